//! Runs the core of `examples/onnx_finetune.rs`: 100 compiled steps on the PyTorch MLP lower
//! the loss, and the saved safetensors hold the trained weights under the ONNX names.

#[path = "../examples/onnx_finetune.rs"]
mod example;

use std::path::Path;

use tracegrad::nn::{state_from_safetensors, ModuleExt};

#[test]
fn finetuning_an_imported_model_lowers_the_loss_and_saves_onnx_names() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/reference/onnx/mlp.onnx");
    let out = std::env::temp_dir().join(format!("tracegrad-onnx-finetune-{}.safetensors", std::process::id()));
    let losses = example::finetune(Path::new(model), 100, &out).unwrap();
    assert_eq!(losses.len(), 100);
    let (first, last) = (losses[0], losses[99]);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let saved = state_from_safetensors(&std::fs::read(&out).unwrap()).unwrap();
    let mut names: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
    names.sort();
    assert_eq!(names, ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]);
    // The saved weights are the trained ones, not the file's.
    let fresh = tracegrad::onnx::load(model).unwrap();
    let w0 = fresh.get_parameter("0.weight").unwrap();
    let trained = &saved.iter().find(|(k, _)| k == "0.weight").unwrap().1;
    assert!(!trained.allclose(&w0, 0.0, 1e-4));
    fresh.load_state_dict(&saved, true).unwrap();
    assert!(fresh.get_parameter("0.weight").unwrap().equal(trained));
}
