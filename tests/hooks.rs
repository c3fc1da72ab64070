//! Module and tensor hooks against PyTorch's transcript `hooks.json`.

mod common;

use std::sync::{Arc, Mutex};

use common::{assert_close, reference, tensor, Mode, MODES};
use serde_json::Value;
use tracegrad::nn::{Linear, Module, ModuleCore, ModuleExt};
use tracegrad::Tensor;

/// `Add(x1, x2) = x1 + x2`: a module with two tensor inputs.
#[derive(tracegrad::nn::Module, Default)]
struct Add {
    core: ModuleCore,
}

impl Module for Add {
    fn forward_many(&self, xs: &[Tensor]) -> Tensor {
        &xs[0] + &xs[1]
    }
}

/// `m(args)`, eagerly or through `compile` on the mode's backend (a fresh plan, traced on
/// this call). Every module case runs in all three modes: the same test.
fn call(m: &dyn Module, args: &[Tensor], mode: Mode) -> Tensor {
    match mode.backend() {
        Some(b) => tracegrad::compile::compile_dyn(m)
            .with_backend(b)
            .call_many(args)
            .unwrap_or_else(|e| panic!("{mode:?}: {e}")),
        None => m.call_many(args),
    }
}

fn case(name: &str) -> Value {
    reference("hooks.json")[name].clone()
}

type Log = Arc<Mutex<Vec<String>>>;

/// Each backward-hook call as (grad_input, grad_output), printed.
type Calls = Vec<(Vec<String>, Vec<String>)>;

fn fmt(t: &Tensor) -> String {
    format!("{:?}", t.to_vec_f32())
}

#[test]
fn pre_and_forward_hooks_see_inputs_and_output() {
    for mode in MODES {
        pre_and_forward(mode);
    }
}

fn pre_and_forward(mode: Mode) {
    let r = case("pre_and_forward_hook_capture");
    let inputs: Vec<Tensor> = r["inputs"].as_array().unwrap().iter().map(tensor).collect();
    let m = Add::default();
    let log: Log = Arc::default();
    let l = log.clone();
    m.register_forward_pre_hook(move |_, args| {
        l.lock().unwrap().push(format!("pre {}", args.iter().map(fmt).collect::<Vec<_>>().join(" ")));
        None
    });
    let l = log.clone();
    m.register_forward_hook(move |_, _, out| {
        l.lock().unwrap().push(format!("fwd {}", fmt(out)));
        None
    });
    let out = call(&m, &inputs, mode);
    assert_close("output", &out, &r["output"], 0.0, 0.0);
    let want: Vec<String> = r["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e[0].as_str().unwrap() {
            "pre" => format!(
                "pre {}",
                e[1].as_array().unwrap().iter().map(|t| fmt(&tensor(t))).collect::<Vec<_>>().join(" ")
            ),
            _ => format!("fwd {}", fmt(&tensor(&e[1]))),
        })
        .collect();
    assert_eq!(*log.lock().unwrap(), want);
}

#[test]
fn hooks_replace_output_and_inputs_and_removal_restores() {
    for mode in MODES {
        let inputs = [Tensor::vec1(&[1.0, 2.0]), Tensor::vec1(&[3.0, 4.0])];
        let m = Add::default();
        let h = m.register_forward_hook(|_, _, out| Some(out + 5.0));
        assert_close("plus 5", &call(&m, &inputs, mode), &case("forward_hook_plus_5"), 0.0, 0.0);
        h.remove();
        h.remove(); // removing twice is harmless
        assert_close("removed", &call(&m, &inputs, mode), &case("removed_hook_has_no_effect"), 0.0, 0.0);
        let p = m.register_forward_pre_hook(|_, args| Some(vec![&args[0] * 10.0, args[1].clone()]));
        let want = case("pre_hook_replaces_first_input_times_10");
        assert_close("pre x10", &call(&m, &inputs, mode), &want, 0.0, 0.0);
        p.remove();
    }
}

/// `o = Add()(u1*u1, u2*3)` as a module, so compiled mode traces the products too.
#[derive(tracegrad::nn::Module, Default)]
struct SquaresThenAdd {
    #[module]
    add: Add,
    core: ModuleCore,
}

