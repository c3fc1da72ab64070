//! The op vocabulary. Every primitive is one [`Op`] variant, and each family module holds, side
//! by side, the parts that define its ops:
//!
//! - the **shape/dtype rule** (`infer`), whose error text names the op and the shapes;
//! - the **reference kernel** (`eval`), which calls into `tracegrad-runtime`;
//! - the **derivative rule** (`vjp`), written against the abstract [`Emitter`], so eager
//!   autograd (which computes) and the AOT autodiff pass (which builds graph nodes) run the very
//!   same rule.
//!
//! Composite ops (softmax-based losses, layer_norm, einsum, …) live in
//! [`crate::composite`] as functions of primitives.

mod index;
mod layout;
mod linalg;
mod nn;
mod pointwise;
mod random;
mod reduce;
mod scatter;

pub(crate) use linalg::torch_type;
pub use pointwise::{BinaryOp, CompareOp, FloatElement, UnaryOp};
pub use random::{dropout, keep_scale, keep_threshold, Distribution};
pub use reduce::{softmax_op, ReduceKind};
pub use scatter::ScatterReduce;

use crate::emitter::Emitter;
use smallvec::SmallVec;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::mem::{discriminant, Discriminant};
use tracegrad_runtime::{Buffer, DType, Data, Dims, ShapeDisplay};

/// The dtype and shape of a value: what the shape rule computes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TensorType {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Dims,
}

