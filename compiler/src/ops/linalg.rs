//! Batched matmul with free transposes and NumPy batch broadcasting (the gemm crate does the
//! work). `matmul`'s 1-D promotion, `addmm`, `linear`, `bmm` and `einsum` are composites.
//! Also torch.linalg's vector_norm, det, inv and solve (LU through faer), below.

use super::{require_same_dtype, sh, CompareOp, Op, OpError, OpResult, Props, TensorType, UnaryOp};
use crate::emitter::{Build, Emitter};
use tracegrad_runtime::kernels::linalg as kernel;
use tracegrad_runtime::shape::broadcast_shapes;
use tracegrad_runtime::{Buffer, DType};

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

pub(super) fn vjp<E: Emitter>(
    op: &Op,
    e: &mut E,
    x: &[&E::Value],
    g: &E::Value,
    needs: [bool; 2],
) -> OpResult<Vec<Option<E::Value>>> {
    let Op::MatMul { trans_a: ta, trans_b: tb } = *op else { unreachable!() };
    let (a, b) = (x[0], x[1]);
    // C = op(A)·op(B). d op(A) = G·op(B)ᵀ and d op(B) = op(A)ᵀ·G; a transposed operand takes the
    // transpose of that, which gemm reads for free through strides.
    let ga = if !needs[0] {
        None
    } else {
        let ga = if ta { e.matmul_t(b, g, tb, true)? } else { e.matmul_t(g, b, false, !tb)? };
        let sa = e.shape(a);
        Some(e.sum_to(&ga, &sa)?)
    };
    let gb = if !needs[1] {
        None
    } else {
        let gb = if tb { e.matmul_t(g, a, true, ta)? } else { e.matmul_t(a, g, !ta, false)? };
        let sb = e.shape(b);
        Some(e.sum_to(&gb, &sb)?)
    };
    Ok(vec![ga, gb])
}

// ---------------------------------------------------------------------------------------------
// torch.linalg: vector_norm, det, inv and solve.
//
// The kernels (runtime `kernels::linalg`) factor with faer's partial-pivoting LU in f64. The
// derivative rules are built from emitted ops (inv, solve, matmul, pointwise), so they trace:
//
// - det:   dA = (g·det) · A⁻ᵀ
// - inv:   dA = -Xᵀ g Xᵀ with X = A⁻¹
// - solve: X = A⁻¹B: dB = solve(Aᵀ, G), dA = -dB Xᵀ
// - vector_norm: PyTorch's `norm_backward` (zero where the norm is zero; inf-norm ties share).

/// PyTorch's scalar-type name in linalg messages (`Long`, `Float`, …).
pub(crate) fn torch_type(d: DType) -> &'static str {
    match d {
        DType::Bool => "Bool",
        DType::U8 => "Byte",
        DType::I64 => "Long",
        DType::F32 => "Float",
        DType::F64 => "Double",
    }
}

fn require_linalg_float(api: &str, t: &TensorType) -> Result<(), String> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("{api}: Expected a floating point or complex tensor as input. Got {}", torch_type(t.dtype)))
    }
}

fn require_square(api: &str, t: &TensorType) -> Result<usize, String> {
    let r = t.rank();
    if r < 2 {
        return Err(format!("{api}: The input tensor A must have at least 2 dimensions."));
    }
    if t.shape[r - 1] != t.shape[r - 2] {
        return Err(format!(
            "{api}: A must be batches of square matrices, but they are {} by {} matrices",
            t.shape[r - 2],
            t.shape[r - 1]
        ));
    }
    Ok(t.shape[r - 1])
}

