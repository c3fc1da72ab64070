//! Central-difference gradient checks, in f64, for every differentiable op of the op set.
//!
//! For a function `f(inputs) -> outputs`, the scalar loss is `Σ_k sum(outputs[k] * W_k)` with
//! fixed random weights `W_k`, so every output element takes part. Each input element is moved
//! by ±1e-6 and the central difference is compared with the gradient that autograd computes:
//! `|num - ana| <= 1e-6 · max(1, |num|, |ana|)`.
//!
//! Inputs are chosen away from kinks (relu/abs at 0, max/min ties, clamp bounds, max-pool
//! window ties), where a derivative does not exist.

use tracegrad::{no_grad, DType, Generator, LossReduction, Tensor};

const EPS: f64 = 1e-6;
const RTOL: f64 = 1e-6;

// ---------------------------------------------------------------------------------------------
// The helper.

/// Fixed random weights for an output of `n` elements: magnitudes in [0.5, 1.5), random signs.
fn weights(seed: u64, n: usize) -> Vec<f64> {
    let mut g = Generator::new(seed);
    let mag = g.uniform(n, 0.5, 1.5);
    let sign = g.uniform(n, 0.0, 1.0);
    mag.into_iter().zip(sign).map(|(m, s)| if s < 0.5 { -m } else { m }).collect()
}

/// `Σ_k Σ_j out_k[j] · w_k[j]`, computed in f64 outside the graph.
fn loss_value(outs: &[Tensor], ws: &[Vec<f64>]) -> f64 {
    outs.iter().zip(ws).map(|(o, w)| o.to_vec_f64().iter().zip(w).map(|(a, b)| a * b).sum::<f64>()).sum()
}

/// Checks autograd's gradient of every input against central differences. `f` must be a pure
/// function of its inputs (captured constants such as indices stay fixed).
#[track_caller]
fn gradcheck(name: &str, inputs: &[&Tensor], f: impl Fn(&[Tensor]) -> Vec<Tensor>) {
    gradcheck_tol(name, inputs, RTOL, f)
}

#[track_caller]
fn gradcheck_tol(name: &str, inputs: &[&Tensor], rtol: f64, f: impl Fn(&[Tensor]) -> Vec<Tensor>) {
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

// ---------------------------------------------------------------------------------------------
// Inputs.

fn leaf(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape).requires_grad_(true)
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// U[lo, hi) values.
fn uniform(seed: u64, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    leaf(Generator::new(seed).uniform(numel(shape), lo, hi), shape)
}

/// Values in [-2, 2).
fn rnd(seed: u64, shape: &[usize]) -> Tensor {
    uniform(seed, shape, -2.0, 2.0)
}

/// Values in [0.5, 2).
fn pos(seed: u64, shape: &[usize]) -> Tensor {
    uniform(seed, shape, 0.5, 2.0)
}

/// Values with |x| in [0.3, 1.8): away from the kinks at 0.
fn nonzero(seed: u64, shape: &[usize]) -> Tensor {
    let mut g = Generator::new(seed);
    let n = numel(shape);
    let m = g.uniform(n, 0.3, 1.8);
    let s = g.uniform(n, 0.0, 1.0);
    leaf(m.into_iter().zip(s).map(|(m, s)| if s < 0.5 { -m } else { m }).collect(), shape)
}

fn idx(v: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape)
}

/// Asserts that no two values of `t` are within `gap` of each other (no ties for max/min).
fn assert_distinct(t: &Tensor, gap: f64) {
    let mut v = t.to_vec_f64();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for w in v.windows(2) {
        assert!(w[1] - w[0] > gap, "test input has a near tie: {} and {}", w[0], w[1]);
    }
}

// ---------------------------------------------------------------------------------------------
// Pointwise.

#[test]
fn unary_ops() {
    type F = fn(&Tensor) -> Tensor;
    let any: &[(&str, F)] = &[
        ("neg", Tensor::neg),
        ("exp", Tensor::exp),
        ("sin", Tensor::sin),
        ("cos", Tensor::cos),
        ("tanh", Tensor::tanh),
        ("sigmoid", Tensor::sigmoid),
        ("gelu", Tensor::gelu),
        ("gelu_tanh", Tensor::gelu_tanh),
        ("silu", Tensor::silu),
        ("erf", Tensor::erf),
        ("square", Tensor::square),
        ("pow 3", |x| x.pow(3.0)),
        ("pow 2", |x| x.pow(2.0)),
        ("pow 0", |x| x.pow(0.0)),
        ("copy", Tensor::copy),
    ];
    for (k, (name, f)) in any.iter().enumerate() {
        gradcheck(name, &[&rnd(10 + k as u64, &[3, 4])], |x| vec![f(&x[0])]);
    }
    let kinked: &[(&str, F)] = &[
        ("abs", Tensor::abs),
        ("relu", Tensor::relu),
        ("reciprocal", Tensor::reciprocal),
        ("pow -2", |x| x.pow(-2.0)),
    ];
    for (k, (name, f)) in kinked.iter().enumerate() {
        gradcheck(name, &[&nonzero(30 + k as u64, &[3, 4])], |x| vec![f(&x[0])]);
    }
    let positive: &[(&str, F)] = &[
        ("log", Tensor::log),
        ("sqrt", Tensor::sqrt),
        ("rsqrt", Tensor::rsqrt),
        ("pow 0.5", |x| x.pow(0.5)),
        ("pow -1.5", |x| x.pow(-1.5)),
        ("pow 2.7", |x| x.pow(2.7)),
        ("pow_scalar_tensor 1.3", |x| x.pow_scalar_tensor(1.3)),
    ];
    for (k, (name, f)) in positive.iter().enumerate() {
        gradcheck(name, &[&pos(50 + k as u64, &[3, 4])], |x| vec![f(&x[0])]);
    }
}

