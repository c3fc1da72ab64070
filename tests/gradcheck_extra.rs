//! Central-difference gradient checks, in f64, for scatter, scatter_reduce and torch.linalg
//! (vector_norm, matrix_norm, det, inv, solve), in the style of `gradcheck.rs`: the loss is
//! `Σ_k sum(outputs[k] · W_k)` with fixed random weights, each input element moves by ±1e-6,
//! and `|num - ana| <= 1e-6 · max(1, |num|, |ana|)`.
//!
//! Then: the derivative rules are made of ops, so they trace. The same functions are built as
//! graphs, differentiated twice by the AOT autodiff pass and run by the interpreter; the
//! first derivatives must equal eager autograd's and the second derivatives must equal the
//! central differences of eager's first derivatives. Finally the linalg gradients that
//! PyTorch recorded in `seed_extra.json` are reproduced.

mod common;

use common::gradcheck::*;

use tracegrad::{linalg, Buffer, DType, Eager, Generator, Tensor, TensorType};
use tracegrad_compiler::autodiff::append_backward_plain;
use tracegrad_compiler::composite as c;
use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::interpret::{interpret, NoCallbacks};
use tracegrad_compiler::{Build, OpResult};

// ---------------------------------------------------------------------------------------------
// Inputs (the check itself is tests/common/gradcheck.rs).

/// A well-conditioned `[..., n, n]`: random entries plus `n` on the diagonal.
fn well_conditioned(seed: u64, batch: &[usize], n: usize) -> Tensor {
    let mut shape = batch.to_vec();
    shape.extend([n, n]);
    let mut v = Generator::new(seed).uniform(numel(&shape), -1.0, 1.0);
    for (k, x) in v.iter_mut().enumerate() {
        if (k % (n * n)) / n == k % n {
            *x += n as f64;
        }
    }
    leaf(v, &shape)
}

// ---------------------------------------------------------------------------------------------
// scatter

/// An index into dim 0 of a `[3, 5]` tensor, of shape `[2, 5]`, without duplicates per column.
fn index_unique() -> Tensor {
    idx(&[0, 1, 2, 0, 1, 2, 0, 1, 1, 2], &[2, 5])
}

/// The same with duplicates (columns 0, 2 and 4 write twice to one row).
fn index_dup() -> Tensor {
    idx(&[0, 1, 2, 0, 1, 0, 0, 2, 1, 1], &[2, 5])
}

#[test]
fn scatter_wrt_self_and_src() {
    for (name, index) in [("scatter", index_unique()), ("scatter duplicates", index_dup())] {
        let (x, src) = (rnd(1, &[3, 5]), rnd(2, &[2, 5]));
        gradcheck(name, &[&x, &src], |t| vec![t[0].scatter(0, &index, &t[1])]);
    }
    // A source larger than the index: the unread part gets a zero gradient; along dim 1.
    let (x, src) = (rnd(3, &[3, 4]), rnd(4, &[3, 6]));
    let index = idx(&[3, 0, 1, 2, 2, 0], &[2, 3]);
    gradcheck("scatter dim 1, larger src", &[&x, &src], |t| vec![t[0].scatter(1, &index, &t[1])]);
    assert_eq!(&src.grad().unwrap().to_vec_f64()[3..6], &[0.0, 0.0, 0.0]);
    // The scalar form, w.r.t. self.
    let x = rnd(5, &[3, 5]);
    gradcheck("scatter_value", &[&x], |t| vec![t[0].scatter_value(0, &index_dup(), 1.23)]);
    // 3-D, in the middle dim.
    let (x, src) = (rnd(6, &[2, 3, 2]), rnd(7, &[2, 2, 2]));
    let index = idx(&[2, 0, 1, 1, 0, 0, 2, 1], &[2, 2, 2]);
    gradcheck("scatter 3-D dim 1", &[&x, &src], |t| vec![t[0].scatter(1, &index, &t[1])]);
}

