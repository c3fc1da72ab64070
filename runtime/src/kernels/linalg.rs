//! Linear-algebra kernels: vector norms; determinant, inverse and solve through an LU
//! factorisation with partial pivoting; and the reduced SVD (the `faer` crate), batched over
//! leading dimensions.
//!
//! Matrices are the last two dimensions of a row-major buffer. The arithmetic is done in f64
//! and the results are cast back to the input's dtype. A singular matrix (an exactly zero
//! pivot, LAPACK's `info > 0`) comes back as [`Singular`], from which the caller builds
//! PyTorch's message.

use faer::linalg::solvers::{DenseSolveCore, PartialPivLu, Solve};
use faer::MatRef;

use super::layout::permute;
use crate::buffer::Buffer;
use crate::shape::numel;

/// An exactly zero pivot in the LU factorisation of one matrix of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Singular {
    /// Which matrix of the batch (row-major over the batch dimensions), or `None` for an
    /// unbatched (2-D) input.
    pub batch: Option<usize>,
    /// The 1-based position of the first zero diagonal element of `U` (LAPACK's `info`).
    pub info: usize,
}

impl Singular {
    /// PyTorch's `": (Batch element i)"` part of a linalg error, empty for a 2-D input.
    pub fn batch_str(&self) -> String {
        self.batch.map(|b| format!(": (Batch element {b})")).unwrap_or_default()
    }
}

/// The batch size and matrix size of a `[..., n, n]` shape.
fn batch_and_n(shape: &[usize]) -> (usize, usize) {
    let r = shape.len();
    assert!(r >= 2 && shape[r - 1] == shape[r - 2], "linalg kernels take batches of square matrices");
    (numel(&shape[..r - 2]), shape[r - 1])
}

/// The LU factorisation of one row-major `n × n` matrix, and the first zero pivot (1-based).
fn factor(a: &[f64], n: usize) -> (PartialPivLu<f64>, Option<usize>) {
    let lu = MatRef::from_row_major_slice(a, n, n).partial_piv_lu();
    let u = lu.U();
    let info = (0..n).find(|&i| u[(i, i)] == 0.0).map(|i| i + 1);
    (lu, info)
}

/// The sign of a permutation given as `perm[i]`.
fn perm_sign(perm: &[usize]) -> f64 {
    let mut seen = vec![false; perm.len()];
    let mut sign = 1.0;
    for start in 0..perm.len() {
        if seen[start] {
            continue;
        }
        let mut len = 0;
        let mut i = start;
        while !seen[i] {
            seen[i] = true;
            i = perm[i];
            len += 1;
        }
        if len % 2 == 0 {
            sign = -sign;
        }
    }
    sign
}

/// The determinant by LAPACK's unblocked `getf2` (a zero pivot column is left unscaled and the
/// elimination goes on), so a singular matrix gives PyTorch's signed zero.
fn det_unblocked(a: &[f64], n: usize) -> f64 {
    let mut m = a.to_vec();
    let mut sign = 1.0;
    for j in 0..n {
        let mut p = j;
        for i in j + 1..n {
            if m[i * n + j].abs() > m[p * n + j].abs() {
                p = i;
            }
        }
        let pivot = m[p * n + j];
        if pivot != 0.0 {
            if p != j {
                for k in 0..n {
                    m.swap(j * n + k, p * n + k);
                }
                sign = -sign;
            }
            for i in j + 1..n {
                m[i * n + j] /= pivot;
            }
        }
        for i in j + 1..n {
            let l = m[i * n + j];
            for k in j + 1..n {
                m[i * n + k] -= l * m[j * n + k];
            }
        }
    }
    (0..n).map(|i| m[i * n + i]).product::<f64>() * sign
}

