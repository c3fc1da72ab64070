//! The eager op API on [`Tensor`]. Every method is a thin call into the op definitions of
//! `tracegrad-compiler` (primitives or composites) through the [`Eager`](crate::Eager) emitter; misuse
//! panics with PyTorch's message naming the op and the shapes.

use std::ops::{Add, Div, Mul, Neg, Sub};

use tracegrad_compiler::composite::{self as c, LossReduction};
use tracegrad_compiler::einsum;
use tracegrad_compiler::ops::{BinaryOp, CompareOp, Distribution, ReduceKind, UnaryOp};
use tracegrad_compiler::{Build, Emitter, Op};
use tracegrad_runtime::{Buffer, DType, Generator, ShapeDisplay};

use crate::autograd::{eager, is_grad_enabled};
use crate::tensor::{eager_ok, Tensor};

macro_rules! unary_methods {
    ($($(#[$doc:meta])* $name:ident => $op:expr;)*) => {
        impl Tensor {
            $(
                $(#[$doc])*
                #[track_caller]
                pub fn $name(&self) -> Tensor {
                    eager(|e| e.unary($op, self))
                }
            )*
        }
    };
}

/// Unary ops whose reference kernel calls a scalar transcendental per element: on a large
/// input the eager call runs the JIT's compiled kernel instead (`crate::eager_kernels`).
macro_rules! fused_unary_methods {
    ($($(#[$doc:meta])* $name:ident => $op:expr;)*) => {
        impl Tensor {
            $(
                $(#[$doc])*
                #[track_caller]
                pub fn $name(&self) -> Tensor {
                    // A call that records no gradient runs the full-width vector math in the
                    // eager emitter (`tracegrad_jit::lanes`, the JIT's math bit for bit); one
                    // that does takes the compiled kernel, whose backward is fused.
                    let lanes = tracegrad_jit::lanes::Func::of($op).is_some()
                        && self.dtype() == tracegrad_runtime::DType::F32
                        && !(self.requires_grad() && crate::autograd::is_grad_enabled());
                    if !lanes {
                        if let Some(y) =
                            crate::eager_kernels::run(stringify!($name), String::new, &[self], &|t| t[0].$name())
                        {
                            return y;
                        }
                    }
                    eager(|e| e.unary($op, self))
                }
            )*
        }
    };
}

unary_methods! {
    /// `-x`.
    neg => UnaryOp::Neg;
    /// `|x|`.
    abs => UnaryOp::Abs;
    /// Sign: -1, 0 or 1.
    sign => UnaryOp::Sign;
    /// Square root.
    sqrt => UnaryOp::Sqrt;
    /// `1/sqrt(x)`.
    rsqrt => UnaryOp::Rsqrt;
    /// `x²`.
    square => UnaryOp::Square;
    /// `1/x`.
    reciprocal => UnaryOp::Reciprocal;
}

fused_unary_methods! {
    /// `max(x, 0)`.
    relu => UnaryOp::Relu;
    /// `e^x`.
    exp => UnaryOp::Exp;
    /// Natural logarithm.
    log => UnaryOp::Log;
    /// Sine.
    sin => UnaryOp::Sin;
    /// Cosine.
    cos => UnaryOp::Cos;
    /// Hyperbolic tangent.
    tanh => UnaryOp::Tanh;
    /// Logistic sigmoid.
    sigmoid => UnaryOp::Sigmoid;
    /// Exact (erf) GELU.
    gelu => UnaryOp::Gelu;
    /// GELU, tanh approximation (`approximate='tanh'`).
    gelu_tanh => UnaryOp::GeluTanh;
    /// SiLU / swish: `x·sigmoid(x)`.
    silu => UnaryOp::Silu;
    /// Error function.
    erf => UnaryOp::Erf;
}

macro_rules! binary_methods {
    ($($(#[$doc:meta])* $name:ident, $scalar:ident => $op:expr;)*) => {
        impl Tensor {
            $(
                $(#[$doc])*
                #[track_caller]
                pub fn $name(&self, other: &Tensor) -> Tensor {
                    eager(|e| if $op == BinaryOp::Div { e.div(self, other) } else { e.binary($op, self, other) })
                }

                /// The same with a number, taken in this tensor's dtype (a float number turns an
                /// integer tensor into f32, as PyTorch's type promotion does).
                #[track_caller]
                pub fn $scalar(&self, v: f64) -> Tensor {
                    let s = self.scalar_like(v);
                    self.$name(&s)
                }
            )*
        }
    };
}

binary_methods! {
    /// `self + other`, broadcasting.
    add, add_scalar => BinaryOp::Add;
    /// `self - other`, broadcasting.
    sub, sub_scalar => BinaryOp::Sub;
    /// `self * other`, broadcasting.
    mul, mul_scalar => BinaryOp::Mul;
    /// `self / other` (true division), broadcasting.
    div, div_scalar => BinaryOp::Div;
    /// Elementwise maximum.
    maximum, maximum_scalar => BinaryOp::Maximum;
    /// Elementwise minimum.
    minimum, minimum_scalar => BinaryOp::Minimum;
    /// `self ^ other`.
    pow_tensor, pow_scalar_tensor => BinaryOp::Pow;
}

macro_rules! compare_methods {
    ($($(#[$doc:meta])* $name:ident, $scalar:ident => $op:expr;)*) => {
        impl Tensor {
            $(
                $(#[$doc])*
                #[track_caller]
                pub fn $name(&self, other: &Tensor) -> Tensor {
                    eager(|e| e.compare($op, self, other))
                }

                /// The same against a number.
                #[track_caller]
                pub fn $scalar(&self, v: f64) -> Tensor {
                    let s = self.scalar_like(v);
                    self.$name(&s)
                }
            )*
        }
    };
}

compare_methods! {
    /// `self == other` (bool).
    eq, eq_scalar => CompareOp::Eq;
    /// `self != other` (bool).
    ne, ne_scalar => CompareOp::Ne;
    /// `self < other` (bool).
    lt, lt_scalar => CompareOp::Lt;
    /// `self <= other` (bool).
    le, le_scalar => CompareOp::Le;
    /// `self > other` (bool).
    gt, gt_scalar => CompareOp::Gt;
    /// `self >= other` (bool).
    ge, ge_scalar => CompareOp::Ge;
}

impl Tensor {
    /// A 0-d tensor holding `v` in this tensor's dtype, or f32 when `v` is fractional and this
    /// tensor is not floating.
    fn scalar_like(&self, v: f64) -> Tensor {
        let d = self.dtype();
        let d = if d.is_float() || v.fract() == 0.0 { d } else { DType::F32 };
        Tensor::full_dtype(&[], v, d)
    }

    /// `x^p` for a number `p`.
    #[track_caller]
    pub fn pow(&self, p: f64) -> Tensor {
        eager(|e| e.unary(UnaryOp::PowScalar(p), self))
    }

    /// Conversion to `dtype` (`tensor.to(dtype)`).
    #[track_caller]
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        eager(|e| e.cast(self, dtype))
    }

    /// `torch.where(cond, a, b)`.
    #[track_caller]
    pub fn where_cond(cond: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
        eager(|e| e.where_(cond, a, b))
    }

    /// `clamp(min, max)`.
    #[track_caller]
    pub fn clamp(&self, min: Option<f64>, max: Option<f64>) -> Tensor {
        eager(|e| c::clamp(e, self, min, max))
    }

    /// `self + value·t1·t2`.
    #[track_caller]
    pub fn addcmul(&self, t1: &Tensor, t2: &Tensor, value: f64) -> Tensor {
        eager(|e| c::addcmul(e, self, t1, t2, value))
    }

    /// `self + value·t1/t2`.
    #[track_caller]
    pub fn addcdiv(&self, t1: &Tensor, t2: &Tensor, value: f64) -> Tensor {
        eager(|e| c::addcdiv(e, self, t1, t2, value))
    }

    /// Fills positions where `mask` is true with `value`.
    #[track_caller]
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Tensor {
        eager(|e| c::masked_fill(e, self, mask, value))
    }

    /// Sum over `dims` (`&[]` for all).
    #[track_caller]
    pub fn sum(&self, dims: &[isize], keepdim: bool) -> Tensor {
        eager(|e| e.sum(self, dims, keepdim))
    }

    /// Sum of all elements.
    #[track_caller]
    pub fn sum_all(&self) -> Tensor {
        self.sum(&[], false)
    }

    /// Mean over `dims` (`&[]` for all).
    #[track_caller]
    pub fn mean(&self, dims: &[isize], keepdim: bool) -> Tensor {
        eager(|e| c::mean(e, self, dims, keepdim))
    }

    /// Mean of all elements.
    #[track_caller]
    pub fn mean_all(&self) -> Tensor {
        self.mean(&[], false)
    }

    /// Variance over `dims` (`&[]` for all) with `correction` (1 = unbiased).
    #[track_caller]
    pub fn var(&self, dims: &[isize], correction: usize, keepdim: bool) -> Tensor {
        eager(|e| c::var(e, self, dims, correction, keepdim))
    }

    /// Maximum over `dims` (`&[]` for all); ties share the gradient.
    #[track_caller]
    pub fn amax(&self, dims: &[isize], keepdim: bool) -> Tensor {
        let all: Vec<isize> = (0..self.dim() as isize).collect();
        eager(|e| e.reduce(ReduceKind::Max, self, if dims.is_empty() { &all } else { dims }, keepdim))
    }

    /// Minimum over `dims` (`&[]` for all).
    #[track_caller]
    pub fn amin(&self, dims: &[isize], keepdim: bool) -> Tensor {
        let all: Vec<isize> = (0..self.dim() as isize).collect();
        eager(|e| e.reduce(ReduceKind::Min, self, if dims.is_empty() { &all } else { dims }, keepdim))
    }

    /// Largest element.
    #[track_caller]
    pub fn max(&self) -> Tensor {
        self.amax(&[], false)
    }

    /// Smallest element.
    #[track_caller]
    pub fn min(&self) -> Tensor {
        self.amin(&[], false)
    }

    /// `max(dim)`: (values, indices).
    #[track_caller]
    pub fn max_dim(&self, dim: isize, keepdim: bool) -> (Tensor, Tensor) {
        eager(|e| c::max_dim(e, self, dim, keepdim, false))
    }

    /// `min(dim)`: (values, indices).
    #[track_caller]
    pub fn min_dim(&self, dim: isize, keepdim: bool) -> (Tensor, Tensor) {
        eager(|e| c::max_dim(e, self, dim, keepdim, true))
    }

    /// Index of the maximum over `dim` (flattened when `None`).
    #[track_caller]
    pub fn argmax(&self, dim: Option<isize>, keepdim: bool) -> Tensor {
        eager(|e| c::arg_reduce(e, self, dim, keepdim, false))
    }

    /// Index of the minimum over `dim` (flattened when `None`).
    #[track_caller]
    pub fn argmin(&self, dim: Option<isize>, keepdim: bool) -> Tensor {
        eager(|e| c::arg_reduce(e, self, dim, keepdim, true))
    }

    /// Whether all elements (over `dims`, `&[]` for all) are non-zero.
    #[track_caller]
    pub fn all(&self, dims: &[isize], keepdim: bool) -> Tensor {
        let all: Vec<isize> = (0..self.dim() as isize).collect();
        eager(|e| e.reduce(ReduceKind::All, self, if dims.is_empty() { &all } else { dims }, keepdim))
    }

    /// Whether any element (over `dims`, `&[]` for all) is non-zero.
    #[track_caller]
    pub fn any(&self, dims: &[isize], keepdim: bool) -> Tensor {
        let all: Vec<isize> = (0..self.dim() as isize).collect();
        eager(|e| e.reduce(ReduceKind::Any, self, if dims.is_empty() { &all } else { dims }, keepdim))
    }

    /// `log(sum(exp(x)))` over `dims`, stable for large inputs.
    #[track_caller]
    pub fn logsumexp(&self, dims: &[isize], keepdim: bool) -> Tensor {
        let params = || format!("{dims:?} {keepdim}");
        if let Some(y) = crate::eager_kernels::run("logsumexp", params, &[self], &|t| t[0].logsumexp(dims, keepdim)) {
            return y;
        }
        eager(|e| c::logsumexp(e, self, dims, keepdim))
    }

    /// Softmax along `dim`.
    #[track_caller]
    pub fn softmax(&self, dim: isize) -> Tensor {
        if let Some(y) = crate::eager_kernels::run("softmax", || dim.to_string(), &[self], &|t| t[0].softmax(dim)) {
            return y;
        }
        eager(|e| c::softmax(e, self, dim))
    }

    /// Log-softmax along `dim`.
    #[track_caller]
    pub fn log_softmax(&self, dim: isize) -> Tensor {
        if let Some(y) =
            crate::eager_kernels::run("log_softmax", || dim.to_string(), &[self], &|t| t[0].log_softmax(dim))
        {
            return y;
        }
        eager(|e| c::log_softmax(e, self, dim))
    }

    /// `matmul` with 1-D promotion and batch broadcasting.
    #[track_caller]
    pub fn matmul(&self, other: &Tensor) -> Tensor {
        eager(|e| c::matmul(e, self, other))
    }

    /// 3-D batched matmul.
    #[track_caller]
    pub fn bmm(&self, other: &Tensor) -> Tensor {
        eager(|e| c::bmm(e, self, other))
    }

    /// `beta·self + alpha·(m1 @ m2)`.
    #[track_caller]
    pub fn addmm(&self, m1: &Tensor, m2: &Tensor, beta: f64, alpha: f64) -> Tensor {
        eager(|e| c::addmm(e, self, m1, m2, beta, alpha))
    }

    /// `torch.einsum(equation, operands)`.
    #[track_caller]
    pub fn einsum(equation: &str, operands: &[&Tensor]) -> Tensor {
        eager(|e| einsum::einsum(e, equation, operands))
    }

    /// Reshape; one dimension may be `-1`.
    #[track_caller]
    pub fn reshape(&self, shape: &[isize]) -> Tensor {
        eager(|e| c::reshape_infer(e, self, shape))
    }

    /// Alias of [`reshape`](Self::reshape) (tracegrad's views copy or share as documented).
    #[track_caller]
    pub fn view(&self, shape: &[isize]) -> Tensor {
        self.reshape(shape)
    }

    /// Reorders dimensions.
    #[track_caller]
    pub fn permute(&self, dims: &[isize]) -> Tensor {
        eager(|e| c::permute(e, self, dims))
    }

    /// Swaps two dimensions.
    #[track_caller]
    pub fn transpose(&self, a: isize, b: isize) -> Tensor {
        eager(|e| c::swapdims(e, self, a, b))
    }

    /// Alias of [`transpose`](Self::transpose).
    #[track_caller]
    pub fn swapdims(&self, a: isize, b: isize) -> Tensor {
        self.transpose(a, b)
    }

    /// Transpose of a matrix (`.t()`; vectors are returned as they are).
    #[track_caller]
    pub fn t(&self) -> Tensor {
        if self.dim() < 2 {
            return self.clone();
        }
        assert!(self.dim() == 2, "t() expects a tensor with <= 2 dimensions, but self is {}D", self.dim());
        self.transpose(0, 1)
    }

    /// Broadcasts to `shape`; `-1` keeps a dimension.
    #[track_caller]
    pub fn expand(&self, shape: &[isize]) -> Tensor {
        let s = self.shape();
        let off = shape.len().saturating_sub(s.len());
        let target: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(i, &d)| if d == -1 && i >= off { s[i - off] } else { d.max(0) as usize })
            .collect();
        self.broadcast_to(&target)
    }

    /// Broadcasts to `shape`.
    #[track_caller]
    pub fn broadcast_to(&self, shape: &[usize]) -> Tensor {
        eager(|e| e.expand(self, shape))
    }

    /// Removes all size-1 dims.
    #[track_caller]
    pub fn squeeze(&self) -> Tensor {
        eager(|e| c::squeeze(e, self, None))
    }

    /// Removes `dim` if it has size 1.
    #[track_caller]
    pub fn squeeze_dim(&self, dim: isize) -> Tensor {
        eager(|e| c::squeeze(e, self, Some(dim)))
    }

    /// Inserts a size-1 dim.
    #[track_caller]
    pub fn unsqueeze(&self, dim: isize) -> Tensor {
        eager(|e| c::unsqueeze(e, self, dim))
    }

    /// Flattens dims `start..=end`.
    #[track_caller]
    pub fn flatten(&self, start: isize, end: isize) -> Tensor {
        eager(|e| c::flatten(e, self, start, end))
    }

    /// Concatenates along `dim`.
    #[track_caller]
    pub fn cat(tensors: &[&Tensor], dim: isize) -> Tensor {
        eager(|e| c::cat(e, tensors, dim))
    }

    /// Stacks along a new `dim`.
    #[track_caller]
    pub fn stack(tensors: &[&Tensor], dim: isize) -> Tensor {
        eager(|e| c::stack(e, tensors, dim))
    }

    /// Splits into `chunks` pieces of `ceil(n/chunks)` (maybe fewer pieces).
    #[track_caller]
    pub fn chunk(&self, chunks: usize, dim: isize) -> Vec<Tensor> {
        self.pieces(dim, |t| eager(|e| c::chunk(e, t, chunks, dim)))
    }

    /// Splits into pieces of `size` (the last smaller).
    #[track_caller]
    pub fn split(&self, size: usize, dim: isize) -> Vec<Tensor> {
        self.pieces(dim, |t| eager(|e| c::split(e, t, size, dim)))
    }

    /// Splits into exactly `sections` pieces as evenly as possible.
    #[track_caller]
    pub fn tensor_split(&self, sections: usize, dim: isize) -> Vec<Tensor> {
        self.pieces(dim, |t| eager(|e| c::tensor_split(e, t, sections, dim)))
    }

    /// Splits at the given indices.
    #[track_caller]
    pub fn tensor_split_at(&self, indices: &[usize], dim: isize) -> Vec<Tensor> {
        self.pieces(dim, |t| eager(|e| c::tensor_split_at(e, t, indices, dim)))
    }

    /// The pieces `split` cuts `self` into along `dim` (consecutive, covering the dim). In
    /// eager mode with a gradient to record they share one node whose backward is a single
    /// `cat` of their gradients (zeros for a piece without one), as PyTorch's SplitBackward,
    /// instead of one zero-padded gradient per piece summed up. Traced, they stay narrows.
    #[track_caller]
    fn pieces(&self, dim: isize, split: impl Fn(&Tensor) -> Vec<Tensor>) -> Vec<Tensor> {
        if crate::trace_seam::is_tracing() || !is_grad_enabled() || !self.requires_grad() {
            return split(self);
        }
        let parts = crate::autograd::no_grad(|| split(self));
        let d = eager(|_| tracegrad_compiler::emitter::norm_dim("split", dim, self.dim()));
        let shapes: Vec<Vec<usize>> = parts.iter().map(|p| p.shape().to_vec()).collect();
        let dtype = self.dtype();
        let backward: crate::autograd::CustomBackward = std::sync::Arc::new(move |grads: &[Option<Tensor>]| {
            let gs: Vec<Tensor> = grads
                .iter()
                .zip(&shapes)
                .map(|(g, s)| g.clone().unwrap_or_else(|| Tensor::zeros_dtype(s, dtype)))
                .collect();
            let refs: Vec<&Tensor> = gs.iter().collect();
            Ok(vec![Some(Tensor::cat(&refs, d as isize))])
        });
        let bufs = parts.iter().map(|p| p.buffer()).collect();
        crate::autograd::custom_op("split", std::slice::from_ref(self), bufs, backward)
    }

    /// `start..start+len` of `dim`.
    #[track_caller]
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Tensor {
        eager(|e| c::narrow(e, self, dim, start, len))
    }

    /// Rows (along `dim`) picked by a 1-D i64 index; duplicates accumulate in the backward.
    #[track_caller]
    pub fn index_select(&self, dim: isize, index: &Tensor) -> Tensor {
        let d = eager(|_| tracegrad_compiler::emitter::norm_dim("index_select", dim, self.dim()));
        eager(|e| e.emit(Op::IndexSelect { dim: d }, &[self, index]))
    }

    /// `out[.., index[j], ..] += src[.., j, ..]`.
    #[track_caller]
    pub fn index_add(&self, dim: isize, index: &Tensor, src: &Tensor) -> Tensor {
        let d = eager(|_| tracegrad_compiler::emitter::norm_dim("index_add", dim, self.dim()));
        eager(|e| e.emit(Op::IndexAdd { dim: d }, &[self, index, src]))
    }

    /// `out[p] = self[p with dim := index[p]]`.
    #[track_caller]
    pub fn gather(&self, dim: isize, index: &Tensor) -> Tensor {
        let d = eager(|_| tracegrad_compiler::emitter::norm_dim("gather", dim, self.dim()));
        eager(|e| e.emit(Op::Gather { dim: d }, &[self, index]))
    }

    /// `out[p with dim := index[p]] += src[p]`.
    #[track_caller]
    pub fn scatter_add(&self, dim: isize, index: &Tensor, src: &Tensor) -> Tensor {
        let d = eager(|_| tracegrad_compiler::emitter::norm_dim("scatter_add", dim, self.dim()));
        eager(|e| e.emit(Op::ScatterAdd { dim: d }, &[self, index, src]))
    }

    /// Indices that sort `dim` (stable; NaN sorts last ascending, as PyTorch).
    #[track_caller]
    pub fn argsort(&self, dim: isize, descending: bool) -> Tensor {
        let d = eager(|_| tracegrad_compiler::emitter::norm_dim("argsort", dim, self.dim()));
        Tensor::from_buffer(argsort_buffer(&self.buffer(), d, descending))
    }

    /// Whether `|self - other| <= atol + rtol·|other|` everywhere (NaN never close).
    #[track_caller]
    pub fn allclose(&self, other: &Tensor, rtol: f64, atol: f64) -> bool {
        let (a, b) = (self.to_dtype(DType::F64), other.to_dtype(DType::F64));
        let d = a.sub(&b).abs();
        let tol = b.abs().mul_scalar(rtol).add_scalar(atol);
        d.le(&tol).all(&[], false).item() != 0.0
    }

    /// Same shape and same elements.
    pub fn equal(&self, other: &Tensor) -> bool {
        self.shape() == other.shape() && self.to_vec_f64() == other.to_vec_f64()
    }

    /// 2-D convolution (NCHW) with optional bias.
    #[track_caller]
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, stride: [usize; 2], padding: [usize; 2]) -> Tensor {
        eager(|e| {
            let y = e.emit(Op::Conv2d { stride, padding }, &[self, weight])?;
            match bias {
                Some(b) => {
                    let n = e.shape(b)[0];
                    let b4 = e.reshape(b, &[1, n, 1, 1])?;
                    e.add(&y, &b4)
                }
                None => Ok(y),
            }
        })
    }

    /// 2-D max pooling (floor mode).
    #[track_caller]
    pub fn max_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Tensor {
        eager(|e| e.emit(Op::MaxPool2d { kernel, stride, padding }, &[self]))
    }

    /// 2-D average pooling (floor mode, padded zeros counted).
    #[track_caller]
    pub fn avg_pool2d(&self, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Tensor {
        eager(|e| e.emit(Op::AvgPool2d { kernel, stride, padding, count_include_pad: true }, &[self]))
    }

    /// Layer normalisation over the trailing `normalized` dims.
    #[track_caller]
    pub fn layer_norm(&self, normalized: &[usize], weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Tensor {
        let (w, b) = (weight.is_some(), bias.is_some());
        let inputs: Vec<&Tensor> = [Some(self), weight, bias].into_iter().flatten().collect();
        let params = || format!("{normalized:?} {eps:?} {w} {b}");
        let def = |t: &[Tensor]| {
            let weight = w.then(|| &t[1]);
            let bias = b.then(|| &t[t.len() - 1]);
            t[0].layer_norm(normalized, weight, bias, eps)
        };
        if let Some(y) = crate::eager_kernels::run("layer_norm", params, &inputs, &def) {
            return y;
        }
        eager(|e| c::layer_norm(e, self, normalized, weight, bias, eps))
    }

    /// Dropout with keep-probability `1-p`: each element is kept where a Philox uniform draw
    /// from the default generator is `>= p`, and scaled by `1/(1-p)`. Identity when not
    /// `training`. It compiles: the mask is drawn from the graph's generator-state input, so
    /// eager, interpreted and JIT-compiled runs from one seed draw the same masks.
    #[track_caller]
    pub fn dropout(&self, p: f64, training: bool) -> Tensor {
        self.dropout_from(None, p, training)
    }

    /// Dropout drawing from `g`'s Philox stream (eager only: inside a compiled forward, use
    /// [`dropout`](Self::dropout), whose draws follow the default generator).
    #[track_caller]
    pub fn dropout_with(&self, g: &mut Generator, p: f64, training: bool) -> Tensor {
        self.dropout_from(Some(g), p, training)
    }

    #[track_caller]
    fn dropout_from(&self, g: Option<&mut Generator>, p: f64, training: bool) -> Tensor {
        assert!((0.0..=1.0).contains(&p), "dropout probability has to be between 0 and 1, but got {p}");
        if !training || p == 0.0 {
            return self.clone();
        }
        if p == 1.0 {
            return self.mul_scalar(0.0);
        }
        let (state, at) = rng_state(g, Distribution::DropoutMask { p }.blocks(self.numel()), "dropout");
        eager(|e| tracegrad_compiler::ops::dropout(e, self, &state, at, p))
    }

    /// Rows of `weight` selected by this integer tensor.
    #[track_caller]
    pub fn embedding(&self, weight: &Tensor) -> Tensor {
        eager(|e| c::embedding(e, self, weight))
    }

    /// Cross-entropy of logits `[N, C, ...]` against class indices.
    #[track_caller]
    pub fn cross_entropy(&self, target: &Tensor) -> Tensor {
        self.cross_entropy_with(target, LossReduction::Mean, 0.0)
    }

    /// Cross-entropy with a reduction and label smoothing (ignore_index -100).
    #[track_caller]
    pub fn cross_entropy_with(&self, target: &Tensor, reduction: LossReduction, label_smoothing: f64) -> Tensor {
        let params = || format!("{reduction:?} {label_smoothing:?}");
        let def = |t: &[Tensor]| t[0].cross_entropy_with(&t[1], reduction, label_smoothing);
        if let Some(y) = crate::eager_kernels::run("cross_entropy", params, &[self, target], &def) {
            return y;
        }
        eager(|e| c::cross_entropy(e, self, target, reduction, label_smoothing, -100))
    }

    /// Negative log-likelihood of log-probabilities against class indices.
    #[track_caller]
    pub fn nll_loss(&self, target: &Tensor, reduction: LossReduction) -> Tensor {
        eager(|e| c::nll_loss(e, self, target, reduction, -100))
    }

    /// Mean squared error.
    #[track_caller]
    pub fn mse_loss(&self, target: &Tensor, reduction: LossReduction) -> Tensor {
        eager(|e| c::mse_loss(e, self, target, reduction))
    }

    /// Stops gradient flow (a detached value inside an expression).
    #[track_caller]
    pub fn stop_gradient(&self) -> Tensor {
        if !is_grad_enabled() {
            return self.clone();
        }
        eager(|e| c::stop_gradient(e, self))
    }
}

/// `linear(x, weight, bias)` = `x @ weightᵀ + bias`.
#[track_caller]
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    eager(|e| c::linear(e, x, weight, bias))
}

fn argsort_buffer(b: &Buffer, dim: usize, descending: bool) -> Buffer {
    let v = b.to_f64_vec();
    let shape = b.shape();
    if shape.is_empty() {
        return Buffer::from_vec(vec![0i64], &[]);
    }
    let outer: usize = shape[..dim].iter().product();
    let n = shape[dim];
    let inner: usize = shape[dim + 1..].iter().product();
    let mut out = vec![0i64; v.len()];
    let key = |x: f64| if x.is_nan() { f64::INFINITY } else { x };
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * n + k) * inner + i;
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&p, &q| {
                let (a, b) = (v[at(p)], v[at(q)]);
                let ord = if a.is_nan() || b.is_nan() {
                    a.is_nan().cmp(&b.is_nan())
                } else {
                    key(a).partial_cmp(&key(b)).unwrap()
                };
                if descending {
                    ord.reverse()
                } else {
                    ord
                }
            });
            for (k, &j) in idx.iter().enumerate() {
                out[at(k)] = j as i64;
            }
        }
    }
    Buffer::from_vec(out, shape)
}

macro_rules! operator {
    ($trait:ident, $method:ident, $tm:ident, $sm:ident) => {
        impl $trait<&Tensor> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: &Tensor) -> Tensor {
                Tensor::$tm(&self, rhs)
            }
        }
        impl $trait<Tensor> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: Tensor) -> Tensor {
                Tensor::$tm(&self, &rhs)
            }
        }
        impl $trait<&Tensor> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: &Tensor) -> Tensor {
                Tensor::$tm(&self, rhs)
            }
        }
        impl $trait<Tensor> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: Tensor) -> Tensor {
                Tensor::$tm(&self, &rhs)
            }
        }
        impl $trait<f64> for &Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: f64) -> Tensor {
                Tensor::$sm(&self, rhs)
            }
        }
        impl $trait<f64> for Tensor {
            type Output = Tensor;
            #[track_caller]
            fn $method(self, rhs: f64) -> Tensor {
                Tensor::$sm(&self, rhs)
            }
        }
    };
}