#[test]
fn unary_ops_at_larger_magnitudes() {
    // Saturated regions of the S-shaped functions, and gelu's tails.
    let x = leaf(vec![-6.0, -3.5, -1.2, 0.7, 2.9, 5.5], &[6]);
    gradcheck("tanh wide", &[&x], |x| vec![x[0].tanh()]);
    gradcheck("sigmoid wide", &[&x], |x| vec![x[0].sigmoid()]);
    gradcheck("gelu wide", &[&x], |x| vec![x[0].gelu()]);
    gradcheck("gelu_tanh wide", &[&x], |x| vec![x[0].gelu_tanh()]);
    gradcheck("silu wide", &[&x], |x| vec![x[0].silu()]);
    gradcheck("erf wide", &[&x], |x| vec![x[0].erf()]);
}

#[test]
fn binary_ops_broadcast() {
    // [3, 1, 4] with [2, 4] broadcasts to [3, 2, 4]: both gradients must be summed back.
    type F = fn(&Tensor, &Tensor) -> Tensor;
    let ops: &[(&str, F)] = &[
        ("add", Tensor::add),
        ("sub", Tensor::sub),
        ("mul", Tensor::mul),
        ("maximum", Tensor::maximum),
        ("minimum", Tensor::minimum),
    ];
    for (k, (name, f)) in ops.iter().enumerate() {
        let a = rnd(100 + k as u64, &[3, 1, 4]);
        let b = rnd(200 + k as u64, &[2, 4]);
        let both = Tensor::cat(&[&a.reshape(&[-1]), &b.reshape(&[-1])], 0);
        assert_distinct(&both, 1e-5);
        gradcheck(name, &[&a, &b], |x| vec![f(&x[0], &x[1])]);
        // And the other way round, and against a 0-d tensor.
        gradcheck(&format!("{name} swapped"), &[&b, &a], |x| vec![f(&x[0], &x[1])]);
        let s = leaf(vec![0.123], &[]);
        gradcheck(&format!("{name} with scalar"), &[&a, &s], |x| vec![f(&x[0], &x[1])]);
    }
    let a = rnd(300, &[3, 1, 4]);
    let b = nonzero(301, &[2, 4]);
    gradcheck("div", &[&a, &b], |x| vec![x[0].div(&x[1])]);
    gradcheck("div swapped", &[&b, &nonzero(302, &[3, 1, 4])], |x| vec![x[0].div(&x[1])]);
    gradcheck("scalar methods", &[&a], |x| {
        vec![x[0].add_scalar(1.5).mul_scalar(-2.0).sub_scalar(0.25).div_scalar(3.0), (&x[0] * 2.0 - 1.0) / 4.0]
    });
    gradcheck("pow tensor", &[&pos(303, &[3, 1, 4]), &uniform(304, &[2, 4], -1.5, 2.5)], |x| {
        vec![x[0].pow_tensor(&x[1])]
    });
    gradcheck("operators", &[&rnd(305, &[2, 3]), &nonzero(306, &[3])], |x| {
        vec![&(&x[0] + &x[1]) * &(&x[0] - &x[1]) / &x[1] + (-&x[0])]
    });
}

