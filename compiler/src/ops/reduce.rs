//! Reductions (sum, amax, amin, all, any), argmax/argmin and softmax/log_softmax.
//! Shape rule, kernel and derivative rule for each.

use super::{jit_float, require_float, sh, CompareOp, Op, OpResult, Props, TensorType, UnaryOp};
use crate::emitter::{norm_dim, Build, Emitter};
use tracegrad_runtime::kernels::reduce::{arg_extremum, extremum, fold, split3, sum};
use tracegrad_runtime::kernels::softmax::softmax;
use tracegrad_runtime::{dispatch, Buffer, DType, Data, Dims};

/// What a [`Op::Reduce`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ReduceKind {
    /// Sum (integers and bools sum to i64).
    Sum,
    /// Maximum (`amax`).
    Max,
    /// Minimum (`amin`).
    Min,
    /// Logical and; bool result.
    All,
    /// Logical or; bool result.
    Any,
}

impl ReduceKind {
    /// Name in errors and dumps.
    pub fn name(self) -> &'static str {
        match self {
            ReduceKind::Sum => "sum",
            ReduceKind::Max => "amax",
            ReduceKind::Min => "amin",
            ReduceKind::All => "all",
            ReduceKind::Any => "any",
        }
    }
}

fn reduced_shape(shape: &[usize], dims: &[usize], keepdim: bool) -> Dims {
    let mut out = Dims::new();
    for (i, &d) in shape.iter().enumerate() {
        if dims.contains(&i) {
            if keepdim {
                out.push(1);
            }
        } else {
            out.push(d);
        }
    }
    out
}

pub(super) fn infer(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let x = &t[0];
    match op {
        Op::Reduce { kind, dims, keepdim } => {
            if dims.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("{}: dims {} must be sorted and unique", kind.name(), sh(dims)));
            }
            for &d in dims.iter() {
                if d >= x.rank().max(1) {
                    return Err(format!(
                        "{}: dim {d} out of range for a tensor of shape {}",
                        kind.name(),
                        sh(&x.shape)
                    ));
                }
            }
            if matches!(kind, ReduceKind::Max | ReduceKind::Min) {
                for &d in dims.iter() {
                    if x.rank() > 0 && x.shape[d] == 0 {
                        return Err(format!(
                            "{}: Expected reduction dim {d} to have non-zero size (shape {})",
                            kind.name(),
                            sh(&x.shape)
                        ));
                    }
                }
            }
            let dtype = match kind {
                ReduceKind::Sum if !x.dtype.is_float() => DType::I64,
                ReduceKind::All | ReduceKind::Any => DType::Bool,
                _ => x.dtype,
            };
            Ok(TensorType { dtype, shape: reduced_shape(&x.shape, dims, *keepdim) })
        }
        Op::ArgReduce { dim, keepdim, .. } => {
            let shape = match dim {
                Some(d) => {
                    if *d >= x.rank().max(1) {
                        return Err(format!(
                            "{}: dim {d} out of range for a tensor of shape {}",
                            op.name(),
                            sh(&x.shape)
                        ));
                    }
                    if x.rank() > 0 && x.shape[*d] == 0 {
                        return Err(format!("{}: Expected reduction dim {d} to have non-zero size", op.name()));
                    }
                    reduced_shape(&x.shape, &[*d], *keepdim)
                }
                None => {
                    if x.numel() == 0 {
                        return Err(format!(
                            "{}: Expected reduction dim to be specified for input.numel() == 0.",
                            op.name()
                        ));
                    }
                    if *keepdim {
                        Dims::from_elem(1, x.rank())
                    } else {
                        Dims::new()
                    }
                }
            };
            Ok(TensorType { dtype: DType::I64, shape })
        }
        Op::Softmax { dim, .. } => {
            require_float(op.name(), x)?;
            if *dim >= x.rank().max(1) {
                return Err(format!("{}: dim {dim} out of range for shape {}", op.name(), sh(&x.shape)));
            }
            Ok(x.clone())
        }
        _ => unreachable!(),
    }
}

/// Runs a block reduction over each maximal run of adjacent dims, last run first.
fn reduce_runs(x: &Buffer, dims: &[usize], step: impl Fn(&Buffer, usize, usize, usize) -> Buffer) -> Buffer {
    let mut cur = x.clone();
    let mut i = dims.len();
    while i > 0 {
        let hi = dims[i - 1] + 1;
        let mut lo = dims[i - 1];
        i -= 1;
        while i > 0 && dims[i - 1] + 1 == lo {
            lo -= 1;
            i -= 1;
        }
        let (outer, r, inner) = split3(cur.shape(), lo, hi);
        let mut kept: Dims = cur.shape().into();
        for d in kept.iter_mut().take(hi).skip(lo) {
            *d = 1;
        }
        cur = step(&cur, outer, r, inner).reshaped(&kept);
    }
    cur
}