impl Module for SquaresThenAdd {
    fn forward_many(&self, xs: &[Tensor]) -> Tensor {
        self.add.call_many(&[&xs[0] * &xs[0], &xs[1] * 3.0])
    }
}

/// `o = Add()(u1*u1, u2*3); loss = sum(o * [1, 2])`.
fn run_full_backward(r: &Value, normalise: bool, mode: Mode) -> (Tensor, Tensor, Calls) {
    let (u1, u2) = (tensor(&r["u1"]).requires_grad_(true), tensor(&r["u2"]).requires_grad_(true));
    let outer = SquaresThenAdd::default();
    let m = &outer.add;
    let calls: Arc<Mutex<Calls>> = Arc::default();
    let c = calls.clone();
    m.register_full_backward_hook(move |gi, go| {
        let s = |v: &[Option<Tensor>]| v.iter().map(|t| fmt(t.as_ref().unwrap())).collect::<Vec<_>>();
        c.lock().unwrap().push((s(gi), s(go)));
        if normalise {
            // Normalise by the total of all input gradients.
            let total: f64 = gi.iter().map(|g| g.as_ref().unwrap().sum_all().item()).sum();
            Some(gi.iter().map(|g| g.as_ref().map(|g| g.div_scalar(total))).collect())
        } else {
            None
        }
    });
    let o = call(&outer, &[u1.clone(), u2.clone()], mode);
    (&o * &Tensor::vec1(&[1.0, 2.0])).sum_all().backward();
    let calls = calls.lock().unwrap().clone();
    (u1.grad().unwrap(), u2.grad().unwrap(), calls)
}

fn expected_calls(r: &Value) -> Calls {
    r["hook_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_array().unwrap().iter().map(|t| fmt(&tensor(t))).collect::<Vec<_>>();
            (s("grad_input"), s("grad_output"))
        })
        .collect()
}

#[test]
fn full_backward_hook_sees_module_input_gradients() {
    let r = case("full_backward_hook_capture");
    for mode in MODES {
        let (g1, g2, calls) = run_full_backward(&r, false, mode);
        assert_eq!(calls, expected_calls(&r));
        assert_close("u1 grad", &g1, &r["u1_grad"], 1e-6, 0.0);
        assert_close("u2 grad", &g2, &r["u2_grad"], 1e-6, 0.0);
    }
}

#[test]
fn full_backward_hook_replaces_grad_input() {
    let r = case("full_backward_hook_normalise");
    for mode in MODES {
        let (g1, g2, calls) = run_full_backward(&r, true, mode);
        assert_eq!(calls, expected_calls(&r));
        assert_close("u1 grad", &g1, &r["u1_grad"], 1e-6, 0.0);
        assert_close("u2 grad", &g2, &r["u2_grad"], 1e-6, 0.0);
    }
}

#[test]
fn backward_pre_hook_replaces_grad_output() {
    // Reconstructed forward (the transcript names only the result): o = Add()(u1, u2),
    // loss = sum(o), with a backward pre-hook multiplying grad_output by 3.
    let r = case("backward_pre_hook_times_3");
    for mode in MODES {
        let (u1, u2) = (Tensor::vec1(&[1.0, 2.0]).requires_grad_(true), Tensor::vec1(&[3.0, 4.0]).requires_grad_(true));
        let m = Add::default();
        m.register_full_backward_pre_hook(|go| Some(go.iter().map(|g| g.as_ref().map(|g| g * 3.0)).collect()));
        call(&m, &[u1.clone(), u2.clone()], mode).sum_all().backward();
        assert_close("u1 grad", &u1.grad().unwrap(), &r["u1_grad"], 0.0, 0.0);
        assert_close("u2 grad", &u2.grad().unwrap(), &r["u2_grad"], 0.0, 0.0);
    }
}

