//! Reproduces the tensor-op sections of `seed_extra.json` (PyTorch 2.15's own results):
//! `scatter`, `broadcast_tensors`, `atleast`, `compare`, `squeeze`, `like` and `linalg`.
//! Values within 1e-6 relative, shapes and dtypes exactly, error texts exactly.
//!
//! The transcript records outputs only; the inputs it does not record are the natural ones
//! its names describe (the shapes are checked against the recorded outputs).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde_json::Value;
use tracegrad::{linalg, DType, Generator, Tensor};

const RTOL: f64 = 1e-6;

fn spec() -> Value {
    common::reference("seed_extra.json")
}

fn dtype_of(v: &Value) -> DType {
    match v["dtype"].as_str().expect("dtype") {
        "float32" => DType::F32,
        "float64" => DType::F64,
        "int64" => DType::I64,
        "bool" => DType::Bool,
        other => panic!("unexpected dtype {other}"),
    }
}

fn shape_of(v: &Value) -> Vec<usize> {
    v["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

/// A recorded tensor in its recorded dtype.
fn load(v: &Value) -> Tensor {
    let shape = shape_of(v);
    let data = v["data"].as_array().expect("data");
    match dtype_of(v) {
        DType::Bool => Tensor::from_vec(data.iter().map(|d| d.as_bool().unwrap()).collect::<Vec<bool>>(), &shape),
        DType::I64 => Tensor::from_vec(data.iter().map(|d| d.as_i64().unwrap()).collect::<Vec<i64>>(), &shape),
        DType::F64 => Tensor::from_vec(data.iter().map(|d| d.as_f64().unwrap()).collect::<Vec<f64>>(), &shape),
        _ => Tensor::from_vec(data.iter().map(|d| d.as_f64().unwrap() as f32).collect::<Vec<f32>>(), &shape),
    }
}

/// Shape, dtype and values (relative `RTOL`; exact zeros exactly, with their sign).
#[track_caller]
fn check(what: &str, got: &Tensor, want: &Value) {
    assert_eq!(got.shape(), shape_of(want), "{what}: shape");
    assert_eq!(got.dtype(), dtype_of(want), "{what}: dtype");
    let w = load(want).to_vec_f64();
    for (i, (g, w)) in got.to_vec_f64().iter().zip(&w).enumerate() {
        if *w == 0.0 {
            assert!(*g == 0.0 && g.is_sign_negative() == w.is_sign_negative(), "{what}[{i}]: got {g:?}, PyTorch {w:?}");
        } else {
            assert!((g - w).abs() <= RTOL * w.abs(), "{what}[{i}]: got {g}, PyTorch {w}");
        }
    }
}

fn i64s(v: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape)
}

/// The panic message of `f`, which must panic.
#[track_caller]
fn panic_message<R>(f: impl FnOnce() -> R) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("expected a panic"),
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .expect("string panic payload"),
    }
}

// ---------------------------------------------------------------------------------------------
// scatter

#[test]
fn scatter_with_a_tensor_source() {
    let s = &spec()["scatter"];
    let (src, index) = (load(&s["src"]), load(&s["index"]));
    // In place, as the transcript's `torch.zeros(3, 5).scatter_(0, index, src)`.
    let z = Tensor::zeros(&[3, 5]);
    let r = z.scatter_(0, &index, &src);
    assert!(r.same(&z));
    check("scatter_dim0_into_zeros_3x5 (in place)", &z, &s["scatter_dim0_into_zeros_3x5"]);
    let out = Tensor::zeros(&[3, 5]).scatter(0, &index, &src);
    check("scatter_dim0_into_zeros_3x5", &out, &s["scatter_dim0_into_zeros_3x5"]);
    // Along dim 1, each row's five values reversed then kept in order.
    let index1 = i64s(&[4, 3, 2, 1, 0, 0, 1, 2, 3, 4], &[2, 5]);
    let out = Tensor::zeros(&[2, 5]).scatter(1, &index1, &src);
    check("scatter_dim1_into_zeros_2x5", &out, &s["scatter_dim1_into_zeros_2x5"]);
    // Negative dims wrap.
    let out = Tensor::zeros(&[2, 5]).scatter(-1, &index1, &src);
    check("scatter dim -1", &out, &s["scatter_dim1_into_zeros_2x5"]);
}