#[test]
fn scatter_reduce_sum_and_mean() {
    for include_self in [true, false] {
        for (reduce, index) in [("sum", index_dup()), ("mean", index_dup()), ("sum", index_unique())] {
            let (x, src) = (rnd(10, &[3, 5]), rnd(11, &[2, 5]));
            let name = format!("scatter_reduce {reduce} include_self={include_self}");
            gradcheck(&name, &[&x, &src], |t| vec![t[0].scatter_reduce(0, &index, &t[1], reduce, include_self)]);
        }
        let (x, src) = (rnd(12, &[3, 4]), rnd(13, &[3, 6]));
        let index = idx(&[3, 3, 1, 2, 2, 0], &[2, 3]);
        gradcheck("scatter_reduce mean, dim 1, larger src", &[&x, &src], |t| {
            vec![t[0].scatter_reduce(-1, &index, &t[1], "mean", include_self)]
        });
    }
    // scatter(reduce="add") is scatter_reduce sum with self.
    let (x, src) = (rnd(14, &[3, 5]), rnd(15, &[2, 5]));
    gradcheck("scatter reduce=add", &[&x, &src], |t| vec![t[0].scatter_with_reduce(0, &index_dup(), &t[1], "add")]);
}

#[test]
fn scatter_reduce_prod_amax_amin() {
    for include_self in [true, false] {
        let (x, src) = (nonzero(20, &[3, 5]), nonzero(21, &[2, 5]));
        gradcheck(&format!("scatter_reduce prod include_self={include_self}"), &[&x, &src], |t| {
            vec![t[0].scatter_reduce(0, &index_dup(), &t[1], "prod", include_self)]
        });
        // Zeros: a single zero among the values of a position, in self and in src.
        let x = leaf(vec![0.0, 1.5, -0.7, 1.1, 0.9, 1.3, -1.2, 0.8, 0.6, -0.4, 1.7, 0.5, -0.9, 1.4, 0.3], &[3, 5]);
        let src = leaf(vec![0.7, 0.0, 1.2, -0.5, 0.8, -1.1, 0.6, 0.0, 0.9, 1.3], &[2, 5]);
        gradcheck(&format!("scatter_reduce prod with zeros include_self={include_self}"), &[&x, &src], |t| {
            vec![t[0].scatter_reduce(0, &index_dup(), &t[1], "prod", include_self)]
        });
        for reduce in ["amax", "amin"] {
            let (x, src) = (rnd(26, &[3, 5]), rnd(27, &[2, 5]));
            assert_distinct(&Tensor::cat(&[&x.reshape(&[-1]), &src.reshape(&[-1])], 0), 1e-3);
            gradcheck(&format!("scatter_reduce {reduce} include_self={include_self}"), &[&x, &src], |t| {
                vec![t[0].scatter_reduce(0, &index_dup(), &t[1], reduce, include_self)]
            });
        }
    }
    let (x, src) = (nonzero(24, &[3, 5]), nonzero(25, &[2, 5]));
    gradcheck("scatter reduce=multiply", &[&x, &src], |t| {
        vec![t[0].scatter_with_reduce(0, &index_dup(), &t[1], "multiply")]
    });
}

#[test]
fn scatter_amax_ties_share_and_excluded_self_is_no_tie() {
    // Two sources tie for the maximum: they share the gradient.
    let x = Tensor::from_vec(vec![0.0f64, 0.0], &[2]).requires_grad_(true);
    let src = Tensor::from_vec(vec![3.0f64, 3.0, 1.0], &[3]).requires_grad_(true);
    x.scatter_reduce(0, &idx(&[0, 0, 1], &[3]), &src, "amax", true).sum_all().backward();
    assert_eq!(src.grad().unwrap().to_vec_f64(), vec![0.5, 0.5, 1.0]);
    assert_eq!(x.grad().unwrap().to_vec_f64(), vec![0.0, 0.0]);
    // An excluded self equal to the result is not a tie (PyTorch would give src 0.5 here).
    let x = Tensor::from_vec(vec![3.0f64, 5.0], &[2]).requires_grad_(true);
    let src = Tensor::from_vec(vec![3.0f64, 1.0], &[2]).requires_grad_(true);
    x.scatter_reduce(0, &idx(&[0, 0], &[2]), &src, "amax", false).sum_all().backward();
    assert_eq!(src.grad().unwrap().to_vec_f64(), vec![1.0, 0.0]);
    assert_eq!(x.grad().unwrap().to_vec_f64(), vec![0.0, 1.0]);
}

