//! Index ops: index_select / index_add and gather / scatter_add. Duplicate indices accumulate
//! in the backward, because each rule's adjoint is the matching `*_add` op.

use super::{sh, Op, OpResult, Props, TensorType};
use crate::emitter::{Build, Emitter};
use tracegrad_runtime::kernels::index;
use tracegrad_runtime::{Buffer, DType, Dims};

pub(super) fn require_index(op: &str, t: &TensorType) -> Result<(), String> {
    if t.dtype != DType::I64 {
        return Err(format!("{op}(): Expected dtype int64 for index, got {} (shape {})", t.dtype, sh(&t.shape)));
    }
    Ok(())
}

pub(super) fn check_dim(op: &str, dim: usize, x: &TensorType) -> Result<(), String> {
    if dim >= x.rank().max(1) {
        return Err(format!("{op}: dim {dim} out of range for a tensor of shape {}", sh(&x.shape)));
    }
    Ok(())
}

/// A shape as PyTorch's gather/scatter checks see it: a 0-d tensor counts as one element
/// along one dimension (`ensure_nonempty_dim`).
pub(super) fn nonempty(shape: &[usize]) -> Dims {
    if shape.is_empty() {
        Dims::from_slice(&[1])
    } else {
        shape.into()
    }
}

/// A buffer viewed through [`nonempty`].
pub(super) fn nonempty_buf(b: &Buffer) -> Buffer {
    if b.rank() == 0 {
        b.reshaped(&[1])
    } else {
        b.clone()
    }
}

