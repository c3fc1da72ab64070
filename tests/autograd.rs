//! Autograd semantics, as in PyTorch: accumulation on leaves, zero_grad, retain_grad, detach,
//! no_grad, broadcasting reduced back in gradients, duplicate indices, backward_with, and a
//! tensor used on several paths.

use tracegrad::{enable_grad, is_grad_enabled, no_grad, DType, Tensor};

fn leaf(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape).requires_grad_(true)
}

fn grad_of(t: &Tensor) -> Vec<f64> {
    t.grad().expect("a gradient").to_vec_f64()
}

#[track_caller]
fn assert_close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0), "{a:?} vs {b:?}");
    }
}

#[test]
fn gradients_accumulate_on_leaves() {
    let x = leaf(&[1.0, 2.0, 3.0], &[3]);
    x.mul_scalar(2.0).sum_all().backward();
    assert_eq!(grad_of(&x), vec![2.0, 2.0, 2.0]);
    // A second backward (on a new graph) adds to the stored gradient.
    x.mul(&x).sum_all().backward();
    assert_eq!(grad_of(&x), vec![4.0, 6.0, 8.0]);
    // Backward twice through the same graph accumulates as well.
    let y = x.exp().sum_all();
    y.backward();
    y.backward();
    let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| 2.0 * v.exp()).collect();
    let expect: Vec<f64> = [4.0, 6.0, 8.0].iter().zip(&e).map(|(a, b)| a + b).collect();
    assert_close(&grad_of(&x), &expect);
    // The gradient of a leaf is itself a leaf that does not require grad.
    let g = x.grad().unwrap();
    assert!(g.is_leaf() && !g.requires_grad());
}

#[test]
fn zero_grad_clears() {
    let x = leaf(&[1.0, -1.0], &[2]);
    x.mul_scalar(3.0).sum_all().backward();
    assert_eq!(grad_of(&x), vec![3.0, 3.0]);
    x.zero_grad();
    assert!(x.grad().is_none());
    x.mul_scalar(5.0).sum_all().backward();
    assert_eq!(grad_of(&x), vec![5.0, 5.0]);
    x.set_grad(Some(Tensor::from_vec(vec![1.0f64, 1.0], &[2])));
    x.mul_scalar(5.0).sum_all().backward();
    assert_eq!(grad_of(&x), vec![6.0, 6.0]);
}

#[test]
fn retain_grad_on_a_non_leaf() {
    let x = leaf(&[1.0, 2.0], &[2]);
    let y = x.mul_scalar(3.0);
    let z = x.add_scalar(1.0);
    assert!(!y.is_leaf());
    y.retain_grad();
    assert!(y.retains_grad() && !z.retains_grad());
    y.mul(&y).add(&z).sum_all().backward();
    // dL/dy = 2y; y = 3x.
    assert_eq!(grad_of(&y), vec![6.0, 12.0]);
    // Without retain_grad a non-leaf keeps no gradient.
    assert!(z.grad().is_none());
    // dL/dx = 2y·3 + 1.
    assert_eq!(grad_of(&x), vec![19.0, 37.0]);
    // A retained gradient accumulates like a leaf's.
    y.sum_all().backward();
    assert_eq!(grad_of(&y), vec![7.0, 13.0]);
    // retain_grad on a leaf is a no-op (a leaf keeps its gradient anyway).
    x.retain_grad();
    assert!(x.is_leaf());
}

#[test]
fn detach_stops_the_gradient() {
    let x = leaf(&[2.0, 3.0], &[2]);
    let d = x.detach();
    assert!(!d.requires_grad() && d.is_leaf());
    assert_eq!(d.to_vec_f64(), x.to_vec_f64());
    // Only the attached factor contributes: d(d·x)/dx = d.
    d.mul(&x).sum_all().backward();
    assert_eq!(grad_of(&x), vec![2.0, 3.0]);
    assert!(d.grad().is_none());
    // Detaching a non-leaf cuts the graph there.
    x.zero_grad();
    let y = x.mul(&x);
    y.detach().mul(&x).sum_all().backward();
    assert_eq!(grad_of(&x), vec![4.0, 9.0]);
    // stop_gradient inside an expression does the same.
    x.zero_grad();
    x.mul(&x).stop_gradient().mul(&x).sum_all().backward();
    assert_eq!(grad_of(&x), vec![4.0, 9.0]);
}

#[test]
fn no_grad_records_nothing() {
    let x = leaf(&[1.0, 2.0], &[2]);
    assert!(is_grad_enabled());
    let y = no_grad(|| {
        assert!(!is_grad_enabled());
        x.mul_scalar(2.0).exp().sum_all()
    });
    assert!(is_grad_enabled(), "grad mode is restored after the scope");
    assert!(!y.requires_grad() && y.is_leaf());
    // enable_grad inside no_grad records again.
    let z = no_grad(|| enable_grad(|| x.mul_scalar(2.0)));
    assert!(z.requires_grad() && !z.is_leaf());
    // A panic inside the scope restores the mode too.
    let r = std::panic::catch_unwind(|| no_grad(|| panic!("boom")));
    assert!(r.is_err());
    assert!(is_grad_enabled());
    // Results from operands that do not require grad do not require grad either.
    let c = Tensor::from_vec(vec![1.0f64, 2.0], &[2]);
    assert!(!c.mul(&c).requires_grad());
    // Integer-valued results never require grad.
    assert!(!x.argmax(None, false).requires_grad());
    assert!(!x.gt_scalar(1.5).requires_grad());
}

