//! The compile API, on the JIT (the default) and on the reference interpreter: compiled and
//! eager runs agree, plans are cached per signature with reasons, hooks fire through callback
//! nodes, trace errors are values naming the module path.

mod common;

use std::sync::{Arc, Mutex};

use tracegrad::nn::{Linear, Module, ModuleCore, ModuleExt, ReLU, Sequential};
use tracegrad::zoo::seed_model;
use tracegrad::{compile, no_grad, Tensor};

fn close(a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape(), b.shape());
    for (x, y) in a.to_vec_f64().iter().zip(b.to_vec_f64()) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

fn mlp() -> Sequential {
    tracegrad::manual_seed(3);
    Sequential::new().add(Linear::new(784, 64)).add(ReLU::new()).add(Linear::new(64, 10))
}

#[test]
fn compiled_mlp_matches_eager_and_caches_per_signature() {
    let m = mlp();
    let mut c = compile(&m);
    no_grad(|| {
        let x = Tensor::randn(&[64, 784]);
        close(&c.call(&x).unwrap(), &m.call(&x));
        close(&c.call(&x).unwrap(), &m.call(&x));
        assert_eq!(c.plan_count(), 1);
        let x2 = Tensor::randn(&[32, 784]);
        close(&c.call(&x2).unwrap(), &m.call(&x2));
        assert_eq!(
            c.recompile_reasons(),
            &["first call".to_string(), "input 0 shape [64, 784] -> [32, 784]".to_string()]
        );
        // Parameters are graph inputs: an update is seen without recompiling.
        let w = m.get_parameter("0.weight").unwrap();
        w.set_buffer(w.mul_scalar(0.5).buffer());
        close(&c.call(&x2).unwrap(), &m.call(&x2));
        assert_eq!(c.plan_count(), 2);
        m.eval();
        c.call(&x2).unwrap();
        assert!(c.recompile_reasons().last().unwrap().contains("mode train -> eval"));
    });
}

#[test]
fn the_plan_is_a_typed_graph_with_module_paths() {
    let m = mlp();
    let mut c = compile(&m);
    no_grad(|| c.call(&Tensor::randn(&[8, 784])).unwrap());
    let text = c.last_plan().unwrap().graph.to_text();
    assert!(text.contains("= matmul"), "{text}");
    assert!(text.contains("# 0 (Linear)"), "{text}");
    assert!(text.contains("(0.weight)"), "{text}");
    assert!(text.contains("f32[8,64]"), "{text}");
}

#[test]
fn seed_model_compiles_to_the_same_output() {
    let m = seed_model();
    let x = Tensor::vec1(&[1.0, 2.0, 3.0]);
    for backend in common::COMPILED {
        let mut c = compile(&m).with_backend(backend);
        no_grad(|| close(&c.call(&x).unwrap(), &m.call(&x)));
    }
}

#[test]
fn hooks_added_or_removed_after_compiling_are_never_ignored() {
    let m = mlp();
    let mut c = compile(&m);
    let x = Tensor::randn(&[4, 784]);
    let fired = Arc::new(Mutex::new(0));
    no_grad(|| {
        c.call(&x).unwrap();
        let f = fired.clone();
        let h = m.get_submodule("2").unwrap().register_forward_hook(move |_, _, out| {
            *f.lock().unwrap() += 1;
            Some(out * 2.0)
        });
        let y = c.call(&x).unwrap();
        assert_eq!(*fired.lock().unwrap(), 1);
        close(&y, &m.call(&x)); // eager fires it too (count 2) and doubles as well
        assert_eq!(*fired.lock().unwrap(), 2);
        assert_eq!(c.recompile_reasons().last().unwrap(), "hook added on 2");
        assert!(c.last_plan().unwrap().graph.to_text().contains("forward hook of 2 (Linear)"));
        h.remove();
        let y = c.call(&x).unwrap();
        assert_eq!(*fired.lock().unwrap(), 2);
        close(&y, &m.call(&x));
        assert_eq!(c.recompile_reasons().last().unwrap(), "hook removed on 2");
    });
}

#[test]
fn a_hook_that_changes_the_shape_is_an_error_naming_the_module() {
    let m = mlp();
    let mut c = compile(&m);
    m.get_submodule("0").unwrap().register_forward_hook(|_, _, out| Some(out.sum(&[1], true)));
    let e = no_grad(|| c.call(&Tensor::randn(&[4, 784]))).unwrap_err();
    assert!(e.to_string().contains("forward hook of 0"), "{e}");
    assert!(e.to_string().contains("f32[4,1]") && e.to_string().contains("f32[4,64]"), "{e}");
}

#[derive(tracegrad::nn::Module)]
struct Broken {
    #[module]
    inner: Linear,
    core: ModuleCore,
}

impl Module for Broken {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.inner.call(x)
    }
}

#[test]
fn a_shape_error_while_tracing_is_an_err_with_the_module_path() {
    let m = Broken { inner: Linear::new(5, 3), core: ModuleCore::new() };
    let mut c = compile(&m);
    let e = no_grad(|| c.call(&Tensor::randn(&[2, 4]))).unwrap_err();
    assert_eq!(e.module_path, "inner");
    assert!(e.message.contains("linear"), "{e}");
    assert!(e.message.contains("[2, 4]") && e.message.contains("[3, 5]"), "{e}");
}