#[test]
fn scatter_with_a_scalar_value() {
    let s = &spec()["scatter"];
    let index = i64s(&[2, 3], &[2, 1]);
    let z = Tensor::zeros(&[2, 4]);
    z.scatter_value_(1, &index, 1.23);
    check("scatter_value_1.23_dim1", &z, &s["scatter_value_1.23_dim1"]);
    let out = Tensor::zeros(&[2, 4]).scatter_value(1, &index, 1.23);
    check("scatter_value_1.23_dim1 (out of place)", &out, &s["scatter_value_1.23_dim1"]);
}

#[test]
fn scatter_with_reduce_add_and_multiply() {
    let s = &spec()["scatter"];
    let (src, index) = (load(&s["src"]), load(&s["index"]));
    let ones = Tensor::ones(&[3, 5]);
    ones.scatter_with_reduce_(0, &index, &src, "add");
    check("scatter_reduce_add_ones_dim0", &ones, &s["scatter_reduce_add_ones_dim0"]);
    let out = Tensor::full(&[3, 5], 2.0).scatter_with_reduce(0, &index, &src, "multiply");
    check("scatter_reduce_multiply_2s_dim0", &out, &s["scatter_reduce_multiply_2s_dim0"]);
    // The scalar form.
    let out = Tensor::full(&[2, 4], 2.0).scatter_value_with_reduce(1, &i64s(&[2, 3], &[2, 1]), 1.23, "multiply");
    assert_eq!(out.to_vec_f32(), vec![2.0, 2.0, 2.46, 2.0, 2.0, 2.0, 2.0, 2.46]);
    let msg = panic_message(|| Tensor::ones(&[3, 5]).scatter_with_reduce(0, &index, &src, "sum"));
    assert_eq!(msg, "reduce argument must be either add or multiply.");
}

#[test]
fn scatter_reduce_every_reduction_with_and_without_self() {
    let s = &spec()["scatter"];
    let (src, index) = (load(&s["src"]), load(&s["index"]));
    let mut n = 0;
    for reduce in ["sum", "prod", "mean", "amax", "amin"] {
        for include_self in [true, false] {
            let key = format!("scatter_reduce_{reduce}_include_self_{}", if include_self { "True" } else { "False" });
            let out = Tensor::full(&[3, 5], 2.0).scatter_reduce(0, &index, &src, reduce, include_self);
            check(&key, &out, &s[&key]);
            let inplace = Tensor::full(&[3, 5], 2.0);
            inplace.scatter_reduce_(0, &index, &src, reduce, include_self);
            check(&key, &inplace, &s[&key]);
            n += 1;
        }
    }
    assert_eq!(n, 10);
    let msg = panic_message(|| Tensor::ones(&[3, 5]).scatter_reduce(0, &index, &src, "max", true));
    assert_eq!(msg, "reduce argument must be either sum, prod, mean, amax or amin, got max");
}

#[test]
fn scatter_gradient_case() {
    let s = &spec()["scatter"]["grad_case"];
    let base = load(&s["base"]).requires_grad_(true);
    let src = load(&s["src"]).requires_grad_(true);
    let (index, weight) = (load(&s["index"]), load(&s["weight"]));
    let loss = base.scatter(0, &index, &src).mul(&weight).sum_all();
    loss.backward();
    check("grad_base", &base.grad().unwrap(), &s["grad_base"]);
    check("grad_src", &src.grad().unwrap(), &s["grad_src"]);
}

#[test]
fn scatter_errors() {
    let s = &spec()["scatter"];
    let (src, index) = (load(&s["src"]), load(&s["index"]));
    let msg = panic_message(|| Tensor::zeros(&[2, 5]).scatter(0, &index, &src));
    assert_eq!(msg, "scatter: index 2 is out of bounds for dimension 0 with size 2");
    let msg = panic_message(|| Tensor::zeros_dtype(&[3, 5], DType::F64).scatter(0, &index, &src));
    assert!(msg.starts_with("scatter(): Expected self.dtype to be equal to src.dtype"), "{msg}");
    let msg = panic_message(|| Tensor::zeros(&[3, 5]).scatter(0, &index.to_dtype(DType::F32), &src));
    assert!(msg.starts_with("scatter(): Expected dtype int64 for index"), "{msg}");
    // In place on a leaf that requires grad: PyTorch's text.
    let leaf = Tensor::zeros(&[3, 5]).requires_grad_(true);
    let msg = panic_message(|| {
        leaf.scatter_(0, &index, &src);
    });
    assert_eq!(msg, "a leaf Variable that requires grad is being used in an in-place operation.");
}

// ---------------------------------------------------------------------------------------------
// broadcast_tensors, atleast, compare, squeeze, like

