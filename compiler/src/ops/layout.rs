//! Shape ops: reshape, permute, expand, narrow, cat. Reshape shares storage; the others copy
//! into a fresh contiguous buffer (tracegrad's views copy).

use super::{checked_numel, sh, Op, OpResult, Props, TensorType};
use crate::emitter::{Build, Emitter};
use tracegrad_runtime::kernels::layout;
use tracegrad_runtime::{Buffer, Dims};

pub(super) fn infer(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let x = &t[0];
    match op {
        Op::Reshape(s) => {
            if checked_numel(s) != Some(x.numel()) {
                return Err(format!(
                    "reshape: shape '{}' is invalid for input of size {} (input shape {})",
                    sh(s),
                    x.numel(),
                    sh(&x.shape)
                ));
            }
            Ok(TensorType { dtype: x.dtype, shape: s.clone() })
        }
        Op::Permute(p) => {
            let mut seen = vec![false; x.rank()];
            let ok = p.len() == x.rank() && p.iter().all(|&d| d < x.rank() && !std::mem::replace(&mut seen[d], true));
            if !ok {
                return Err(format!(
                    "permute(sparse_coo): number of dimensions in the tensor input does not match the length of the desired ordering of dimensions i.e. input.dim() = {} is not equal to len(dims) = {} (or dims {} is not a permutation; input shape {})",
                    x.rank(),
                    p.len(),
                    sh(p),
                    sh(&x.shape)
                )
                .replace("permute(sparse_coo)", "permute"));
            }
            Ok(TensorType { dtype: x.dtype, shape: p.iter().map(|&d| x.shape[d]).collect() })
        }
        Op::Expand(s) => {
            if s.len() < x.rank() {
                return Err(format!(
                    "expand: the number of sizes provided ({}) must be greater or equal to the number of dimensions in the tensor ({}) (shapes {} and {})",
                    s.len(),
                    x.rank(),
                    sh(&x.shape),
                    sh(s)
                ));
            }
            let off = s.len() - x.rank();
            for (i, &d) in x.shape.iter().enumerate() {
                if d != 1 && d != s[i + off] {
                    return Err(format!(
                        "expand: The expanded size of the tensor ({}) must match the existing size ({d}) at non-singleton dimension {}.  Target sizes: {}.  Tensor sizes: {}",
                        s[i + off],
                        i + off,
                        sh(s),
                        sh(&x.shape)
                    ));
                }
            }
            Ok(TensorType { dtype: x.dtype, shape: s.clone() })
        }
        Op::Narrow { dim, start, len } => {
            if *dim >= x.rank() {
                return Err(format!("narrow: dim {dim} out of range for a tensor of shape {}", sh(&x.shape)));
            }
            if start.checked_add(*len).is_none_or(|end| end > x.shape[*dim]) {
                return Err(format!(
                    "narrow: start ({start}) + length ({len}) exceeds dimension size ({}) (shape {})",
                    x.shape[*dim],
                    sh(&x.shape)
                ));
            }
            let mut s = x.shape.clone();
            s[*dim] = *len;
            Ok(TensorType { dtype: x.dtype, shape: s })
        }
        Op::Cat { dim } => {
            let d = *dim;
            if x.rank() == 0 {
                return Err("cat: zero-dimensional tensor (at position 0) cannot be concatenated".into());
            }
            if d >= x.rank() {
                return Err(format!("cat: dim {d} out of range for tensors of shape {}", sh(&x.shape)));
            }
            let mut s = x.shape.clone();
            s[d] = 0;
            for (k, p) in t.iter().enumerate() {
                if p.dtype != x.dtype {
                    return Err(format!(
                        "cat: expected all tensors to have dtype {}, but tensor {k} has {}",
                        x.dtype, p.dtype
                    ));
                }
                if p.rank() != x.rank() {
                    return Err(format!(
                        "cat: Tensors must have same number of dimensions: got {} and {} (shapes {} and {})",
                        x.rank(),
                        p.rank(),
                        sh(&x.shape),
                        sh(&p.shape)
                    ));
                }
                for i in 0..x.rank() {
                    if i != d && p.shape[i] != x.shape[i] {
                        return Err(format!(
                            "cat: Sizes of tensors must match except in dimension {d}. Expected size {} but got size {} for tensor number {k} in the list (shapes {} and {})",
                            x.shape[i],
                            p.shape[i],
                            sh(&x.shape),
                            sh(&p.shape)
                        ));
                    }
                }
                s[d] = s[d].checked_add(p.shape[d]).ok_or("cat: the concatenated size overflows")?;
            }
            Ok(TensorType { dtype: x.dtype, shape: s })
        }
        _ => unreachable!(),
    }
}

pub(super) fn eval(op: &Op, x: &[&Buffer], out: &TensorType) -> Buffer {
    match op {
        Op::Reshape(s) => x[0].reshaped(s),
        Op::Permute(p) => layout::permute(x[0], p),
        Op::Expand(s) => layout::expand(x[0], s),
        Op::Narrow { dim, start, len } => layout::narrow(x[0], *dim, *start, *len),
        Op::Cat { dim } => {
            let _ = out;
            layout::cat(x, *dim)
        }
        _ => unreachable!(),
    }
}

pub(super) fn vjp<E: Emitter>(op: &Op, e: &mut E, x: &[&E::Value], g: &E::Value) -> OpResult<Vec<Option<E::Value>>> {
    let xs = e.shape(x[0]);
    Ok(match op {
        Op::Reshape(_) => vec![Some(e.reshape(g, &xs)?)],
        Op::Permute(p) => {
            let mut inv = vec![0; p.len()];
            for (i, &d) in p.iter().enumerate() {
                inv[d] = i;
            }
            vec![Some(e.permute(g, &inv)?)]
        }
        Op::Expand(_) => vec![Some(e.sum_to(g, &xs)?)],
        Op::Narrow { dim, start, len } => {
            let dt = e.dtype(g);
            let mut parts = Vec::new();
            let mut before: Dims = xs.clone();
            before[*dim] = *start;
            let mut after: Dims = xs.clone();
            after[*dim] = xs[*dim] - start - len;
            if *start > 0 {
                parts.push(e.full(0.0, dt, &before)?);
            }
            parts.push(g.clone());
            if after[*dim] > 0 {
                parts.push(e.full(0.0, dt, &after)?);
            }
            let refs: Vec<&E::Value> = parts.iter().collect();
            vec![Some(e.cat(&refs, *dim)?)]
        }
        Op::Cat { dim } => {
            let mut start = 0;
            let mut out = Vec::with_capacity(x.len());
            for p in x {
                let n = e.shape(p)[*dim];
                out.push(Some(e.narrow(g, *dim, start, n)?));
                start += n;
            }
            out
        }
        _ => unreachable!(),
    })
}

/// Layout ops never fail; reshape is cheap to recompute (a view), and reshape, permute and
/// expand keep a uniform tensor uniform.
pub(super) fn props(op: &Op) -> Props {
    Props {
        cheap: matches!(op, Op::Reshape(_)),
        preserves_uniform: matches!(op, Op::Reshape(_) | Op::Permute(_) | Op::Expand(_)),
        ..Props::NONE
    }
}