operator!(Add, add, add, add_scalar);
operator!(Sub, sub, sub, sub_scalar);
operator!(Mul, mul, mul, mul_scalar);
operator!(Div, div, div, div_scalar);

impl Neg for &Tensor {
    type Output = Tensor;
    #[track_caller]
    fn neg(self) -> Tensor {
        Tensor::neg(self)
    }
}

impl Neg for Tensor {
    type Output = Tensor;
    #[track_caller]
    fn neg(self) -> Tensor {
        Tensor::neg(&self)
    }
}

impl Tensor {
    /// Batch normalisation of `[N, C, ...]` (functional). In training mode (or without running
    /// statistics) returns the batch mean and unbiased variance (detached) for the caller's
    /// running-statistics update.
    #[track_caller]
    pub fn batch_norm(
        &self,
        running: Option<(&Tensor, &Tensor)>,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        eps: f64,
    ) -> (Tensor, Option<(Tensor, Tensor)>) {
        eager(|e| c::batch_norm(e, self, running, weight, bias, training, eps))
    }

    /// Broadcasts tensors against each other (`torch.broadcast_tensors`).
    #[track_caller]
    pub fn broadcast_tensors(tensors: &[&Tensor]) -> Vec<Tensor> {
        let mut shape: Vec<usize> = vec![];
        for t in tensors {
            shape = eager_ok(
                tracegrad_runtime::shape::broadcast_shapes("broadcast_tensors", &shape, &t.shape())
                    .map_err(|m| tracegrad_compiler::OpError::new("broadcast_tensors", m)),
            )
            .to_vec();
        }
        tensors.iter().map(|t| t.broadcast_to(&shape)).collect()
    }