impl TensorType {
    /// Builds a type.
    pub fn new(dtype: DType, shape: &[usize]) -> TensorType {
        TensorType { dtype, shape: shape.into() }
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements; panics naming the shape if the product overflows (the graph
    /// validator and the eager ops refuse such shapes first, via `shape::checked_numel`).
    #[track_caller]
    pub fn numel(&self) -> usize {
        tracegrad_runtime::shape::numel(&self.shape)
    }

    /// The type of a buffer.
    pub fn of(b: &Buffer) -> TensorType {
        TensorType::new(b.dtype(), b.shape())
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dtype)?;
        write!(f, "[")?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// A failure to build or differentiate an op: the op's name and a PyTorch-style message that
/// already names the shapes involved.
#[derive(Clone, Debug, PartialEq)]
pub struct OpError {
    /// The op that failed.
    pub op: String,
    /// The full message.
    pub message: String,
}

impl OpError {
    /// An error for `op` with `message` (which should start with the op name).
    pub fn new(op: impl Into<String>, message: impl Into<String>) -> OpError {
        OpError { op: op.into(), message: message.into() }
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OpError {}

/// Result of a shape rule or kernel.
pub type OpResult<T> = Result<T, OpError>;

/// One primitive operation. Operands are positional; attributes are fields.
///
/// Equality and hashing (CSE, the JIT's kernel cache) take floats by their bits, so `0.0` and
/// `-0.0` differ and a NaN equals itself, and literals by dtype, shape and element bits.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// A tensor filled with one value (also how scalars enter a computation).
    Full {
        /// The fill value.
        #[serde(with = "tracegrad_runtime::buffer::json_f64")]
        value: f64,
        /// Element type.
        dtype: DType,
        /// Shape.
        shape: Dims,
    },
    /// A literal tensor.
    Constant(Buffer),
    /// Elementwise unary function of a float tensor.
    Unary(UnaryOp),
    /// Elementwise binary arithmetic with broadcasting; operands share a dtype.
    Binary(BinaryOp),
    /// Elementwise comparison with broadcasting; the result is bool.
    Compare(CompareOp),
    /// `where(cond, a, b)` with broadcasting.
    Where,
    /// Clamp into `[min, max]`; either bound may be absent.
    Clamp {
        /// Lower bound.
        #[serde(with = "tracegrad_runtime::buffer::json_f64::option")]
        min: Option<f64>,
        /// Upper bound.
        #[serde(with = "tracegrad_runtime::buffer::json_f64::option")]
        max: Option<f64>,
    },
    /// Conversion to another dtype.
    Cast(DType),
    /// Identity whose derivative rule passes no gradient (JAX's `stop_gradient`, PyTorch's
    /// `detach` inside a computation).
    StopGradient,
    /// Reduction over `dims` (sorted, unique, non-negative).
    Reduce {
        /// What to compute.
        kind: ReduceKind,
        /// Reduced dimensions.
        dims: Dims,
        /// Keep reduced dimensions with size 1.
        keepdim: bool,
    },
    /// argmax / argmin over one dimension, or over the flattened tensor when `dim` is `None`.
    ArgReduce {
        /// argmin instead of argmax.
        min: bool,
        /// The dimension.
        dim: Option<usize>,
        /// Keep the reduced dimension.
        keepdim: bool,
    },
    /// Softmax (or log-softmax) along `dim`.
    Softmax {
        /// The dimension.
        dim: usize,
        /// log_softmax instead of softmax.
        log: bool,
    },
    /// Batched matrix product with NumPy batch broadcasting; transposes are free.
    MatMul {
        /// Use the transpose of the last two dims of operand 0.
        trans_a: bool,
        /// Use the transpose of the last two dims of operand 1.
        trans_b: bool,
    },
    /// Same data, new shape.
    Reshape(Dims),
    /// Reorders dimensions: output dim `i` is input dim `perm[i]`.
    Permute(Dims),
    /// Broadcast to a larger shape.
    Expand(Dims),
    /// The slice `start..start+len` of dimension `dim`.
    Narrow {
        /// The dimension.
        dim: usize,
        /// First index.
        start: usize,
        /// Length.
        len: usize,
    },
    /// Concatenation along `dim` of all operands.
    Cat {
        /// The dimension.
        dim: usize,
    },
    /// `x.index_select(dim, idx)`.
    IndexSelect {
        /// The dimension.
        dim: usize,
    },
    /// `x.index_add(dim, idx, src)`.
    IndexAdd {
        /// The dimension.
        dim: usize,
    },
    /// `x.gather(dim, idx)`.
    Gather {
        /// The dimension.
        dim: usize,
    },
    /// `x.scatter_add(dim, idx, src)`.
    ScatterAdd {
        /// The dimension.
        dim: usize,
    },
    /// `x.scatter(dim, idx, src)`: `out[p with dim := idx[p]] = src[p]`; with duplicate
    /// indices the last write (in the index's row-major order) wins.
    Scatter {
        /// The dimension.
        dim: usize,
    },
    /// `x.scatter_reduce(dim, idx, src, reduce, include_self)`.
    ScatterReduce {
        /// The dimension.
        dim: usize,
        /// How values landing on one position combine.
        reduce: ScatterReduce,
        /// Whether the destination's own value takes part.
        include_self: bool,
    },
    /// `torch.linalg.vector_norm` over `dims` (sorted, unique, non-negative).
    VectorNorm {
        /// The order: `inf`, `-inf`, `0` or any other `p`.
        #[serde(with = "tracegrad_runtime::buffer::json_f64")]
        ord: f64,
        /// Reduced dimensions.
        dims: Dims,
        /// Keep reduced dimensions with size 1.
        keepdim: bool,
    },
    /// `torch.linalg.det` of a batch of square matrices `[..., n, n]` (LU with partial
    /// pivoting).
    Det,
    /// `torch.linalg.inv` of a batch of square matrices; a singular one is an error.
    Inv,
    /// `torch.linalg.solve(A, B)`: `X` with `A X = B`, for `A: [..., n, n]` and `B: [..., n, k]`
    /// with the same batch dimensions (the composite broadcasts and handles vector `B`).
    Solve,
    /// `torch.linalg.svdvals`: the singular values `[..., k]` of `[..., m, n]`, `k = min(m, n)`,
    /// non-negative and non-increasing.
    SvdVals,
    /// The `U` factor `[..., m, k]` of the reduced SVD (`torch.linalg.svd(A,
    /// full_matrices=False)`).
    SvdU,
    /// The `Vh` factor `[..., k, n]` of the reduced SVD.
    SvdVh,
    /// 2-D convolution, NCHW, no bias (bias is a separate add).
    Conv2d {
        /// Stride.
        stride: [usize; 2],
        /// Zero padding.
        padding: [usize; 2],
    },
    /// Gradient of conv2d w.r.t. its input: operands (grad_out, weight).
    Conv2dGradInput {
        /// Stride.
        stride: [usize; 2],
        /// Padding.
        padding: [usize; 2],
        /// The input's spatial size.
        input_hw: [usize; 2],
    },
    /// Gradient of conv2d w.r.t. its weight: operands (input, grad_out).
    Conv2dGradWeight {
        /// Stride.
        stride: [usize; 2],
        /// Padding.
        padding: [usize; 2],
        /// The kernel's spatial size.
        kernel_hw: [usize; 2],
    },
    /// 2-D max pooling.
    MaxPool2d {
        /// Window.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Padding (with -inf).
        padding: [usize; 2],
    },
    /// Gradient of max pooling: operands (input, grad_out).
    MaxPool2dGrad {
        /// Window.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Padding.
        padding: [usize; 2],
    },
    /// 2-D average pooling.
    AvgPool2d {
        /// Window.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Padding (with zeros).
        padding: [usize; 2],
        /// Whether padded zeros count in the divisor (PyTorch's default: true).
        count_include_pad: bool,
    },
    /// Gradient of average pooling: operand grad_out.
    AvgPool2dGrad {
        /// Window.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Padding.
        padding: [usize; 2],
        /// As in the forward.
        count_include_pad: bool,
        /// The forward input's shape.
        input_shape: Dims,
    },
    /// A counter-based random draw of `shape` (see `ops/random.rs`): operand 0 is the
    /// generator state `[seed, offset]` (`i64[2]`); the draw starts `at` Philox blocks after
    /// `offset`.
    Random {
        /// What each element is.
        dist: Distribution,
        /// Element type (float).
        dtype: DType,
        /// Shape.
        shape: Dims,
        /// Blocks between the state's offset and the draw's start.
        at: u64,
    },
}

impl Op {
    /// The op's name as it appears in errors and dumps.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Full { .. } => "full",
            Op::Constant(_) => "constant",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Where => "where",
            Op::Clamp { .. } => "clamp",
            Op::Cast(_) => "to",
            Op::StopGradient => "stop_gradient",
            Op::Reduce { kind, .. } => kind.name(),
            Op::ArgReduce { min, .. } => {
                if *min {
                    "argmin"
                } else {
                    "argmax"
                }
            }
            Op::Softmax { log, .. } => {
                if *log {
                    "log_softmax"
                } else {
                    "softmax"
                }
            }
            Op::MatMul { .. } => "matmul",
            Op::Reshape(_) => "reshape",
            Op::Permute(_) => "permute",
            Op::Expand(_) => "expand",
            Op::Narrow { .. } => "narrow",
            Op::Cat { .. } => "cat",
            Op::IndexSelect { .. } => "index_select",
            Op::IndexAdd { .. } => "index_add",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::Scatter { .. } => "scatter",
            Op::ScatterReduce { .. } => "scatter_reduce",
            Op::VectorNorm { .. } => "linalg.vector_norm",
            Op::Det => "linalg.det",
            Op::Inv => "linalg.inv",
            Op::Solve => "linalg.solve",
            Op::SvdVals => "linalg.svdvals",
            Op::SvdU => "linalg.svd.U",
            Op::SvdVh => "linalg.svd.Vh",
            Op::Conv2d { .. } => "conv2d",
            Op::Conv2dGradInput { .. } => "conv2d_grad_input",
            Op::Conv2dGradWeight { .. } => "conv2d_grad_weight",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::MaxPool2dGrad { .. } => "max_pool2d_grad",
            Op::AvgPool2d { .. } => "avg_pool2d",
            Op::AvgPool2dGrad { .. } => "avg_pool2d_grad",
            Op::Random { dist: Distribution::Uniform, .. } => "rand",
            Op::Random { dist: Distribution::Normal, .. } => "randn",
            Op::Random { dist: Distribution::DropoutMask { .. }, .. } => "dropout_mask",
        }
    }

    /// Number of operands the op takes, or `None` for variadic ops (cat).
    pub fn arity(&self) -> Option<usize> {
        Some(match self {
            Op::Full { .. } | Op::Constant(_) => 0,
            Op::Unary(_)
            | Op::Clamp { .. }
            | Op::Cast(_)
            | Op::StopGradient
            | Op::Reduce { .. }
            | Op::ArgReduce { .. } => 1,
            Op::Softmax { .. } | Op::Reshape(_) | Op::Permute(_) | Op::Expand(_) | Op::Narrow { .. } => 1,
            Op::MaxPool2d { .. } | Op::AvgPool2d { .. } | Op::AvgPool2dGrad { .. } => 1,
            Op::VectorNorm { .. } | Op::Det | Op::Inv | Op::Random { .. } => 1,
            Op::Solve => 2,
            Op::SvdVals | Op::SvdU | Op::SvdVh => 1,
            Op::Scatter { .. } | Op::ScatterReduce { .. } => 3,
            Op::Binary(_) | Op::Compare(_) | Op::MatMul { .. } | Op::IndexSelect { .. } | Op::Gather { .. } => 2,
            Op::Conv2d { .. } | Op::Conv2dGradInput { .. } | Op::Conv2dGradWeight { .. } => 2,
            Op::MaxPool2dGrad { .. } => 2,
            Op::Where | Op::IndexAdd { .. } | Op::ScatterAdd { .. } => 3,
            Op::Cat { .. } => return None,
        })
    }

    /// The shape/dtype rule: the output type for these operand types, or a PyTorch-style error.
    pub fn infer(&self, inputs: &[TensorType]) -> OpResult<TensorType> {
        if let Some(n) = self.arity() {
            if inputs.len() != n {
                return Err(self.error(format!("{}: expected {n} operands, got {}", self.name(), inputs.len())));
            }
        } else if inputs.is_empty() {
            return Err(self.error(format!("{}: expected a non-empty list of Tensors", self.name())));
        }
        // The rules below compute sizes in usize: a shape whose element count does not fit
        // is refused before any rule sees it (and no rule may produce one).
        if let Some(t) = inputs.iter().find(|t| checked_numel(&t.shape).is_none()) {
            return Err(self.error(format!("{}: operand shape {} has too many elements", self.name(), sh(&t.shape))));
        }
        let r = match self {
            Op::Full { dtype, shape, .. } => Ok(TensorType { dtype: *dtype, shape: shape.clone() }),
            Op::Constant(b) if checked_numel(b.shape()) != Some(b.numel()) => {
                Err(format!("constant: shape {} does not match its {} elements", sh(b.shape()), b.numel()))
            }
            Op::Constant(b) => Ok(TensorType::of(b)),
            Op::StopGradient => Ok(inputs[0].clone()),
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Clamp { .. } | Op::Cast(_) => {
                pointwise::infer(self, inputs)
            }
            Op::Reduce { .. } | Op::ArgReduce { .. } | Op::Softmax { .. } => reduce::infer(self, inputs),
            Op::MatMul { .. } => linalg::infer(self, inputs),
            Op::Reshape(_) | Op::Permute(_) | Op::Expand(_) | Op::Narrow { .. } | Op::Cat { .. } => {
                layout::infer(self, inputs)
            }
            Op::IndexSelect { .. } | Op::IndexAdd { .. } | Op::Gather { .. } | Op::ScatterAdd { .. } => {
                index::infer(self, inputs)
            }
            Op::Scatter { .. } | Op::ScatterReduce { .. } => scatter::infer(self, inputs),
            Op::Random { .. } => random::infer(self, inputs),
            Op::VectorNorm { .. } | Op::Det | Op::Inv | Op::Solve | Op::SvdVals | Op::SvdU | Op::SvdVh => {
                linalg::infer_ext(self, inputs)
            }
            _ => nn::infer(self, inputs),
        };
        match r {
            Ok(t) if checked_numel(&t.shape).is_none() => {
                Err(self.error(format!("{}: result shape {} has too many elements", self.name(), sh(&t.shape))))
            }
            r => r.map_err(|m| self.error(m)),
        }
    }

    /// The reference kernel: computes the output from operand buffers whose types passed
    /// `infer` (giving `out`). Data-dependent failures (an index out of range) are errors.
    pub fn eval(&self, inputs: &[&Buffer], out: &TensorType) -> OpResult<Buffer> {
        if matches!(self, Op::VectorNorm { .. } | Op::Det | Op::Inv | Op::Solve | Op::SvdVals | Op::SvdU | Op::SvdVh) {
            // Their messages are PyTorch's whole texts (`torch.linalg.solve: ...`).
            return linalg::eval_ext(self, inputs);
        }
        let r = match self {
            Op::Full { value, dtype, shape } => Ok(Buffer::full(*value, *dtype, shape)),
            Op::Constant(b) => Ok(b.clone()),
            Op::StopGradient => Ok(inputs[0].clone()),
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Clamp { .. } | Op::Cast(_) => {
                Ok(pointwise::eval(self, inputs, out))
            }
            Op::Reduce { .. } | Op::ArgReduce { .. } | Op::Softmax { .. } => Ok(reduce::eval(self, inputs, out)),
            Op::MatMul { trans_a, trans_b } => {
                Ok(tracegrad_runtime::kernels::matmul::matmul(inputs[0], inputs[1], *trans_a, *trans_b))
            }
            Op::Reshape(_) | Op::Permute(_) | Op::Expand(_) | Op::Narrow { .. } | Op::Cat { .. } => {
                Ok(layout::eval(self, inputs, out))
            }
            Op::IndexSelect { .. } | Op::IndexAdd { .. } | Op::Gather { .. } | Op::ScatterAdd { .. } => {
                index::eval(self, inputs)
            }
            Op::Scatter { .. } | Op::ScatterReduce { .. } => scatter::eval(self, inputs),
            Op::Random { .. } => random::eval(self, inputs, out),
            _ => Ok(nn::eval(self, inputs, out)),
        };
        r.map_err(|m| self.error(format!("{}: {m}", self.name())))
    }

    /// The derivative rule: given the operands, the output and the gradient of the output,
    /// emits the gradient of each operand (`None` where an operand takes no gradient, e.g. an
    /// index). Ops without a rule return an error; they never yield a silent zero.
    pub fn vjp<E: Emitter>(
        &self,
        e: &mut E,
        inputs: &[&E::Value],
        output: &E::Value,
        grad: &E::Value,
    ) -> OpResult<Vec<Option<E::Value>>> {
        match self {
            Op::Full { .. } | Op::Constant(_) => Ok(vec![]),
            Op::StopGradient => Ok(vec![None]),
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Clamp { .. } | Op::Cast(_) => {
                pointwise::vjp(self, e, inputs, output, grad)
            }
            Op::Reduce { .. } | Op::ArgReduce { .. } | Op::Softmax { .. } => reduce::vjp(self, e, inputs, output, grad),
            Op::MatMul { .. } => linalg::vjp(self, e, inputs, grad, [true, true]),
            Op::Reshape(_) | Op::Permute(_) | Op::Expand(_) | Op::Narrow { .. } | Op::Cat { .. } => {
                layout::vjp(self, e, inputs, grad)
            }
            Op::IndexSelect { .. } | Op::IndexAdd { .. } | Op::Gather { .. } | Op::ScatterAdd { .. } => {
                index::vjp(self, e, inputs, grad)
            }
            Op::Scatter { .. } | Op::ScatterReduce { .. } => scatter::vjp(self, e, inputs, output, grad),
            Op::Random { .. } => random::vjp::<E>(self),
            Op::VectorNorm { .. } | Op::Det | Op::Inv | Op::Solve | Op::SvdVals | Op::SvdU | Op::SvdVh => {
                linalg::vjp_ext(self, e, inputs, output, grad)
            }
            _ => nn::vjp(self, e, inputs, grad),
        }
    }

    /// [`Op::vjp`] computing only the gradients `needs` asks for (one flag per input; the
    /// others come back `None`): eager mode's backward skips the products that a compiled
    /// plan's dead-code elimination drops, such as a first layer's input gradient or a masked
    /// fill's value. The products (matmul, conv) and `where` take the mask; other ops'
    /// gradients are cheap and computed whole.
    pub fn vjp_for<E: Emitter>(
        &self,
        e: &mut E,
        inputs: &[&E::Value],
        output: &E::Value,
        grad: &E::Value,
        needs: &[bool],
    ) -> OpResult<Vec<Option<E::Value>>> {
        let two = |i: usize| needs.get(i).copied().unwrap_or(true);
        match self {
            Op::MatMul { .. } => linalg::vjp(self, e, inputs, grad, [two(0), two(1)]),
            Op::Conv2d { .. } => nn::conv2d_vjp(self, e, inputs, grad, [two(0), two(1)]),
            Op::Where => pointwise::where_vjp(e, inputs, grad, [two(1), two(2)]),
            _ => self.vjp(e, inputs, output, grad),
        }
    }

    /// The properties the passes read (fusion class, recompute cost, failure, folding).
    fn props(&self) -> Props {
        match self {
            Op::Full { .. } => Props { cheap: true, ..Props::NONE },
            Op::Constant(_) => Props::NONE,
            Op::StopGradient => Props { elementwise: true, preserves_uniform: true, ..Props::NONE },
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Clamp { .. } | Op::Cast(_) => {
                pointwise::props(self)
            }
            Op::Reduce { .. } | Op::ArgReduce { .. } | Op::Softmax { .. } => reduce::props(self),
            Op::MatMul { .. }
            | Op::VectorNorm { .. }
            | Op::Det
            | Op::Inv
            | Op::Solve
            | Op::SvdVals
            | Op::SvdU
            | Op::SvdVh => linalg::props(self),
            Op::Reshape(_) | Op::Permute(_) | Op::Expand(_) | Op::Narrow { .. } | Op::Cat { .. } => layout::props(self),
            Op::IndexSelect { .. } | Op::IndexAdd { .. } | Op::Gather { .. } | Op::ScatterAdd { .. } => {
                index::props(self)
            }
            Op::Scatter { .. } | Op::ScatterReduce { .. } => scatter::props(self),
            Op::Random { .. } => random::props(self),
            _ => nn::props(self),
        }
    }

    /// Whether output element `i` depends only on element `i` of each (broadcast) operand, so
    /// that the op can join a pointwise fusion group.
    pub fn is_elementwise(&self) -> bool {
        self.props().elementwise
    }

    /// Whether recomputing the op in the backward is cheaper than saving its output
    /// (rematerialisation in partitioning).
    pub fn cheap_to_recompute(&self) -> bool {
        self.props().cheap
    }

    /// Whether evaluating the op on well-typed operands can fail at run time (an index out of
    /// range, a singular matrix).
    pub fn is_fallible(&self) -> bool {
        self.props().fallible
    }

    /// Whether uniform (`Full`) operands give a uniform result, so constant folding can keep a
    /// `Full` at any size: elementwise ops (evaluate once on scalars) and the layout ops that
    /// only move elements around (the value passes through).
    pub fn preserves_uniform(&self) -> bool {
        self.props().preserves_uniform
    }

    /// Whether the JIT can compute the op inside a fused kernel, given the dtypes of its
    /// operands and of its output.
    pub fn jit_lowerable(&self, operand_dtypes: &[DType], out: DType) -> bool {
        match self {
            Op::StopGradient => jit_float(out),
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Clamp { .. } | Op::Cast(_) => {
                pointwise::jit_lowerable(self, operand_dtypes, out)
            }
            Op::Reduce { .. } | Op::ArgReduce { .. } | Op::Softmax { .. } => {
                reduce::jit_lowerable(self, operand_dtypes, out)
            }
            Op::Random { .. } => random::jit_lowerable(self, out),
            _ => false,
        }
    }

    /// The op's fusion class: for a row op (one that reduces, or normalises over, the trailing
    /// dims of its first operand, whose shape is `input`), the row length; `None` otherwise.
    /// Fusion builds row kernels around such ops.
    pub fn row_length(&self, input: &[usize]) -> Option<usize> {
        match self {
            Op::Reduce { .. } | Op::ArgReduce { .. } | Op::Softmax { .. } => reduce::row_length(self, input),
            _ => None,
        }
    }

    /// An error attributed to this op.
    pub fn error(&self, message: impl Into<String>) -> OpError {
        OpError::new(self.name(), message)
    }

    /// The error for an op that has no derivative rule.
    pub fn no_derivative(&self) -> OpError {
        self.error(format!("the derivative for '{}' is not implemented", self.name()))
    }
}

/// What identifies an op apart from a literal's data: its variant, the variant of a unary
/// function, and every attribute as a word (floats by their bits).
#[derive(PartialEq, Eq, Hash)]
struct OpKey {
    variant: Discriminant<Op>,
    unary: Option<Discriminant<UnaryOp>>,
    words: SmallVec<[u64; 8]>,
}

impl Op {
    fn key(&self) -> OpKey {
        let mut w: SmallVec<[u64; 8]> = SmallVec::new();
        let dims = |w: &mut SmallVec<[u64; 8]>, d: &[usize]| {
            w.push(d.len() as u64);
            w.extend(d.iter().map(|&x| x as u64));
        };
        let opt_bits = |x: &Option<f64>| x.map_or(u64::MAX, f64::to_bits);
        let mut unary = None;
        match self {
            Op::Full { value, dtype, shape } => {
                w.extend([value.to_bits(), *dtype as u64]);
                dims(&mut w, shape);
            }
            Op::Constant(b) => {
                w.push(b.dtype() as u64);
                dims(&mut w, b.shape());
            }
            Op::Unary(u) => {
                unary = Some(discriminant(u));
                w.push(u.attr_bits());
            }
            Op::Binary(b) => w.push(*b as u64),
            Op::Compare(c) => w.push(*c as u64),
            // `None` and `Some(x)` differ in the variant word; MAX is only padding.
            Op::Clamp { min, max } => {
                w.extend([min.is_some() as u64, opt_bits(min), max.is_some() as u64, opt_bits(max)])
            }
            Op::Cast(d) => w.push(*d as u64),
            Op::Where | Op::StopGradient | Op::Det | Op::Inv | Op::Solve | Op::SvdVals | Op::SvdU | Op::SvdVh => {}
            Op::Reduce { kind, dims: d, keepdim } => {
                w.extend([*kind as u64, *keepdim as u64]);
                dims(&mut w, d);
            }
            Op::ArgReduce { min, dim, keepdim } => {
                w.extend([*min as u64, dim.is_some() as u64, dim.unwrap_or(0) as u64, *keepdim as u64])
            }
            Op::Softmax { dim, log } => w.extend([*dim as u64, *log as u64]),
            Op::MatMul { trans_a, trans_b } => w.extend([*trans_a as u64, *trans_b as u64]),
            Op::Reshape(d) | Op::Permute(d) | Op::Expand(d) => dims(&mut w, d),
            Op::Narrow { dim, start, len } => w.extend([*dim as u64, *start as u64, *len as u64]),
            Op::Cat { dim }
            | Op::IndexSelect { dim }
            | Op::IndexAdd { dim }
            | Op::Gather { dim }
            | Op::ScatterAdd { dim }
            | Op::Scatter { dim } => w.push(*dim as u64),
            Op::ScatterReduce { dim, reduce, include_self } => {
                w.extend([*dim as u64, *reduce as u64, *include_self as u64])
            }
            Op::VectorNorm { ord, dims: d, keepdim } => {
                w.extend([ord.to_bits(), *keepdim as u64]);
                dims(&mut w, d);
            }
            Op::Conv2d { stride, padding } => dims(&mut w, &[stride[0], stride[1], padding[0], padding[1]]),
            Op::Conv2dGradInput { stride, padding, input_hw: hw }
            | Op::Conv2dGradWeight { stride, padding, kernel_hw: hw } => {
                dims(&mut w, &[stride[0], stride[1], padding[0], padding[1], hw[0], hw[1]])
            }
            Op::MaxPool2d { kernel, stride, padding } | Op::MaxPool2dGrad { kernel, stride, padding } => {
                dims(&mut w, &[kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]])
            }
            Op::AvgPool2d { kernel, stride, padding, count_include_pad } => {
                w.push(*count_include_pad as u64);
                dims(&mut w, &[kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]]);
            }
            Op::AvgPool2dGrad { kernel, stride, padding, count_include_pad, input_shape } => {
                w.push(*count_include_pad as u64);
                dims(&mut w, &[kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1]]);
                dims(&mut w, input_shape);
            }
            Op::Random { dist, dtype, shape, at } => {
                w.extend(dist.code());
                w.extend([*dtype as u64, *at]);
                dims(&mut w, shape);
            }
        }
        OpKey { variant: discriminant(self), unary, words: w }
    }
}