#[test]
fn where_clamp_masked_fill() {
    let cond = Tensor::from_vec(vec![true, false], &[2, 1]);
    gradcheck("where broadcast", &[&rnd(400, &[3, 1, 4]), &rnd(401, &[2, 4])], |x| {
        vec![Tensor::where_cond(&cond, &x[0], &x[1])]
    });
    let cond2 = Tensor::from_vec(vec![true, false, false, true, true, false], &[2, 3]);
    gradcheck("where same shape", &[&rnd(402, &[2, 3]), &rnd(403, &[2, 3])], |x| {
        vec![Tensor::where_cond(&cond2, &x[0], &x[1])]
    });

    // Clamp, with inputs kept away from the bounds.
    let v: Vec<f64> = Generator::new(404)
        .uniform(40, -2.0, 2.0)
        .into_iter()
        .filter(|&x: &f64| (x + 0.5).abs() > 0.05 && (x - 0.7).abs() > 0.05)
        .take(12)
        .collect();
    let x = leaf(v, &[3, 4]);
    assert!(x.to_vec_f64().iter().any(|&v| v < -0.5) && x.to_vec_f64().iter().any(|&v| v > 0.7));
    gradcheck("clamp both", &[&x], |x| vec![x[0].clamp(Some(-0.5), Some(0.7))]);
    gradcheck("clamp min", &[&x], |x| vec![x[0].clamp(Some(-0.5), None)]);
    gradcheck("clamp max", &[&x], |x| vec![x[0].clamp(None, Some(0.7))]);

    gradcheck("addcmul", &[&rnd(405, &[3, 1, 4]), &rnd(406, &[2, 4]), &rnd(407, &[4])], |x| {
        vec![x[0].addcmul(&x[1], &x[2], 0.7)]
    });
    gradcheck("addcdiv", &[&rnd(408, &[3, 1, 4]), &rnd(409, &[2, 4]), &nonzero(410, &[4])], |x| {
        vec![x[0].addcdiv(&x[1], &x[2], -1.3)]
    });
    let mask = Tensor::from_vec(vec![true, false, false, true], &[4]);
    gradcheck("masked_fill", &[&rnd(411, &[3, 4])], |x| vec![x[0].masked_fill(&mask, 2.5)]);
    let mask2 = Tensor::from_vec(vec![false, true, true, false, true, false], &[2, 3]);
    gradcheck("masked_fill same shape", &[&rnd(412, &[2, 3])], |x| vec![x[0].masked_fill(&mask2, -1.0)]);
}

#[test]
fn cast_passes_the_gradient_through() {
    // A round trip through f32 cannot be checked by central differences at 1e-6, so check the
    // rule exactly: d(sum(w · x.to(f32)))/dx = w (cast back to f64).
    let x = rnd(420, &[2, 3]);
    let w = Tensor::from_vec(vec![0.5f32, -1.25, 2.0, 0.75, -3.5, 1.0], &[2, 3]);
    let y = x.to_dtype(DType::F32);
    assert_eq!(y.dtype(), DType::F32);
    assert!(y.requires_grad());
    y.mul(&w).sum_all().backward();
    let g = x.grad().unwrap();
    assert_eq!(g.dtype(), DType::F64);
    assert_eq!(g.to_vec_f64(), vec![0.5, -1.25, 2.0, 0.75, -3.5, 1.0]);
    // A cast to f64 of an f64 tensor is the identity; a cast inside an f64 chain is checked too.
    gradcheck("to f64", &[&rnd(421, &[2, 3])], |x| vec![x[0].to_dtype(DType::F64).exp()]);
    // Integer results carry no gradient.
    let z = rnd(422, &[3]).to_dtype(DType::I64);
    assert!(!z.requires_grad());
}

// ---------------------------------------------------------------------------------------------
// Reductions.

const DIM_SETS: &[&[isize]] = &[&[], &[0], &[1], &[2], &[-1], &[0, 2], &[2, 0], &[1, 2], &[0, 1], &[0, 1, 2]];

#[test]
fn reductions() {
    let x = rnd(500, &[2, 3, 4]);
    assert_distinct(&x, 1e-5);
    for dims in DIM_SETS {
        for keepdim in [false, true] {
            let tag = format!("dims {dims:?} keepdim {keepdim}");
            gradcheck(&format!("sum {tag}"), &[&x], |x| vec![x[0].sum(dims, keepdim)]);
            gradcheck(&format!("mean {tag}"), &[&x], |x| vec![x[0].mean(dims, keepdim)]);
            gradcheck(&format!("amax {tag}"), &[&x], |x| vec![x[0].amax(dims, keepdim)]);
            gradcheck(&format!("amin {tag}"), &[&x], |x| vec![x[0].amin(dims, keepdim)]);
            gradcheck(&format!("var {tag}"), &[&x], |x| vec![x[0].var(dims, 1, keepdim)]);
            gradcheck(&format!("var biased {tag}"), &[&x], |x| vec![x[0].var(dims, 0, keepdim)]);
            gradcheck(&format!("logsumexp {tag}"), &[&x], |x| vec![x[0].logsumexp(dims, keepdim)]);
        }
    }
    gradcheck("sum_all / mean_all / max / min", &[&x], |x| {
        vec![x[0].sum_all(), x[0].mean_all(), x[0].max(), x[0].min()]
    });
    // A 0-d input.
    gradcheck("reductions of a scalar", &[&leaf(vec![0.7], &[])], |x| {
        vec![x[0].sum_all(), x[0].mean_all(), x[0].amax(&[], false), x[0].logsumexp(&[], false)]
    });
}

#[test]
fn max_min_dim() {
    let x = rnd(510, &[2, 3, 4]);
    assert_distinct(&x, 1e-5);
    for dim in [0, 1, 2, -1] {
        for keepdim in [false, true] {
            gradcheck(&format!("max_dim {dim} {keepdim}"), &[&x], |x| vec![x[0].max_dim(dim, keepdim).0]);
            gradcheck(&format!("min_dim {dim} {keepdim}"), &[&x], |x| vec![x[0].min_dim(dim, keepdim).0]);
        }
    }
}