    /// At least 1-D (`torch.atleast_1d`).
    #[track_caller]
    pub fn atleast_1d(&self) -> Tensor {
        if self.dim() >= 1 {
            self.clone()
        } else {
            self.reshape(&[1])
        }
    }

    /// At least 2-D: a vector becomes a row `[1, n]`.
    #[track_caller]
    pub fn atleast_2d(&self) -> Tensor {
        match self.dim() {
            0 => self.reshape(&[1, 1]),
            1 => self.unsqueeze(0),
            _ => self.clone(),
        }
    }

    /// At least 3-D: `[n]` becomes `[1, n, 1]`, `[m, n]` becomes `[m, n, 1]`.
    #[track_caller]
    pub fn atleast_3d(&self) -> Tensor {
        match self.dim() {
            0 => self.reshape(&[1, 1, 1]),
            1 => self.unsqueeze(0).unsqueeze(-1),
            2 => self.unsqueeze(-1),
            _ => self.clone(),
        }
    }

    /// Removes the listed dims that have size 1 (`squeeze(dims)`); other dims stay.
    #[track_caller]
    pub fn squeeze_dims(&self, dims: &[isize]) -> Tensor {
        let s = self.shape();
        let norm: Vec<usize> =
            dims.iter().map(|&d| eager(|_| tracegrad_compiler::emitter::norm_dim("squeeze", d, s.len()))).collect();
        let out: Vec<isize> =
            s.iter().enumerate().filter(|&(i, &n)| !(n == 1 && norm.contains(&i))).map(|(_, &n)| n as isize).collect();
        self.reshape(&out)
    }

