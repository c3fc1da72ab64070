//! The executor: memory plan (peak bytes, in-place outputs, donation), panicking hooks, and
//! thread splitting of large kernels.

use tracegrad_compiler::composite;
use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::interpret::{interpret, CallbackRunner, NoCallbacks};
use tracegrad_compiler::ops::UnaryOp;
use tracegrad_compiler::{Build, TensorType};
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, DType};

fn input(g: &mut Graph, name: &str, shape: &[usize]) -> tracegrad_compiler::graph::NodeId {
    g.add_input(name, InputRole::Data, TensorType::new(DType::F32, shape))
}

fn ramp(shape: &[usize], scale: f32) -> Buffer {
    let n: usize = shape.iter().product();
    Buffer::from_vec((0..n).map(|i| ((i % 17) as f32 - 8.0) * scale).collect::<Vec<f32>>(), shape)
}

#[test]
fn the_memory_plan_frees_after_last_use_and_writes_epilogues_in_place() {
    // a = 2x; b = a @ w; c = relu(b + bias): the epilogue overwrites b, `a` dies at the
    // matmul, so the peak is a and b together.
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[64, 32]);
    let w = input(&mut g, "w", &[16, 32]);
    let bias = input(&mut g, "bias", &[16]);
    let a = g.mul_scalar(&x, 2.0).unwrap();
    let c = composite::linear(&mut g, &a, &w, Some(&bias)).unwrap();
    let r = g.unary(UnaryOp::Relu, &c).unwrap();
    g.add_output("r", r);
    let exe = Executable::new(&g, Backend::Jit).unwrap();
    let plan = exe.plan_text();
    assert!(plan.contains("in place of"), "{plan}");
    assert_eq!(exe.peak_bytes(), 64 * 32 * 4 + 64 * 16 * 4, "{plan}");
    let inputs = [ramp(&[64, 32], 0.1), ramp(&[16, 32], 0.05), ramp(&[16], 0.2)];
    let got = exe.run(&inputs, &NoCallbacks).unwrap();
    let want = interpret(&g, &inputs, &NoCallbacks).unwrap();
    for (p, q) in got[0].to_vec::<f32>().iter().zip(want[0].to_vec::<f32>()) {
        assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
    }
    // The interpreter backend runs the same graph.
    let interp = Executable::new(&g, Backend::Interpreter).unwrap();
    assert_eq!(interp.run(&inputs, &NoCallbacks).unwrap()[0], want[0]);
}

#[test]
fn a_donated_input_is_overwritten_only_when_the_executor_owns_it() {
    // p' = p - 0.1·g, with p donated.
    let mut g = Graph::new();
    let p = input(&mut g, "p", &[1000]);
    let gr = input(&mut g, "g", &[1000]);
    let step = g.mul_scalar(&gr, 0.1).unwrap();
    let np = g.sub(&p, &step).unwrap();
    g.add_output("p", np);
    let exe = Executable::with_donation(&g, Backend::Jit, &[true, false]).unwrap();
    let p0 = ramp(&[1000], 1.0);
    let g0 = ramp(&[1000], 0.5);
    let want = interpret(&g, &[p0.clone(), g0.clone()], &NoCallbacks).unwrap();

    // Shared: the caller keeps `p0`, so the output is fresh storage and p0 is unchanged.
    let kept = p0.clone();
    let out = exe.run_donated(vec![p0.clone(), g0.clone()], &NoCallbacks).ok().unwrap();
    assert_eq!(out[0], want[0]);
    assert!(!out[0].shares_storage(&kept));
    assert_eq!(kept, ramp(&[1000], 1.0));

    // Sole owner: the new value is written over the donated storage.
    let owned = ramp(&[1000], 1.0);
    let addr = owned.data().as_ptr();
    let out = exe.run_donated(vec![owned, g0.clone()], &NoCallbacks).ok().unwrap();
    assert_eq!(out[0], want[0]);
    assert_eq!(out[0].data().as_ptr(), addr, "written in place");

    // Without donation an input is never written.
    let plain = Executable::new(&g, Backend::Jit).unwrap();
    let owned = ramp(&[1000], 1.0);
    let addr = owned.data().as_ptr();
    let out = plain.run_donated(vec![owned, g0], &NoCallbacks).ok().unwrap();
    assert_ne!(out[0].data().as_ptr(), addr);
}

/// `p − s·(gᵀ·x)`: SGD on a weight whose gradient is a product.
fn sgd_update_graph(extra_use: bool) -> Graph {
    let mut g = Graph::new();
    let p = input(&mut g, "p", &[24, 40]);
    let gr = input(&mut g, "g", &[96, 24]);
    let x = input(&mut g, "x", &[96, 40]);
    let s = g.add_input("lr", InputRole::State, TensorType::new(DType::F32, &[]));
    let prod = g.matmul_t(&gr, &x, true, false).unwrap();
    let scaled = g.mul(&s, &prod).unwrap();
    let np = g.sub(&p, &scaled).unwrap();
    g.add_output("p", np);
    if extra_use {
        g.add_output("grad", prod);
    }
    g
}