#[test]
fn tensor_hooks_on_parameters_capture_and_clip() {
    let r = case("param_tensor_hook_capture");
    let x = tensor(&r["x"]);
    let w = tensor(&r["W"]).requires_grad_(true);
    let captured: Arc<Mutex<Vec<Tensor>>> = Arc::default();
    let c = captured.clone();
    w.register_hook(move |g| {
        c.lock().unwrap().push(g.clone());
        None
    });
    x.matmul(&w.t()).pow(2.0).sum_all().backward();
    let caps = captured.lock().unwrap();
    assert_eq!(caps.len(), r["captured"].as_array().unwrap().len());
    assert_close("captured", &caps[0], &r["captured"][0], 1e-6, 0.0);
    assert_close("W grad", &w.grad().unwrap(), &r["W_grad"], 1e-6, 0.0);

    let w = tensor(&r["W"]).requires_grad_(true);
    w.register_hook(|g| Some(g.clamp(Some(-1.0), Some(1.0))));
    x.matmul(&w.t()).pow(2.0).sum_all().backward();
    assert_close("clipped", &w.grad().unwrap(), &case("param_tensor_hook_clip")["W_grad"], 0.0, 0.0);
}

/// `h = v*2` with a tensor hook multiplying h's gradient by 10; returns `sum(h²)`.
#[derive(tracegrad::nn::Module, Default)]
struct HookedSquare {
    core: ModuleCore,
}

impl Module for HookedSquare {
    fn forward(&self, v: &Tensor) -> Tensor {
        let h = v * 2.0;
        h.register_hook(|g| Some(g * 10.0));
        h.pow(2.0).sum_all()
    }
}

#[test]
fn tensor_hook_on_an_intermediate() {
    let r = case("intermediate_tensor_hook_times_10");
    for mode in MODES {
        let v = tensor(&r["v"]).requires_grad_(true);
        call(&HookedSquare::default(), std::slice::from_ref(&v), mode).backward();
        assert_close("v grad", &v.grad().unwrap(), &r["v_grad"], 1e-6, 0.0);
    }
}

#[test]
fn post_accumulate_hook_runs_after_grad_is_stored() {
    let w = Tensor::vec1(&[1.0, 2.0]).requires_grad_(true);
    let seen: Arc<Mutex<Vec<Vec<f32>>>> = Arc::default();
    let s = seen.clone();
    let h = w.register_post_accumulate_grad_hook(move |t| s.lock().unwrap().push(t.grad().unwrap().to_vec_f32()));
    (&w * 3.0).sum_all().backward();
    (&w * 3.0).sum_all().backward();
    assert_eq!(*seen.lock().unwrap(), vec![vec![3.0, 3.0], vec![6.0, 6.0]]);
    h.remove();
    (&w * 3.0).sum_all().backward();
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[test]
fn a_wrong_hook_return_is_an_error_not_a_crash() {
    let u = Tensor::vec1(&[1.0, 2.0]).requires_grad_(true);
    let m = Add::default();
    m.register_full_backward_hook(|gi, _| Some(vec![Some(Tensor::zeros(&[3])), gi[1].clone()]));
    let err = m.call_many(&[&u * 2.0, &u * 3.0]).sum_all().try_backward().unwrap_err();
    assert!(err.to_string().contains("full backward hook of Add"), "{err}");
    assert!(err.to_string().contains("f32[3]") && err.to_string().contains("f32[2]"), "{err}");

    let m = Add::default();
    m.register_full_backward_hook(|gi, _| Some(gi[..1].to_vec()));
    let err = m.call_many(&[&u * 2.0, &u * 3.0]).sum_all().try_backward().unwrap_err();
    assert!(err.to_string().contains("returned 1 gradients, expected 2"), "{err}");

    let t = &u * 2.0;
    t.register_hook(|_| Some(Tensor::zeros(&[5])));
    assert!(t.sum_all().try_backward().unwrap_err().to_string().contains("tensor hook"));
}

/// A full backward hook that returns a gradient where `grad_input` has none is an error, with
/// eager mode's text, in every mode: once for an input that takes no gradient, once for a
/// module none of whose inputs does (its hooks fire with `grad_input` all `None`).
#[test]
fn an_unexpected_gradient_from_a_backward_hook_is_rejected_in_every_mode() {
    for mode in MODES {
        let u = Tensor::vec1(&[1.0, 2.0]).requires_grad_(true);
        let m = Add::default();
        let seen: Arc<Mutex<Vec<bool>>> = Arc::default();
        let s = seen.clone();
        m.register_full_backward_hook(move |gi, _| {
            s.lock().unwrap().extend(gi.iter().map(Option::is_some));
            Some(vec![gi[0].clone(), Some(Tensor::zeros(&[2]))])
        });
        let out = call(&m, &[u.clone(), Tensor::vec1(&[3.0, 4.0])], mode);
        let err = out.sum_all().try_backward().err().unwrap_or_else(|| panic!("{mode:?}: no error")).to_string();
        let want = "a full backward hook of Add returned a gradient of shape [2] where there is none";
        assert!(err.contains(want), "{mode:?}: {err}");
        assert_eq!(*seen.lock().unwrap(), [true, false], "{mode:?}: grad_input is None for an input without grad");

        tracegrad::manual_seed(0);
        let lin = Linear::new(2, 3);
        lin.register_full_backward_hook(|_, _| Some(vec![Some(Tensor::zeros(&[1, 2]))]));
        let out = call(&lin, &[Tensor::ones(&[1, 2])], mode);
        let err = out.sum_all().try_backward().err().unwrap_or_else(|| panic!("{mode:?}: no error")).to_string();
        let want = "a full backward hook of Linear returned a gradient of shape [1, 2] where there is none";
        assert!(err.contains(want), "{mode:?}: {err}");
    }
}

#[derive(tracegrad::nn::Module)]
struct Inner {
    #[module]
    l: Linear,
    core: ModuleCore,
}

impl Module for Inner {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.l.call(x).tanh()
    }
}