#[test]
fn broadcast_gradients_are_reduced_to_input_shapes() {
    let a = leaf(&[1.0, 2.0, 3.0], &[3, 1]);
    let b = leaf(&[10.0, 20.0, 30.0, 40.0], &[4]);
    let s = leaf(&[0.5], &[]);
    a.add(&b).mul(&s).sum_all().backward();
    assert_eq!(a.grad().unwrap().shape(), vec![3, 1]);
    assert_eq!(b.grad().unwrap().shape(), vec![4]);
    assert_eq!(s.grad().unwrap().shape(), Vec::<usize>::new());
    assert_eq!(grad_of(&a), vec![2.0, 2.0, 2.0]);
    assert_eq!(grad_of(&b), vec![1.5, 1.5, 1.5, 1.5]);
    // sum(a + b) over the [3, 4] grid: 4·Σa + 3·Σb = 24 + 300.
    assert_eq!(grad_of(&s), vec![324.0]);

    // mul: d/da = Σ_j b_j, d/db = Σ_i a_i.
    a.zero_grad();
    b.zero_grad();
    a.mul(&b).sum_all().backward();
    assert_eq!(grad_of(&a), vec![100.0, 100.0, 100.0]);
    assert_eq!(grad_of(&b), vec![6.0, 6.0, 6.0, 6.0]);

    // A size-1 dim in the middle, and leading dims added by broadcasting.
    let c = leaf(&[1.0, 2.0], &[2, 1, 1]);
    let d = Tensor::ones(&[5, 2, 3, 4]).to_dtype(DType::F64);
    c.mul(&d).sum_all().backward();
    assert_eq!(c.grad().unwrap().shape(), vec![2, 1, 1]);
    assert_eq!(grad_of(&c), vec![60.0, 60.0]);
}

#[test]
fn duplicate_indices_accumulate() {
    let x = leaf(&[1.0, 2.0, 3.0, 4.0], &[4]);
    let i = Tensor::from_vec(vec![1i64, 1, 3, 1], &[4]);
    let w = Tensor::from_vec(vec![1.0, 10.0, 100.0, 1000.0], &[4]);
    x.index_select(0, &i).mul(&w).sum_all().backward();
    assert_eq!(grad_of(&x), vec![0.0, 1011.0, 0.0, 100.0]);

    let m = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let gi = Tensor::from_vec(vec![2i64, 2, 0, 1, 1, 1], &[2, 3]);
    let gw = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    m.gather(1, &gi).mul(&gw).sum_all().backward();
    assert_eq!(grad_of(&m), vec![3.0, 0.0, 3.0, 0.0, 15.0, 0.0]);

    // Embedding rows picked twice.
    let table = leaf(&[0.0; 6], &[3, 2]);
    let ids = Tensor::from_vec(vec![2i64, 0, 2], &[3]);
    ids.embedding(&table).sum_all().backward();
    assert_eq!(grad_of(&table), vec![1.0, 1.0, 0.0, 0.0, 2.0, 2.0]);
}

#[test]
fn backward_with_a_gradient() {
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let y = x.mul(&x);
    let g = Tensor::from_vec(vec![1.0, 0.0, -1.0, 0.5, 2.0, 3.0], &[2, 3]);
    y.backward_with(&g);
    assert_eq!(grad_of(&x), vec![2.0, 0.0, -6.0, 4.0, 20.0, 36.0]);
    // A gradient of another float dtype is converted to the output's.
    x.zero_grad();
    y.backward_with(&g.to_dtype(DType::F32));
    assert_eq!(x.grad().unwrap().dtype(), DType::F64);
    assert_eq!(grad_of(&x), vec![2.0, 0.0, -6.0, 4.0, 20.0, 36.0]);
    // On a leaf directly.
    let l = leaf(&[1.0, 2.0], &[2]);
    l.backward_with(&Tensor::from_vec(vec![3.0, 4.0], &[2]));
    assert_eq!(grad_of(&l), vec![3.0, 4.0]);
}

#[test]
fn a_tensor_used_twice_gets_both_paths() {
    let x = leaf(&[0.5, -1.5], &[2]);
    // x·x: both operands are x.
    x.mul(&x).sum_all().backward();
    assert_eq!(grad_of(&x), vec![1.0, -3.0]);
    // A diamond: b = exp(x) feeds two ops, both reaching the loss; L = b·x + b.
    x.zero_grad();
    let b = x.exp();
    b.mul(&x).add(&b).sum_all().backward();
    let expect: Vec<f64> = [0.5f64, -1.5].iter().map(|v| v.exp() * (v + 2.0)).collect();
    assert_close(&grad_of(&x), &expect);
    // x + x + x.
    x.zero_grad();
    x.add(&x).add(&x).sum_all().backward();
    assert_eq!(grad_of(&x), vec![3.0, 3.0]);
    // Two leaves sharing one intermediate used at different depths.
    let p = leaf(&[2.0], &[1]);
    let q = leaf(&[3.0], &[1]);
    let h = p.mul(&q); // 6
    let out = h.mul(&h).add(&h.mul(&p)); // h² + h·p
    out.sum_all().backward();
    // dL/dp = (2h + p)·q + h = (12 + 2)·3 + 6 = 48; dL/dq = (2h + p)·p = 28.
    assert_eq!(grad_of(&p), vec![48.0]);
    assert_eq!(grad_of(&q), vec![28.0]);
}

