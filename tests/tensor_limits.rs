//! Impossible tensors: shapes whose element or byte count overflows, narrow past the end, and
//! allocations no machine can satisfy. Each is a clear panic naming the shape eagerly and an
//! `Err` from a compiled call, never a wrapped size or a process abort. The allocating cases
//! run in a child process (this test binary, filtered to one case), so an abort (134/SIGABRT)
//! would be seen as such instead of killing the test run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;

use tracegrad::compile::{compile, Backend};
use tracegrad::nn::{Linear, Module, ModuleCore};
use tracegrad::{no_grad, Tensor};

fn panic_text<T>(f: impl FnOnce() -> T) -> String {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("expected a panic"),
        Err(p) => tracegrad_runtime::panic_message(&*p).unwrap_or("").to_string(),
    }
}

#[test]
fn an_overflowing_shape_product_is_refused_naming_the_shape() {
    let msg = panic_text(|| Tensor::zeros(&[(1 << 62) + 1, 4]));
    assert!(msg.contains("[4611686018427387905, 4]"), "{msg}");
    let msg = panic_text(|| Tensor::from_vec(vec![0f32; 4], &[(1 << 62) + 1, 4]));
    assert!(msg.contains("[4611686018427387905, 4]"), "{msg}");
    assert!(tracegrad_runtime::shape::checked_numel(&[usize::MAX, 2]).is_err());
    assert_eq!(tracegrad_runtime::shape::checked_numel(&[3, 0, usize::MAX]), Ok(0));
    assert!(tracegrad_runtime::shape::checked_bytes(&[1 << 62], 4).is_err());
    assert_eq!(tracegrad_runtime::shape::checked_bytes(&[2, 3], 8), Ok(48));
}

#[test]
fn narrow_past_the_end_is_a_clear_panic_eagerly() {
    let x = Tensor::zeros(&[3, 4]);
    let msg = panic_text(|| x.narrow(0, usize::MAX, 2));
    assert!(msg.contains("narrow") && msg.contains("[3, 4]"), "{msg}");
}

#[derive(tracegrad::nn::Module)]
struct NarrowFar {
    core: ModuleCore,
}

impl Module for NarrowFar {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.narrow(0, usize::MAX, 2)
    }
}

#[test]
fn narrow_past_the_end_is_an_err_from_a_compiled_call() {
    let m = NarrowFar { core: ModuleCore::new() };
    for backend in [Backend::Jit, Backend::Interpreter] {
        let e = no_grad(|| compile(&m).with_backend(backend).call(&Tensor::zeros(&[3, 4]))).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("narrow") && text.contains("[3, 4]"), "{backend:?}: {text}");
    }
}

/// The child side: runs the case named by `TRACEGRAD_LIMITS_CASE` (set only by
/// [`huge_allocations_are_normal_panics_in_a_child_process`]), which is expected to panic.
#[test]
#[ignore = "child-process entry, run by huge_allocations_are_normal_panics_in_a_child_process"]
fn child_case() {
    let Ok(case) = std::env::var("TRACEGRAD_LIMITS_CASE") else {
        // Run by hand (`--ignored`) without its parent: there is no case to run.
        eprintln!("child_case runs only as the child of huge_allocations_are_normal_panics_in_a_child_process");
        return;
    };
    match case.as_str() {
        "zeros" => drop(Tensor::zeros(&[1 << 40])),
        "randn" => drop(Tensor::randn(&[1 << 40])),
        "linear" => drop(Linear::new(1 << 31, 1 << 31)),
        "zeros_limit" => drop(Tensor::zeros(&[1 << 20])),
        other => panic!("unknown case {other:?}"),
    }
}

fn run_child(case: &str, max_alloc: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_case", "--exact", "--ignored", "--nocapture", "--test-threads=1"]);
    cmd.env("TRACEGRAD_LIMITS_CASE", case);
    match max_alloc {
        Some(v) => cmd.env("TRACEGRAD_MAX_ALLOC", v),
        None => cmd.env_remove("TRACEGRAD_MAX_ALLOC"),
    };
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn huge_allocations_are_normal_panics_in_a_child_process() {
    let cases = [
        ("zeros", None, "[1099511627776]"),
        ("randn", None, "[1099511627776]"),
        ("linear", None, "[2147483648, 2147483648]"),
        ("zeros_limit", Some("1000000"), "TRACEGRAD_MAX_ALLOC"),
    ];
    for (case, limit, shape) in cases {
        let (code, stderr) = run_child(case, limit);
        // 101: the test harness's exit after a normal panic; an abort has no code (SIGABRT).
        assert_eq!(code, Some(101), "{case}: not a normal panic exit: {stderr}");
        assert!(stderr.contains(shape), "{case}: the panic message does not name {shape}: {stderr}");
    }
}
