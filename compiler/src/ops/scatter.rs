//! Scatter ops: `scatter` (assignment; the scalar-value form is a composite over it) and
//! `scatter_reduce` (sum, prod, mean, amax, amin, with or without the destination's values;
//! `scatter(..., reduce="add"|"multiply")` are composites over it).
//!
//! Derivative rules follow PyTorch's (`scatter` and `scatter_reduce_backward`) with two
//! deliberate differences, both where PyTorch's rule disagrees with the central difference:
//! a plain scatter's source value that a later duplicate index overwrote gets no gradient
//! (PyTorch gathers one for it), and for amax/amin without `include_self` a destination value
//! that was overwritten does not count as a tie (PyTorch counts it and halves the source's
//! gradient).

use super::index::{check_dim, check_scatter_shapes, nonempty, nonempty_buf, require_index};
use super::{CompareOp, Op, OpResult, Props, TensorType};
use crate::emitter::{Build, Emitter};
use tracegrad_runtime::kernels::scatter as kernel;
use tracegrad_runtime::{Buffer, DType};

pub use tracegrad_runtime::kernels::scatter::ScatterReduction as ScatterReduce;

fn dim_of(op: &Op) -> usize {
    match op {
        Op::Scatter { dim } | Op::ScatterReduce { dim, .. } => *dim,
        _ => unreachable!(),
    }
}

pub(super) fn infer(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let name = op.name();
    let (x, idx, src) = (&t[0], &t[1], &t[2]);
    let dim = dim_of(op);
    check_dim(name, dim, x)?;
    require_index(name, idx)?;
    if src.dtype != x.dtype {
        return Err(format!("{name}(): Expected self.dtype to be equal to src.dtype ({} vs {})", x.dtype, src.dtype));
    }
    if matches!(op, Op::ScatterReduce { .. }) && x.dtype == DType::Bool {
        return Err(format!("\"{name}\" not implemented for 'Bool' (shape {})", super::sh(&x.shape)));
    }
    check_scatter_shapes(name, dim, x, idx, Some(src))?;
    Ok(x.clone())
}

pub(super) fn eval(op: &Op, x: &[&Buffer]) -> Result<Buffer, String> {
    // 0-d operands run as one-element vectors; the result keeps self's shape.
    let (s, idx, src) = (nonempty_buf(x[0]), nonempty_buf(x[1]), nonempty_buf(x[2]));
    let r = match op {
        Op::Scatter { dim } => kernel::scatter(&s, *dim, &idx, &src)?,
        Op::ScatterReduce { dim, reduce, include_self } => {
            kernel::scatter_reduce(&s, *dim, &idx, &src, *reduce, *include_self)?
        }
        _ => unreachable!(),
    };
    Ok(r.reshaped(x[0].shape()))
}

/// `v.scatter(dim, idx, 0)`: `v` with the positions that `idx` writes set to zero.
fn mask_out<E: Emitter>(e: &mut E, dim: usize, v: &E::Value, idx: &E::Value) -> OpResult<E::Value> {
    let z = e.full(0.0, e.dtype(v), &e.shape(idx))?;
    e.emit(Op::Scatter { dim }, &[v, idx, &z])
}

/// A value of the index's shape grown to `src`'s shape with zeros (src positions beyond the
/// index's extent take no part in a scatter, so their gradient is zero).
fn pad_to_src<E: Emitter>(e: &mut E, v: &E::Value, src: &E::Value) -> OpResult<E::Value> {
    let ss = e.shape(src);
    let v = e.reshape(v, &nonempty(&e.shape(v)))?;
    let v = e.pad_to(&v, &nonempty(&ss))?;
    e.reshape(&v, &ss)
}

/// `v.gather(dim, idx)` grown to `src`'s shape.
fn gather_to_src<E: Emitter>(
    e: &mut E,
    dim: usize,
    v: &E::Value,
    idx: &E::Value,
    src: &E::Value,
) -> OpResult<E::Value> {
    let gs = e.emit(Op::Gather { dim }, &[v, idx])?;
    pad_to_src(e, &gs, src)
}

/// The part of `src` that a scatter reads: its leading block of the index's shape.
fn src_used<E: Emitter>(e: &mut E, src: &E::Value, idx: &E::Value) -> OpResult<E::Value> {
    let is = e.shape(idx);
    let target = nonempty(&is);
    let mut v = e.reshape(src, &nonempty(&e.shape(src)))?;
    for (d, &n) in target.iter().enumerate() {
        v = e.narrow(&v, d, 0, n)?;
    }
    e.reshape(&v, &is)
}

/// A 0/1 mask of the index's shape (in `s`'s dtype): 1 where that position's write is the
/// one that stays (the last one to its target), 0 where a later duplicate overwrote it. An
/// overwritten source value does not reach the output, so its derivative is zero (PyTorch's
/// rule gathers the gradient for it all the same).
fn last_writes<E: Emitter>(e: &mut E, dim: usize, s: &E::Value, idx: &E::Value) -> OpResult<E::Value> {
    let is = e.shape(idx);
    let n: usize = is.iter().product();
    let ids = e.constant(Buffer::from_vec((0..n as i64).collect::<Vec<i64>>(), &is))?;
    let none = e.full(-1.0, DType::I64, &e.shape(s))?;
    let winner = e.emit(Op::Scatter { dim }, &[&none, idx, &ids])?;
    let back = e.emit(Op::Gather { dim }, &[&winner, idx])?;
    let won = e.compare(CompareOp::Eq, &back, &ids)?;
    e.cast(&won, e.dtype(s))
}