    /// Zeros with this tensor's shape and dtype.
    pub fn zeros_like(&self) -> Tensor {
        Tensor::full_dtype(&self.shape(), 0.0, self.dtype())
    }

    /// Ones with this tensor's shape and dtype.
    pub fn ones_like(&self) -> Tensor {
        Tensor::full_dtype(&self.shape(), 1.0, self.dtype())
    }

    /// `value` with this tensor's shape and dtype.
    pub fn full_like(&self, value: f64) -> Tensor {
        Tensor::full_dtype(&self.shape(), value, self.dtype())
    }

    /// U[0, 1) samples with this tensor's shape and (float) dtype, from the default
    /// generator's Philox stream.
    #[track_caller]
    pub fn rand_like(&self) -> Tensor {
        random_draw(None, Distribution::Uniform, self.float_dtype(), &self.shape(), "rand_like")
    }

    /// Standard normal samples with this tensor's shape and (float) dtype, from the default
    /// generator's Philox stream.
    #[track_caller]
    pub fn randn_like(&self) -> Tensor {
        random_draw(None, Distribution::Normal, self.float_dtype(), &self.shape(), "randn_like")
    }

    /// `torch.bernoulli(self)`: 1 with probability `self[i]` (a float tensor of probabilities),
    /// else 0, in this tensor's dtype: `rand_like(self) < self`, from the default generator.
    #[track_caller]
    pub fn bernoulli(&self) -> Tensor {
        self.bernoulli_from(None)
    }

