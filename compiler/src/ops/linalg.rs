//! Batched matmul with free transposes and NumPy batch broadcasting (the gemm crate does the
//! work). `matmul`'s 1-D promotion, `addmm`, `linear`, `bmm` and `einsum` are composites.

use super::{require_same_dtype, sh, Op, OpResult, TensorType};
use crate::emitter::{Build, Emitter};
use tracegrad_runtime::shape::broadcast_shapes;

pub(super) fn infer(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let Op::MatMul { trans_a, trans_b } = op else { unreachable!() };
    let (a, b) = (&t[0], &t[1]);
    if a.rank() < 2 || b.rank() < 2 {
        return Err(format!(
            "matmul: both arguments need at least 2 dimensions here, got shapes {} and {}",
            sh(&a.shape),
            sh(&b.shape)
        ));
    }
    require_same_dtype("matmul", a, b)?;
    if !a.dtype.is_float() {
        return Err(format!("matmul: not implemented for {} (shapes {} and {})", a.dtype, sh(&a.shape), sh(&b.shape)));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, ka) = if *trans_a { (a.shape[ra - 1], a.shape[ra - 2]) } else { (a.shape[ra - 2], a.shape[ra - 1]) };
    let (kb, n) = if *trans_b { (b.shape[rb - 1], b.shape[rb - 2]) } else { (b.shape[rb - 2], b.shape[rb - 1]) };
    if ka != kb {
        return Err(format!(
            "matmul: mat1 and mat2 shapes cannot be multiplied ({m}x{ka} and {kb}x{n}) (shapes {} and {})",
            sh(&a.shape),
            sh(&b.shape)
        ));
    }
    let mut shape = broadcast_shapes("matmul", &a.shape[..ra - 2], &b.shape[..rb - 2]).map_err(|_| {
        format!("matmul: batch dimensions of shapes {} and {} cannot be broadcast", sh(&a.shape), sh(&b.shape))
    })?;
    shape.push(m);
    shape.push(n);
    Ok(TensorType { dtype: a.dtype, shape })
}

pub(super) fn vjp<E: Emitter>(op: &Op, e: &mut E, x: &[&E::Value], g: &E::Value) -> OpResult<Vec<Option<E::Value>>> {
    let Op::MatMul { trans_a: ta, trans_b: tb } = *op else { unreachable!() };
    let (a, b) = (x[0], x[1]);
    // C = op(A)·op(B). d op(A) = G·op(B)ᵀ and d op(B) = op(A)ᵀ·G; a transposed operand takes the
    // transpose of that, which gemm reads for free through strides.
    let ga = if ta { e.matmul_t(b, g, tb, true)? } else { e.matmul_t(g, b, false, !tb)? };
    let gb = if tb { e.matmul_t(g, a, true, ta)? } else { e.matmul_t(a, g, !ta, false)? };
    let (sa, sb) = (e.shape(a), e.shape(b));
    Ok(vec![Some(e.sum_to(&ga, &sa)?), Some(e.sum_to(&gb, &sb)?)])
}
