//! The abstract op builder that derivative rules and composite ops are written against.
//!
//! An [`Emitter`] turns an [`Op`] plus operands into a new value. There are two: eager mode's
//! `Eager` (in the `tracegrad` crate) computes the value at once and records autograd, or, while
//! a trace is active, has the tracer record the op as a graph node; and
//! [`Graph`](crate::graph::Graph) itself, whose values are nodes, through which AOT autodiff
//! appends the backward. Because every rule is written against this trait, eager backward and
//! AOT autodiff cannot drift apart.
//!
//! [`Build`] adds named helpers (`add`, `sum_to`, `matmul`, …) to every emitter, so rules read
//! like the maths.

use crate::ops::{BinaryOp, CompareOp, Op, OpError, OpResult, ReduceKind, TensorType, UnaryOp};
use tracegrad_runtime::{shape::normalize_dim, Buffer, DType, Dims};

/// Something that can apply ops to values.
pub trait Emitter {
    /// The value type: a tensor in eager mode (symbolic while tracing), a node id in a graph.
    type Value: Clone;

    /// Applies `op` to `inputs`, checking the shape rule.
    fn emit(&mut self, op: Op, inputs: &[&Self::Value]) -> OpResult<Self::Value>;

    /// The dtype and shape of a value.
    fn value_type(&self, v: &Self::Value) -> TensorType;
}

/// Normalises a possibly negative `dim` for a value of `rank`, as an op error.
pub fn norm_dim(op: &str, dim: isize, rank: usize) -> OpResult<usize> {
    normalize_dim(dim, rank).map_err(|m| OpError::new(op, format!("{op}: {m}")))
}

/// PyTorch's `result_type` for two tensors: a 0-d tensor only takes part when its category
/// (bool < integer < float) is higher than the dimensioned operand's, so `f32[3] + f64[]` is
/// f32 and `u8[3] + i64[]` is u8, while `i64[3] + f32[]` is f32. Otherwise the wider dtype wins.
pub fn result_type(a: &TensorType, b: &TensorType) -> DType {
    fn category(d: DType) -> u8 {
        match d {
            DType::Bool => 0,
            DType::U8 | DType::I64 => 1,
            DType::F32 | DType::F64 => 2,
        }
    }
    match (a.rank() == 0, b.rank() == 0) {
        (true, false) if category(a.dtype) <= category(b.dtype) => b.dtype,
        (false, true) if category(b.dtype) <= category(a.dtype) => a.dtype,
        _ => DType::promote(a.dtype, b.dtype),
    }
}

/// Named helpers over any [`Emitter`]. Implemented for all of them.
pub trait Build: Emitter {
    /// Shape of a value.
    fn shape(&self, v: &Self::Value) -> Dims {
        self.value_type(v).shape
    }

    /// Dtype of a value.
    fn dtype(&self, v: &Self::Value) -> DType {
        self.value_type(v).dtype
    }

    /// A tensor of `shape` filled with `value`.
    fn full(&mut self, value: f64, dtype: DType, shape: &[usize]) -> OpResult<Self::Value> {
        self.emit(Op::Full { value, dtype, shape: shape.into() }, &[])
    }

    /// A 0-d tensor.
    fn scalar(&mut self, value: f64, dtype: DType) -> OpResult<Self::Value> {
        self.full(value, dtype, &[])
    }

    /// A literal.
    fn constant(&mut self, b: Buffer) -> OpResult<Self::Value> {
        self.emit(Op::Constant(b), &[])
    }

    /// Zeros with the type of `v`.
    fn zeros_like(&mut self, v: &Self::Value) -> OpResult<Self::Value> {
        let t = self.value_type(v);
        self.full(0.0, t.dtype, &t.shape)
    }

    /// `op(x)` for a unary op. Integer and bool inputs of the transcendental functions are
    /// cast to f32 first, as PyTorch promotes them to the default float type.
    fn unary(&mut self, op: UnaryOp, x: &Self::Value) -> OpResult<Self::Value> {
        if op.promotes_integers() && !self.dtype(x).is_float() {
            let xf = self.cast(x, DType::F32)?;
            return self.emit(Op::Unary(op), &[&xf]);
        }
        self.emit(Op::Unary(op), &[x])
    }