// ---------------------------------------------------------------------------------------------
// linalg

#[test]
fn vector_norm_gradients() {
    let x = nonzero(30, &[3, 4]);
    for ord in [2.0, 1.0, 3.0, 0.5, 1.5] {
        gradcheck(&format!("vector_norm ord={ord}"), &[&x], |t| vec![linalg::vector_norm(&t[0], ord, &[], false)]);
        gradcheck(&format!("vector_norm ord={ord} dim 1"), &[&x], |t| {
            vec![linalg::vector_norm(&t[0], ord, &[1], false)]
        });
        gradcheck(&format!("vector_norm ord={ord} dim 0 keepdim"), &[&x], |t| {
            vec![linalg::vector_norm(&t[0], ord, &[0], true)]
        });
    }
    assert_distinct(&x.abs(), 1e-3);
    for ord in [f64::INFINITY, f64::NEG_INFINITY] {
        gradcheck(&format!("vector_norm ord={ord}"), &[&x], |t| vec![linalg::vector_norm(&t[0], ord, &[], false)]);
        gradcheck(&format!("vector_norm ord={ord} dims (0, -1) keepdim"), &[&x], |t| {
            vec![linalg::vector_norm(&t[0], ord, &[-1, 0], true)]
        });
        gradcheck(&format!("vector_norm ord={ord} dim -1"), &[&x], |t| {
            vec![linalg::vector_norm(&t[0], ord, &[-1], false)]
        });
    }
    let v = nonzero(31, &[2, 3, 2]);
    gradcheck("vector_norm 3-D dims (0, 2)", &[&v], |t| vec![linalg::vector_norm(&t[0], 2.0, &[0, 2], false)]);
    let s = leaf(vec![-1.3], &[]);
    gradcheck("vector_norm of a 0-d tensor", &[&s], |t| vec![linalg::vector_norm(&t[0], 2.0, &[], false)]);
}

#[test]
fn vector_norm_at_zero_is_finite() {
    // PyTorch's subgradient: zero where the norm is zero.
    let x = Tensor::zeros_dtype(&[3], DType::F64).requires_grad_(true);
    linalg::vector_norm(&x, 2.0, &[], false).backward();
    assert_eq!(x.grad().unwrap().to_vec_f64(), vec![0.0, 0.0, 0.0]);
    let x = Tensor::from_vec(vec![0.0f64, 2.0, -2.0], &[3]).requires_grad_(true);
    linalg::vector_norm(&x, f64::INFINITY, &[], false).backward();
    assert_eq!(x.grad().unwrap().to_vec_f64(), vec![0.0, 0.5, -0.5]);
}

#[test]
fn matrix_norm_gradients() {
    let x = nonzero(40, &[3, 4]);
    gradcheck("matrix_norm fro", &[&x], |t| vec![linalg::matrix_norm(&t[0], "fro", false)]);
    let b = nonzero(41, &[2, 3, 3]);
    gradcheck("matrix_norm fro batched keepdim", &[&b], |t| vec![linalg::matrix_norm(&t[0], "fro", true)]);
    for ord in ["1", "-1", "inf", "-inf"] {
        gradcheck(&format!("matrix_norm {ord}"), &[&x], |t| vec![linalg::matrix_norm(&t[0], ord, false)]);
        gradcheck(&format!("matrix_norm {ord} batched"), &[&b], |t| vec![linalg::matrix_norm(&t[0], ord, false)]);
    }
}