impl PartialEq for Op {
    fn eq(&self, other: &Op) -> bool {
        self.key() == other.key()
            && match (self, other) {
                (Op::Constant(a), Op::Constant(b)) => literal_bits_eq(a, b),
                _ => true,
            }
    }
}

impl Eq for Op {}

impl Hash for Op {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
        if let Op::Constant(b) = self {
            hash_literal_bits(b, state);
        }
    }
}

/// Whether two literals (whose dtypes and shapes match) hold the same element bits.
fn literal_bits_eq(a: &Buffer, b: &Buffer) -> bool {
    match (a.data(), b.data()) {
        (Data::F32(x), Data::F32(y)) => x.iter().map(|v| v.to_bits()).eq(y.iter().map(|v| v.to_bits())),
        (Data::F64(x), Data::F64(y)) => x.iter().map(|v| v.to_bits()).eq(y.iter().map(|v| v.to_bits())),
        (x, y) => x == y,
    }
}

fn hash_literal_bits<H: Hasher>(b: &Buffer, state: &mut H) {
    match b.data() {
        Data::Bool(v) => v.hash(state),
        Data::U8(v) => v.hash(state),
        Data::I64(v) => v.hash(state),
        Data::F32(v) => v.iter().for_each(|x| x.to_bits().hash(state)),
        Data::F64(v) => v.iter().for_each(|x| x.to_bits().hash(state)),
    }
}