pub(super) fn eval(op: &Op, x: &[&Buffer], out: &TensorType) -> Buffer {
    let x = x[0];
    match op {
        Op::Reduce { kind, dims, .. } => {
            let r = if x.rank() == 0 || dims.is_empty() {
                // Reducing a scalar (or nothing) is the identity, up to the result dtype.
                match kind {
                    ReduceKind::All | ReduceKind::Any => x.cast(DType::Bool),
                    _ => x.cast(out.dtype),
                }
            } else {
                let kind = *kind;
                let x = if kind == ReduceKind::Sum && !x.dtype().is_float() { x.cast(DType::I64) } else { x.clone() };
                reduce_runs(&x, dims, |b, o, r, i| match kind {
                    ReduceKind::Sum => match b.data() {
                        Data::I64(v) => {
                            Buffer::from_vec(fold(v, o, r, i, 0i64, |a, v, _| a.wrapping_add(v), |a| a), &[o * i])
                        }
                        d => dispatch!(float, d, "sum", |v: T| Buffer::from_vec(sum(v, o, r, i), &[o * i])),
                    },
                    ReduceKind::Max | ReduceKind::Min => {
                        dispatch!(all, b.data(), |v: T| Buffer::from_vec(
                            extremum(v, o, r, i, kind == ReduceKind::Min),
                            &[o * i]
                        ))
                    }
                    ReduceKind::All | ReduceKind::Any => {
                        let all = kind == ReduceKind::All;
                        dispatch!(all, b.data(), |v: T| {
                            let zero = T::default();
                            Buffer::from_vec(
                                fold(
                                    v,
                                    o,
                                    r,
                                    i,
                                    all,
                                    |a, v, _| if all { a && v != zero } else { a || v != zero },
                                    |a| a,
                                ),
                                &[o * i],
                            )
                        })
                    }
                })
            };
            r.reshaped(&out.shape)
        }
        Op::ArgReduce { min, dim, .. } => {
            let (o, r, i) = match dim {
                Some(d) if x.rank() > 0 => split3(x.shape(), *d, d + 1),
                _ => (1, x.numel(), 1),
            };
            dispatch!(all, x.data(), |v: T| Buffer::from_vec(arg_extremum(v, o, r, i, *min), &out.shape))
        }
        Op::Softmax { dim, log } => {
            let (o, r, i) = if x.rank() == 0 { (1, 1, 1) } else { split3(x.shape(), *dim, dim + 1) };
            dispatch!(float, x.data(), op.name(), |v: T| Buffer::from_vec(softmax(v, o, r, i, *log), x.shape()))
        }
        _ => unreachable!(),
    }
}

pub(super) fn vjp<E: Emitter>(
    op: &Op,
    e: &mut E,
    x: &[&E::Value],
    y: &E::Value,
    g: &E::Value,
) -> OpResult<Vec<Option<E::Value>>> {
    let xs = e.shape(x[0]);
    match op {
        Op::Reduce { kind: ReduceKind::Sum, dims, keepdim } => {
            let g = e.unsqueeze_reduced(g, &xs, dims, *keepdim)?;
            Ok(vec![Some(e.expand(&g, &xs)?)])
        }
        Op::Reduce { kind: ReduceKind::Max | ReduceKind::Min, dims, keepdim } => {
            // The gradient is shared evenly among the positions that attain the extremum.
            let yk = e.unsqueeze_reduced(y, &xs, dims, *keepdim)?;
            let gk = e.unsqueeze_reduced(g, &xs, dims, *keepdim)?;
            let hit = e.compare(CompareOp::Eq, x[0], &yk)?;
            let hit = e.cast(&hit, e.dtype(x[0]))?;
            let idims: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
            let count = e.sum(&hit, &idims, true)?;
            let share = e.div(&gk, &count)?;
            Ok(vec![Some(e.mul(&hit, &share)?)])
        }
        Op::Reduce { .. } | Op::ArgReduce { .. } => Ok(vec![None]),
        Op::Softmax { dim, log } => {
            let d = *dim as isize;
            if *log {
                // g - softmax(x) * sum(g)
                let p = e.unary(UnaryOp::Exp, y)?;
                let s = e.sum(g, &[d], true)?;
                let t = e.mul(&p, &s)?;
                Ok(vec![Some(e.sub(g, &t)?)])
            } else {
                // y * (g - sum(g * y))
                let gy = e.mul(g, y)?;
                let s = e.sum(&gy, &[d], true)?;
                let t = e.sub(g, &s)?;
                Ok(vec![Some(e.mul(y, &t)?)])
            }
        }
        _ => unreachable!(),
    }
}

/// Builds a softmax op for a possibly negative dim.
pub fn softmax_op(dim: isize, rank: usize, log: bool) -> OpResult<Op> {
    let name = if log { "log_softmax" } else { "softmax" };
    Ok(Op::Softmax { dim: norm_dim(name, dim, rank)?, log })
}

/// Reductions and softmax read whole rows: not elementwise, not cheap, never failing.
pub(super) fn props(_op: &Op) -> Props {
    Props::NONE
}

/// sum/amax/amin over trailing dims and softmax/log_softmax over the last dim are row ops:
/// their row is the product of the reduced trailing dims.
pub(super) fn row_length(op: &Op, shape: &[usize]) -> Option<usize> {
    let rank = shape.len();
    match op {
        Op::Reduce { kind: ReduceKind::Sum | ReduceKind::Max | ReduceKind::Min, dims, .. } => {
            let trailing = !dims.is_empty() && dims.iter().enumerate().all(|(i, &d)| d + dims.len() == rank + i);
            trailing.then(|| dims.iter().map(|&d| shape[d]).product())
        }
        Op::Softmax { dim, .. } if *dim + 1 == rank => Some(shape[rank - 1]),
        _ => None,
    }
}

/// The JIT lowers float sum/amax/amin and softmax/log_softmax as row kernels.
pub(super) fn jit_lowerable(op: &Op, operands: &[DType], out: DType) -> bool {
    match op {
        Op::Reduce { kind: ReduceKind::Sum | ReduceKind::Max | ReduceKind::Min, .. } | Op::Softmax { .. } => {
            jit_float(out) && operands.iter().all(|&d| jit_float(d))
        }
        _ => false,
    }
}