#[test]
fn det_inv_solve_gradients() {
    for n in [1, 2, 3, 4] {
        let a = well_conditioned(50 + n as u64, &[], n);
        gradcheck(&format!("det {n}x{n}"), &[&a], |t| vec![linalg::det(&t[0])]);
        gradcheck(&format!("inv {n}x{n}"), &[&a], |t| vec![linalg::inv(&t[0])]);
        let b = rnd(60 + n as u64, &[n, 2]);
        gradcheck(&format!("solve {n}x{n}"), &[&a, &b], |t| vec![linalg::solve(&t[0], &t[1])]);
    }
    // A general (non-symmetric, sign-changing) matrix, away from singular.
    let a = leaf(vec![0.3, -1.2, 0.8, 1.1, 0.4, -0.6, -0.7, 0.9, 0.5], &[3, 3]);
    gradcheck("det general", &[&a], |t| vec![linalg::det(&t[0])]);
    gradcheck("inv general", &[&a], |t| vec![linalg::inv(&t[0])]);
    // Batched, with broadcasting of the batch dims and a vector right-hand side.
    let a = well_conditioned(70, &[2], 3);
    gradcheck("det batched", &[&a], |t| vec![linalg::det(&t[0])]);
    gradcheck("inv batched", &[&a], |t| vec![linalg::inv(&t[0])]);
    let b = rnd(71, &[3, 1, 3, 2]);
    gradcheck("solve broadcast batch", &[&a, &b], |t| vec![linalg::solve(&t[0], &t[1])]);
    let v = rnd(72, &[3]);
    gradcheck("solve vector", &[&a, &v], |t| vec![linalg::solve(&t[0], &t[1])]);
    let v = rnd(73, &[2, 3]);
    gradcheck("solve batched vectors", &[&a, &v], |t| vec![linalg::solve(&t[0], &t[1])]);
    // Composed: log|det| through inv and solve.
    let a = well_conditioned(74, &[], 3);
    let b = rnd(75, &[3, 3]);
    gradcheck("composed", &[&a, &b], |t| {
        let x = linalg::solve(&t[0], &t[1]);
        vec![linalg::det(&linalg::inv(&x).add(&t[0])).abs().log()]
    });
}

// ---------------------------------------------------------------------------------------------
// Traced, and differentiated twice.

/// The same function, on any emitter.
fn program<B: Build>(which: &str, e: &mut B, x: &[B::Value]) -> OpResult<B::Value> {
    let dup = |e: &mut B| e.constant(Buffer::from_vec(vec![0i64, 1, 2, 0, 1, 0, 0, 2, 1, 1], &[2, 5]));
    match which {
        "det" => c::det(e, &x[0]),
        "inv" => c::inv(e, &x[0]),
        "solve" => c::solve(e, &x[0], &x[1]),
        "vector_norm 2" => c::vector_norm(e, &x[0], 2.0, &[1], false),
        "vector_norm 3" => c::vector_norm(e, &x[0], 3.0, &[], false),
        "matrix_norm fro" => c::matrix_norm(e, &x[0], "fro", [-2, -1], false),
        "scatter" => {
            let i = dup(e)?;
            c::scatter(e, &x[0], 0, &i, &x[1])
        }
        r @ ("sum" | "mean" | "prod" | "amax" | "amin") => {
            let i = dup(e)?;
            c::scatter_reduce(e, &x[0], 0, &i, &x[1], r, false)
        }
        _ => unreachable!("{which}"),
    }
}