#[test]
fn broadcast_tensors_matches() {
    let want = spec()["broadcast_tensors"].as_array().unwrap().clone();
    let a = Tensor::arange(0.0, 3.0, 1.0).reshape(&[3, 1]);
    let b = Tensor::arange(0.0, 4.0, 1.0);
    let c = Tensor::scalar(5.0);
    let out = Tensor::broadcast_tensors(&[&a, &b, &c]);
    assert_eq!(out.len(), want.len());
    for (i, (o, w)) in out.iter().zip(&want).enumerate() {
        check(&format!("broadcast_tensors[{i}]"), o, w);
    }
}

#[test]
fn atleast_shapes_match() {
    let s = &spec()["atleast"];
    let inputs = [Tensor::scalar(1.0), Tensor::zeros(&[3]), Tensor::zeros(&[2, 3]), Tensor::zeros(&[2, 3, 4])];
    let shapes = |v: &Value| -> Vec<Vec<usize>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())
            .collect()
    };
    type F = fn(&Tensor) -> Tensor;
    let f: [(&str, F); 3] =
        [("atleast_1d", Tensor::atleast_1d), ("atleast_2d", Tensor::atleast_2d), ("atleast_3d", Tensor::atleast_3d)];
    for (name, f) in f {
        let got: Vec<Vec<usize>> = inputs.iter().map(|x| f(x).shape()).collect();
        assert_eq!(got, shapes(&s[name]), "{name}");
    }
}

#[test]
fn comparisons_match() {
    let s = &spec()["compare"];
    let (x, y) = (load(&s["x"]), load(&s["y"]));
    check("eq", &x.eq(&y), &s["eq"]);
    check("ne", &x.ne(&y), &s["ne"]);
    check("lt", &x.lt(&y), &s["lt"]);
    check("ge", &x.ge(&y), &s["ge"]);
    // The two not recorded, against their definitions.
    assert_eq!(x.le(&y).to_vec::<bool>(), x.gt(&y).to_vec::<bool>().iter().map(|b| !b).collect::<Vec<_>>());
    assert_eq!(x.equal(&x), s["equal_self"].as_bool().unwrap());
    assert_eq!(x.equal(&y), s["equal_other"].as_bool().unwrap());
    // allclose(x, x·(1 + 1e-4), rtol=1e-3): within tolerance; 1e-2 off is not.
    let near = x.mul_scalar(1.0 + 1e-4);
    assert_eq!(x.allclose(&near, 1e-3, 1e-8), s["allclose_1e-3"].as_bool().unwrap());
    assert!(!x.allclose(&x.mul_scalar(1.01), 1e-3, 1e-8));
}

#[test]
fn squeeze_shapes_match() {
    let s = &spec()["squeeze"];
    let shape =
        |k: &str| -> Vec<usize> { s[k].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect() };
    let x = Tensor::zeros(&[2, 1, 3, 1]);
    assert_eq!(x.squeeze().shape(), shape("all"));
    assert_eq!(x.squeeze_dim(1).shape(), shape("dim1"));
    assert_eq!(x.squeeze_dim(0).shape(), shape("dim0_noop"));
    assert_eq!(x.squeeze_dims(&[1, 3]).shape(), shape("dims_1_3"));
    assert_eq!(x.squeeze_dims(&[1, -1]).shape(), shape("dims_1_3"));
    assert_eq!(x.unsqueeze(-1).shape(), shape("unsqueeze_-1"));
}

#[test]
fn like_constructors_match() {
    let s = &spec()["like"];
    let x = Tensor::zeros(&[2, 3]);
    check("zeros_like", &Tensor::ones(&[2, 3]).zeros_like(), &s["zeros_like"]);
    check("ones_like_i64", &Tensor::zeros_dtype(&[2, 3], DType::I64).ones_like(), &s["ones_like_i64"]);
    check("full_like", &x.full_like(7.0), &s["full_like"]);
}

// ---------------------------------------------------------------------------------------------
// normal with tensor parameters

