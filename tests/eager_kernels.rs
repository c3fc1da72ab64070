//! Large eager calls of composite and transcendental ops run the JIT's compiled kernels
//! (`tracegrad::eager_kernels`). Each test runs the same call with them on and off (the
//! reference kernels) and compares values and gradients; misuse still panics with the
//! reference path's message, and module hooks still fire once.
//!
//! The switch is process-wide, so every test holds one lock while it flips it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracegrad::nn::{self, ModuleExt};
use tracegrad::{eager_kernels, Generator, LossReduction, Tensor};

static SWITCH: Mutex<()> = Mutex::new(());

/// An op's definition over its inputs.
type Def<'a> = &'a dyn Fn(&[Tensor]) -> Tensor;

fn lock() -> MutexGuard<'static, ()> {
    SWITCH.lock().unwrap_or_else(|e| e.into_inner())
}

fn input(seed: u64, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let v: Vec<f32> =
        Generator::new(seed).uniform(shape.iter().product(), lo, hi).into_iter().map(|x| x as f32).collect();
    Tensor::from_vec(v, shape)
}

#[track_caller]
fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    let (g, w) = (got.to_vec_f64(), want.to_vec_f64());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!((a - b).abs() <= atol + rtol * b.abs(), "{what}: element {i}: compiled kernel {a}, reference {b}");
    }
}

/// Runs `f` on fresh leaves (copies of `inputs`, `requires_grad` where `grad` says) with the
/// compiled kernels on, then off; returns (output, input gradients) for each, after a backward
/// of `sum(output * weights)`.
fn both(inputs: &[Tensor], grad: &[bool], f: Def) -> [(Tensor, Vec<Option<Tensor>>); 2] {
    [true, false].map(|on| {
        eager_kernels::set_enabled(on);
        let xs: Vec<Tensor> =
            inputs.iter().zip(grad).map(|(t, &g)| Tensor::from_buffer(t.buffer()).requires_grad_(g)).collect();
        let y = f(&xs);
        if grad.iter().any(|&g| g) {
            let w = input(99, &y.shape(), -1.0, 1.0);
            (&y * &w).sum_all().backward();
        }
        let grads = xs.iter().map(|x| x.grad()).collect();
        eager_kernels::set_enabled(true);
        (y.detach(), grads)
    })
}

#[track_caller]
fn compare(what: &str, inputs: &[Tensor], grad: &[bool], tol: f64, f: Def) {
    let [(y, gs), (y_ref, gs_ref)] = both(inputs, grad, f);
    assert_close(&format!("{what}: forward"), &y, &y_ref, tol, tol);
    for (i, (g, g_ref)) in gs.iter().zip(&gs_ref).enumerate() {
        match (g, g_ref) {
            (Some(g), Some(r)) => assert_close(&format!("{what}: gradient of input {i}"), g, r, tol, tol),
            (None, None) => {}
            _ => panic!("{what}: input {i} got a gradient on one path only"),
        }
    }
}

#[test]
fn transcendentals_match_the_reference_kernels() {
    let _l = lock();
    let x = input(1, &[256, 257], -6.0, 6.0);
    let pos = input(2, &[256, 257], 1e-3, 50.0);
    let cases: [(&str, Def); 10] = [
        ("exp", &|t| t[0].exp()),
        ("log", &|t| t[0].log()),
        ("sin", &|t| t[0].sin()),
        ("cos", &|t| t[0].cos()),
        ("tanh", &|t| t[0].tanh()),
        ("sigmoid", &|t| t[0].sigmoid()),
        ("gelu", &|t| t[0].gelu()),
        ("gelu_tanh", &|t| t[0].gelu_tanh()),
        ("silu", &|t| t[0].silu()),
        ("erf", &|t| t[0].erf()),
    ];
    for (name, f) in cases {
        let arg = if name == "log" { &pos } else { &x };
        compare(name, std::slice::from_ref(arg), &[true], 2e-6, f);
        // Without gradients (a forward-only kernel) as well.
        compare(&format!("{name}, no grad"), std::slice::from_ref(arg), &[false], 2e-6, f);
    }
}