    /// `op(a, b)` after casting both to their promoted dtype.
    fn binary(&mut self, op: BinaryOp, a: &Self::Value, b: &Self::Value) -> OpResult<Self::Value> {
        let (a, b) = self.promote(a, b)?;
        self.emit(Op::Binary(op), &[&a, &b])
    }

    /// Casts two values to their common dtype ([`result_type`]).
    fn promote(&mut self, a: &Self::Value, b: &Self::Value) -> OpResult<(Self::Value, Self::Value)> {
        let d = result_type(&self.value_type(a), &self.value_type(b));
        Ok((self.cast(a, d)?, self.cast(b, d)?))
    }

    /// `a + b`.
    fn add(&mut self, a: &Self::Value, b: &Self::Value) -> OpResult<Self::Value> {
        self.binary(BinaryOp::Add, a, b)
    }

    /// `a - b`.
    fn sub(&mut self, a: &Self::Value, b: &Self::Value) -> OpResult<Self::Value> {
        self.binary(BinaryOp::Sub, a, b)
    }

    /// `a * b`.
    fn mul(&mut self, a: &Self::Value, b: &Self::Value) -> OpResult<Self::Value> {
        self.binary(BinaryOp::Mul, a, b)
    }

    /// `a / b` (true division: integers are cast to the default float type first).
    fn div(&mut self, a: &Self::Value, b: &Self::Value) -> OpResult<Self::Value> {
        let (a, b) = self.promote(a, b)?;
        let (a, b) =
            if self.dtype(&a).is_float() { (a, b) } else { (self.cast(&a, DType::F32)?, self.cast(&b, DType::F32)?) };
        self.emit(Op::Binary(BinaryOp::Div), &[&a, &b])
    }

    /// `x + c` for a number `c`, in `x`'s dtype.
    fn add_scalar(&mut self, x: &Self::Value, c: f64) -> OpResult<Self::Value> {
        let s = self.scalar(c, self.dtype(x))?;
        self.emit(Op::Binary(BinaryOp::Add), &[x, &s])
    }

    /// `x * c` for a number `c`, in `x`'s dtype.
    fn mul_scalar(&mut self, x: &Self::Value, c: f64) -> OpResult<Self::Value> {
        let s = self.scalar(c, self.dtype(x))?;
        self.emit(Op::Binary(BinaryOp::Mul), &[x, &s])
    }

    /// `-x`.
    fn neg(&mut self, x: &Self::Value) -> OpResult<Self::Value> {
        self.unary(UnaryOp::Neg, x)
    }

    /// Elementwise comparison (operands promoted to a common dtype); bool result.
    fn compare(&mut self, op: CompareOp, a: &Self::Value, b: &Self::Value) -> OpResult<Self::Value> {
        let (a, b) = self.promote(a, b)?;
        self.emit(Op::Compare(op), &[&a, &b])
    }

    /// `where(cond, a, b)`.
    fn where_(&mut self, cond: &Self::Value, a: &Self::Value, b: &Self::Value) -> OpResult<Self::Value> {
        let (a, b) = self.promote(a, b)?;
        self.emit(Op::Where, &[cond, &a, &b])
    }

    /// Conversion to `dtype` (no node when already of that dtype).
    fn cast(&mut self, x: &Self::Value, dtype: DType) -> OpResult<Self::Value> {
        if self.dtype(x) == dtype {
            return Ok(x.clone());
        }
        self.emit(Op::Cast(dtype), &[x])
    }

    /// Reduction over `dims` (may be negative, in any order).
    fn reduce(&mut self, kind: ReduceKind, x: &Self::Value, dims: &[isize], keepdim: bool) -> OpResult<Self::Value> {
        let rank = self.shape(x).len();
        let mut d: Vec<usize> = Vec::with_capacity(dims.len());
        for &i in dims {
            let n = norm_dim(kind.name(), i, rank)?;
            if d.contains(&n) {
                return Err(OpError::new(
                    kind.name(),
                    format!("{}: dim {n} appears multiple times in the list of dims", kind.name()),
                ));
            }
            d.push(n);
        }
        d.sort_unstable();
        if rank == 0 {
            d.clear();
        }
        self.emit(Op::Reduce { kind, dims: d.into_iter().collect(), keepdim }, &[x])
    }