#[test]
fn normal_with_tensor_mean_and_std() {
    let mean = Tensor::from_vec(vec![0.0f32, 10.0, -5.0], &[3, 1]);
    let std = Tensor::from_vec(vec![1.0f32, 0.5], &[1, 2]);
    let a = Tensor::normal_tensor_with(&mut Generator::new(7), &mean, &std);
    let b = Tensor::normal_tensor_with(&mut Generator::new(7), &mean, &std);
    assert_eq!(a.shape(), vec![3, 2]);
    assert_eq!(a.dtype(), DType::F32);
    assert_eq!(a.to_vec_f32(), b.to_vec_f32(), "seeded draws repeat");
    // Zero std gives the mean exactly; per-element statistics over many draws.
    let z = Tensor::normal_tensor(&mean, &Tensor::zeros(&[3, 1]));
    assert_eq!(z.to_vec_f32(), vec![0.0, 10.0, -5.0]);
    let n = 20000;
    let m = Tensor::full(&[n], 3.0);
    let sd = Tensor::full(&[n], 2.0);
    let v = Tensor::normal_tensor_with(&mut Generator::new(1), &m, &sd).to_vec_f64();
    let mu = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|x| (x - mu) * (x - mu)).sum::<f64>() / n as f64;
    assert!((mu - 3.0).abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05, "{mu} {var}");
    let msg = panic_message(|| Tensor::normal_tensor(&mean, &Tensor::full(&[3, 1], -1.0)));
    assert_eq!(msg, "normal expects all elements of std >= 0.0");
    // Reparameterised gradient: d/dmean = 1, d/dstd = z.
    let mean = Tensor::from_vec(vec![1.0f64, 2.0], &[2]).requires_grad_(true);
    let std = Tensor::from_vec(vec![0.5f64, 3.0], &[2]).requires_grad_(true);
    let y = Tensor::normal_tensor_with(&mut Generator::new(3), &mean, &std);
    y.sum_all().backward();
    assert_eq!(mean.grad().unwrap().to_vec_f64(), vec![1.0, 1.0]);
    let z: Vec<f64> = y.to_vec_f64().iter().zip([1.0, 2.0]).zip([0.5, 3.0]).map(|((y, m), s)| (y - m) / s).collect();
    for (g, z) in std.grad().unwrap().to_vec_f64().iter().zip(z) {
        assert!((g - z).abs() < 1e-12);
    }
}

// ---------------------------------------------------------------------------------------------
// linalg

#[test]
fn vector_norms_and_gradients() {
    let s = &spec()["linalg"];
    let v = load(&s["v"]);
    for (key, ord) in [("vector_norm_2", 2.0), ("vector_norm_1", 1.0)] {
        let x = v.detach().requires_grad_(true);
        let n = linalg::vector_norm(&x, ord, &[], false);
        check(key, &n, &s[key]["value"]);
        n.backward();
        check(&format!("{key} grad"), &x.grad().unwrap(), &s[key]["grad_v"]);
    }
    check("vector_norm_inf", &linalg::vector_norm(&v, f64::INFINITY, &[], false), &s["vector_norm_inf"]);
    let b = load(&s["B"]);
    check(
        "vector_norm_2_dim0_keepdim_B",
        &linalg::vector_norm(&b, 2.0, &[0], true),
        &s["vector_norm_2_dim0_keepdim_B"],
    );
}

#[test]
fn matrix_norm_det_inv_solve_and_gradients() {
    let s = &spec()["linalg"];
    let a = load(&s["A"]);
    let b = load(&s["B"]);

    let x = a.detach().requires_grad_(true);
    let n = linalg::matrix_norm(&x, "fro", false);
    check("matrix_norm_fro", &n, &s["matrix_norm_fro"]["value"]);
    n.backward();
    check("matrix_norm_fro grad", &x.grad().unwrap(), &s["matrix_norm_fro"]["grad_A"]);

    let x = a.detach().requires_grad_(true);
    let d = linalg::det(&x);
    check("det", &d, &s["det"]["value"]);
    d.backward();
    check("det grad", &x.grad().unwrap(), &s["det"]["grad_A"]);

    let x = a.detach().requires_grad_(true);
    let i = linalg::inv(&x);
    check("inv", &i, &s["inv"]["value"]);
    i.sum_all().backward();
    check("inv grad", &x.grad().unwrap(), &s["inv"]["grad_A"]);

    let (xa, xb) = (a.detach().requires_grad_(true), b.detach().requires_grad_(true));
    let sol = linalg::solve(&xa, &xb);
    check("solve", &sol, &s["solve"]["value"]);
    sol.sum_all().backward();
    check("solve grad_A", &xa.grad().unwrap(), &s["solve"]["grad_A"]);
    check("solve grad_B", &xb.grad().unwrap(), &s["solve"]["grad_B"]);

    // Tensor methods are the same functions.
    check("det()", &a.det(), &s["det"]["value"]);
    check("inverse()", &a.inverse(), &s["inv"]["value"]);
}

