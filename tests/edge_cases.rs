//! Edge cases that PyTorch defines and the op rules must follow: 0-d operands of the index
//! ops, reductions over empty dims, integer inputs of the transcendental functions, and
//! rank-0 `where`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use tracegrad::{DType, Tensor};

fn scalar64(v: f64) -> Tensor {
    Tensor::from_vec(vec![v], &[]).requires_grad_(true)
}

fn panic_text<R>(f: impl FnOnce() -> R) -> String {
    let p = catch_unwind(AssertUnwindSafe(f)).err().expect("expected a panic");
    p.downcast_ref::<String>().cloned().unwrap_or_else(|| p.downcast_ref::<&str>().unwrap_or(&"").to_string())
}

#[test]
fn index_ops_on_zero_dim_tensors() {
    // torch.tensor(5.).index_select(0, torch.tensor([0])) is a 0-d tensor(5.).
    let x = scalar64(5.0);
    let y = x.index_select(0, &Tensor::from_vec(vec![0i64], &[1]));
    assert_eq!(y.shape(), Vec::<usize>::new());
    assert_eq!(y.item(), 5.0);
    y.mul_scalar(3.0).backward();
    assert_eq!(x.grad().unwrap().to_vec_f64(), vec![3.0]);
    let msg = panic_text(|| x.index_select(0, &Tensor::from_vec(vec![0i64, 0], &[2])));
    assert!(msg.contains("index_select") && msg.contains("only 1 value"), "{msg}");

    // gather on a 0-d input: a 0-d or 1-d index (PyTorch counts a 0-d tensor as 1-d).
    let x = scalar64(2.5);
    let g0 = x.gather(0, &Tensor::from_vec(vec![0i64], &[]));
    assert_eq!((g0.shape(), g0.item()), (vec![], 2.5));
    let g1 = x.gather(0, &Tensor::from_vec(vec![0i64, 0, 0], &[3]));
    assert_eq!(g1.to_vec_f64(), vec![2.5, 2.5, 2.5]);
    g1.mul(&Tensor::from_vec(vec![1.0, 2.0, 4.0], &[3])).sum_all().backward();
    assert_eq!(x.grad().unwrap().to_vec_f64(), vec![7.0]);
    let msg = panic_text(|| x.gather(0, &Tensor::from_vec(vec![1i64], &[])));
    assert!(msg.contains("index 1 is out of bounds for dimension 0 with size 1"), "{msg}");

    // scatter_add into a 0-d tensor, with gradients for self and src.
    let s = scalar64(1.0);
    let src = Tensor::from_vec(vec![2.0, 3.0], &[2]).requires_grad_(true);
    let out = s.scatter_add(0, &Tensor::from_vec(vec![0i64, 0], &[2]), &src);
    assert_eq!((out.shape(), out.item()), (vec![], 6.0));
    out.mul_scalar(2.0).backward();
    assert_eq!(s.grad().unwrap().to_vec_f64(), vec![2.0]);
    assert_eq!(src.grad().unwrap().to_vec_f64(), vec![2.0, 2.0]);
    let s0 = scalar64(1.0);
    let src0 = scalar64(4.0);
    let out = s0.scatter_add(0, &Tensor::from_vec(vec![0i64], &[]), &src0);
    assert_eq!(out.item(), 5.0);
    out.backward();
    assert_eq!(src0.grad().unwrap().shape(), Vec::<usize>::new());

    // index_add into a 0-d tensor.
    let a = scalar64(1.0);
    let src = scalar64(0.5);
    let out = a.index_add(0, &Tensor::from_vec(vec![0i64], &[1]), &src);
    assert_eq!(out.item(), 1.5);
    out.backward();
    assert_eq!(src.grad().unwrap().shape(), Vec::<usize>::new());
    assert_eq!(a.grad().unwrap().to_vec_f64(), vec![1.0]);

    // max(dim) of a 0-d tensor.
    let (v, i) = scalar64(3.0).max_dim(0, false);
    assert_eq!((v.item(), i.item()), (3.0, 0.0));
}

#[test]
fn reductions_over_empty_dims() {
    // torch.zeros(2, 0).logsumexp(1) == tensor([-inf, -inf]); sum is 0; amax errors.
    let x = Tensor::zeros(&[2, 0]).to_dtype(DType::F64).requires_grad_(true);
    let l = x.logsumexp(&[1], false);
    assert_eq!(l.to_vec_f64(), vec![f64::NEG_INFINITY; 2]);
    let lk = x.logsumexp(&[1], true);
    assert_eq!(lk.shape(), vec![2, 1]);
    l.sum_all().backward();
    assert_eq!(x.grad().unwrap().shape(), vec![2, 0]);
    assert_eq!(x.sum(&[1], false).to_vec_f64(), vec![0.0, 0.0]);
    assert!(x.mean(&[1], false).to_vec_f64().iter().all(|v| v.is_nan()));
    let msg = panic_text(|| x.amax(&[1], false));
    assert!(msg.contains("amax") && msg.contains("[2, 0]"), "{msg}");
    // Reducing over a non-empty dim of a tensor with an empty dim elsewhere.
    assert_eq!(x.logsumexp(&[0], false).shape(), vec![0]);
}

