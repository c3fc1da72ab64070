//! `torch.linalg`: norms, determinant, inverse and linear solve.
//!
//! ```
//! use tracegrad::{linalg, Tensor};
//!
//! let a = Tensor::from_vec(vec![4.0f64, 1.0, 1.0, 3.0], &[2, 2]).requires_grad_(true);
//! let b = Tensor::from_vec(vec![1.0f64, 2.0], &[2]);
//! let x = linalg::solve(&a, &b);
//! assert!(a.matmul(&x).allclose(&b, 1e-12, 1e-12));
//! linalg::det(&a).backward();
//! // d det / dA = det · A⁻ᵀ
//! let want = linalg::inv(&a.detach()).t().mul_scalar(11.0);
//! assert!(a.grad().unwrap().allclose(&want, 1e-12, 1e-12));
//! ```
//!
//! Determinant, inverse and solve factor with LU and partial pivoting (the `faer` crate) in
//! f64 and are batched over leading dimensions. Their derivative rules are made of ops
//! (inverse, solve, matmul), so they trace and differentiate twice. A singular matrix makes
//! `inv` and `solve` fail with PyTorch's text: the panicking functions panic with it, the
//! `try_` ones return it.

use tracegrad_compiler::composite as c;
use tracegrad_compiler::OpError;

use crate::autograd::{eager, Eager};
use crate::Tensor;

/// `torch.linalg.vector_norm(x, ord, dim=dims, keepdim)`. `dims` empty means all dims; `ord`
/// is `f64::INFINITY` (max `|x|`), `f64::NEG_INFINITY` (min `|x|`), `0.0` (count of
/// non-zeros) or any other `p`, giving `(Σ|x|^p)^(1/p)`. The gradient is zero where the norm
/// is zero; ties of the inf-norms share it.
#[track_caller]
pub fn vector_norm(x: &Tensor, ord: f64, dims: &[isize], keepdim: bool) -> Tensor {
    eager(|e| c::vector_norm(e, x, ord, dims, keepdim))
}

/// `torch.linalg.matrix_norm(x, ord, keepdim=keepdim)` over the last two dims. `ord` is
/// `"fro"`, `"1"`, `"-1"`, `"inf"`, `"-inf"`, or `"nuc"`, `"2"` and `"-2"` (the sum, largest
/// and smallest singular value).
#[track_caller]
pub fn matrix_norm(x: &Tensor, ord: &str, keepdim: bool) -> Tensor {
    matrix_norm_dims(x, ord, [-2, -1], keepdim)
}

/// [`matrix_norm`] over the two given dims.
#[track_caller]
pub fn matrix_norm_dims(x: &Tensor, ord: &str, dims: [isize; 2], keepdim: bool) -> Tensor {
    eager(|e| c::matrix_norm(e, x, ord, dims, keepdim))
}

/// `torch.linalg.svdvals` of `[..., m, n]`: the singular values `[..., min(m, n)]`,
/// non-increasing. Differentiable (`dA = U·diag(dS)·Vh`, where the values are distinct).
#[track_caller]
pub fn svdvals(a: &Tensor) -> Tensor {
    eager(|e| c::svdvals(e, a))
}

/// `torch.linalg.svd(a, full_matrices=False)`: `(U, S, Vh)` with `a = U·diag(S)·Vh`. Gradients
/// flow through all three with PyTorch's `svd_backward` rule. As in PyTorch, a loss through `U`
/// or `Vh` should not depend on the factors' signs (they are not unique), and repeated
/// singular values make the gradient through them infinite or NaN.
#[track_caller]
pub fn svd(a: &Tensor) -> (Tensor, Tensor, Tensor) {
    eager(|e| c::svd(e, a))
}

/// `torch.linalg.det` of `[..., n, n]`: shape `[...]`. A singular matrix gives (signed) zero.
#[track_caller]
pub fn det(a: &Tensor) -> Tensor {
    eager(|e| c::det(e, a))
}

/// `torch.linalg.inv` of `[..., n, n]`. Panics on a singular matrix with PyTorch's text
/// (`linalg.inv: The diagonal element 2 is zero, ...`).
#[track_caller]
pub fn inv(a: &Tensor) -> Tensor {
    eager(|e| c::inv(e, a))
}

/// `torch.linalg.solve(A, B)`: `X` with `A X = B`. `B` is `[..., n, k]` or a vector (`[n]`,
/// or `A`'s shape without its last dim); batch dims broadcast. Panics on a singular `A` with
/// PyTorch's text.
#[track_caller]
pub fn solve(a: &Tensor, b: &Tensor) -> Tensor {
    eager(|e| c::solve(e, a, b))
}

/// [`det`], with a misuse (a non-square or integer input) returned as the error.
pub fn try_det(a: &Tensor) -> Result<Tensor, OpError> {
    c::det(&mut Eager, a)
}

/// [`inv`], with a singular matrix or misuse returned as the error.
pub fn try_inv(a: &Tensor) -> Result<Tensor, OpError> {
    c::inv(&mut Eager, a)
}

/// [`solve`], with a singular matrix or misuse returned as the error.
pub fn try_solve(a: &Tensor, b: &Tensor) -> Result<Tensor, OpError> {
    c::solve(&mut Eager, a, b)
}

impl Tensor {
    /// `torch.linalg.det` of `[..., n, n]` (`tensor.det()`); see [`det`].
    #[track_caller]
    pub fn det(&self) -> Tensor {
        det(self)
    }

    /// `torch.linalg.inv` of `[..., n, n]` (`tensor.inverse()`); see [`inv`].
    #[track_caller]
    pub fn inverse(&self) -> Tensor {
        inv(self)
    }
}