#[test]
fn singular_matrix_det_and_inv_error() {
    let s = &spec()["linalg"];
    let sing = Tensor::from_vec(vec![1.0f64, 2.0, 2.0, 4.0], &[2, 2]);
    check("det_singular", &linalg::det(&sing), &s["det_singular"]);
    let want = s["inv_singular_error"].as_str().unwrap();
    assert_eq!(panic_message(|| linalg::inv(&sing)), want);
    assert_eq!(linalg::try_inv(&sing).unwrap_err().to_string(), want);
    assert_eq!(panic_message(|| sing.inverse()), want);
    // Batched inputs name the batch element, as PyTorch's `_linalg_check_errors` does.
    let batch = Tensor::stack(&[&Tensor::eye(2).to_dtype(DType::F64), &sing], 0);
    assert_eq!(
        linalg::try_inv(&batch).unwrap_err().to_string(),
        "linalg.inv: (Batch element 1): The diagonal element 2 is zero, the inversion could not be completed because the input matrix is singular."
    );
    let rhs = Tensor::from_vec(vec![1.0f64, 1.0], &[2]);
    assert_eq!(
        linalg::try_solve(&sing, &rhs).unwrap_err().to_string(),
        "torch.linalg.solve: The solver failed because the input matrix is singular."
    );
}

#[test]
fn linalg_misuse_texts() {
    let m = |shape: &[usize]| Tensor::zeros_dtype(shape, DType::F64);
    let err = |r: Result<Tensor, tracegrad::OpError>| r.unwrap_err().to_string();
    assert_eq!(
        err(linalg::try_det(&m(&[2, 3]))),
        "linalg.det: A must be batches of square matrices, but they are 2 by 3 matrices"
    );
    assert_eq!(err(linalg::try_det(&m(&[3]))), "linalg.det: The input tensor A must have at least 2 dimensions.");
    assert_eq!(
        err(linalg::try_inv(&Tensor::zeros_dtype(&[2, 2], DType::I64))),
        "linalg.inv: Expected a floating point or complex tensor as input. Got Long"
    );
    assert_eq!(
        err(linalg::try_solve(&m(&[3, 3]), &m(&[2, 2]))),
        "linalg.solve: Incompatible shapes of A and B for the equation AX = B (3x3 and 2x2) (shapes [3, 3] and [2, 2])"
    );
    assert_eq!(
        err(linalg::try_solve(&m(&[3, 3]), &Tensor::zeros(&[3, 1]))),
        "linalg.solve: Expected A and B to have the same dtype, but found A of type Double and B of type Float instead"
    );
    // ord=nuc was "not implemented" here; it is now the sum of the singular values (tests/svd.rs).
    let nuc = linalg::matrix_norm(&m(&[2, 2]), "nuc", false).item();
    assert!((nuc - linalg::svdvals(&m(&[2, 2])).sum_all().item()).abs() < 1e-12, "{nuc}");
    let msg = panic_message(|| linalg::matrix_norm(&m(&[3]), "nuc", false));
    assert_eq!(msg, "linalg.matrix_norm: The input tensor A must have at least 2 dimensions.");
    let msg = panic_message(|| linalg::matrix_norm(&m(&[2, 2]), "3", false));
    assert_eq!(msg, "linalg.matrix_norm: Order 3 not supported.");
    let msg = panic_message(|| linalg::vector_norm(&m(&[0, 2]), f64::INFINITY, &[0], false));
    assert_eq!(
        msg,
        "linalg.vector_norm cannot compute the inf norm on an empty tensor because the operation does not have an identity"
    );
    // Norms of other orders and over other dims, against their definitions.
    let x = Tensor::from_vec(vec![1.0f64, -2.0, 3.0, -4.0, 0.0, 6.0], &[2, 3]);
    assert_eq!(linalg::matrix_norm(&x, "1", false).item(), 9.0);
    assert_eq!(linalg::matrix_norm(&x, "-1", false).item(), 2.0);
    assert_eq!(linalg::matrix_norm(&x, "inf", false).item(), 10.0);
    assert_eq!(linalg::matrix_norm(&x, "-inf", true).to_vec_f64(), vec![6.0]);
    assert_eq!(linalg::vector_norm(&x, 0.0, &[], false).item(), 5.0);
    assert_eq!(linalg::vector_norm(&x, f64::NEG_INFINITY, &[1], false).to_vec_f64(), vec![1.0, 0.0]);
    assert_eq!(linalg::vector_norm(&x, 2.0, &[-1], true).shape(), vec![2, 1]);
    let v = linalg::vector_norm(&x.to_dtype(DType::F32), 3.0, &[], false);
    assert_eq!(v.dtype(), DType::F32);
    assert!((v.item() - (1.0f64 + 8.0 + 27.0 + 64.0 + 216.0).cbrt()).abs() < 1e-5);
}