#[test]
fn transcendental_functions_promote_integers() {
    // torch.arange(3).exp() is float32; so are log, sqrt, sin, sigmoid, ... of integers.
    let i = Tensor::from_vec(vec![0i64, 1, 2], &[3]);
    let e = i.exp();
    assert_eq!(e.dtype(), DType::F32);
    assert_eq!(e.to_vec_f32(), vec![1.0, 1f32.exp(), 2f32.exp()]);
    for (name, y) in [
        ("log", i.log()),
        ("sqrt", i.sqrt()),
        ("rsqrt", i.rsqrt()),
        ("sin", i.sin()),
        ("cos", i.cos()),
        ("tanh", i.tanh()),
        ("sigmoid", i.sigmoid()),
        ("erf", i.erf()),
        ("reciprocal", i.reciprocal()),
    ] {
        assert_eq!(y.dtype(), DType::F32, "{name}");
    }
    assert_eq!(i.sqrt().to_vec_f32(), vec![0.0, 1.0, 2f32.sqrt()]);
    assert_eq!(Tensor::from_vec(vec![true, false], &[2]).exp().to_vec_f32(), vec![1f32.exp(), 1.0]);
    // Ops that keep integers stay integer.
    assert_eq!(i.neg().dtype(), DType::I64);
    assert_eq!(i.abs().dtype(), DType::I64);
    assert_eq!(i.square().to_vec::<i64>(), vec![0, 1, 4]);
    assert_eq!(i.relu().dtype(), DType::I64);
}

#[test]
fn where_and_clamp_of_zero_dim_tensors() {
    let c = Tensor::from_vec(vec![true], &[]);
    let a = scalar64(1.0);
    let b = scalar64(2.0);
    let y = Tensor::where_cond(&c, &a, &b);
    assert_eq!((y.shape(), y.item()), (vec![], 1.0));
    y.backward();
    assert_eq!(a.grad().unwrap().to_vec_f64(), vec![1.0]);
    assert_eq!(b.grad().unwrap().to_vec_f64(), vec![0.0]);
    // masked_fill with a 0-d mask, and clamp of a 0-d tensor (their rules use where).
    let m = scalar64(3.0).masked_fill(&Tensor::from_vec(vec![false], &[]), 9.0);
    assert_eq!(m.item(), 3.0);
    let x = scalar64(3.0);
    let cl = x.clamp(Some(0.0), Some(1.0));
    assert_eq!(cl.item(), 1.0);
    cl.backward();
    assert_eq!(x.grad().unwrap().to_vec_f64(), vec![0.0]);
    // relu's rule on a 0-d input.
    let r = scalar64(-2.0);
    r.relu().backward();
    assert_eq!(r.grad().unwrap().to_vec_f64(), vec![0.0]);
}

#[test]
fn zero_dim_operands_follow_pytorch_type_promotion() {
    // A 0-d tensor of the same category does not widen a dimensioned one.
    let f32v = Tensor::vec1(&[1.0, 2.0]);
    let f64s = Tensor::from_vec(vec![0.5f64], &[]);
    let y = f32v.add(&f64s);
    assert_eq!(y.dtype(), DType::F32);
    assert_eq!(y.to_vec_f32(), vec![1.5, 2.5]);
    assert_eq!(f64s.mul(&f32v).dtype(), DType::F32);
    let u8v = Tensor::from_vec(vec![250u8, 3], &[2]);
    assert_eq!(u8v.add(&Tensor::from_vec(vec![10i64], &[])).dtype(), DType::U8);
    // A 0-d tensor of a higher category does.
    let i64v = Tensor::from_vec(vec![1i64, 2], &[2]);
    assert_eq!(i64v.add(&Tensor::from_vec(vec![0.5f64], &[])).dtype(), DType::F64);
    assert_eq!(i64v.add(&Tensor::scalar(0.5)).to_vec_f32(), vec![1.5, 2.5]);
    let bv = Tensor::from_vec(vec![true, false], &[2]);
    assert_eq!(bv.mul(&Tensor::from_vec(vec![3i64], &[])).to_vec::<i64>(), vec![3, 0]);
    // Two dimensioned operands, or two 0-d ones, take the wider dtype.
    assert_eq!(f32v.add(&Tensor::from_vec(vec![1.0f64, 1.0], &[2])).dtype(), DType::F64);
    assert_eq!(Tensor::scalar(1.0).add(&f64s).dtype(), DType::F64);
    // Comparisons and where follow the same rule; the gradient keeps each input's dtype.
    assert_eq!(f32v.lt(&f64s).to_vec::<bool>(), vec![false, false]);
    let x = Tensor::vec1(&[1.0, 2.0]).requires_grad_(true);
    let s = Tensor::from_vec(vec![3.0f64], &[]).requires_grad_(true);
    let out = x.mul(&s);
    assert_eq!(out.dtype(), DType::F32);
    out.sum_all().backward();
    assert_eq!(x.grad().unwrap().to_vec_f32(), vec![3.0, 3.0]);
    assert_eq!(s.grad().unwrap().dtype(), DType::F64);
    assert_eq!(s.grad().unwrap().item(), 3.0);
}
