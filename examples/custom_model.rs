//! The seed "custom model" exercise: a nested model with parameters, a persistent buffer and a
//! shared-type child, introspected and then rewired at run time with `apply` and forward hooks.
//! It prints what the PyTorch script behind `shared/reference/seed_model.json` prints.
//!
//! Run with `cargo run --release --example custom_model`.

use tracegrad::nn::{Module, ModuleExt};
use tracegrad::zoo::seed_model;
use tracegrad::Tensor;

fn main() {
    let model = seed_model();
    println!("{}", model.repr());

    let x = Tensor::vec1(&[1.0, 2.0, 3.0]).requires_grad_(true);
    let y = model.call(&x);
    println!("output: {y}");
    y.sum_all().backward();
    println!("input grad: {}", x.grad().unwrap());
    for (name, p) in model.named_parameters() {
        println!("grad of {name}: {}", p.grad().unwrap());
    }

    println!("named_modules:");
    for (name, m) in model.named_modules() {
        println!("  {:<8} {}", if name.is_empty() { "''" } else { &name }, m.type_name());
    }
    let keys: Vec<String> = model.state_dict().into_iter().map(|(k, _)| k).collect();
    println!("named_buffers: {:?}", model.named_buffers().into_iter().map(|(k, _)| k).collect::<Vec<_>>());
    println!("state_dict keys: {keys:?}");
    println!("get_parameter('ab.b.W1') = {}", model.get_parameter("ab.b.W1").unwrap());
    println!("get_buffer('cd.c.duck') = {}", model.get_buffer("cd.c.duck").unwrap());
    for path in ["ab.x", "ab.a.W1", "cd.c.missing"] {
        println!("get_submodule('{path}') -> {}", model.get_submodule(path).err().unwrap());
    }
    let mut order = Vec::new();
    model.apply(&mut |m| order.push(m.type_name()));
    println!("apply order: {order:?}");

    // The apply exercise: add a bias to every Function_*, fill their own parameters with 1,
    // and turn each into `inp * W1 + b` with a forward hook.
    let is_function = |m: &dyn Module| m.type_name().starts_with("Function_");
    model.apply(&mut |m| {
        if is_function(m) {
            m.register_parameter("b", Some(Tensor::rand(&[2]).requires_grad_(true))).unwrap();
        }
    });
    model.apply(&mut |m| {
        if is_function(m) {
            for (_, p) in m.named_parameters_recurse(false) {
                p.set_buffer(p.ones_like().buffer());
            }
        }
    });
    model.apply(&mut |m| {
        if is_function(m) {
            m.register_forward_hook(|module, inputs, _| {
                let b = module.get_parameter("b").unwrap();
                Some(match module.get_parameter("W1") {
                    Ok(w1) => &inputs[0] * &w1 + &b,
                    Err(_) => &inputs[0] + &b,
                })
            });
        }
    });
    model.zero_grad();
    println!("parameters after apply: {:?}", model.named_parameters().into_iter().map(|(k, _)| k).collect::<Vec<_>>());
    let x = Tensor::from_vec(vec![1.0f32, 2.0], &[1, 2]).requires_grad_(true);
    let y = model.call(&x);
    println!("linear output: {y}");
    y.sum_all().backward();
    println!("input grad: {}", x.grad().unwrap());
    for (name, p) in model.named_parameters() {
        if let Some(g) = p.grad() {
            println!("grad of {name}: {g}");
        }
    }
}