    /// [`bernoulli`](Self::bernoulli) drawing from `g` (eager only).
    #[track_caller]
    pub fn bernoulli_with(&self, g: &mut Generator) -> Tensor {
        self.bernoulli_from(Some(g))
    }

    #[track_caller]
    fn bernoulli_from(&self, g: Option<&mut Generator>) -> Tensor {
        let dtype = self.dtype();
        assert!(dtype.is_float(), "bernoulli expects a floating-point tensor of probabilities, but got {dtype}");
        if !crate::trace_seam::is_tracing() {
            assert!(
                self.to_vec_f64().iter().all(|p| (0.0..=1.0).contains(p)),
                "bernoulli expects all elements of the input to be in [0, 1]"
            );
        }
        let u = random_draw(g, Distribution::Uniform, dtype, &self.shape(), "bernoulli");
        eager(|e| {
            let keep = e.compare(CompareOp::Lt, &u, self)?;
            e.cast(&keep, dtype)
        })
    }

    fn float_dtype(&self) -> DType {
        if self.dtype().is_float() {
            self.dtype()
        } else {
            DType::F32
        }
    }
}

/// Scatter forms, `normal` with tensor parameters, and the matrix functions that PyTorch has
/// as `Tensor` methods.
impl Tensor {
    /// `scatter(dim, index, src)`: `out[p with dim := index[p]] = src[p]` for each position `p`
    /// of `index` (i64, this tensor's rank, at most `src`'s size and, apart from `dim`, this
    /// tensor's). With duplicate indices the last write in `index`'s row-major order wins.
    /// Gradients: to `self` where nothing was written, to `src` from where it was written.
    #[track_caller]
    pub fn scatter(&self, dim: isize, index: &Tensor, src: &Tensor) -> Tensor {
        eager(|e| c::scatter(e, self, dim, index, src))
    }

