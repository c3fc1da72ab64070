//! One suite, three modes: the same models run eagerly, compiled on the JIT and compiled on
//! the reference interpreter must give the same outputs, input and parameter gradients, and
//! updated buffers (BatchNorm running stats).

mod common;

use tracegrad::nn::{BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Module, ModuleExt, ReLU, Sequential};
use tracegrad::zoo::{mlp, TransformerBlock};
use tracegrad::{compile, Tensor};

fn close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape(), b.shape(), "{what}: shape");
    for (i, (x, y)) in a.to_vec_f64().iter().zip(b.to_vec_f64()).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}[{i}]: compiled {x} vs eager {y}");
    }
}

fn cnn_bn() -> Sequential {
    Sequential::new()
        .add(Conv2d::new(1, 4, 3).padding(1))
        .add(BatchNorm2d::new(4))
        .add(ReLU::new())
        .add(MaxPool2d::new(2))
        .add(Flatten::new())
        .add(Linear::new(4 * 14 * 14, 10))
}

/// Builds two identical models, runs `calls` train-mode steps of `sum(out * w)` on each (one
/// eager, one compiled) and compares everything observable.
/// Tests run in parallel and share the default generator: seeding and drawing must not
/// interleave, or the two "identical" models differ.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check(name: &str, make: &dyn Fn() -> Box<dyn Module>, input: &[usize], calls: usize) {
    for backend in common::COMPILED {
        check_on(&format!("{name} ({backend:?})"), make, input, calls, backend);
    }
}

fn check_on(
    name: &str,
    make: &dyn Fn() -> Box<dyn Module>,
    input: &[usize],
    calls: usize,
    backend: tracegrad::compile::Backend,
) {
    let guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tracegrad::manual_seed(11);
    let eager = make();
    tracegrad::manual_seed(11);
    let compiled_model = make();
    let inputs: Vec<Tensor> = (0..calls).map(|_| Tensor::randn(input)).collect();
    drop(guard);
    let mut compiled = tracegrad::compile::compile_dyn(&*compiled_model).with_backend(backend);
    for (call, x) in inputs.iter().enumerate() {
        let run = |m: &dyn Module, compiled: Option<&mut tracegrad::CompiledModule>| {
            m.zero_grad();
            let xi = x.detach().requires_grad_(true);
            let y = match compiled {
                Some(c) => c.call(&xi).unwrap_or_else(|e| panic!("{name}: {e}")),
                None => m.call(&xi),
            };
            let w = Tensor::arange(0.0, y.numel() as f64, 1.0)
                .mul_scalar(0.01)
                .reshape(&y.shape().iter().map(|&d| d as isize).collect::<Vec<_>>());
            (&y * &w).sum_all().backward();
            (y.detach(), xi.grad().unwrap())
        };
        let (ye, gxe) = run(&*eager, None);
        let (yc, gxc) = run(&*compiled_model, Some(&mut compiled));
        close(&format!("{name} call {call} output"), &yc, &ye);
        close(&format!("{name} call {call} input grad"), &gxc, &gxe);
        for ((n, pe), (_, pc)) in eager.named_parameters().iter().zip(compiled_model.named_parameters()) {
            close(&format!("{name} call {call} grad {n}"), &pc.grad().unwrap(), &pe.grad().unwrap());
        }
        for ((n, be), (_, bc)) in eager.named_buffers().iter().zip(compiled_model.named_buffers()) {
            close(&format!("{name} call {call} buffer {n}"), &bc, be);
        }
    }
    assert_eq!(compiled.plan_count(), 1, "{name}: one plan serves every call");
}

#[test]
fn mlp_agrees() {
    check("mlp", &|| Box::new(mlp()), &[8, 784], 2);
}

#[test]
fn cnn_with_batchnorm_agrees_including_running_stats() {
    check("cnn+bn", &|| Box::new(cnn_bn()), &[4, 1, 28, 28], 3);
}

#[test]
fn transformer_block_agrees() {
    check("transformer", &|| Box::new(TransformerBlock::new(32, 4)), &[2, 8, 32], 1);
}

#[test]
fn eval_mode_batchnorm_uses_running_stats_compiled_too() {
    let guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tracegrad::manual_seed(5);
    let m = cnn_bn();
    let warm = Tensor::randn(&[4, 1, 28, 28]);
    let x = Tensor::randn(&[2, 1, 28, 28]);
    drop(guard);
    m.call(&warm); // move the running stats off their initial values
    m.eval();
    let before: Vec<Vec<f32>> = m.buffers().iter().map(|b| b.to_vec_f32()).collect();
    for backend in common::COMPILED {
        let y = tracegrad::no_grad(|| compile(&m).with_backend(backend).call(&x).unwrap());
        close(&format!("eval output ({backend:?})"), &y, &tracegrad::no_grad(|| m.call(&x)));
    }
    let after: Vec<Vec<f32>> = m.buffers().iter().map(|b| b.to_vec_f32()).collect();
    assert_eq!(before, after, "eval mode leaves running stats alone");
}