#[test]
fn softmax_family() {
    let x = rnd(520, &[2, 3, 4]);
    for dim in [0, 1, 2, -1, -3] {
        gradcheck(&format!("softmax {dim}"), &[&x], |x| vec![x[0].softmax(dim)]);
        gradcheck(&format!("log_softmax {dim}"), &[&x], |x| vec![x[0].log_softmax(dim)]);
    }
}

// ---------------------------------------------------------------------------------------------
// Extreme logits: finite values, finite gradients, equal to the closed forms.

#[test]
fn softmax_family_at_extreme_logits() {
    let v = vec![1000.0, -1000.0, 999.5, -999.0, 1000.0, -1000.0];
    let x = leaf(v.clone(), &[2, 3]);
    gradcheck("softmax ±1000", &[&x], |x| vec![x[0].softmax(-1)]);
    gradcheck("log_softmax ±1000", &[&x], |x| vec![x[0].log_softmax(-1)]);
    gradcheck("logsumexp ±1000", &[&x], |x| vec![x[0].logsumexp(&[-1], false)]);
    gradcheck("logsumexp ±1000 all", &[&x], |x| vec![x[0].logsumexp(&[], false)]);
    gradcheck("softmax ±1000 dim 0", &[&x], |x| vec![x[0].softmax(0)]);
    let t = idx(&[2, 0], &[2]);
    gradcheck("cross_entropy ±1000", &[&x], |x| vec![x[0].cross_entropy(&t)]);
    gradcheck("cross_entropy ±1000 smoothed", &[&x], |x| vec![x[0].cross_entropy_with(&t, LossReduction::Sum, 0.2)]);

    // Closed forms for the row [1000, -1000, 999.5]: p = [1, 0, e^-0.5] / (1 + e^-0.5).
    let z = 1.0 + (-0.5f64).exp();
    let p = [1.0 / z, 0.0, (-0.5f64).exp() / z];
    let row = leaf(v[..3].to_vec(), &[3]);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0);

    let s = row.softmax(0);
    for (a, b) in s.to_vec_f64().iter().zip(&p) {
        assert!(close(*a, *b), "softmax {a} vs {b}");
    }
    let ls = row.log_softmax(0).to_vec_f64();
    let expect_ls = [-z.ln(), -2000.0 - z.ln(), -0.5 - z.ln()];
    for (a, b) in ls.iter().zip(&expect_ls) {
        assert!(close(*a, *b), "log_softmax {a} vs {b}");
    }
    let lse = row.logsumexp(&[0], false);
    assert!(close(lse.item(), 1000.0 + z.ln()), "logsumexp {}", lse.item());
    lse.backward();
    // d logsumexp / dx = softmax(x).
    for (a, b) in row.grad().unwrap().to_vec_f64().iter().zip(&p) {
        assert!(a.is_finite() && close(*a, *b), "logsumexp grad {a} vs {b}");
    }

    // cross_entropy(row, target 1) = 2000 + ln z; its gradient is softmax - onehot(1).
    row.zero_grad();
    let ce = row.reshape(&[1, 3]).cross_entropy(&idx(&[1], &[1]));
    assert!(close(ce.item(), 2000.0 + z.ln()), "cross_entropy {}", ce.item());
    ce.backward();
    let expect = [p[0], p[1] - 1.0, p[2]];
    for (a, b) in row.grad().unwrap().to_vec_f64().iter().zip(&expect) {
        assert!(a.is_finite() && close(*a, *b), "cross_entropy grad {a} vs {b}");
    }

    // log_softmax's gradient for upstream weights w: w - softmax · sum(w).
    row.zero_grad();
    let w = [0.3, -1.1, 0.4];
    row.log_softmax(0).mul(&Tensor::from_vec(w.to_vec(), &[3])).sum_all().backward();
    let sw: f64 = w.iter().sum();
    for (k, a) in row.grad().unwrap().to_vec_f64().iter().enumerate() {
        let b = w[k] - p[k] * sw;
        assert!(a.is_finite() && close(*a, b), "log_softmax grad {a} vs {b}");
    }

    // f32 too: finite, and the same closed forms at f32 precision.
    let r32 = Tensor::from_vec(vec![1000.0f32, -1000.0, 999.5], &[3]).requires_grad_(true);
    let l = r32.logsumexp(&[0], false);
    assert!(l.item().is_finite());
    l.backward();
    for (a, b) in r32.grad().unwrap().to_vec_f64().iter().zip(&p) {
        assert!(a.is_finite() && (a - b).abs() < 1e-6, "f32 logsumexp grad {a} vs {b}");
    }
    let ls32 = r32.log_softmax(0).to_vec_f64();
    assert!(ls32.iter().all(|v| v.is_finite()), "{ls32:?}");
}

// ---------------------------------------------------------------------------------------------
// Linear algebra.

