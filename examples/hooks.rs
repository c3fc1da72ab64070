//! Hooks in practice: capture activations with forward hooks, clip gradients with a tensor
//! hook, and normalise `grad_input` with a full backward hook.
//!
//! Run with `cargo run --release --example hooks`.

use std::sync::{Arc, Mutex};

use tracegrad::nn::{Linear, ModuleExt, ReLU, Sequential};
use tracegrad::Tensor;

/// (child name and type, output shape) per forward call.
type Activations = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

fn main() {
    tracegrad::manual_seed(0);
    let model = Sequential::new().add(Linear::new(4, 8)).add(ReLU::new()).add(Linear::new(8, 2));

    // 1. Capture every child's output.
    let activations: Activations = Arc::default();
    let mut handles = Vec::new();
    for (name, child) in model.named_children() {
        let acts = activations.clone();
        handles.push(child.register_forward_hook(move |m, _, out| {
            acts.lock().unwrap().push((format!("{name} ({})", m.type_name()), out.shape()));
            None
        }));
    }

    // 2. Clip the first layer's weight gradient to [-0.01, 0.01].
    let w = model.get_parameter("0.weight").unwrap();
    w.register_hook(|g| Some(g.clamp(Some(-0.01), Some(0.01))));

    // 3. Normalise the gradient flowing into the last layer to unit norm.
    let last = model.get_submodule("2").unwrap();
    last.register_full_backward_hook(|grad_input, _grad_output| {
        Some(
            grad_input
                .iter()
                .map(|g| g.as_ref().map(|g| g.div_scalar(g.square().sum_all().sqrt().item() + 1e-12)))
                .collect(),
        )
    });

    let x = Tensor::randn(&[3, 4]);
    let loss = model.call(&x).square().mean_all();
    loss.backward();

    for (name, shape) in activations.lock().unwrap().iter() {
        println!("activation of {name}: {shape:?}");
    }
    let g = w.grad().unwrap();
    println!("0.weight grad in [{:.4}, {:.4}] after clipping", g.min().item(), g.max().item());
    println!("loss {loss}");
    for h in handles {
        h.remove();
    }
}
