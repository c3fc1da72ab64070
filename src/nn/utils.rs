//! `torch.nn.utils`' gradient clipping: [`clip_grad_norm_`] and [`clip_grad_value_`], eager,
//! with PyTorch's arithmetic (per-gradient norms, then the norm of those norms; the coefficient
//! `max_norm / (total + 1e-6)` clamped to 1) and its error text.

use crate::autograd::no_grad;
use crate::linalg::vector_norm;
use crate::tensor::Tensor;

/// Python's `repr` of a norm order (`2.0`, `inf`).
fn order_repr(p: f64) -> String {
    if p.is_infinite() {
        if p > 0.0 { "inf" } else { "-inf" }.to_string()
    } else if p.fract() == 0.0 {
        format!("{p:.1}")
    } else {
        format!("{p}")
    }
}

/// `torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite)`:
/// scales every gradient in place by `min(1, max_norm / (total + 1e-6))`, where `total` is the
/// `norm_type`-norm of all gradients together (`f64::INFINITY` for the max norm), and returns
/// `total` as a 0-d tensor. Parameters without a gradient are skipped; with none at all the
/// result is `0`. A non-finite total is an error when `error_if_nonfinite` is set, with
/// PyTorch's text; otherwise the gradients are scaled by it, as in PyTorch.
pub fn clip_grad_norm_(
    parameters: &[Tensor],
    max_norm: f64,
    norm_type: f64,
    error_if_nonfinite: bool,
) -> Result<Tensor, String> {
    no_grad(|| clip_norm(parameters, max_norm, norm_type, error_if_nonfinite))
}

fn clip_norm(parameters: &[Tensor], max_norm: f64, norm_type: f64, error_if_nonfinite: bool) -> Result<Tensor, String> {
    let grads: Vec<(&Tensor, Tensor)> = parameters.iter().filter_map(|p| p.grad().map(|g| (p, g))).collect();
    if grads.is_empty() {
        return Ok(Tensor::scalar(0.0));
    }
    let norms: Vec<Tensor> = grads.iter().map(|(_, g)| vector_norm(g, norm_type, &[], false)).collect();
    let total = vector_norm(&Tensor::stack(&norms.iter().collect::<Vec<_>>(), 0), norm_type, &[], false);
    let t = total.item();
    if error_if_nonfinite && !t.is_finite() {
        return Err(format!(
            "The total norm of order {} for gradients from `parameters` is non-finite, so it cannot be clipped. To \
             disable this error and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`",
            order_repr(norm_type)
        ));
    }
    let eps = Tensor::full_dtype(&[], 1e-6, total.dtype());
    let coef = Tensor::full_dtype(&[], max_norm, total.dtype()).div(&total.add(&eps)).clamp(None, Some(1.0));
    for (p, g) in grads {
        p.set_grad(Some(g.mul(&coef.to_dtype(g.dtype()))));
    }
    Ok(total)
}

/// `torch.nn.utils.clip_grad_value_(parameters, clip_value)`: clamps every gradient to
/// `[-clip_value, clip_value]` in place.
pub fn clip_grad_value_(parameters: &[Tensor], clip_value: f64) {
    no_grad(|| {
        for p in parameters {
            if let Some(g) = p.grad() {
                p.set_grad(Some(g.clamp(Some(-clip_value), Some(clip_value))));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_with_grad(v: &[f32], g: &[f32]) -> Tensor {
        let p = Tensor::vec1(v).requires_grad_(true);
        p.set_grad(Some(Tensor::vec1(g)));
        p
    }

    #[test]
    fn clips_by_the_total_two_norm() {
        // Gradients [3, 4] and [12]: total = sqrt(9 + 16 + 144) = 13.
        let (a, b) = (leaf_with_grad(&[0.0, 0.0], &[3.0, 4.0]), leaf_with_grad(&[0.0], &[12.0]));
        let total = clip_grad_norm_(&[a.clone(), b.clone()], 1.0, 2.0, false).unwrap();
        assert!((total.item() - 13.0).abs() < 1e-6);
        let coef = 1.0 / (13.0 + 1e-6);
        for (got, want) in a.grad().unwrap().to_vec_f64().iter().zip([3.0 * coef, 4.0 * coef]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert!((b.grad().unwrap().item() - 12.0 * coef).abs() < 1e-6);
    }

    #[test]
    fn below_the_limit_nothing_changes() {
        let a = leaf_with_grad(&[0.0, 0.0], &[0.3, -0.4]);
        let total = clip_grad_norm_(std::slice::from_ref(&a), 1.0, 2.0, false).unwrap();
        assert!((total.item() - 0.5).abs() < 1e-7);
        assert_eq!(a.grad().unwrap().to_vec_f32(), vec![0.3, -0.4]);
    }

    #[test]
    fn inf_and_p_norms() {
        let a = leaf_with_grad(&[0.0, 0.0], &[-3.0, 2.0]);
        let b = leaf_with_grad(&[0.0], &[1.0]);
        let total = clip_grad_norm_(&[a.clone(), b.clone()], 1.5, f64::INFINITY, false).unwrap();
        assert_eq!(total.item(), 3.0);
        let coef = (1.5f32 / (3.0f32 + 1e-6)) as f64;
        assert!((a.grad().unwrap().to_vec_f64()[0] + 3.0 * coef).abs() < 1e-6);
        let c = leaf_with_grad(&[0.0, 0.0], &[1.0, 1.0]);
        let total = clip_grad_norm_(std::slice::from_ref(&c), 10.0, 1.0, false).unwrap();
        assert_eq!(total.item(), 2.0);
    }

    #[test]
    fn nonfinite_total_is_an_error_only_when_asked() {
        let a = leaf_with_grad(&[0.0], &[f32::NAN]);
        let e = clip_grad_norm_(std::slice::from_ref(&a), 1.0, 2.0, true).unwrap_err();
        assert_eq!(
            e,
            "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be clipped. To \
             disable this error and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
        );
        assert!(a.grad().unwrap().item().is_nan(), "an error changes nothing");
        let b = leaf_with_grad(&[0.0], &[f32::INFINITY]);
        assert!(clip_grad_norm_(std::slice::from_ref(&b), 1.0, f64::INFINITY, true).unwrap_err().contains("order inf"));
        assert!(clip_grad_norm_(std::slice::from_ref(&b), 1.0, 2.0, false).unwrap().item().is_infinite());
    }

    #[test]
    fn no_gradients_give_zero_and_value_clipping_clamps() {
        let p = Tensor::vec1(&[1.0]).requires_grad_(true);
        assert_eq!(clip_grad_norm_(std::slice::from_ref(&p), 1.0, 2.0, false).unwrap().item(), 0.0);
        let a = leaf_with_grad(&[0.0, 0.0, 0.0], &[-2.0, 0.5, 3.0]);
        clip_grad_value_(std::slice::from_ref(&a), 1.0);
        assert_eq!(a.grad().unwrap().to_vec_f32(), vec![-1.0, 0.5, 1.0]);
    }
}