#[test]
fn matmul_family() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[3, 4], &[4, 2]),
        (&[2, 1, 3, 4], &[5, 4, 2]),
        (&[5, 3, 4], &[2, 1, 4, 2]),
        (&[4], &[4]),
        (&[4], &[4, 3]),
        (&[3, 4], &[4]),
        (&[2, 3, 4], &[4]),
        (&[4], &[2, 4, 3]),
        (&[1, 3, 4], &[2, 4, 2]),
    ];
    for (k, (sa, sb)) in cases.iter().enumerate() {
        let k = k as u64;
        gradcheck(&format!("matmul {sa:?} x {sb:?}"), &[&rnd(600 + k, sa), &rnd(650 + k, sb)], |x| {
            vec![x[0].matmul(&x[1])]
        });
    }
    gradcheck("bmm", &[&rnd(700, &[2, 3, 4]), &rnd(701, &[2, 4, 5])], |x| vec![x[0].bmm(&x[1])]);
    gradcheck("addmm", &[&rnd(702, &[2, 3]), &rnd(703, &[2, 4]), &rnd(704, &[4, 3])], |x| {
        vec![x[0].addmm(&x[1], &x[2], 1.0, 1.0)]
    });
    gradcheck("addmm beta alpha broadcast", &[&rnd(705, &[3]), &rnd(706, &[2, 4]), &rnd(707, &[4, 3])], |x| {
        vec![x[0].addmm(&x[1], &x[2], 0.5, -2.0)]
    });
    gradcheck("linear 3-D with bias", &[&rnd(708, &[2, 3, 4]), &rnd(709, &[5, 4]), &rnd(710, &[5])], |x| {
        vec![tracegrad::linear(&x[0], &x[1], Some(&x[2]))]
    });
    gradcheck("linear 1-D no bias", &[&rnd(711, &[4]), &rnd(712, &[5, 4])], |x| {
        vec![tracegrad::linear(&x[0], &x[1], None)]
    });
    gradcheck("t()", &[&rnd(713, &[3, 4]), &rnd(714, &[3, 2])], |x| vec![x[0].t().matmul(&x[1])]);
}