/// `det(a)` for `a` of shape `[..., n, n]`; the result has shape `[...]`. Singular matrices
/// give (signed) zero, as in PyTorch.
pub fn det(a: &Buffer) -> Buffer {
    let (batch, n) = batch_and_n(a.shape());
    let v = a.to_f64_vec();
    let out: Vec<f64> = (0..batch)
        .map(|b| {
            let m = &v[b * n * n..(b + 1) * n * n];
            if n == 0 {
                return 1.0;
            }
            let (lu, info) = factor(m, n);
            if info.is_some() {
                return det_unblocked(m, n);
            }
            let u = lu.U();
            let (fwd, _) = lu.P().arrays();
            (0..n).map(|i| u[(i, i)]).product::<f64>() * perm_sign(fwd)
        })
        .collect();
    let r = a.rank();
    Buffer::from_vec(out, &a.shape()[..r - 2]).cast(a.dtype())
}

/// `inv(a)` for `a` of shape `[..., n, n]`, or the first singular matrix.
pub fn inv(a: &Buffer) -> Result<Buffer, Singular> {
    let (batch, n) = batch_and_n(a.shape());
    let batched = a.rank() > 2;
    let v = a.to_f64_vec();
    let mut out = vec![0.0f64; v.len()];
    for b in 0..batch {
        let (lu, info) = factor(&v[b * n * n..(b + 1) * n * n], n);
        if let Some(info) = info {
            return Err(Singular { batch: batched.then_some(b), info });
        }
        let m = lu.inverse();
        for i in 0..n {
            for j in 0..n {
                out[b * n * n + i * n + j] = m[(i, j)];
            }
        }
    }
    Ok(Buffer::from_vec(out, a.shape()).cast(a.dtype()))
}

/// `solve(a, b)`: `X` with `a X = b`, for `a` of shape `[..., n, n]` and `b` of shape
/// `[..., n, k]` with the same batch dimensions; or the first singular matrix.
pub fn solve(a: &Buffer, b: &Buffer) -> Result<Buffer, Singular> {
    let (batch, n) = batch_and_n(a.shape());
    let batched = a.rank() > 2;
    let k = b.shape()[b.rank() - 1];
    let (av, bv) = (a.to_f64_vec(), b.to_f64_vec());
    let mut out = vec![0.0f64; bv.len()];
    for i in 0..batch {
        let (lu, info) = factor(&av[i * n * n..(i + 1) * n * n], n);
        if let Some(info) = info {
            return Err(Singular { batch: batched.then_some(i), info });
        }
        let rhs = MatRef::from_row_major_slice(&bv[i * n * k..(i + 1) * n * k], n, k);
        let x = lu.solve(rhs);
        for r in 0..n {
            for c in 0..k {
                out[i * n * k + r * k + c] = x[(r, c)];
            }
        }
    }
    Ok(Buffer::from_vec(out, b.shape()).cast(b.dtype()))
}

/// The reduced SVD of every `m × n` matrix of `a: [..., m, n]`: `U: [..., m, k]`,
/// `S: [..., k]` (non-negative, non-increasing) and `Vh: [..., k, n]` with `k = min(m, n)`
/// (`torch.linalg.svd(a, full_matrices=False)`), or the batch index of a matrix whose
/// iteration did not converge (a non-finite input).
pub fn svd(a: &Buffer) -> Result<(Buffer, Buffer, Buffer), Option<usize>> {
    let r = a.rank();
    assert!(r >= 2, "svd takes batches of matrices");
    let (m, n) = (a.shape()[r - 2], a.shape()[r - 1]);
    let k = m.min(n);
    let batch = numel(&a.shape()[..r - 2]);
    let v = a.to_f64_vec();
    let (mut u, mut s, mut vh) = (vec![0.0; batch * m * k], vec![0.0; batch * k], vec![0.0; batch * k * n]);
    for b in 0..batch {
        if k == 0 {
            break;
        }
        let mat = MatRef::from_row_major_slice(&v[b * m * n..(b + 1) * m * n], m, n);
        let f = mat.thin_svd().map_err(|_| (r > 2).then_some(b))?;
        let (fu, fs, fv) = (f.U(), f.S().column_vector(), f.V());
        for i in 0..k {
            s[b * k + i] = fs[i];
            for row in 0..m {
                u[b * m * k + row * k + i] = fu[(row, i)];
            }
            for col in 0..n {
                vh[b * k * n + i * n + col] = fv[(col, i)];
            }
        }
    }
    let lead = &a.shape()[..r - 2];
    let shape = |tail: &[usize]| lead.iter().chain(tail).copied().collect::<Vec<usize>>();
    let dt = a.dtype();
    Ok((
        Buffer::from_vec(u, &shape(&[m, k])).cast(dt),
        Buffer::from_vec(s, &shape(&[k])).cast(dt),
        Buffer::from_vec(vh, &shape(&[k, n])).cast(dt),
    ))
}