#[test]
fn composites_match_the_reference_kernels() {
    let _l = lock();
    let x = input(3, &[64, 8, 130], -4.0, 4.0);
    compare("softmax(-1)", std::slice::from_ref(&x), &[true], 1e-6, &|t| t[0].softmax(-1));
    compare("softmax(1)", std::slice::from_ref(&x), &[true], 1e-6, &|t| t[0].softmax(1));
    compare("log_softmax(-1)", std::slice::from_ref(&x), &[true], 1e-5, &|t| t[0].log_softmax(-1));
    compare("logsumexp", std::slice::from_ref(&x), &[true], 1e-5, &|t| t[0].logsumexp(&[-1], true));

    let w = input(4, &[130], 0.5, 1.5);
    let b = input(5, &[130], -0.5, 0.5);
    let ln_all: Def = &|t| t[0].layer_norm(&[130], Some(&t[1]), Some(&t[2]), 1e-5);
    compare("layer_norm with weight and bias", &[x.clone(), w.clone(), b.clone()], &[true, true, true], 2e-5, ln_all);
    compare("layer_norm, no grad for x", &[x.clone(), w.clone(), b.clone()], &[false, true, false], 2e-5, ln_all);
    // Weight only and bias only take the same number of inputs: they must not share a kernel.
    compare("layer_norm with weight", &[x.clone(), w.clone()], &[true, true], 2e-5, &|t| {
        t[0].layer_norm(&[130], Some(&t[1]), None, 1e-5)
    });
    compare("layer_norm with bias", &[x.clone(), b.clone()], &[true, true], 2e-5, &|t| {
        t[0].layer_norm(&[130], None, Some(&t[1]), 1e-5)
    });
    compare("layer_norm over two dims", std::slice::from_ref(&x), &[true], 2e-5, &|t| {
        t[0].layer_norm(&[8, 130], None, None, 1e-3)
    });

    let logits = input(6, &[4096, 10], -3.0, 3.0);
    let target = Tensor::from_vec((0..4096).map(|i| (i * 7 % 10) as i64).collect::<Vec<_>>(), &[4096]);
    for (reduction, smoothing) in [(LossReduction::Mean, 0.0), (LossReduction::Sum, 0.1), (LossReduction::None, 0.0)] {
        compare(
            &format!("cross_entropy {reduction:?} {smoothing}"),
            &[logits.clone(), target.clone()],
            &[true, false],
            1e-4,
            &|t| t[0].cross_entropy_with(&t[1], reduction, smoothing),
        );
    }
}

#[test]
fn the_large_path_compiles_once_and_records_one_node() {
    let _l = lock();
    let x = input(7, &[512, 256], -2.0, 2.0).requires_grad_(true);
    let before = eager_kernels::cached_kernels();
    let y = x.layer_norm(&[256], None, None, 1e-5);
    assert_eq!(y.grad_fn_name().as_deref(), Some("layer_norm"), "one node for the whole composite");
    // Small inputs keep the reference kernels: the composite's primitives record their own nodes.
    let small = input(8, &[4, 5], -2.0, 2.0).requires_grad_(true);
    assert_ne!(small.layer_norm(&[5], None, None, 1e-5).grad_fn_name().as_deref(), Some("layer_norm"));
    // f64 keeps the reference kernels too.
    let x64 = x.detach().to_dtype(tracegrad::DType::F64).requires_grad_(true);
    assert_ne!(x64.layer_norm(&[256], None, None, 1e-5).grad_fn_name().as_deref(), Some("layer_norm"));
    // The same call again reuses the kernel: results are bit-identical.
    let again = x.layer_norm(&[256], None, None, 1e-5);
    assert_eq!(eager_kernels::cached_kernels(), before + 1, "one kernel for both calls");
    assert_eq!(y.to_vec_f32(), again.to_vec_f32());
}

