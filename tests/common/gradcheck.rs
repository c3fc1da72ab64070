//! The f64 central-difference gradient check shared by `gradcheck.rs` and `gradcheck_extra.rs`.
//!
//! For a function `f(inputs) -> outputs`, the scalar loss is `Σ_k sum(outputs[k] * W_k)` with
//! fixed random weights `W_k`, so every output element takes part. Each input element is moved
//! by ±1e-6 and the central difference is compared with the gradient that autograd computes:
//! `|num - ana| <= rtol · max(1, |num|, |ana|)` (`rtol` = 1e-6 unless a test says otherwise).

use tracegrad::{no_grad, DType, Generator, Tensor};

/// The central-difference step.
pub const EPS: f64 = 1e-6;
/// The default relative tolerance.
pub const RTOL: f64 = 1e-6;

/// Fixed random weights for an output of `n` elements: magnitudes in [0.5, 1.5), random signs.
pub fn weights(seed: u64, n: usize) -> Vec<f64> {
    let mut g = Generator::new(seed);
    let mag = g.uniform(n, 0.5, 1.5);
    let sign = g.uniform(n, 0.0, 1.0);
    mag.into_iter().zip(sign).map(|(m, s)| if s < 0.5 { -m } else { m }).collect()
}

/// `Σ_k Σ_j out_k[j] · w_k[j]`, computed in f64 outside the graph.
pub fn loss_value(outs: &[Tensor], ws: &[Vec<f64>]) -> f64 {
    outs.iter().zip(ws).map(|(o, w)| o.to_vec_f64().iter().zip(w).map(|(a, b)| a * b).sum::<f64>()).sum()
}

/// Checks autograd's gradient of every input against central differences. `f` must be a pure
/// function of its inputs (captured constants such as indices stay fixed).
#[track_caller]
pub fn gradcheck(name: &str, inputs: &[&Tensor], f: impl Fn(&[Tensor]) -> Vec<Tensor>) {
    gradcheck_tol(name, inputs, RTOL, f)
}

#[track_caller]
pub fn gradcheck_tol(name: &str, inputs: &[&Tensor], rtol: f64, f: impl Fn(&[Tensor]) -> Vec<Tensor>) {
    for x in inputs {
        assert_eq!(x.dtype(), DType::F64, "{name}: gradcheck inputs must be f64");
        assert!(x.requires_grad() && x.is_leaf(), "{name}: gradcheck inputs must be leaves requiring grad");
        x.zero_grad();
    }
    // Analytic gradients.
    let owned: Vec<Tensor> = inputs.iter().map(|&x| x.clone()).collect();
    let outs = f(&owned);
    assert!(!outs.is_empty(), "{name}: no outputs");
    let ws: Vec<Vec<f64>> = outs.iter().enumerate().map(|(k, o)| weights(0x5eed + k as u64, o.numel())).collect();
    let mut loss: Option<Tensor> = None;
    for (o, w) in outs.iter().zip(&ws) {
        assert_eq!(o.dtype(), DType::F64, "{name}: output dtype");
        assert!(o.to_vec_f64().iter().all(|v| v.is_finite()), "{name}: non-finite output {:?}", o.to_vec_f64());
        let wt = Tensor::from_vec(w.clone(), &o.shape());
        let term = o.mul(&wt).sum_all();
        loss = Some(match loss {
            None => term,
            Some(l) => l.add(&term),
        });
    }
    let loss = loss.unwrap();
    let direct = loss.item();
    let reference = loss_value(&outs, &ws);
    assert!((direct - reference).abs() <= 1e-9 * reference.abs().max(1.0), "{name}: loss {direct} vs {reference}");
    loss.backward();

    // Numeric gradients, one input element at a time.
    let base: Vec<Vec<f64>> = inputs.iter().map(|x| x.to_vec_f64()).collect();
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|x| x.shape()).collect();
    let eval = |which: usize, at: usize, delta: f64| -> f64 {
        no_grad(|| {
            let xs: Vec<Tensor> = base
                .iter()
                .zip(&shapes)
                .enumerate()
                .map(|(i, (v, s))| {
                    let mut v = v.clone();
                    if i == which {
                        v[at] += delta;
                    }
                    Tensor::from_vec(v, s)
                })
                .collect();
            loss_value(&f(&xs), &ws)
        })
    };
    for (i, x) in inputs.iter().enumerate() {
        let g = x.grad().unwrap_or_else(|| panic!("{name}: input {i} got no gradient"));
        assert_eq!(g.shape(), x.shape(), "{name}: gradient shape of input {i}");
        assert_eq!(g.dtype(), DType::F64, "{name}: gradient dtype of input {i}");
        let ana = g.to_vec_f64();
        for (j, &a) in ana.iter().enumerate() {
            let num = (eval(i, j, EPS) - eval(i, j, -EPS)) / (2.0 * EPS);
            let tol = rtol * 1f64.max(num.abs()).max(a.abs());
            assert!(
                (num - a).abs() <= tol && a.is_finite(),
                "{name}: d/d input{i}[{j}] (shape {:?}): numeric {num:e}, autograd {a:e}, diff {:e}",
                shapes[i],
                (num - a).abs()
            );
        }
    }
}

// Inputs.

pub fn leaf(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape).requires_grad_(true)
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// U[lo, hi) values.
pub fn uniform(seed: u64, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    leaf(Generator::new(seed).uniform(numel(shape), lo, hi), shape)
}

/// Values in [-2, 2).
pub fn rnd(seed: u64, shape: &[usize]) -> Tensor {
    uniform(seed, shape, -2.0, 2.0)
}

/// Values in [0.5, 2).
pub fn pos(seed: u64, shape: &[usize]) -> Tensor {
    uniform(seed, shape, 0.5, 2.0)
}

/// Values with |x| in [0.3, 1.8): away from the kinks at 0.
pub fn nonzero(seed: u64, shape: &[usize]) -> Tensor {
    let mut g = Generator::new(seed);
    let n = numel(shape);
    let m = g.uniform(n, 0.3, 1.8);
    let s = g.uniform(n, 0.0, 1.0);
    leaf(m.into_iter().zip(s).map(|(m, s)| if s < 0.5 { -m } else { m }).collect(), shape)
}

pub fn idx(v: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape)
}

/// Asserts that no two values of `t` are within `gap` of each other (no ties for max/min).
pub fn assert_distinct(t: &Tensor, gap: f64) {
    let mut v = t.to_vec_f64();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for w in v.windows(2) {
        assert!(w[1] - w[0] > gap, "test input has a near tie: {} and {}", w[0], w[1]);
    }
}
