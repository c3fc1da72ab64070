//! Deep graphs (issue 17): a long pointwise chain must compile on the JIT without deep
//! recursion (a 2 MiB thread stack is enough for 100 000 ops, forward and backward) and in
//! near-linear time. The chain alternates `tanh` and `mul_scalar(1.0001)`: values and
//! gradients stay finite and non-zero over 100 000 ops (the slope per pair is near 1), and
//! every step is an op no pass can fold away.

use std::time::{Duration, Instant};
use tracegrad::compile::{compile, Backend};
use tracegrad::nn::{Module, ModuleCore};
use tracegrad::{no_grad, Tensor};

#[derive(tracegrad::nn::Module)]
struct Chain {
    /// Number of graph ops: `tanh` and `mul_scalar` alternate.
    ops: usize,
    core: ModuleCore,
}

impl Module for Chain {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut y = x.clone();
        for i in 0..self.ops {
            y = if i % 2 == 0 { y.tanh() } else { y.mul_scalar(1.0001) };
        }
        y
    }
}

fn input() -> Tensor {
    Tensor::from_vec((0..12).map(|i| i as f64 / 6.0 - 1.0).collect(), &[3, 4])
}

/// The output and the input's gradient of `sum(chain(x))` on `backend`, or the output alone.
fn run(ops: usize, backend: Backend, grad: bool) -> (Vec<f64>, Option<Vec<f64>>) {
    let m = Chain { ops, core: ModuleCore::new() };
    let x = input().requires_grad_(grad);
    let mut c = compile(&m).with_backend(backend);
    if !grad {
        let y = no_grad(|| c.call(&x)).unwrap_or_else(|e| panic!("{ops} ops on {backend:?}: {e}"));
        return (y.to_vec_f64(), None);
    }
    let y = c.call(&x).unwrap_or_else(|e| panic!("{ops} ops on {backend:?}: {e}"));
    y.sum_all().backward();
    (y.to_vec_f64(), Some(x.grad().expect("the input's gradient").to_vec_f64()))
}

/// Runs `f` on a fresh thread with a 2 MiB stack (the default for spawned threads), so deep
/// recursion anywhere in the pipeline shows up as an abort.
fn on_small_stack<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::Builder::new().stack_size(2 << 20).spawn(f).expect("spawn").join().expect("the thread")
}

#[track_caller]
fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-3 * a.abs().max(b.abs()).max(1.0), "{what}: element {i}: got {a}, want {b}");
    }
}

#[test]
fn a_100k_op_chain_compiles_on_a_2mib_stack_forward_and_backward() {
    const OPS: usize = 100_000;
    for grad in [false, true] {
        let jit = on_small_stack(move || run(OPS, Backend::Jit, grad));
        let interp = on_small_stack(move || run(OPS, Backend::Interpreter, grad));
        assert_close("output", &jit.0, &interp.0);
        if grad {
            let (jit, interp) = (jit.1.unwrap(), interp.1.unwrap());
            assert!(interp.iter().all(|g| g.is_finite() && *g != 0.0), "a degenerate gradient: {interp:?}");
            assert_close("input gradient", &jit, &interp);
        }
    }
}

/// The fastest of `runs` first calls (trace, optimize, compile and run) of a fresh chain.
fn compile_time(ops: usize, grad: bool, runs: usize) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            run(ops, Backend::Jit, grad);
            t.elapsed()
        })
        .min()
        .expect("at least one run")
}

#[test]
fn compile_time_is_near_linear_in_depth() {
    for grad in [false, true] {
        let small = compile_time(2000, grad, 3);
        let large = compile_time(8000, grad, 3);
        let ratio = large.as_secs_f64() / small.as_secs_f64();
        println!("grad={grad}: 2000 ops {small:?}, 8000 ops {large:?}, ratio {ratio:.2}");
        assert!(ratio <= 4.0, "grad={grad}: 8000 ops took {large:?}, {ratio:.2}x the {small:?} of 2000 ops");
    }
}