#[test]
fn einsum_family() {
    let cases: &[(&str, &[&[usize]])] = &[
        ("ij,jk->ik", &[&[3, 4], &[4, 2]]),
        ("bij,bjk->bik", &[&[2, 3, 4], &[2, 4, 5]]),
        ("ii->", &[&[4, 4]]),
        ("i,j->ij", &[&[3], &[4]]),
        ("ii->i", &[&[3, 3]]),
        ("ij->ji", &[&[3, 4]]),
        ("ij->", &[&[3, 4]]),
        ("ij,ij->", &[&[3, 4], &[3, 4]]),
        ("bij,bkj->bik", &[&[2, 3, 4], &[2, 5, 4]]),
        ("ij,jk,kl->il", &[&[2, 3], &[3, 4], &[4, 2]]),
        ("iij->j", &[&[3, 3, 2]]),
        ("bii->bi", &[&[2, 3, 3]]),
        ("ij,j->i", &[&[3, 4], &[4]]),
    ];
    for (k, (eq, shapes)) in cases.iter().enumerate() {
        let inputs: Vec<Tensor> =
            shapes.iter().enumerate().map(|(j, s)| rnd(800 + 10 * k as u64 + j as u64, s)).collect();
        let refs: Vec<&Tensor> = inputs.iter().collect();
        gradcheck(&format!("einsum {eq}"), &refs, |x| {
            let refs: Vec<&Tensor> = x.iter().collect();
            vec![Tensor::einsum(eq, &refs)]
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Views and shapes.

#[test]
fn layout_ops() {
    let x = rnd(900, &[2, 3, 4]);
    gradcheck("reshape", &[&x], |x| vec![x[0].reshape(&[4, -1])]);
    gradcheck("view", &[&x], |x| vec![x[0].view(&[6, 4])]);
    gradcheck("permute", &[&x], |x| vec![x[0].permute(&[2, 0, 1])]);
    gradcheck("permute negative", &[&x], |x| vec![x[0].permute(&[-1, -2, 0])]);
    gradcheck("transpose", &[&x], |x| vec![x[0].transpose(0, 2)]);
    gradcheck("swapdims", &[&x], |x| vec![x[0].swapdims(-1, 1)]);
    gradcheck("flatten", &[&x], |x| vec![x[0].flatten(1, 2), x[0].flatten(0, -1)]);
    let y = rnd(901, &[3, 1, 4]);
    gradcheck("expand", &[&y], |x| vec![x[0].expand(&[2, -1, 5, -1])]);
    gradcheck("broadcast_to", &[&y], |x| vec![x[0].broadcast_to(&[2, 3, 2, 4])]);
    gradcheck("squeeze", &[&y], |x| vec![x[0].squeeze(), x[0].squeeze_dim(1), x[0].squeeze_dim(0)]);
    gradcheck("unsqueeze", &[&y], |x| vec![x[0].unsqueeze(0), x[0].unsqueeze(-1), x[0].unsqueeze(2)]);
    gradcheck("cat", &[&rnd(902, &[2, 3]), &rnd(903, &[2, 1]), &rnd(904, &[2, 2])], |x| {
        vec![Tensor::cat(&[&x[0], &x[1], &x[2]], 1), Tensor::cat(&[&x[0], &x[0]], -2)]
    });
    gradcheck("stack", &[&rnd(905, &[2, 3]), &rnd(906, &[2, 3])], |x| {
        vec![Tensor::stack(&[&x[0], &x[1]], 0), Tensor::stack(&[&x[0], &x[1], &x[0]], 1), Tensor::stack(&[&x[1]], -1)]
    });
    let z = rnd(907, &[2, 7]);
    gradcheck("chunk", &[&z], |x| x[0].chunk(3, 1));
    gradcheck("split", &[&z], |x| x[0].split(3, -1));
    gradcheck("tensor_split", &[&z], |x| x[0].tensor_split(3, 1));
    gradcheck("tensor_split_at", &[&z], |x| x[0].tensor_split_at(&[1, 4], 1));
    gradcheck("narrow", &[&z], |x| vec![x[0].narrow(1, 2, 3), x[0].narrow(0, 1, 1), x[0].narrow(-1, 0, 7)]);
    // Only some pieces used: the others' gradient is zero.
    gradcheck("chunk partial", &[&z], |x| vec![x[0].chunk(3, 1)[1].clone()]);
}

// ---------------------------------------------------------------------------------------------
// Indexing.

#[test]
fn index_ops() {
    // Duplicate indices: the gradient of a repeated row accumulates.
    let dup = idx(&[2, 0, 2, 1, 2], &[5]);
    gradcheck("index_select dim 1", &[&rnd(1000, &[3, 4])], |x| vec![x[0].index_select(1, &dup)]);
    gradcheck("index_select dim 0", &[&rnd(1001, &[3, 4])], |x| vec![x[0].index_select(0, &dup)]);
    gradcheck("index_select dim -1 of 3-D", &[&rnd(1002, &[2, 2, 3])], |x| vec![x[0].index_select(-1, &dup)]);

    let g1 = idx(&[0, 0, 3, 1, 0, 2, 2, 2, 3, 3, 1, 0, 1, 1, 1], &[3, 5]);
    gradcheck("gather dim 1 with duplicates", &[&rnd(1003, &[3, 4])], |x| vec![x[0].gather(1, &g1)]);
    let g0 = idx(&[0, 1, 0, 2, 0, 0, 2, 2], &[2, 4]);
    gradcheck("gather dim 0 (index smaller than input)", &[&rnd(1004, &[3, 4])], |x| vec![x[0].gather(0, &g0)]);

    // scatter_add with duplicate targets: [0,1,0,2] and [0,1,2,2] put two src values on (0,0),
    // (1,1) and (2,3).
    let s0 = idx(&[0, 1, 0, 2, 0, 1, 2, 2], &[2, 4]);
    gradcheck("scatter_add dim 0", &[&rnd(1005, &[3, 4]), &rnd(1006, &[2, 4])], |x| {
        vec![x[0].scatter_add(0, &s0, &x[1])]
    });
    // src larger than index: positions outside the index get no gradient.
    gradcheck("scatter_add src larger", &[&rnd(1007, &[3, 4]), &rnd(1008, &[3, 5])], |x| {
        vec![x[0].scatter_add(0, &s0, &x[1])]
    });
    let s1 = idx(&[3, 3, 0, 1, 1, 1], &[2, 3]);
    gradcheck("scatter_add dim 1", &[&rnd(1009, &[2, 4]), &rnd(1010, &[2, 3])], |x| {
        vec![x[0].scatter_add(1, &s1, &x[1])]
    });
    gradcheck("index_add", &[&rnd(1011, &[3, 4]), &rnd(1012, &[3, 5])], |x| vec![x[0].index_add(1, &dup, &x[1])]);

    let m = Tensor::from_vec(vec![true, false, true, false, false, true], &[2, 3]);
    gradcheck("masked_fill then gather", &[&rnd(1013, &[2, 3])], |x| {
        vec![x[0].masked_fill(&m, 0.0).gather(1, &idx(&[2, 2, 0, 1], &[2, 2]))]
    });
}

#[test]
fn scatter_add_duplicate_gradients_are_exact() {
    // out = self.scatter_add(0, idx, src); loss = sum(out * w).
    // d/dself = w; d/dsrc[p] = w[idx[p], col(p)] — each duplicate gets the full target weight.
    let x = rnd(1020, &[3, 2]);
    let src = rnd(1021, &[3, 2]);
    let i = idx(&[1, 1, 1, 0, 1, 1], &[3, 2]);
    let w = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
    let out = x.scatter_add(0, &i, &src);
    let xs = x.to_vec_f64();
    let ss = src.to_vec_f64();
    let o = out.to_vec_f64();
    // Row 1 collects src[0,0], src[1,0], src[2,0] in column 0 and src[0,1], src[2,1] in column 1.
    assert!((o[2] - (xs[2] + ss[0] + ss[2] + ss[4])).abs() < 1e-12);
    assert!((o[3] - (xs[3] + ss[1] + ss[5])).abs() < 1e-12);
    assert!((o[1] - (xs[1] + ss[3])).abs() < 1e-12);
    out.mul(&w).sum_all().backward();
    assert_eq!(x.grad().unwrap().to_vec_f64(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(src.grad().unwrap().to_vec_f64(), vec![3.0, 4.0, 3.0, 2.0, 3.0, 4.0]);
}

// ---------------------------------------------------------------------------------------------
// nn.

#[test]
fn conv2d() {
    gradcheck(
        "conv2d stride 2 padding 1 + bias",
        &[&rnd(1100, &[2, 3, 5, 6]), &rnd(1101, &[4, 3, 3, 3]), &rnd(1102, &[4])],
        |x| vec![x[0].conv2d(&x[1], Some(&x[2]), [2, 2], [1, 1])],
    );
    gradcheck("conv2d stride 1 padding 0", &[&rnd(1103, &[1, 2, 4, 5]), &rnd(1104, &[3, 2, 2, 3])], |x| {
        vec![x[0].conv2d(&x[1], None, [1, 1], [0, 0])]
    });
    gradcheck(
        "conv2d mixed stride/padding",
        &[&rnd(1105, &[2, 2, 6, 5]), &rnd(1106, &[2, 2, 3, 2]), &rnd(1107, &[2])],
        |x| vec![x[0].conv2d(&x[1], Some(&x[2]), [1, 2], [2, 0])],
    );
    gradcheck("conv2d 1x1", &[&rnd(1108, &[2, 3, 3, 3]), &rnd(1109, &[2, 3, 1, 1])], |x| {
        vec![x[0].conv2d(&x[1], None, [1, 1], [0, 0])]
    });
    gradcheck("conv2d stride 3 (input rows left over)", &[&rnd(1110, &[1, 2, 7, 8]), &rnd(1111, &[3, 2, 3, 3])], |x| {
        vec![x[0].conv2d(&x[1], None, [3, 3], [0, 1])]
    });
}

#[test]
fn pooling() {
    let x = rnd(1200, &[2, 2, 5, 6]);
    assert_distinct(&x, 1e-5);
    gradcheck("max_pool2d 2x2", &[&x], |x| vec![x[0].max_pool2d([2, 2], [2, 2], [0, 0])]);
    gradcheck("max_pool2d 3x3 s2 p1 (overlapping)", &[&x], |x| vec![x[0].max_pool2d([3, 3], [2, 2], [1, 1])]);
    gradcheck("max_pool2d 2x3 s1", &[&x], |x| vec![x[0].max_pool2d([2, 3], [1, 1], [1, 0])]);
    gradcheck("avg_pool2d 2x2", &[&x], |x| vec![x[0].avg_pool2d([2, 2], [2, 2], [0, 0])]);
    gradcheck("avg_pool2d 3x3 s2 p1", &[&x], |x| vec![x[0].avg_pool2d([3, 3], [2, 2], [1, 1])]);
    gradcheck("avg_pool2d 2x3 s(1,2) p(1,0)", &[&x], |x| vec![x[0].avg_pool2d([2, 3], [1, 2], [1, 0])]);
}

#[test]
fn layer_norm() {
    gradcheck("layer_norm [4] affine", &[&rnd(1300, &[2, 3, 4]), &rnd(1301, &[4]), &rnd(1302, &[4])], |x| {
        vec![x[0].layer_norm(&[4], Some(&x[1]), Some(&x[2]), 1e-5)]
    });
    gradcheck("layer_norm [3, 4] affine", &[&rnd(1303, &[2, 3, 4]), &rnd(1304, &[3, 4]), &rnd(1305, &[3, 4])], |x| {
        vec![x[0].layer_norm(&[3, 4], Some(&x[1]), Some(&x[2]), 1e-5)]
    });
    gradcheck("layer_norm plain", &[&rnd(1306, &[3, 5])], |x| vec![x[0].layer_norm(&[5], None, None, 1e-5)]);
}

#[test]
fn embedding() {
    let i = idx(&[1, 4, 1, 0, 4, 4], &[2, 3]);
    gradcheck("embedding with repeated rows", &[&rnd(1400, &[5, 4])], |x| vec![i.embedding(&x[0])]);
    let j = idx(&[3], &[]);
    gradcheck("embedding 0-d index", &[&rnd(1401, &[5, 2])], |x| vec![j.embedding(&x[0])]);
}

#[test]
fn losses() {
    let t = idx(&[1, 0, 4, 1], &[4]);
    for (r, red) in [LossReduction::Mean, LossReduction::Sum, LossReduction::None].into_iter().enumerate() {
        let x = rnd(1500 + r as u64, &[4, 5]);
        gradcheck(&format!("cross_entropy {red:?}"), &[&x], |x| vec![x[0].cross_entropy_with(&t, red, 0.0)]);
        gradcheck(&format!("cross_entropy {red:?} smoothing 0.1"), &[&x], |x| {
            vec![x[0].cross_entropy_with(&t, red, 0.1)]
        });
        gradcheck(&format!("nll_loss {red:?}"), &[&x], |x| vec![x[0].log_softmax(1).nll_loss(&t, red)]);
        gradcheck(&format!("nll_loss raw {red:?}"), &[&x], |x| vec![x[0].nll_loss(&t, red)]);
        gradcheck(&format!("mse_loss {red:?}"), &[&x, &rnd(1510 + r as u64, &[4, 5])], |x| {
            vec![x[0].mse_loss(&x[1], red)]
        });
    }
    gradcheck("cross_entropy default", &[&rnd(1520, &[4, 5])], |x| vec![x[0].cross_entropy(&t)]);
    // Ignored targets (-100) drop out of the loss and of the mean's count.
    let ti = idx(&[1, -100, 4, 2], &[4]);
    gradcheck("cross_entropy ignore_index", &[&rnd(1521, &[4, 5])], |x| vec![x[0].cross_entropy(&ti)]);
    gradcheck("cross_entropy ignore_index smoothing", &[&rnd(1522, &[4, 5])], |x| {
        vec![x[0].cross_entropy_with(&ti, LossReduction::Mean, 0.25)]
    });
    gradcheck("nll_loss ignore_index", &[&rnd(1523, &[4, 5])], |x| vec![x[0].nll_loss(&ti, LossReduction::Mean)]);
    // K-dimensional: logits [N, C, d], target [N, d].
    let tk = idx(&[0, 2, 1, 2, 2, 0], &[2, 3]);
    gradcheck("cross_entropy [N, C, d]", &[&rnd(1524, &[2, 3, 3])], |x| {
        vec![x[0].cross_entropy_with(&tk, LossReduction::Mean, 0.15)]
    });
    // Unbatched: logits [C], 0-d target.
    let t0 = idx(&[2], &[]);
    gradcheck("cross_entropy unbatched", &[&rnd(1525, &[4])], |x| vec![x[0].cross_entropy(&t0)]);
}

#[test]
fn dropout_with_fixed_generator() {
    let x = rnd(1600, &[4, 5]);
    gradcheck("dropout p=0.3", &[&x], |x| vec![x[0].dropout_with(&mut Generator::new(7), 0.3, true)]);
    gradcheck("dropout eval", &[&x], |x| vec![x[0].dropout_with(&mut Generator::new(7), 0.3, false)]);
    // The mask really drops something and scales the rest by 1/(1-p).
    let y = x.dropout_with(&mut Generator::new(7), 0.3, true).to_vec_f64();
    let xv = x.to_vec_f64();
    let dropped = y.iter().filter(|v| **v == 0.0).count();
    assert!(dropped > 0 && dropped < 20, "dropped {dropped}");
    for (a, b) in y.iter().zip(&xv) {
        assert!(*a == 0.0 || (a - b / 0.7).abs() < 1e-12);
    }
}

#[test]
fn composed_model() {
    // A small MLP block end to end: linear, layer_norm, gelu, softmax, cross-entropy.
    let t = idx(&[2, 0, 1], &[3]);
    gradcheck(
        "mlp",
        &[&rnd(1700, &[3, 4]), &rnd(1701, &[5, 4]), &rnd(1702, &[5]), &rnd(1703, &[3, 5]), &rnd(1704, &[5])],
        |x| {
            let h = tracegrad::linear(&x[0], &x[1], Some(&x[2])).layer_norm(&[5], None, Some(&x[4]), 1e-5).gelu();
            let logits = tracegrad::linear(&h, &x[3], None);
            vec![logits.cross_entropy(&t), logits.softmax(-1)]
        },
    );
}

#[test]
fn the_checker_catches_wrong_gradients() {
    // stop_gradient(x)·x has true derivative 2x but autograd (correctly for the detached
    // expression) reports x: a checker that compares with central differences must object.
    let x = rnd(1800, &[3]);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gradcheck("deliberately wrong", &[&x], |x| vec![x[0].stop_gradient().mul(&x[0])])
    }));
    assert!(r.is_err(), "gradcheck accepted a wrong gradient");
    // An error of 1e-5 relative is above the 1e-6 bar: x·(1 + 1e-5·stop_gradient(1)) differs
    // from the function evaluated numerically only through the detached factor.
    let y = rnd(1801, &[3]);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gradcheck("off by 1e-5", &[&y], |x| {
            let s = x[0].stop_gradient().mul_scalar(1e-5);
            vec![x[0].mul(&x[0].add(&s))]
        })
    }));
    assert!(r.is_err(), "gradcheck accepted a gradient off by 1e-5");
    // An input that gets no gradient at all is reported too.
    let z = rnd(1802, &[2]);
    let unused = rnd(1803, &[2]);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gradcheck("unused input", &[&z, &unused], |x| vec![x[0].exp()])
    }));
    assert!(r.is_err(), "gradcheck accepted an input without a gradient");
}