pub(super) fn vjp<E: Emitter>(
    op: &Op,
    e: &mut E,
    x: &[&E::Value],
    out: &E::Value,
    g: &E::Value,
) -> OpResult<Vec<Option<E::Value>>> {
    let (s, idx, src) = (x[0], x[1], x[2]);
    let dim = dim_of(op);
    let dt = e.dtype(g);
    Ok(match op {
        Op::Scatter { .. } => {
            let gs = mask_out(e, dim, g, idx)?;
            let gsrc = e.emit(Op::Gather { dim }, &[g, idx])?;
            let won = last_writes(e, dim, s, idx)?;
            let gsrc = e.mul(&gsrc, &won)?;
            vec![Some(gs), None, Some(pad_to_src(e, &gsrc, src)?)]
        }
        Op::ScatterReduce { reduce, include_self, .. } => {
            let include_self = *include_self;
            let (gs, gsrc) = match reduce {
                ScatterReduce::Sum => {
                    let gs = if include_self { g.clone() } else { mask_out(e, dim, g, idx)? };
                    (gs, gather_to_src(e, dim, g, idx, src)?)
                }
                ScatterReduce::Mean => {
                    // N counts the values averaged at each position.
                    let base = e.full(if include_self { 1.0 } else { 0.0 }, dt, &e.shape(s))?;
                    let ones = e.full(1.0, dt, &e.shape(idx))?;
                    let n = e.emit(Op::ScatterAdd { dim }, &[&base, idx, &ones])?;
                    let (zero, one) = (e.scalar(0.0, dt)?, e.scalar(1.0, dt)?);
                    let empty = e.compare(CompareOp::Eq, &n, &zero)?;
                    let n = e.where_(&empty, &one, &n)?;
                    let gn = e.div(g, &n)?;
                    let gs = if include_self { gn.clone() } else { mask_out(e, dim, &gn, idx)? };
                    (gs, gather_to_src(e, dim, &gn, idx, src)?)
                }
                ScatterReduce::Prod => {
                    let (zero, one) = (e.scalar(0.0, dt)?, e.scalar(1.0, dt)?);
                    // d/dself: the product of everything else, computed without self's zeros.
                    let self_zero = e.compare(CompareOp::Eq, s, &zero)?;
                    let masked_self = e.where_(&self_zero, &one, s)?;
                    let msr = e.emit(op.clone(), &[&masked_self, idx, src])?;
                    let gm = e.mul(g, &msr)?;
                    let gs = e.div(&gm, &masked_self)?;
                    let gs = if include_self { gs } else { mask_out(e, dim, &gs, idx)? };
                    // d/dsrc: result / src, except for a src value that is the only zero
                    // landing on its position, whose derivative is the product of the others.
                    let su = src_used(e, src, idx)?;
                    let src_zero = e.compare(CompareOp::Eq, &su, &zero)?;
                    let src_zero_f = e.cast(&src_zero, dt)?;
                    let zs = e.zeros_like(s)?;
                    let nz = e.emit(Op::ScatterAdd { dim }, &[&zs, idx, &src_zero_f])?;
                    let nz = e.emit(Op::Gather { dim }, &[&nz, idx])?;
                    let one_zero = e.compare(CompareOp::Eq, &nz, &one)?;
                    let single_zero = e.where_(&src_zero, &one_zero, &src_zero)?;
                    let masked_src = e.where_(&single_zero, &one, &su)?;
                    let msr = e.emit(op.clone(), &[s, idx, &masked_src])?;
                    let a = e.mul(g, &msr)?;
                    let a = e.emit(Op::Gather { dim }, &[&a, idx])?;
                    let b = e.mul(g, out)?;
                    let b = e.emit(Op::Gather { dim }, &[&b, idx])?;
                    let src_nz = e.where_(&src_zero, &one, &su)?;
                    let b = e.div(&b, &src_nz)?;
                    let gsrc = e.where_(&single_zero, &a, &b)?;
                    (gs, pad_to_src(e, &gsrc, src)?)
                }
                ScatterReduce::Amax | ScatterReduce::Amin => {
                    // Ties share the gradient evenly, as PyTorch's amax/amin do.
                    let value = e.emit(Op::Gather { dim }, &[out, idx])?;
                    let self_is = e.compare(CompareOp::Eq, s, out)?;
                    let self_is = e.cast(&self_is, dt)?;
                    let self_is = if include_self { self_is } else { mask_out(e, dim, &self_is, idx)? };
                    let su = src_used(e, src, idx)?;
                    let src_is = e.compare(CompareOp::Eq, &su, &value)?;
                    let src_is = e.cast(&src_is, dt)?;
                    let n = e.emit(Op::ScatterAdd { dim }, &[&self_is, idx, &src_is])?;
                    let (zero, one) = (e.scalar(0.0, dt)?, e.scalar(1.0, dt)?);
                    let none = e.compare(CompareOp::Eq, &n, &zero)?;
                    let n = e.where_(&none, &one, &n)?;
                    let gd = e.div(g, &n)?;
                    let gs = e.mul(&self_is, &gd)?;
                    let gd = e.emit(Op::Gather { dim }, &[&gd, idx])?;
                    let gsrc = e.mul(&src_is, &gd)?;
                    (gs, pad_to_src(e, &gsrc, src)?)
                }
            };
            vec![Some(gs), None, Some(gsrc)]
        }
        _ => unreachable!(),
    })
}

/// Scatter ops fail on an index out of range.
pub(super) fn props(_op: &Op) -> Props {
    Props { fallible: true, ..Props::NONE }
}
