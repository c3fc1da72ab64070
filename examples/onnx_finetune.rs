//! Fine-tune a model exported from PyTorch: load `mlp.onnx` (12 → 32 → 16 → 4, softmax
//! output), train it for 100 compiled Adam steps on a synthetic task, and save the weights as
//! safetensors under their ONNX names (PyTorch's `state_dict` keys), ready for
//! `model.load_state_dict(safetensors.torch.load_file(...))` on the PyTorch side.
//!
//! ```text
//! cargo run --release --example onnx_finetune -- [MODEL.onnx] [OUT.safetensors]
//! ```

use std::error::Error;
use std::path::Path;

use tracegrad::compile::{compile_train_step, StepOptimizer};
use tracegrad::nn::save_safetensors;
use tracegrad::optim::AdamOptions;
use tracegrad::{Generator, LossReduction, Tensor};

/// The synthetic task: the class of a sample is the index of the largest of its first four
/// features, and the softmax output is fitted to the one-hot class (mean squared error).
pub fn task(g: &mut Generator, n: usize) -> (Tensor, Tensor) {
    let x = Tensor::randn_with(g, &[n, 12]);
    let class = x.narrow(1, 0, 4).argmax(Some(1), false);
    let onehot = Tensor::eye(4).index_select(0, &class);
    (x, onehot)
}

/// Loads `model`, runs `steps` compiled training steps, saves to `out`; returns the losses.
pub fn finetune(model: &Path, steps: usize, out: &Path) -> Result<Vec<f64>, Box<dyn Error>> {
    let m = tracegrad::onnx::load(model)?;
    let mut g = Generator::new(7);
    let (x, y) = task(&mut g, 256);
    let opt = StepOptimizer::Adam(AdamOptions { lr: 1e-2, ..Default::default() });
    let mut step = compile_train_step(&m, |out, y| out.mse_loss(y, LossReduction::Mean), opt);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        losses.push(step.step(&x, &y)?.item());
    }
    drop(step);
    save_safetensors(&m, out)?;
    Ok(losses)
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let default_model = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/reference/onnx/mlp.onnx");
    let model = args.first().map_or(default_model, String::as_str);
    let out = args.get(1).map_or("mlp_finetuned.safetensors", String::as_str);
    let losses = finetune(Path::new(model), 100, Path::new(out))?;
    for (i, l) in losses.iter().enumerate().filter(|(i, _)| i % 10 == 0 || *i == losses.len() - 1) {
        println!("step {:>3}  loss {l:.5}", i + 1);
    }
    println!("saved {out}");
    Ok(())
}