#[test]
fn ties_share_or_pick_like_pytorch() {
    // amax: ties share the gradient evenly.
    let x = leaf(&[1.0, 3.0, 3.0, 2.0], &[4]);
    x.amax(&[0], false).backward();
    assert_eq!(grad_of(&x), vec![0.0, 0.5, 0.5, 0.0]);
    // max(dim): the gradient goes to the returned (first) index.
    x.zero_grad();
    let (v, i) = x.max_dim(0, false);
    assert_eq!(i.item(), 1.0);
    v.backward();
    assert_eq!(grad_of(&x), vec![0.0, 1.0, 0.0, 0.0]);
    // maximum: equal operands split the gradient.
    let a = leaf(&[1.0, 2.0], &[2]);
    let b = leaf(&[1.0, 0.0], &[2]);
    a.maximum(&b).sum_all().backward();
    assert_eq!(grad_of(&a), vec![0.5, 1.0]);
    assert_eq!(grad_of(&b), vec![0.5, 0.0]);
}

#[test]
fn deep_chains_do_not_overflow_the_stack() {
    let x = leaf(&[1.0], &[1]);
    let mut y = x.clone();
    for _ in 0..20_000 {
        y = y.mul_scalar(1.0);
    }
    y.sum_all().backward();
    assert_eq!(grad_of(&x), vec![1.0]);
}

#[test]
fn gradients_have_the_input_dtype() {
    let x = Tensor::from_vec(vec![1.0f32, 2.0], &[2]).requires_grad_(true);
    x.mul_scalar(2.0).sum_all().backward();
    assert_eq!(x.grad().unwrap().dtype(), DType::F32);
    assert_eq!(x.grad().unwrap().to_vec_f32(), vec![2.0, 2.0]);
    // Through a cast, the gradient comes back in the leaf's dtype.
    let y = Tensor::from_vec(vec![1.0f32, 2.0], &[2]).requires_grad_(true);
    y.to_dtype(DType::F64).mul_scalar(3.0).sum_all().backward();
    assert_eq!(y.grad().unwrap().dtype(), DType::F32);
    assert_eq!(y.grad().unwrap().to_vec_f32(), vec![3.0, 3.0]);
}

#[test]
fn pow_gradients_at_zero_match_pytorch() {
    // torch: x = [0, 0, 2, 0], e = [2, 0, 3, 0.5]; (x ** e).sum().backward()
    // x.grad = [0, 0, 12, inf]; e.grad = [0, 0, 8·ln 2, 0] (0·ln 0 is taken as 0 when e >= 0).
    let x = leaf(&[0.0, 0.0, 2.0, 0.0], &[4]);
    let e = leaf(&[2.0, 0.0, 3.0, 0.5], &[4]);
    let y = x.pow_tensor(&e);
    assert_eq!(y.to_vec_f64(), vec![0.0, 1.0, 8.0, 0.0]);
    y.sum_all().backward();
    assert_eq!(grad_of(&x), vec![0.0, 0.0, 12.0, f64::INFINITY]);
    assert_close(&grad_of(&e), &[0.0, 0.0, 8.0 * 2f64.ln(), 0.0]);
    // A negative exponent at 0 keeps PyTorch's non-finite values: 0^-1 = inf, d/de = inf·ln 0.
    let x = leaf(&[0.0], &[1]);
    let e = leaf(&[-1.0], &[1]);
    x.pow_tensor(&e).sum_all().backward();
    assert_eq!(grad_of(&x), vec![f64::NEG_INFINITY]);
    assert_eq!(grad_of(&e), vec![f64::NEG_INFINITY]);
    // The scalar-exponent form: d/dx x^0 = 0 everywhere, including at 0.
    let z = leaf(&[0.0, 3.0], &[2]);
    z.pow(0.0).sum_all().backward();
    assert_eq!(grad_of(&z), vec![0.0, 0.0]);
    // Broadcast exponent: the masks broadcast with the operands.
    let b = leaf(&[0.0, 1.0, 2.0], &[3, 1]);
    let p = leaf(&[0.0, 2.0], &[2]);
    b.pow_tensor(&p).sum_all().backward();
    assert_eq!(grad_of(&b), vec![0.0, 2.0, 4.0]);
    // d/dp0 = Σ b^0·ln b = 0 (masked at b = 0) + ln 1 + ln 2; d/dp1 = Σ b²·ln b = 4·ln 2.
    assert_close(&grad_of(&p), &[2f64.ln(), 4.0 * 2f64.ln()]);
}