#[test]
fn rules_trace_and_differentiate_twice() {
    let cases: Vec<(&str, Vec<Tensor>)> = vec![
        ("det", vec![well_conditioned(80, &[2], 3)]),
        ("inv", vec![well_conditioned(81, &[], 3)]),
        ("solve", vec![well_conditioned(82, &[], 3), rnd(83, &[3, 2])]),
        ("vector_norm 2", vec![nonzero(84, &[3, 4])]),
        ("vector_norm 3", vec![nonzero(85, &[3, 4])]),
        ("matrix_norm fro", vec![nonzero(86, &[2, 3])]),
        ("scatter", vec![rnd(87, &[3, 5]), rnd(88, &[2, 5])]),
        ("sum", vec![rnd(89, &[3, 5]), rnd(90, &[2, 5])]),
        ("mean", vec![rnd(91, &[3, 5]), rnd(92, &[2, 5])]),
        ("prod", vec![nonzero(93, &[3, 5]), nonzero(94, &[2, 5])]),
        ("amax", vec![rnd(95, &[3, 5]), rnd(96, &[2, 5])]),
        ("amin", vec![rnd(97, &[3, 5]), rnd(98, &[2, 5])]),
    ];
    for (which, xs) in cases {
        let bufs: Vec<Buffer> = xs.iter().map(|t| t.buffer()).collect();
        // Eager value and first derivative of Σ y·w.
        let y = program(which, &mut Eager, &xs).unwrap();
        let w = Tensor::from_vec(weights(1, y.numel()), &y.shape());
        y.mul(&w).sum_all().backward();
        let eager_grads: Vec<Vec<f64>> = xs.iter().map(|x| x.grad().unwrap().to_vec_f64()).collect();

        // Graph: y, first derivatives, then the derivatives of Σ_i grad_i · v_i.
        let mut g = Graph::new();
        let ins: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| g.add_input(&format!("x{i}"), InputRole::Data, TensorType::of(b)))
            .collect();
        let yn = program(which, &mut g, &ins).unwrap();
        let wn = g.constant(w.buffer()).unwrap();
        let prod = g.mul(&yn, &wn).unwrap();
        let ln = g.sum(&prod, &[], false).unwrap();
        let one = g.full(1.0, DType::F64, &[]).unwrap();
        let grads = append_backward_plain(&mut g, &[(ln, one)], &ins).unwrap();
        let vs: Vec<Vec<f64>> = bufs.iter().enumerate().map(|(i, b)| weights(100 + i as u64, b.numel())).collect();
        let mut l2 = None;
        for (i, gr) in grads.iter().enumerate() {
            let gr = gr.unwrap_or_else(|| panic!("{which}: no graph gradient for x{i}"));
            let vn = g.constant(Buffer::from_vec(vs[i].clone(), bufs[i].shape())).unwrap();
            let p = g.mul(&gr, &vn).unwrap();
            let s = g.sum(&p, &[], false).unwrap();
            l2 = Some(match l2 {
                None => s,
                Some(prev) => g.add(&prev, &s).unwrap(),
            });
            g.add_output(&format!("dx{i}"), gr);
        }
        let one = g.full(1.0, DType::F64, &[]).unwrap();
        let second = append_backward_plain(&mut g, &[(l2.unwrap(), one)], &ins).unwrap();
        // A gradient that does not depend on an input (a linear op's) has no second
        // derivative node: it is zero.
        for (i, s) in second.iter().enumerate() {
            let s = match s {
                Some(s) => *s,
                None => g.full(0.0, DType::F64, bufs[i].shape()).unwrap(),
            };
            g.add_output(&format!("ddx{i}"), s);
        }
        g.validate().unwrap();
        // The new ops round-trip through the graph's JSON form (constants' last digits may
        // not: the JSON reader rounds floats).
        let back = Graph::from_json(&g.to_json()).unwrap();
        let ops = |g: &Graph| -> Vec<String> {
            g.to_text().lines().filter(|l| !l.contains("constant")).map(String::from).collect()
        };
        assert_eq!(ops(&back), ops(&g), "{which}: JSON round trip");
        let out = interpret(&g, &bufs, &NoCallbacks).unwrap();
        let n = xs.len();
        for i in 0..n {
            for (a, b) in out[i].to_f64_vec().iter().zip(&eager_grads[i]) {
                assert!((a - b).abs() <= 1e-10 * b.abs().max(1.0), "{which}: graph grad x{i} {a} vs eager {b}");
            }
        }
        // Second derivatives against central differences of eager's first derivatives.
        let first = |which_in: usize, at: usize, delta: f64| -> f64 {
            let ts: Vec<Tensor> = bufs
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let mut v = b.to_f64_vec();
                    if i == which_in {
                        v[at] += delta;
                    }
                    Tensor::from_vec(v, b.shape()).requires_grad_(true)
                })
                .collect();
            let y = program(which, &mut Eager, &ts).unwrap();
            y.mul(&w).sum_all().backward();
            ts.iter()
                .zip(&vs)
                .map(|(t, v)| t.grad().unwrap().to_vec_f64().iter().zip(v).map(|(a, b)| a * b).sum::<f64>())
                .sum()
        };
        for i in 0..n {
            for (j, &a) in out[n + i].to_f64_vec().iter().enumerate() {
                let num = (first(i, j, EPS) - first(i, j, -EPS)) / (2.0 * EPS);
                let tol = 1e-5 * 1f64.max(num.abs()).max(a.abs());
                assert!((num - a).abs() <= tol, "{which}: d²/dx{i}[{j}]: numeric {num:e}, graph {a:e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PyTorch's recorded linalg gradients.

#[test]
fn recorded_linalg_gradients() {
    let s = common::reference("seed_extra.json");
    let s = &s["linalg"];
    let f64s = |v: &serde_json::Value| -> Tensor {
        let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        Tensor::from_vec(
            v["data"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap()).collect::<Vec<f64>>(),
            &shape,
        )
    };
    let close = |what: &str, got: &Tensor, want: &serde_json::Value| {
        let want = f64s(want);
        assert_eq!(got.shape(), want.shape(), "{what}");
        for (g, w) in got.to_vec_f64().iter().zip(want.to_vec_f64()) {
            assert!((g - w).abs() <= 1e-10 * w.abs().max(1e-3), "{what}: {g} vs PyTorch {w}");
        }
    };
    let (a0, b0, v0) = (f64s(&s["A"]), f64s(&s["B"]), f64s(&s["v"]));
    let grad_of = |x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor| {
        let x = x.detach().requires_grad_(true);
        f(&x).sum_all().backward();
        x.grad().unwrap()
    };
    close("vector_norm 2", &grad_of(&v0, &|v| linalg::vector_norm(v, 2.0, &[], false)), &s["vector_norm_2"]["grad_v"]);
    close("vector_norm 1", &grad_of(&v0, &|v| linalg::vector_norm(v, 1.0, &[], false)), &s["vector_norm_1"]["grad_v"]);
    close("matrix_norm fro", &grad_of(&a0, &|a| linalg::matrix_norm(a, "fro", false)), &s["matrix_norm_fro"]["grad_A"]);
    close("det", &grad_of(&a0, &linalg::det), &s["det"]["grad_A"]);
    close("inv", &grad_of(&a0, &linalg::inv), &s["inv"]["grad_A"]);
    close("solve A", &grad_of(&a0, &|a| linalg::solve(a, &b0)), &s["solve"]["grad_A"]);
    close("solve B", &grad_of(&b0, &|b| linalg::solve(&a0, b)), &s["solve"]["grad_B"]);
}

/// The checker itself must reject a wrong gradient (here: the transpose of det's).
#[test]
#[should_panic(expected = "numeric")]
fn the_checker_catches_wrong_gradients() {
    let a = leaf(vec![0.3, -1.2, 0.8, 1.1, 0.4, -0.6, -0.7, 0.9, 0.5], &[3, 3]);
    // The value of det(A), with the gradient det·A⁻¹ (missing the transpose).
    gradcheck("wrong", &[&a], |t| {
        let d = linalg::det(&t[0].detach());
        let wrong = t[0].mul(&linalg::inv(&t[0].detach()).mul_scalar(d.item())).sum_all();
        vec![wrong.sub(&wrong.detach()).add(&d)]
    });
}