/// Shape rule of the torch.linalg ops.
pub(super) fn infer_ext(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let name = op.name();
    let a = &t[0];
    require_linalg_float(name, a)?;
    match op {
        Op::VectorNorm { ord, dims, keepdim } => {
            for &d in dims.iter() {
                if d >= a.rank().max(1) {
                    return Err(format!("{name}: dim {d} out of range for a tensor of shape {}", sh(&a.shape)));
                }
            }
            let reduced: usize = if a.rank() == 0 { 1 } else { dims.iter().map(|&d| a.shape[d]).product() };
            if ord.is_infinite() && reduced == 0 {
                return Err(format!(
                    "{name} cannot compute the {} norm on an empty tensor because the operation does not have an identity",
                    if *ord > 0.0 { "inf" } else { "-inf" }
                ));
            }
            let shape = (0..a.rank())
                .filter_map(|d| match (dims.contains(&d), keepdim) {
                    (false, _) => Some(a.shape[d]),
                    (true, true) => Some(1),
                    (true, false) => None,
                })
                .collect();
            Ok(TensorType { dtype: a.dtype, shape })
        }
        Op::Det => {
            require_square(name, a)?;
            Ok(TensorType::new(a.dtype, &a.shape[..a.rank() - 2]))
        }
        Op::Inv => {
            require_square(name, a)?;
            Ok(a.clone())
        }
        Op::SvdVals | Op::SvdU | Op::SvdVh => {
            let r = a.rank();
            if r < 2 {
                return Err(format!(
                    "{name}: The input tensor A must have at least 2 dimensions. (shape {})",
                    sh(&a.shape)
                ));
            }
            let (m, n) = (a.shape[r - 2], a.shape[r - 1]);
            let k = m.min(n);
            let mut shape = a.shape[..r - 2].to_vec();
            shape.extend(match op {
                Op::SvdVals => vec![k],
                Op::SvdU => vec![m, k],
                _ => vec![k, n],
            });
            Ok(TensorType::new(a.dtype, &shape))
        }
        Op::Solve => {
            let n = require_square(name, a)?;
            let b = &t[1];
            if a.dtype != b.dtype {
                return Err(format!(
                    "{name}: Expected A and B to have the same dtype, but found A of type {} and B of type {} instead",
                    torch_type(a.dtype),
                    torch_type(b.dtype)
                ));
            }
            let (ra, rb) = (a.rank(), b.rank());
            if rb != ra || b.shape[..rb - 2] != a.shape[..ra - 2] || b.shape[rb - 2] != n {
                let (p, q) = if rb >= 2 { (b.shape[rb - 2], b.shape[rb - 1]) } else { (b.numel(), 1) };
                return Err(format!(
                    "{name}: Incompatible shapes of A and B for the equation AX = B ({n}x{n} and {p}x{q}) (shapes {} and {})",
                    sh(&a.shape),
                    sh(&b.shape)
                ));
            }
            Ok(b.clone())
        }
        _ => unreachable!(),
    }
}

/// Reference kernels of the torch.linalg ops, with PyTorch's full singular-matrix messages.
pub(super) fn eval_ext(op: &Op, x: &[&Buffer]) -> OpResult<Buffer> {
    match op {
        Op::VectorNorm { ord, dims, keepdim } => {
            let v = if x[0].rank() == 0 { x[0].reshaped(&[1]) } else { x[0].clone() };
            let dims: Vec<usize> = if x[0].rank() == 0 { vec![0] } else { dims.to_vec() };
            let r = kernel::vector_norm(&v, &dims, *keepdim, *ord);
            Ok(if x[0].rank() == 0 { r.reshaped(&[]) } else { r })
        }
        Op::Det => Ok(kernel::det(x[0])),
        Op::Inv => kernel::inv(x[0]).map_err(|s| {
            OpError::new(
                op.name(),
                format!(
                    "linalg.inv{}: The diagonal element {} is zero, the inversion could not be completed because the input matrix is singular.",
                    s.batch_str(),
                    s.info
                ),
            )
        }),
        Op::SvdVals | Op::SvdU | Op::SvdVh => {
            let (u, s, vh) = kernel::svd(x[0]).map_err(|b| {
                let at = b.map(|b| format!(": (Batch element {b})")).unwrap_or_default();
                OpError::new(op.name(), format!("{}{at}: The algorithm failed to converge because the input matrix is ill-conditioned or has too many repeated singular values.", op.name()))
            })?;
            Ok(match op {
                Op::SvdVals => s,
                Op::SvdU => u,
                _ => vh,
            })
        }
        Op::Solve => kernel::solve(x[0], x[1]).map_err(|s| {
            OpError::new(
                op.name(),
                format!("torch.linalg.solve{}: The solver failed because the input matrix is singular.", s.batch_str()),
            )
        }),
        _ => unreachable!(),
    }
}

/// Swaps the last two dims.
fn mt<E: Emitter>(e: &mut E, v: &E::Value) -> OpResult<E::Value> {
    let r = e.shape(v).len();
    e.transpose(v, r - 2, r - 1)
}

/// `where(cond, 0, v)` with a 0-d zero of `v`'s dtype.
fn zero_where<E: Emitter>(e: &mut E, cond: &E::Value, v: &E::Value) -> OpResult<E::Value> {
    let z = e.scalar(0.0, e.dtype(v))?;
    e.where_(cond, &z, v)
}

/// `A`'s thin SVD factors `(U, S, Vh)` as nodes.
fn svd_parts<E: Emitter>(e: &mut E, a: &E::Value) -> OpResult<(E::Value, E::Value, E::Value)> {
    Ok((e.emit(Op::SvdU, &[a])?, e.emit(Op::SvdVals, &[a])?, e.emit(Op::SvdVh, &[a])?))
}

/// `s` (`[..., k]`) reshaped to a row `[..., 1, k]` (`at = 1`) or a column `[..., k, 1]` (`at = 0`).
fn as_matrix<E: Emitter>(e: &mut E, s: &E::Value, at: usize) -> OpResult<E::Value> {
    let mut shape = e.shape(s).to_vec();
    shape.insert(shape.len() - at, 1);
    e.reshape(s, &shape)
}

