//! ONNX models exported from PyTorch (`../shared/reference/onnx/`), run eager, on the JIT and
//! on the interpreter: outputs at two batch sizes, the gradients of `0.5·sum(out²)` by
//! parameter name, and the state-dict keys, all against PyTorch's values.

mod common;

use common::{assert_close, reference, tensor, Mode, MODES};
use serde_json::Value;
use tracegrad::nn::ModuleExt;
use tracegrad::onnx::{load, OnnxModule};
use tracegrad::Tensor;

const MODELS: [&str; 3] = ["mlp", "cnn", "transformer_block"];

fn model(name: &str) -> (OnnxModule, Value) {
    let dir = format!("{}/../shared/reference/onnx", env!("CARGO_MANIFEST_DIR"));
    let m = load(format!("{dir}/{name}.onnx")).unwrap_or_else(|e| panic!("{name}: {e}"));
    m.eval();
    (m, reference(&format!("onnx/{name}.json")))
}

/// The forward output in `mode`, keeping the autograd link to the parameters.
fn forward(m: &OnnxModule, c: &mut Option<tracegrad::CompiledModule>, x: &Tensor) -> Tensor {
    match c {
        Some(c) => c.call(x).unwrap_or_else(|e| panic!("{e}")),
        None => m.call(x),
    }
}

fn check(name: &str, mode: Mode) {
    let (m, r) = model(name);
    let mut compiled = mode.backend().map(|b| tracegrad::compile(&m).with_backend(b));
    for (input, output) in [("input", "output"), ("input_batch2x", "output_batch2x")] {
        m.zero_grad();
        let y = forward(&m, &mut compiled, &tensor(&r[input]));
        assert_close(&format!("{name} {mode:?} {output}"), &y, &r[output], 1e-5, 1e-5);
        if input == "input" {
            y.square().sum_all().mul_scalar(0.5).backward();
            let grads = r["param_grads"].as_object().expect("param_grads");
            let params = m.named_parameters();
            assert_eq!(params.len(), grads.len(), "{name}: parameter count");
            for (k, want) in grads {
                let p = params.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("{name}: no parameter {k}"));
                let g = p.1.grad().unwrap_or_else(|| panic!("{name} {mode:?}: no gradient for {k}"));
                assert_close(&format!("{name} {mode:?} grad {k}"), &g, want, 1e-5, 1e-5);
            }
        }
    }
    if let Some(c) = &compiled {
        assert_eq!(c.plan_count(), 2, "{name}: a new batch size is a new plan");
        assert!(!c.recompile_reasons().is_empty(), "{name}: the recompile has a reason");
    }
}

#[test]
fn outputs_and_gradients_match_pytorch_in_every_mode() {
    for name in MODELS {
        for mode in MODES {
            check(name, mode);
        }
    }
}

/// The state dict is the file's initializers under their ONNX names, plus BatchNorm's
/// `num_batches_tracked` (which the exporter drops): PyTorch's keys, exactly.
#[test]
fn state_dict_keys_are_the_onnx_names() {
    for name in MODELS {
        let (m, r) = model(name);
        let mut ours: Vec<String> = m.state_dict().into_iter().map(|(k, _)| k).collect();
        let mut want: Vec<String> = r["state_dict"].as_object().expect("state_dict").keys().cloned().collect();
        ours.sort();
        want.sort();
        assert_eq!(ours, want, "{name}");
        let buffers: Vec<String> = m.named_buffers().into_iter().map(|(k, _)| k).collect();
        if name == "cnn" {
            assert_eq!(buffers, ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]);
        }
    }
}

/// Values from the JSON state dict load into the module by name and change its output.
#[test]
fn load_state_dict_by_onnx_names() {
    let (m, r) = model("mlp");
    let state: Vec<(String, Tensor)> =
        r["state_dict"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), tensor(v).mul_scalar(0.5))).collect();
    m.load_state_dict(&state, true).unwrap();
    let w = m.get_parameter("0.weight").unwrap();
    let want = tensor(&r["state_dict"]["0.weight"]).to_vec_f64();
    for (g, w) in w.to_vec_f64().iter().zip(want) {
        assert_eq!(*g, (w as f32 * 0.5) as f64);
    }
}

/// Hooks on an imported module run in eager and compiled mode alike, and adding one is a new
/// plan.
#[test]
fn hooks_work_on_an_imported_module() {
    let (m, r) = model("cnn");
    let x = tensor(&r["input"]);
    let mut compiled = tracegrad::compile(&m);
    let plain = compiled.call(&x).unwrap();
    let handle = m.register_forward_hook(|_, _, y| Some(y.mul_scalar(2.0)));
    let eager = tracegrad::no_grad(|| m.call(&x));
    let hooked = compiled.call(&x).unwrap();
    for (a, b) in [(&eager, &plain), (&hooked, &plain)] {
        for (u, v) in a.to_vec_f64().iter().zip(b.to_vec_f64()) {
            assert!((u - 2.0 * v).abs() <= 1e-6 * (1.0 + v.abs()), "{u} vs 2·{v}");
        }
    }
    assert_eq!(compiled.plan_count(), 2);
    drop(handle);
}