/// An op's properties beyond shape rule, kernel and derivative; each family module says which
/// of its ops have which.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Props {
    /// See [`Op::is_elementwise`].
    pub elementwise: bool,
    /// See [`Op::cheap_to_recompute`].
    pub cheap: bool,
    /// See [`Op::is_fallible`].
    pub fallible: bool,
    /// See [`Op::preserves_uniform`].
    pub preserves_uniform: bool,
}

impl Props {
    /// None of the properties.
    pub const NONE: Props = Props { elementwise: false, cheap: false, fallible: false, preserves_uniform: false };
}

/// The dtypes the JIT's kernels compute in.
pub(crate) fn jit_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F64)
}

/// The element count of `shape`, or `None` when it overflows `usize`.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Formats a shape for messages.
pub(crate) fn sh(s: &[usize]) -> ShapeDisplay<'_> {
    ShapeDisplay(s)
}

/// Requires a floating dtype, with the op's name in the message.
pub(crate) fn require_float(op: &str, t: &TensorType) -> Result<(), String> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("{op}: expected a floating-point tensor, got {} of shape {}", t.dtype, sh(&t.shape)))
    }
}

/// Requires two operands of one dtype.
pub(crate) fn require_same_dtype(op: &str, a: &TensorType, b: &TensorType) -> Result<(), String> {
    if a.dtype == b.dtype {
        Ok(())
    } else {
        Err(format!(
            "{op}: expected both operands to have the same dtype, but got {} {} and {} {}",
            a.dtype,
            sh(&a.shape),
            b.dtype,
            sh(&b.shape)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_follow_the_op_family() {
        let add = Op::Binary(BinaryOp::Add);
        assert!(add.is_elementwise() && add.cheap_to_recompute() && !add.is_fallible() && add.preserves_uniform());
        assert!(Op::StopGradient.is_elementwise() && !Op::StopGradient.cheap_to_recompute());
        let reshape = Op::Reshape(Dims::from_slice(&[2]));
        assert!(!reshape.is_elementwise() && reshape.cheap_to_recompute() && reshape.preserves_uniform());
        assert!(
            Op::Gather { dim: 0 }.is_fallible()
                && Op::Inv.is_fallible()
                && !Op::VectorNorm { ord: 2.0, dims: Dims::new(), keepdim: false }.is_fallible()
        );
        let softmax = Op::Softmax { dim: 0, log: false };
        assert!(!softmax.is_elementwise() && !softmax.is_fallible());
    }

    #[test]
    fn jit_lowerable_needs_float_operands() {
        use DType::{Bool, F32, F64, I64};
        let add = Op::Binary(BinaryOp::Add);
        assert!(add.jit_lowerable(&[F32, F32], F32));
        assert!(!add.jit_lowerable(&[I64, I64], I64));
        assert!(!Op::Binary(BinaryOp::Pow).jit_lowerable(&[F32, F32], F32));
        assert!(Op::Where.jit_lowerable(&[Bool, F64, F64], F64));
        assert!(!Op::Where.jit_lowerable(&[F64, F64, F64], F64));
        assert!(Op::Cast(F32).jit_lowerable(&[Bool], F32) && !Op::Cast(F32).jit_lowerable(&[F64], F32));
        assert!(Op::Cast(Bool).jit_lowerable(&[F64], Bool));
        assert!(!Op::MatMul { trans_a: false, trans_b: false }.jit_lowerable(&[F32, F32], F32));
    }

    fn hash_of(op: &Op) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        op.hash(&mut h);
        h.finish()
    }

    #[test]
    fn equality_and_hash_take_floats_by_bits() {
        let full = |value: f64| Op::Full { value, dtype: DType::F32, shape: Dims::from_slice(&[2]) };
        assert_ne!(full(0.0), full(-0.0));
        assert_eq!(full(f64::NAN), full(f64::NAN));
        assert_eq!(hash_of(&full(f64::NAN)), hash_of(&full(f64::NAN)));
        let pow = |p: f64| Op::Unary(UnaryOp::PowScalar(p));
        assert_eq!(pow(2.0), pow(2.0));
        assert_ne!(pow(2.0), pow(3.0));
        assert_ne!(Op::Unary(UnaryOp::Exp), Op::Unary(UnaryOp::Log));
        assert_ne!(Op::Clamp { min: Some(0.0), max: None }, Op::Clamp { min: None, max: Some(0.0) });
        let lit = |v: Vec<f32>| Op::Constant(Buffer::from_vec(v, &[2]));
        assert_eq!(lit(vec![1.0, f32::NAN]), lit(vec![1.0, f32::NAN]));
        assert_eq!(hash_of(&lit(vec![1.0, 2.0])), hash_of(&lit(vec![1.0, 2.0])));
        assert_ne!(lit(vec![0.0, 1.0]), lit(vec![-0.0, 1.0]));
        assert_ne!(lit(vec![1.0, 2.0]), Op::Constant(Buffer::from_vec(vec![1.0f32, 2.0], &[2, 1])));
        assert_ne!(Op::Reshape(Dims::from_slice(&[2])), Op::Expand(Dims::from_slice(&[2])));
    }
}