/// The gap matrix of PyTorch's `svd_backward`: `E[j, k] = S[k]² − S[j]²` off the diagonal and 1
/// on it. Repeated singular values make an off-diagonal entry 0, and the gradient then infinite
/// or NaN, as in PyTorch (the factors are not differentiable there).
fn svd_gaps<E: Emitter>(e: &mut E, s: &E::Value) -> OpResult<E::Value> {
    let s2 = e.mul(s, s)?;
    let (row, col) = (as_matrix(e, &s2, 1)?, as_matrix(e, &s2, 0)?);
    let d = e.sub(&row, &col)?;
    let k = *e.shape(s).last().expect("singular values have a last dim");
    let eye: Vec<f64> = (0..k * k).map(|i| if i % (k + 1) == 0 { 1.0 } else { 0.0 }).collect();
    let eye = e.constant(Buffer::from_vec(eye, &[k, k]))?;
    let eye = e.cast(&eye, e.dtype(s))?;
    e.add(&d, &eye)
}

/// The `U` part of PyTorch's `svd_backward` (real case; the rule is linear in `(gU, gS, gVh)`,
/// so each factor's part is its own VJP): `gA = U·((skew(Uᵀ·gU) / E)·S)·Vh`, plus
/// `(I − U·Uᵀ)·gU·S⁻¹·Vh` when `A` has more rows than columns.
fn svd_u_vjp<E: Emitter>(e: &mut E, a: &E::Value, g: &E::Value) -> OpResult<E::Value> {
    let (u, s, vh) = svd_parts(e, a)?;
    let uhgu = e.matmul_t(&u, g, true, false)?;
    let uhgu_t = mt(e, &uhgu)?;
    let skew = e.sub(&uhgu, &uhgu_t)?;
    let gaps = svd_gaps(e, &s)?;
    let s_row = as_matrix(e, &s, 1)?;
    let t = e.div(&skew, &gaps)?;
    let t = e.mul(&t, &s_row)?;
    let ut = e.matmul_t(&u, &t, false, false)?;
    let mut ga = e.matmul_t(&ut, &vh, false, false)?;
    let (us, k) = (e.shape(&u).to_vec(), *e.shape(&s).last().expect("k"));
    let m = us[us.len() - 2];
    if m > k {
        let proj = e.matmul_t(&u, &uhgu, false, false)?;
        let r = e.sub(g, &proj)?;
        let r = e.div(&r, &s_row)?;
        let r = e.matmul_t(&r, &vh, false, false)?;
        ga = e.add(&ga, &r)?;
    }
    Ok(ga)
}

/// The `Vh` part of PyTorch's `svd_backward`: `gA = U·(S·(skew(Vh·gVhᵀ) / E))·Vh`, plus
/// `U·S⁻¹·gVh·(I − V·Vh)` when `A` has more columns than rows.
fn svd_vh_vjp<E: Emitter>(e: &mut E, a: &E::Value, g: &E::Value) -> OpResult<E::Value> {
    let (u, s, vh) = svd_parts(e, a)?;
    let vhgv = e.matmul_t(&vh, g, false, true)?;
    let vhgv_t = mt(e, &vhgv)?;
    let skew = e.sub(&vhgv, &vhgv_t)?;
    let gaps = svd_gaps(e, &s)?;
    let s_col = as_matrix(e, &s, 0)?;
    let t = e.div(&skew, &gaps)?;
    let t = e.mul(&s_col, &t)?;
    let ut = e.matmul_t(&u, &t, false, false)?;
    let mut ga = e.matmul_t(&ut, &vh, false, false)?;
    let (k, n) = (*e.shape(&s).last().expect("k"), *e.shape(&vh).last().expect("n"));
    if n > k {
        let gv = e.matmul_t(g, &vh, false, true)?;
        let proj = e.matmul_t(&gv, &vh, false, false)?;
        let r = e.sub(g, &proj)?;
        let r = e.div(&r, &s_col)?;
        let r = e.matmul_t(&u, &r, false, false)?;
        ga = e.add(&ga, &r)?;
    }
    Ok(ga)
}