/// Gradients of `sum(out * w)` w.r.t. the input and every parameter, eager or compiled.
fn grads_of(m: &dyn Module, x: &Tensor, mode: common::Mode) -> (Tensor, Vec<(String, Tensor)>) {
    m.zero_grad();
    let x = x.detach().requires_grad_(true);
    let y = match mode.backend() {
        Some(b) => compile_dyn(m).with_backend(b).call(&x).unwrap(),
        None => m.call(&x),
    };
    let w =
        Tensor::arange(0.0, y.numel() as f64, 1.0).reshape(&y.shape().iter().map(|&d| d as isize).collect::<Vec<_>>());
    (&y * &w).sum_all().backward();
    let params = m.named_parameters().into_iter().map(|(n, p)| (n, p.grad().expect("parameter gradient"))).collect();
    (x.grad().expect("input gradient"), params)
}

fn compile_dyn(m: &dyn Module) -> tracegrad::CompiledModule<'_> {
    tracegrad::compile::compile_dyn(m)
}

fn same_grads(m: &dyn Module, x: &Tensor) {
    let (gx_e, gp_e) = grads_of(m, x, common::Mode::Eager);
    for mode in [common::Mode::Jit, common::Mode::Interpreter] {
        let (gx_c, gp_c) = grads_of(m, x, mode);
        close(&gx_c, &gx_e);
        assert_eq!(gp_e.len(), gp_c.len());
        for ((n, a), (_, b)) in gp_c.iter().zip(&gp_e) {
            assert_eq!(a.shape(), b.shape(), "{mode:?} {n}");
            close(a, b);
        }
    }
}

#[test]
fn compiled_backward_matches_eager_autograd() {
    same_grads(&mlp(), &Tensor::randn(&[16, 784]));
    same_grads(&seed_model(), &Tensor::vec1(&[1.0, 2.0, 3.0]));
}

#[test]
fn the_backward_graph_reads_saved_values() {
    let m = mlp();
    let mut c = compile(&m);
    let y = c.call(&Tensor::randn(&[4, 784])).unwrap();
    assert!(y.requires_grad());
    y.sum_all().backward();
    let plan = c.last_plan().unwrap();
    let bwd = plan.backward.as_ref().expect("a backward graph").to_text();
    assert!(bwd.contains("(saved%"), "{bwd}");
    assert!(bwd.contains("(grad_out)"), "{bwd}");
    assert!(m.get_parameter("0.weight").unwrap().grad().is_some());
}

#[test]
fn gradients_flow_through_forward_hooks_that_use_parameters() {
    // The seed exercise: every Function_* gets a bias `b` and a forward hook `inp*W1 + b`.
    let path = format!("{}/../shared/reference/seed_model.json", env!("CARGO_MANIFEST_DIR"));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let r = &r["apply_linear"];
    let m = seed_model();
    let is_function = |m: &dyn Module| m.type_name().starts_with("Function_");
    m.apply(&mut |sub| {
        if is_function(sub) {
            sub.register_parameter("b", Some(Tensor::ones(&[2]).requires_grad_(true))).unwrap();
            for (_, p) in sub.named_parameters_recurse(false) {
                p.set_buffer(p.ones_like().buffer());
            }
            sub.register_forward_hook(|module, inputs, _| {
                let b = module.get_parameter("b").unwrap();
                Some(match module.get_parameter("W1") {
                    Ok(w1) => &inputs[0] * &w1 + &b,
                    Err(_) => &inputs[0] + &b,
                })
            });
        }
    });
    for backend in common::COMPILED {
        m.zero_grad();
        let x = Tensor::from_vec(vec![1.0f32, 2.0], &[1, 2]).requires_grad_(true);
        let y = compile(&m).with_backend(backend).call(&x).unwrap();
        let want = |k: &str| r[k]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
        assert_eq!(
            y.to_vec_f64().iter().map(|v| (v * 1e4).round()).collect::<Vec<_>>(),
            want("output").iter().map(|v| (v * 1e4).round()).collect::<Vec<_>>()
        );
        y.sum_all().backward();
        for (a, b) in x.grad().unwrap().to_vec_f64().iter().zip(want("input_grad_of_sum")) {
            assert!((a - b).abs() < 1e-6, "input grad {a} vs {b}");
        }
        let grads = r["param_grads_of_sum"].as_object().unwrap();
        for (name, p) in m.named_parameters() {
            match grads.get(&name) {
                Some(w) => {
                    let w: Vec<f64> = w["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                    let g = p.grad().unwrap_or_else(|| panic!("{name} has no gradient")).to_vec_f64();
                    for (a, b) in g.iter().zip(&w) {
                        assert!((a - b).abs() < 1e-5, "{name}: {a} vs {b}");
                    }
                }
                None => assert!(
                    p.grad().is_none_or(|g| g.to_vec_f64().iter().all(|v| *v == 0.0)),
                    "{name} should get no gradient"
                ),
            }
        }
    }
}