    /// `scatter(dim, index, value)`: writes the number `value` (in this tensor's dtype).
    #[track_caller]
    pub fn scatter_value(&self, dim: isize, index: &Tensor, value: f64) -> Tensor {
        eager(|e| c::scatter_value(e, self, dim, index, value))
    }

    /// `scatter(dim, index, src, reduce=...)` with `reduce` `"add"` or `"multiply"`: values
    /// landing on a position are added to (multiplied into) this tensor's value there.
    #[track_caller]
    pub fn scatter_with_reduce(&self, dim: isize, index: &Tensor, src: &Tensor, reduce: &str) -> Tensor {
        eager(|e| c::scatter_with_reduce(e, self, dim, index, src, reduce))
    }

    /// `scatter(dim, index, value, reduce=...)` with `reduce` `"add"` or `"multiply"`.
    #[track_caller]
    pub fn scatter_value_with_reduce(&self, dim: isize, index: &Tensor, value: f64, reduce: &str) -> Tensor {
        eager(|e| c::scatter_value_with_reduce(e, self, dim, index, value, reduce))
    }

    /// `scatter_reduce(dim, index, src, reduce, include_self)`: the values of `src` landing on a
    /// position are combined by `reduce` (`"sum"`, `"prod"`, `"mean"`, `"amax"`, `"amin"`),
    /// together with this tensor's value there when `include_self`. Positions that receive
    /// nothing keep this tensor's value.
    #[track_caller]
    pub fn scatter_reduce(&self, dim: isize, index: &Tensor, src: &Tensor, reduce: &str, include_self: bool) -> Tensor {
        eager(|e| c::scatter_reduce(e, self, dim, index, src, reduce, include_self))
    }