    /// Sum over `dims` (all dims when empty).
    fn sum(&mut self, x: &Self::Value, dims: &[isize], keepdim: bool) -> OpResult<Self::Value> {
        let all: Vec<isize>;
        let dims = if dims.is_empty() {
            all = (0..self.shape(x).len() as isize).collect();
            &all[..]
        } else {
            dims
        };
        self.reduce(ReduceKind::Sum, x, dims, keepdim)
    }

    /// Same data, new shape.
    fn reshape(&mut self, x: &Self::Value, shape: &[usize]) -> OpResult<Self::Value> {
        if self.shape(x).as_slice() == shape {
            return Ok(x.clone());
        }
        self.emit(Op::Reshape(shape.into()), &[x])
    }

    /// Dimension reorder.
    fn permute(&mut self, x: &Self::Value, perm: &[usize]) -> OpResult<Self::Value> {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x.clone());
        }
        self.emit(Op::Permute(perm.into()), &[x])
    }

    /// Swaps two (non-negative) dims.
    fn transpose(&mut self, x: &Self::Value, a: usize, b: usize) -> OpResult<Self::Value> {
        let mut perm: Vec<usize> = (0..self.shape(x).len()).collect();
        perm.swap(a, b);
        self.permute(x, &perm)
    }

    /// Broadcast to `shape`.
    fn expand(&mut self, x: &Self::Value, shape: &[usize]) -> OpResult<Self::Value> {
        if self.shape(x).as_slice() == shape {
            return Ok(x.clone());
        }
        self.emit(Op::Expand(shape.into()), &[x])
    }

    /// Sums a broadcast gradient back to `shape` (the inverse of broadcasting).
    fn sum_to(&mut self, g: &Self::Value, shape: &[usize]) -> OpResult<Self::Value> {
        let gs = self.shape(g);
        if gs.as_slice() == shape {
            return Ok(g.clone());
        }
        let lead = gs.len() - shape.len();
        let dims: Vec<isize> =
            (0..gs.len()).filter(|&i| i < lead || (shape[i - lead] == 1 && gs[i] != 1)).map(|i| i as isize).collect();
        let s = if dims.is_empty() { g.clone() } else { self.reduce(ReduceKind::Sum, g, &dims, true)? };
        self.reshape(&s, shape)
    }

    /// Re-inserts reduced dims as size 1 so a reduced value broadcasts against its input.
    fn unsqueeze_reduced(
        &mut self,
        v: &Self::Value,
        in_shape: &[usize],
        dims: &[usize],
        keepdim: bool,
    ) -> OpResult<Self::Value> {
        if keepdim {
            return Ok(v.clone());
        }
        let kept: Vec<usize> =
            in_shape.iter().enumerate().map(|(i, &d)| if dims.contains(&i) { 1 } else { d }).collect();
        self.reshape(v, &kept)
    }

    /// The slice `start..start+len` of `dim`.
    fn narrow(&mut self, x: &Self::Value, dim: usize, start: usize, len: usize) -> OpResult<Self::Value> {
        if start == 0 && self.shape(x)[dim] == len {
            return Ok(x.clone());
        }
        self.emit(Op::Narrow { dim, start, len }, &[x])
    }

    /// Concatenation.
    fn cat(&mut self, xs: &[&Self::Value], dim: usize) -> OpResult<Self::Value> {
        if xs.len() == 1 {
            return Ok(xs[0].clone());
        }
        self.emit(Op::Cat { dim }, xs)
    }

    /// Pads `x` with zeros at the end of each dimension up to `shape`.
    fn pad_to(&mut self, x: &Self::Value, shape: &[usize]) -> OpResult<Self::Value> {
        let mut v = x.clone();
        for (d, &target) in shape.iter().enumerate() {
            let mut s = self.shape(&v);
            if s[d] < target {
                let dt = self.dtype(&v);
                s[d] = target - s[d];
                let z = self.full(0.0, dt, &s)?;
                v = self.cat(&[&v, &z], d)?;
            }
        }
        Ok(v)
    }

    /// Batched matmul with free transposes.
    fn matmul_t(&mut self, a: &Self::Value, b: &Self::Value, trans_a: bool, trans_b: bool) -> OpResult<Self::Value> {
        self.emit(Op::MatMul { trans_a, trans_b }, &[a, b])
    }
}

impl<E: Emitter + ?Sized> Build for E {}