/// PyTorch's gather/scatter rule: same rank, and `index.size(d) <= other.size(d)` for the
/// dims it names (a 0-d operand counts as 1-d).
pub(super) fn check_scatter_shapes(
    op: &str,
    dim: usize,
    x: &TensorType,
    idx: &TensorType,
    src: Option<&TensorType>,
) -> Result<(), String> {
    let (xs, is) = (nonempty(&x.shape), nonempty(&idx.shape));
    let ss = src.map(|s| nonempty(&s.shape));
    if is.len() != xs.len() || ss.as_ref().is_some_and(|s| s.len() != xs.len()) {
        return Err(format!(
            "{op}(): Index tensor must have the same number of dimensions as input tensor (shapes {} and index {}{})",
            sh(&x.shape),
            sh(&idx.shape),
            src.map(|s| format!(" and src {}", sh(&s.shape))).unwrap_or_default()
        ));
    }
    for d in 0..xs.len() {
        if d != dim && is[d] > xs[d] {
            return Err(format!(
                "{op}(): Size does not match at dimension {d} expected index {} to be smaller than self {} apart from dimension {dim}",
                sh(&idx.shape),
                sh(&x.shape)
            ));
        }
        if let Some(s) = src {
            if is[d] > ss.as_ref().expect("src shape")[d] {
                return Err(format!(
                    "{op}(): Expected index {} to be smaller than self {} apart from dimension {dim} and to be smaller size than src {}",
                    sh(&idx.shape),
                    sh(&x.shape),
                    sh(&s.shape)
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn infer(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let name = op.name();
    let x = &t[0];
    require_index(name, &t[1])?;
    match op {
        Op::IndexSelect { dim } => {
            check_dim(name, *dim, x)?;
            if t[1].rank() > 1 {
                return Err(format!(
                    "index_select(): Index is supposed to be a vector (got shape {})",
                    sh(&t[1].shape)
                ));
            }
            if x.rank() == 0 && t[1].numel() != 1 {
                return Err(format!(
                    "index_select(): Index to scalar can have only 1 value, got {} value(s) (index shape {})",
                    t[1].numel(),
                    sh(&t[1].shape)
                ));
            }
            let mut s = x.shape.clone();
            if x.rank() > 0 {
                s[*dim] = t[1].numel();
            }
            Ok(TensorType { dtype: x.dtype, shape: s })
        }
        Op::IndexAdd { dim } => {
            check_dim(name, *dim, x)?;
            if t[1].rank() > 1 {
                return Err(format!("index_add_(): Index is supposed to be a vector (got shape {})", sh(&t[1].shape)));
            }
            // A 0-d self is a one-element vector; its source is then 0-d or 1-d.
            let mut expect = nonempty(&x.shape);
            expect[*dim] = t[1].numel();
            if nonempty(&t[2].shape) != expect || t[2].rank() > expect.len() || t[2].dtype != x.dtype {
                return Err(format!(
                    "index_add_(): source {} {} does not match self {} {} with index of length {} along dim {dim}",
                    t[2].dtype,
                    sh(&t[2].shape),
                    x.dtype,
                    sh(&x.shape),
                    t[1].numel()
                ));
            }
            Ok(x.clone())
        }
        Op::Gather { dim } => {
            check_dim(name, *dim, x)?;
            check_scatter_shapes(name, *dim, x, &t[1], None)?;
            Ok(TensorType { dtype: x.dtype, shape: t[1].shape.clone() })
        }
        Op::ScatterAdd { dim } => {
            check_dim(name, *dim, x)?;
            if t[2].dtype != x.dtype {
                return Err(format!(
                    "scatter_add(): Expected self.dtype to be equal to src.dtype ({} vs {})",
                    x.dtype, t[2].dtype
                ));
            }
            check_scatter_shapes(name, *dim, x, &t[1], Some(&t[2]))?;
            Ok(x.clone())
        }
        _ => unreachable!(),
    }
}

pub(super) fn eval(op: &Op, x: &[&Buffer]) -> Result<Buffer, String> {
    match op {
        Op::IndexSelect { dim } => {
            if x[0].rank() == 0 {
                // A scalar behaves as a one-element vector whose result keeps rank 0.
                let r = index::index_select(&x[0].reshaped(&[1]), 0, x[1].as_slice::<i64>())?;
                return Ok(r.reshaped(&[]));
            }
            index::index_select(x[0], *dim, x[1].as_slice::<i64>())
        }
        // 0-d operands run as one-element vectors; results keep the shapes the rule gave.
        Op::IndexAdd { dim } => {
            let r = index::index_add(&nonempty_buf(x[0]), *dim, x[1].as_slice::<i64>(), &nonempty_buf(x[2]))?;
            Ok(r.reshaped(x[0].shape()))
        }
        Op::Gather { dim } => {
            let r = index::gather(&nonempty_buf(x[0]), *dim, &nonempty_buf(x[1]))?;
            Ok(r.reshaped(x[1].shape()))
        }
        Op::ScatterAdd { dim } => {
            let r = index::scatter_add(&nonempty_buf(x[0]), *dim, &nonempty_buf(x[1]), &nonempty_buf(x[2]))?;
            Ok(r.reshaped(x[0].shape()))
        }
        _ => unreachable!(),
    }
}

pub(super) fn vjp<E: Emitter>(op: &Op, e: &mut E, x: &[&E::Value], g: &E::Value) -> OpResult<Vec<Option<E::Value>>> {
    Ok(match op {
        Op::IndexSelect { dim } => {
            let z = e.zeros_like(x[0])?;
            vec![Some(e.emit(Op::IndexAdd { dim: *dim }, &[&z, x[1], g])?), None]
        }
        Op::IndexAdd { dim } => {
            let gs = e.emit(Op::IndexSelect { dim: *dim }, &[g, x[1]])?;
            let ss = e.shape(x[2]);
            vec![Some(g.clone()), None, Some(e.reshape(&gs, &ss)?)]
        }
        Op::Gather { dim } => {
            let z = e.zeros_like(x[0])?;
            vec![Some(e.emit(Op::ScatterAdd { dim: *dim }, &[&z, x[1], g])?), None]
        }
        Op::ScatterAdd { dim } => {
            // src positions outside the index's extent receive no gradient.
            let gs = e.emit(Op::Gather { dim: *dim }, &[g, x[1]])?;
            let ss = e.shape(x[2]);
            let gs = e.reshape(&gs, &nonempty(&e.shape(&gs)))?;
            let gs = e.pad_to(&gs, &nonempty(&ss))?;
            vec![Some(g.clone()), None, Some(e.reshape(&gs, &ss)?)]
        }
        _ => unreachable!(),
    })
}

/// Index ops fail on an index out of range.
pub(super) fn props(_op: &Op) -> Props {
    Props { fallible: true, ..Props::NONE }
}