/// Derivative rules of the torch.linalg ops.
pub(super) fn vjp_ext<E: Emitter>(
    op: &Op,
    e: &mut E,
    x: &[&E::Value],
    out: &E::Value,
    g: &E::Value,
) -> OpResult<Vec<Option<E::Value>>> {
    let a = x[0];
    Ok(match op {
        Op::Det => {
            let ai = e.emit(Op::Inv, &[a])?;
            let ait = mt(e, &ai)?;
            let gd = e.mul(g, out)?;
            let mut s = e.shape(&gd).to_vec();
            s.extend([1, 1]);
            let gd = e.reshape(&gd, &s)?;
            vec![Some(e.mul(&gd, &ait)?)]
        }
        Op::Inv => {
            let t = e.matmul_t(out, g, true, false)?;
            let t = e.matmul_t(&t, out, false, true)?;
            vec![Some(e.neg(&t)?)]
        }
        Op::Solve => {
            let at = mt(e, a)?;
            let gb = e.emit(Op::Solve, &[&at, g])?;
            let ga = e.matmul_t(&gb, out, false, true)?;
            vec![Some(e.neg(&ga)?), Some(gb)]
        }
        Op::SvdVals => {
            // dA = U·diag(gS)·Vh.
            let u = e.emit(Op::SvdU, &[a])?;
            let vh = e.emit(Op::SvdVh, &[a])?;
            let mut s = e.shape(g).to_vec();
            s.insert(s.len() - 1, 1);
            let gs = e.reshape(g, &s)?;
            let ug = e.mul(&u, &gs)?;
            vec![Some(e.matmul_t(&ug, &vh, false, false)?)]
        }
        Op::SvdU => vec![Some(svd_u_vjp(e, a, g)?)],
        Op::SvdVh => vec![Some(svd_vh_vjp(e, a, g)?)],
        Op::VectorNorm { ord, dims, keepdim } => {
            let ord = *ord;
            let xs = e.shape(a);
            let dt = e.dtype(a);
            let gb = e.unsqueeze_reduced(g, &xs, dims, *keepdim)?;
            let nb = e.unsqueeze_reduced(out, &xs, dims, *keepdim)?;
            let zero = e.scalar(0.0, dt)?;
            let gx = if ord == 0.0 {
                // A count of non-zeros: piecewise constant.
                e.zeros_like(a)?
            } else if ord == 1.0 {
                let s = e.unary(UnaryOp::Sign, a)?;
                e.mul(&s, &gb)?
            } else if ord.is_infinite() {
                // The extreme |x| take the gradient; ties share it evenly.
                let ax = e.unary(UnaryOp::Abs, a)?;
                let hit = e.compare(CompareOp::Eq, &ax, &nb)?;
                let hit = e.cast(&hit, dt)?;
                let rank = xs.len();
                let all: Vec<isize> = if rank == 0 { vec![] } else { dims.iter().map(|&d| d as isize).collect() };
                let count = if rank == 0 { hit.clone() } else { e.sum(&hit, &all, true)? };
                let s = e.unary(UnaryOp::Sign, a)?;
                let w = e.mul(&s, &hit)?;
                let w = e.div(&w, &count)?;
                e.mul(&w, &gb)?
            } else if ord == 2.0 {
                let norm_zero = e.compare(CompareOp::Eq, &nb, &zero)?;
                let scale = e.div(&gb, &nb)?;
                let scale = zero_where(e, &norm_zero, &scale)?;
                e.mul(a, &scale)?
            } else if ord < 1.0 {
                // sgn(x)·|x|^(p-1)·g·‖x‖^(1-p), zero where x is zero.
                let s = e.unary(UnaryOp::Sign, a)?;
                let ax = e.unary(UnaryOp::Abs, a)?;
                let p = e.unary(UnaryOp::PowScalar(ord - 1.0), &ax)?;
                let sx = e.mul(&s, &p)?;
                let x_zero = e.compare(CompareOp::Eq, a, &zero)?;
                let sx = zero_where(e, &x_zero, &sx)?;
                let np = e.unary(UnaryOp::PowScalar(1.0 - ord), &nb)?;
                let t = e.mul(&gb, &np)?;
                e.mul(&sx, &t)?
            } else {
                // sgn(x)·|x|^(p-1)·g / ‖x‖^(p-1), zero where the norm is zero.
                let s = e.unary(UnaryOp::Sign, a)?;
                let ax = e.unary(UnaryOp::Abs, a)?;
                let p = e.unary(UnaryOp::PowScalar(ord - 1.0), &ax)?;
                let sx = e.mul(&s, &p)?;
                let np = e.unary(UnaryOp::PowScalar(ord - 1.0), &nb)?;
                let scale = e.div(&gb, &np)?;
                let norm_zero = e.compare(CompareOp::Eq, &nb, &zero)?;
                let scale = zero_where(e, &norm_zero, &scale)?;
                e.mul(&sx, &scale)?
            };
            vec![Some(gx)]
        }
        _ => unreachable!(),
    })
}

/// matmul and vector_norm cannot fail on well-typed operands; det, inv and solve can (a
/// singular matrix), and the SVD (no convergence on a non-finite input).
pub(super) fn props(op: &Op) -> Props {
    Props { fallible: matches!(op, Op::Det | Op::Inv | Op::Solve | Op::SvdVals | Op::SvdU | Op::SvdVh), ..Props::NONE }
}