    /// In place: [`scatter`](Self::scatter) (`tensor.scatter_`).
    #[track_caller]
    pub fn scatter_(&self, dim: isize, index: &Tensor, src: &Tensor) -> &Tensor {
        self.write_in_place("scatter_", &[src], || self.scatter(dim, index, src))
    }

    /// In place: [`scatter_value`](Self::scatter_value).
    #[track_caller]
    pub fn scatter_value_(&self, dim: isize, index: &Tensor, value: f64) -> &Tensor {
        self.write_in_place("scatter_", &[], || self.scatter_value(dim, index, value))
    }

    /// In place: [`scatter_with_reduce`](Self::scatter_with_reduce).
    #[track_caller]
    pub fn scatter_with_reduce_(&self, dim: isize, index: &Tensor, src: &Tensor, reduce: &str) -> &Tensor {
        self.write_in_place("scatter_", &[src], || self.scatter_with_reduce(dim, index, src, reduce))
    }

    /// In place: [`scatter_value_with_reduce`](Self::scatter_value_with_reduce).
    #[track_caller]
    pub fn scatter_value_with_reduce_(&self, dim: isize, index: &Tensor, value: f64, reduce: &str) -> &Tensor {
        self.write_in_place("scatter_", &[], || self.scatter_value_with_reduce(dim, index, value, reduce))
    }