#[test]
fn an_sgd_update_of_a_product_accumulates_into_the_parameter() {
    let g = sgd_update_graph(false);
    let exe = Executable::with_donation(&g, Backend::Jit, &[true, false, false, false]).unwrap();
    let plan = exe.plan_text();
    assert!(plan.contains("matmul_accumulate") && plan.contains("(in place of"), "{plan}");
    // Neither the product nor a new parameter is ever allocated.
    assert_eq!(exe.peak_bytes(), 0, "{plan}");
    let inputs = [ramp(&[24, 40], 1.0), ramp(&[96, 24], 0.5), ramp(&[96, 40], 0.25), Buffer::scalar(0.01, DType::F32)];
    let want = interpret(&g, &inputs, &NoCallbacks).unwrap();
    let close = |got: &Buffer| {
        for (p, q) in got.to_vec::<f32>().iter().zip(want[0].to_vec::<f32>()) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
        }
    };

    // The caller keeps p: the update goes to a copy and p is unchanged.
    let kept = inputs[0].clone();
    let out = exe.run_donated(inputs.to_vec(), &NoCallbacks).ok().unwrap();
    close(&out[0]);
    assert!(!out[0].shares_storage(&kept));
    assert_eq!(kept, ramp(&[24, 40], 1.0));

    // Sole owner: the update is written over p's storage.
    let mut owned = inputs.to_vec();
    owned[0] = ramp(&[24, 40], 1.0);
    let addr = owned[0].data().as_ptr();
    let out = exe.run_donated(owned, &NoCallbacks).ok().unwrap();
    close(&out[0]);
    assert_eq!(out[0].data().as_ptr(), addr, "written in place");

    // Without donation p is never written; the step still accumulates into a copy.
    let plain = Executable::new(&g, Backend::Jit).unwrap();
    assert!(plain.plan_text().contains("matmul_accumulate"), "{}", plain.plan_text());
    let mut owned = inputs.to_vec();
    owned[0] = ramp(&[24, 40], 1.0);
    let addr = owned[0].data().as_ptr();
    let out = plain.run_donated(owned, &NoCallbacks).ok().unwrap();
    close(&out[0]);
    assert_ne!(out[0].data().as_ptr(), addr);
}

#[test]
fn a_product_used_elsewhere_is_materialized() {
    let g = sgd_update_graph(true);
    let exe = Executable::with_donation(&g, Backend::Jit, &[true, false, false, false]).unwrap();
    let plan = exe.plan_text();
    assert!(!plan.contains("matmul_accumulate"), "{plan}");
    let inputs = [ramp(&[24, 40], 1.0), ramp(&[96, 24], 0.5), ramp(&[96, 40], 0.25), Buffer::scalar(0.01, DType::F32)];
    let want = interpret(&g, &inputs, &NoCallbacks).unwrap();
    let got = exe.run(&inputs, &NoCallbacks).unwrap();
    for (a, b) in got.iter().zip(&want) {
        for (p, q) in a.to_vec::<f32>().iter().zip(b.to_vec::<f32>()) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}

struct Panicky;

impl CallbackRunner for Panicky {
    fn run(&self, _id: usize, args: &[Buffer]) -> Result<Vec<Buffer>, String> {
        if args[0].to_vec::<f32>()[0] < 0.0 {
            panic!("the hook saw a negative value");
        }
        Ok(args.to_vec())
    }
}

#[test]
fn a_panicking_hook_is_an_error_and_the_plan_stays_usable() {
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[8]);
    let e = g.unary(UnaryOp::Tanh, &x).unwrap();
    let ty = g.ty(e).clone();
    let h = g.add_callback(0, "forward hook of fc", &[e], &[ty])[0];
    let y = g.mul_scalar(&h, 3.0).unwrap();
    g.add_output("y", y);
    for backend in [Backend::Jit, Backend::Interpreter] {
        let exe = Executable::new(&g, backend).unwrap();
        let err = exe.run(&[ramp(&[8], 1.0)], &Panicky).unwrap_err().to_string();
        assert!(err.contains("forward hook of fc") && err.contains("panicked: the hook saw a negative value"), "{err}");
        let pos = Buffer::from_vec((0..8).map(|i| i as f32 * 0.1).collect::<Vec<f32>>(), &[8]);
        let out = exe.run(std::slice::from_ref(&pos), &Panicky).unwrap();
        let want: Vec<f32> = pos.to_vec::<f32>().iter().map(|v| 3.0 * v.tanh()).collect();
        for (p, q) in out[0].to_vec::<f32>().iter().zip(want) {
            assert!((p - q).abs() <= 1e-6, "{backend:?}: {p} vs {q}");
        }
    }
}

#[test]
fn large_kernels_split_across_threads_and_agree() {
    // 2^20 elements: above the threshold, the kernel runs in chunks on rayon's pool; the
    // result must not depend on the split.
    let n = 1 << 20;
    let mut g = Graph::new();
    let x = input(&mut g, "x", &[n]);
    let t = g.unary(UnaryOp::Sigmoid, &x).unwrap();
    let y = g.mul(&t, &x).unwrap();
    g.add_output("y", y);
    let exe = Executable::new(&g, Backend::Jit).unwrap();
    let xs = Buffer::from_vec((0..n).map(|i| (i as f32 / n as f32 - 0.5) * 20.0).collect::<Vec<f32>>(), &[n]);
    let par = exe.run(std::slice::from_ref(&xs), &NoCallbacks).unwrap();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let seq = one.install(|| exe.run(std::slice::from_ref(&xs), &NoCallbacks).unwrap());
    assert_eq!(par[0], seq[0]);
    let want = interpret(&g, &[xs], &NoCallbacks).unwrap();
    for (p, q) in par[0].to_vec::<f32>().iter().zip(want[0].to_vec::<f32>()) {
        assert!((p - q).abs() <= 4.0 * f32::EPSILON * (1.0 + q.abs()), "{p} vs {q}");
    }
}