/// `linalg.vector_norm(x, ord, dims, keepdim)` for a float `x`: `ord` is `inf` (max `|x|`),
/// `-inf` (min `|x|`), `0` (count of non-zeros) or any other `p`: `(Σ|x|^p)^(1/p)`. `dims` are
/// sorted, unique and in range (all dims for a full reduction).
pub fn vector_norm(x: &Buffer, dims: &[usize], keepdim: bool, ord: f64) -> Buffer {
    let shape = x.shape();
    let kept: Vec<usize> = (0..shape.len()).filter(|d| !dims.contains(d)).collect();
    let perm: Vec<usize> = kept.iter().chain(dims).copied().collect();
    let moved = permute(x, &perm).to_f64_vec();
    let r: usize = dims.iter().map(|&d| shape[d]).product();
    let outer: usize = kept.iter().map(|&d| shape[d]).product();
    let norm = |row: &[f64]| -> f64 {
        if ord == f64::INFINITY {
            row.iter().fold(f64::NEG_INFINITY, |m, &v| if v.is_nan() || m.is_nan() { f64::NAN } else { m.max(v.abs()) })
        } else if ord == f64::NEG_INFINITY {
            row.iter().fold(f64::INFINITY, |m, &v| if v.is_nan() || m.is_nan() { f64::NAN } else { m.min(v.abs()) })
        } else if ord == 0.0 {
            row.iter().filter(|&&v| v != 0.0).count() as f64
        } else if ord == 1.0 {
            row.iter().map(|v| v.abs()).sum()
        } else if ord == 2.0 {
            row.iter().map(|v| v * v).sum::<f64>().sqrt()
        } else {
            row.iter().map(|v| v.abs().powf(ord)).sum::<f64>().powf(1.0 / ord)
        }
    };
    let out: Vec<f64> = if r == 0 { vec![norm(&[]); outer] } else { moved.chunks(r).map(norm).collect() };
    let out_shape: Vec<usize> = (0..shape.len())
        .filter_map(|d| {
            if !dims.contains(&d) {
                Some(shape[d])
            } else if keepdim {
                Some(1)
            } else {
                None
            }
        })
        .collect();
    Buffer::from_vec(out, &out_shape).cast(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: Vec<f64>, shape: &[usize]) -> Buffer {
        Buffer::from_vec(v, shape)
    }

    #[test]
    fn det_inv_solve_of_a_small_matrix() {
        let a = m(vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0], &[3, 3]);
        assert!((det(&a).item() - 21.29).abs() < 1e-12);
        let ai = inv(&a).unwrap();
        let b = m(vec![1.0, 2.0, 0.5, -1.0, 3.0, 0.0], &[3, 2]);
        let x = solve(&a, &b).unwrap().to_f64_vec();
        // A·X = B.
        let av = a.to_f64_vec();
        for r in 0..3 {
            for c in 0..2 {
                let s: f64 = (0..3).map(|k| av[r * 3 + k] * x[k * 2 + c]).sum();
                assert!((s - b.to_f64_vec()[r * 2 + c]).abs() < 1e-12);
            }
        }
        assert!((ai.to_f64_vec()[0] - 0.2799436355096289).abs() < 1e-12);
    }

    #[test]
    fn permutation_sign_and_singular_pivots() {
        // Rows swapped: det flips sign.
        let a = m(vec![0.0, 1.0, 1.0, 0.0], &[2, 2]);
        assert_eq!(det(&a).item(), -1.0);
        let s = m(vec![1.0, 2.0, 2.0, 4.0], &[2, 2]);
        let d = det(&s).item();
        assert!(d == 0.0 && d.is_sign_negative());
        assert_eq!(inv(&s).unwrap_err(), Singular { batch: None, info: 2 });
        // A zero pivot before the last row: LAPACK carries on, the determinant is zero.
        let z = m(vec![1.0, 2.0, 3.0, 2.0, 4.0, 5.0, 4.0, 8.0, 7.0], &[3, 3]);
        assert_eq!(det(&z).item(), 0.0);
        assert_eq!(inv(&z).unwrap_err(), Singular { batch: None, info: 2 });
        let batched = m(vec![1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0], &[2, 2, 2]);
        assert_eq!(inv(&batched).unwrap_err(), Singular { batch: Some(1), info: 2 });
    }

    #[test]
    fn vector_norms() {
        let v = m(vec![3.0, -4.0, 12.0], &[3]);
        assert_eq!(vector_norm(&v, &[0], false, 2.0).item(), 13.0);
        assert_eq!(vector_norm(&v, &[0], false, 1.0).item(), 19.0);
        assert_eq!(vector_norm(&v, &[0], false, f64::INFINITY).item(), 12.0);
        assert_eq!(vector_norm(&v, &[0], false, f64::NEG_INFINITY).item(), 3.0);
        assert_eq!(vector_norm(&v, &[0], false, 0.0).item(), 3.0);
        let b = m(vec![1.0, 2.0, 0.5, -1.0, 3.0, 0.0], &[3, 2]);
        let n = vector_norm(&b, &[0], true, 2.0);
        assert_eq!(n.shape(), &[1, 2]);
        assert!((n.to_f64_vec()[1] - 5f64.sqrt()).abs() < 1e-15);
    }

    #[test]
    fn svd_reconstructs_and_orders() {
        // A batch of a 3×2 and a 3×2 with a known spectrum: diag(3, 1) rotated.
        let a = m(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0], &[2, 3, 2]);
        let (u, s, vh) = svd(&a).unwrap();
        assert_eq!((u.shape(), s.shape(), vh.shape()), (&[2, 3, 2][..], &[2, 2][..], &[2, 2, 2][..]));
        let (u, s, vh, av) = (u.to_f64_vec(), s.to_f64_vec(), vh.to_f64_vec(), a.to_f64_vec());
        for b in 0..2 {
            assert!(s[b * 2] >= s[b * 2 + 1] && s[b * 2 + 1] >= 0.0);
            for r in 0..3 {
                for c in 0..2 {
                    let x: f64 = (0..2).map(|i| u[b * 6 + r * 2 + i] * s[b * 2 + i] * vh[b * 4 + i * 2 + c]).sum();
                    assert!((x - av[b * 6 + r * 2 + c]).abs() < 1e-12, "U S Vh != A at {b},{r},{c}");
                }
            }
        }
        assert!((s[2] - 3.0).abs() < 1e-14 && (s[3] - 1.0).abs() < 1e-14);
        // sqrt of the eigenvalues of AᵀA for [[1,2],[3,4],[5,6]]: 9.5255180…, 0.5143005….
        assert!((s[0] - 9.525518091565107).abs() < 1e-12 && (s[1] - 0.5143005806586441).abs() < 1e-12);
        // Empty matrices.
        let (u, s, _) = svd(&m(vec![], &[0, 3])).unwrap();
        assert_eq!((u.shape(), s.shape()), (&[0, 0][..], &[0][..]));
    }
}