#[derive(tracegrad::nn::Module)]
struct Outer {
    #[module]
    i1: Inner,
    #[module]
    i2: Inner,
    core: ModuleCore,
}

impl Module for Outer {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.i2.call(&self.i1.call(x))
    }
}

#[test]
fn all_four_hook_kinds_fire_in_pytorchs_order() {
    for mode in MODES {
        firing_order(mode);
    }
}

fn firing_order(mode: Mode) {
    let r = case("firing_order_nested");
    let inner = || Inner { l: Linear::new(3, 3), core: ModuleCore::new() };
    let model = Outer { i1: inner(), i2: inner(), core: ModuleCore::new() };
    let events: Log = Arc::default();
    for (name, m) in model.named_modules() {
        let label = if name.is_empty() { "<root>".to_string() } else { name };
        let (e, l) = (events.clone(), label.clone());
        m.register_forward_pre_hook(move |_, _| {
            e.lock().unwrap().push(format!("fwd_pre {l}"));
            None
        });
        let (e, l) = (events.clone(), label.clone());
        m.register_forward_hook(move |_, _, _| {
            e.lock().unwrap().push(format!("fwd {l}"));
            None
        });
        let (e, l) = (events.clone(), label.clone());
        m.register_full_backward_pre_hook(move |_| {
            e.lock().unwrap().push(format!("bwd_pre {l}"));
            None
        });
        let (e, l) = (events.clone(), label);
        m.register_full_backward_hook(move |_, _| {
            e.lock().unwrap().push(format!("bwd {l}"));
            None
        });
    }
    let x = Tensor::randn(&[2, 3]).requires_grad_(true);
    call(&model, std::slice::from_ref(&x), mode).sum_all().backward();
    assert_eq!(*events.lock().unwrap(), common::strings(&r["events"]), "mode: {mode:?}");
}

#[test]
fn global_hooks_fire_for_every_module() {
    let count = Arc::new(Mutex::new(0));
    let c = count.clone();
    let h = tracegrad::nn::register_module_forward_hook(move |m, _, _| {
        if m.type_name() == "GlobalProbe" {
            *c.lock().unwrap() += 1;
        }
        None
    });
    #[derive(tracegrad::nn::Module, Default)]
    struct GlobalProbe {
        core: ModuleCore,
    }
    impl Module for GlobalProbe {
        fn forward(&self, x: &Tensor) -> Tensor {
            x.clone()
        }
    }
    let m = GlobalProbe::default();
    let v0 = tracegrad::nn::hooks_version();
    m.call(&Tensor::zeros(&[1]));
    m.call(&Tensor::zeros(&[1]));
    h.remove();
    assert!(tracegrad::nn::hooks_version() > v0);
    m.call(&Tensor::zeros(&[1]));
    assert_eq!(*count.lock().unwrap(), 2);
}