#[test]
fn misuse_panics_with_the_reference_message() {
    let _l = lock();
    let x = input(9, &[256, 256], -1.0, 1.0);
    let bad_w = input(10, &[255], -1.0, 1.0);
    let message = |on: bool| {
        eager_kernels::set_enabled(on);
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| x.layer_norm(&[256], Some(&bad_w), None, 1e-5)));
        eager_kernels::set_enabled(true);
        let e = r.expect_err("a weight of the wrong shape is an error");
        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
    };
    assert_eq!(message(true), message(false));

    // An out-of-range class index: the compiled kernel's error sends the call to the
    // reference path, whose message the user sees.
    let logits = input(11, &[4096, 10], -1.0, 1.0);
    let target = Tensor::from_vec((0..4096).map(|i| if i == 4000 { 10i64 } else { 1 }).collect::<Vec<_>>(), &[4096]);
    let message = |on: bool| {
        eager_kernels::set_enabled(on);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logits.cross_entropy(&target)));
        eager_kernels::set_enabled(true);
        let e = r.expect_err("an out-of-range class is an error");
        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
    };
    assert_eq!(message(true), message(false));
}

#[test]
fn module_hooks_fire_once_and_compiled_modules_still_trace() {
    let _l = lock();
    let ln = nn::LayerNorm::new(&[256]);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let _h = nn::register_module_forward_hook(move |_m, _inputs, _out| {
        c.fetch_add(1, Ordering::SeqCst);
        None
    });
    let x = input(12, &[512, 256], -1.0, 1.0);
    let y = ln.call(&x);
    // The kernel's own trace runs under no module of the user's: one call, one global hook.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    drop(_h);

    // Inside compile the same op is traced into the plan as before.
    let mut compiled = tracegrad::compile(&ln);
    let z = compiled.call(&x).unwrap();
    assert_close("compiled LayerNorm vs eager", &z, &y, 1e-5, 1e-5);
}

/// A unary tensor function.
type Unary = fn(&Tensor) -> Tensor;

/// A module applying one unary function.
#[derive(nn::Module)]
struct Apply {
    core: nn::ModuleCore,
    f: Unary,
}

impl nn::Module for Apply {
    fn forward(&self, x: &Tensor) -> Tensor {
        (self.f)(x)
    }
}

#[test]
fn small_transcendentals_compute_what_compiled_kernels_compute() {
    // Below MIN_ELEMENTS eager f32 transcendentals run tracegrad_jit::lanes at the machine's
    // full width: the JIT's math, so bit for bit the compiled kernel's results.
    let _l = lock();
    let x = input(3, &[33, 31], -12.0, 12.0);
    let pos = input(4, &[33, 31], 1e-30, 1e30);
    let cases: [(&str, Unary); 8] = [
        ("exp", Tensor::exp),
        ("log", Tensor::log),
        ("tanh", Tensor::tanh),
        ("sigmoid", Tensor::sigmoid),
        ("silu", Tensor::silu),
        ("erf", Tensor::erf),
        ("gelu", Tensor::gelu),
        ("gelu_tanh", Tensor::gelu_tanh),
    ];
    for (name, f) in cases {
        let arg = if name == "log" { &pos } else { &x };
        let eager = f(arg);
        let m = Apply { core: nn::ModuleCore::new(), f };
        let compiled = tracegrad::no_grad(|| tracegrad::compile(&m).call(arg)).unwrap();
        let (e, c) = (eager.to_vec_f32(), compiled.to_vec_f32());
        for (i, (a, b)) in e.iter().zip(&c).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{name}: element {i} (x = {}): eager {a:e}, compiled {b:e}",
                arg.to_vec_f32()[i]
            );
        }
        // The reference kernels agree to a few ulps, or absolutely where their formula loses
        // the relative accuracy (gelu below zero: 1 + erf(x/√2) cancels in f32).
        eager_kernels::set_enabled(false);
        let reference = f(arg);
        eager_kernels::set_enabled(true);
        assert_close(&format!("{name} vs the reference kernel"), &eager, &reference, 1e-6, 4e-7);
    }
}
