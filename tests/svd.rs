//! `linalg.svdvals`, `linalg.svd` and the SVD-based matrix norms (`nuc`, `2`, `-2`): values
//! and gradients against PyTorch 2.15's in a recorded case (`tests/svd_reference.py` prints
//! them), exact identities, and f64 gradchecks where the singular values are distinct.

mod common;

use common::gradcheck::*;
use tracegrad::{linalg, Tensor};

/// The recorded case: `A = [[1, 2, 0.5], [-1, 3, 2]]` (values from `tests/svd_reference.py`).
fn a() -> Tensor {
    Tensor::from_vec(vec![1.0f64, 2.0, 0.5, -1.0, 3.0, 2.0], &[2, 3]).requires_grad_(true)
}

#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn values_match_the_recorded_case() {
    let s = linalg::svdvals(&a());
    assert_eq!(s.shape(), vec![2]);
    close("svdvals", &s.to_vec_f64(), &[4.129246101910077, 1.4830126870193752], 1e-12);
    close("nuc", &[linalg::matrix_norm(&a(), "nuc", false).item()], &[5.612258788929452], 1e-12);
    close("2", &[linalg::matrix_norm(&a(), "2", false).item()], &[4.129246101910077], 1e-12);
    close("-2", &[linalg::matrix_norm(&a(), "-2", false).item()], &[1.4830126870193752], 1e-12);
    // A symmetric positive definite matrix: its nuclear norm is its trace.
    let spd = Tensor::from_vec(vec![4.0f64, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0], &[3, 3]);
    close("spd nuc", &[linalg::matrix_norm(&spd, "nuc", false).item()], &[9.0], 1e-14);
}

#[test]
fn gradients_match_the_recorded_case() {
    let cases: [(&str, [f64; 6]); 3] = [
        (
            "nuc",
            [
                0.7601193181123151,
                0.6473317247988934,
                -0.05639379665671096,
                -0.5055214689464753,
                0.6436574954136888,
                0.574589482180082,
            ],
        ),
        (
            "2",
            [
                -0.048093487026856424,
                0.3930109995440675,
                0.2205522432854619,
                -0.09458925527249629,
                0.7729657394152688,
                0.4337774973438825,
            ],
        ),
        (
            "-2",
            [
                0.8082128051391716,
                0.2543207252548259,
                -0.2769460399421729,
                -0.41093221367397903,
                -0.12930824400158,
                0.14081198483619953,
            ],
        ),
    ];
    for (ord, want) in cases {
        let x = a();
        linalg::matrix_norm(&x, ord, false).backward();
        close(&format!("d matrix_norm({ord})"), &x.grad().unwrap().to_vec_f64(), &want, 1e-12);
    }
}

#[test]
fn svd_reconstructs_and_batches() {
    let x = Tensor::from_vec((0..24).map(|i| ((i * 7 % 11) as f64) - 5.0).collect::<Vec<_>>(), &[2, 4, 3]);
    let (u, s, vh) = linalg::svd(&x);
    assert_eq!((u.shape(), s.shape(), vh.shape()), (vec![2, 4, 3], vec![2, 3], vec![2, 3, 3]));
    let back = u.mul(&s.unsqueeze(-2)).matmul(&vh);
    close("U·S·Vh", &back.to_vec_f64(), &x.to_vec_f64(), 1e-12);
    // keepdim and other dims: the norm over dims (0, 2) of a [4, 2, 3] tensor.
    let y = x.permute(&[1, 0, 2]);
    let n = linalg::matrix_norm_dims(&y, "nuc", [0, 2], true);
    assert_eq!(n.shape(), vec![1, 2, 1]);
    let direct: Vec<f64> = (0..2).map(|b| linalg::svdvals(&x.narrow(0, b, 1)).sum_all().item()).collect();
    close("nuc over dims (0, 2)", &n.to_vec_f64(), &direct, 1e-12);
}

#[test]
fn gradchecks_with_distinct_singular_values() {
    let x = rnd(11, &[3, 4]);
    gradcheck("svdvals", &[&x], |x| vec![linalg::svdvals(&x[0])]);
    let b = rnd(12, &[2, 4, 3]);
    gradcheck("svdvals batched", &[&b], |x| vec![linalg::svdvals(&x[0])]);
    for ord in ["nuc", "2", "-2"] {
        let x = rnd(13, &[3, 3]);
        gradcheck(&format!("matrix_norm {ord}"), &[&x], |x| vec![linalg::matrix_norm(&x[0], ord, false)]);
    }
}

/// `L = sum((U·Vh) ∘ C) + sum(U² ∘ W) + sum(Vh² ∘ W2)`: a loss through the factors that does
/// not depend on their signs, for `A` (wide) and `Aᵀ` (tall), against PyTorch's gradients.
fn factor_loss(x: &Tensor) -> Tensor {
    let (u, _, vh) = linalg::svd(x);
    let ramp = |shape: &[usize], div: f64, add: f64| {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|i| i as f64 / div + add).collect::<Vec<_>>(), shape)
    };
    let c = ramp(&x.shape(), 7.0, -0.3);
    let w = ramp(&u.shape(), 5.0, 0.1);
    let w2 = ramp(&vh.shape(), 3.0, -0.2);
    let l = u.matmul(&vh).mul(&c).sum_all();
    let l = l.add(&u.mul(&u).mul(&w).sum_all());
    l.add(&vh.mul(&vh).mul(&w2).sum_all())
}

#[test]
fn gradients_through_u_and_vh_match_the_recorded_case() {
    let cases: [(&str, f64, [f64; 6]); 2] = [
        (
            "wide",
            1.9188019045582063,
            [
                -0.1068560140582865,
                0.10174214093590198,
                -0.27241302902395154,
                0.14872758465018548,
                -0.09662295819255032,
                0.23908735296314756,
            ],
        ),
        (
            "tall",
            1.7476489865531681,
            [
                -0.12961462681458244,
                0.06730580662629004,
                0.13842626115193776,
                -0.15708646888391126,
                -0.15808248231635827,
                0.23518427947345524,
            ],
        ),
    ];
    for (name, loss, grad) in cases {
        let x = if name == "wide" {
            a()
        } else {
            Tensor::from_vec(a().detach().transpose(0, 1).to_vec_f64(), &[3, 2]).requires_grad_(true)
        };
        let l = factor_loss(&x);
        close(&format!("{name} loss"), &[l.item()], &[loss], 1e-12);
        l.backward();
        close(&format!("{name} dA"), &x.grad().unwrap().to_vec_f64(), &grad, 1e-10);
    }
}

#[test]
fn gradchecks_through_u_and_vh() {
    for (seed, shape) in [(21, vec![3, 4]), (22, vec![4, 3]), (23, vec![3, 3]), (24, vec![2, 4, 3])] {
        let x = rnd(seed, &shape);
        gradcheck(&format!("svd factors {shape:?}"), &[&x], |x| vec![factor_loss(&x[0])]);
        gradcheck(&format!("U·Vh {shape:?}"), &[&x], |x| {
            let (u, _, vh) = linalg::svd(&x[0]);
            vec![u.matmul(&vh)]
        });
    }
}