    /// In place: [`scatter_reduce`](Self::scatter_reduce).
    #[track_caller]
    pub fn scatter_reduce_(
        &self,
        dim: isize,
        index: &Tensor,
        src: &Tensor,
        reduce: &str,
        include_self: bool,
    ) -> &Tensor {
        self.write_in_place("scatter_reduce_", &[src], || self.scatter_reduce(dim, index, src, reduce, include_self))
    }

    /// Writes `compute()` into this tensor. tracegrad has no in-place autograd, so with grad
    /// mode on this refuses a tensor (or operand) that requires grad instead of dropping
    /// history silently; PyTorch's text for a leaf.
    #[track_caller]
    fn write_in_place(&self, name: &str, operands: &[&Tensor], compute: impl FnOnce() -> Tensor) -> &Tensor {
        if is_grad_enabled() {
            if self.requires_grad() && self.is_leaf() {
                panic!("a leaf Variable that requires grad is being used in an in-place operation.");
            }
            if self.requires_grad() || operands.iter().any(|t| t.requires_grad()) {
                panic!(
                    "{name}: in-place operations that would record autograd history are not supported (tracegrad has no in-place autograd); use the out-of-place {}",
                    name.trim_end_matches('_')
                );
            }
        }
        let out = compute();
        self.assign(&out);
        self
    }

    /// `torch.normal(mean, std)` with tensor parameters: one sample of `N(mean[i], std[i]²)` per
    /// element of the broadcast shape, from the default generator (see
    /// [`normal_tensor_with`](Self::normal_tensor_with)).
    #[track_caller]
    pub fn normal_tensor(mean: &Tensor, std: &Tensor) -> Tensor {
        Tensor::normal_tensor_from(None, mean, std)
    }

    /// `torch.normal(mean, std, generator=g)`: `mean + std·z` with `z` standard normal draws
    /// from `g`'s Philox stream (not PyTorch's stream; eager only). The result is float (the promoted dtype of the
    /// parameters). It is differentiable by reparameterisation: `d/dmean = 1`, `d/dstd = z`
    /// (PyTorch's `torch.normal` passes zero gradients instead; this is `rsample`'s rule).
    #[track_caller]
    pub fn normal_tensor_with(g: &mut Generator, mean: &Tensor, std: &Tensor) -> Tensor {
        Tensor::normal_tensor_from(Some(g), mean, std)
    }

    #[track_caller]
    fn normal_tensor_from(g: Option<&mut Generator>, mean: &Tensor, std: &Tensor) -> Tensor {
        for (what, t) in [("mean", mean), ("std", std)] {
            assert!(
                t.dtype().is_float(),
                "normal expects floating-point {what}, but got {} (shape {:?})",
                t.dtype(),
                t.shape()
            );
        }
        if !crate::trace_seam::is_tracing() {
            // A traced std has no values yet; the compiled draw cannot check it.
            assert!(std.to_vec_f64().iter().all(|&s| s >= 0.0), "normal expects all elements of std >= 0.0");
        }
        let shape = eager_ok(
            tracegrad_runtime::shape::broadcast_shapes("normal", &mean.shape(), &std.shape())
                .map_err(|m| tracegrad_compiler::OpError::new("normal", m)),
        );
        let dtype = DType::promote(mean.dtype(), std.dtype());
        let z = random_draw(g, Distribution::Normal, dtype, &shape, "normal");
        let (m, s) = (mean.to_dtype(dtype), std.to_dtype(dtype));
        m.add(&s.mul(&z))
    }
}

/// The generator state a random draw of `blocks` Philox blocks reads, and how many blocks into
/// it the draw starts. While tracing, the graph's state input (draws from an explicit
/// generator would be frozen into the plan, so they are refused); otherwise `g`'s or the
/// default generator's state, advanced past the draw now.
#[track_caller]
fn rng_state(g: Option<&mut Generator>, blocks: u64, what: &str) -> (Tensor, u64) {
    match (crate::trace_seam::tracer(), g) {
        (Some(_), Some(_)) => panic!(
            "{what}: a compiled forward draws from the default generator; a draw from an explicit generator would be frozen into the graph"
        ),
        (Some(t), None) => t.rng(blocks),
        (None, g) => {
            let (seed, start) = match g {
                Some(g) => g.philox_draw(blocks),
                None => tracegrad_runtime::random::with_default(|g| g.philox_draw(blocks)),
            };
            (Tensor::from_vec(vec![seed as i64, start as i64], &[2]), 0)
        }
    }
}

/// A draw of `dist` with `shape` and `dtype` from the Philox stream of `g` (`None`: the
/// default generator), as an `Op::Random` node: eager mode computes it, a trace records it.
#[track_caller]
pub(crate) fn random_draw(
    g: Option<&mut Generator>,
    dist: Distribution,
    dtype: DType,
    shape: &[usize],
    what: &str,
) -> Tensor {
    // Size checked before the generator advances, so a refused shape leaves the stream as it was.
    if let Err(e) = tracegrad_runtime::shape::checked_bytes(shape, dtype.size()) {
        panic!("{what}: {e}");
    }
    let (state, at) = rng_state(g, dist.blocks(tracegrad_runtime::shape::numel(shape)), what);
    // The output allocation can fail in the kernel, which only knows an element count: say
    // which draw and shape it was.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        eager(|e| e.emit(Op::Random { dist, dtype, shape: shape.into(), at }, &[&state]))
    }))
    .unwrap_or_else(|p| {
        panic!(
            "{what} of shape {}: {}",
            ShapeDisplay(shape),
            tracegrad_runtime::panic_message(&*p).unwrap_or("panicked")
        )
    })
}
