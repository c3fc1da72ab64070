//! Lazy layers against the `lazy_linear` entry of `seed_extra.json`, plus LazyConv2d, their
//! initialisation, and the refusal to optimize (or compile) parameters that are not
//! materialized yet.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;
use tracegrad::nn::{
    check_initialized, is_uninitialized, Conv2d, LazyConv2d, LazyLinear, Linear, ModuleExt, ModuleFields, ReLU,
    Sequential,
};
use tracegrad::optim::{Adam, AdamW, OptimError, Optimizer, Sgd, SgdOptions};
use tracegrad::Tensor;

const UNINIT_TAIL: &str = ". This error happens when you are using a `LazyModule` or explicitly manipulating \
                           `torch.nn.parameter.UninitializedParameter` objects. When using LazyModules Call `forward` \
                           with a dummy batch to initialize the parameters before calling torch functions";

/// Tests here draw from (and reseed) the process-wide default generator; one at a time keeps
/// `manual_seed` comparisons exact.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array().expect("a shape").iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

fn panic_text(f: impl FnOnce()) -> String {
    let p = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
}

#[test]
fn lazy_linear_matches_reference() {
    let _serial = serial();
    let r = &common::reference("seed_extra.json")["lazy_linear"];
    let layer = LazyLinear::new(3);

    let before = &r["before"];
    assert_eq!(layer.repr(), before["repr"].as_str().unwrap());
    assert_eq!(is_uninitialized(layer.weight()), before["weight_is_uninitialized"].as_bool().unwrap());
    let names: Vec<String> = layer.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, common::strings(&before["named_parameters"]));
    assert_eq!(layer.type_name(), "LazyLinear");
    assert_eq!((layer.in_features(), layer.out_features()), (0, 3));
    assert!(!layer.is_materialized());

    let after = &r["after"];
    let y = layer.call(&Tensor::randn(&[2, 5]));
    assert_eq!(y.shape(), shape(&after["output_shape"]));
    assert_eq!(layer.repr(), after["repr"].as_str().unwrap());
    assert_eq!(layer.type_name(), after["type"].as_str().unwrap());
    assert_eq!(layer.weight().shape(), shape(&after["weight_shape"]));
    assert_eq!(layer.bias().unwrap().shape(), shape(&after["bias_shape"]));
    assert!(!is_uninitialized(layer.weight()) && !is_uninitialized(layer.bias().unwrap()));
    assert!(layer.is_materialized() && layer.in_features() == 5);

    // The sequential model: state_dict keys and shapes after the first call.
    let want = r["sequential_shapes_after_first_call"].as_object().unwrap();
    let model = Sequential::new().add(LazyLinear::new(8)).add(ReLU::new()).add(LazyLinear::new(2));
    assert_eq!(
        model.repr(),
        "Sequential(\n  (0): LazyLinear(in_features=0, out_features=8, bias=True)\n  (1): ReLU()\n  \
         (2): LazyLinear(in_features=0, out_features=2, bias=True)\n)"
    );
    assert_eq!(model.call(&Tensor::randn(&[4, 6])).shape(), vec![4, 2]);
    let got: Vec<(String, Vec<usize>)> = model.state_dict().into_iter().map(|(k, t)| (k, t.shape())).collect();
    let want: Vec<(String, Vec<usize>)> = want.iter().map(|(k, v)| (k.clone(), shape(v))).collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got_sorted, want_sorted);
    assert_eq!(got.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["0.weight", "0.bias", "2.weight", "2.bias"]);
    assert_eq!(
        model.repr(),
        "Sequential(\n  (0): Linear(in_features=6, out_features=8, bias=True)\n  (1): ReLU()\n  \
         (2): Linear(in_features=8, out_features=2, bias=True)\n)"
    );
}

#[test]
fn lazy_layers_initialize_as_their_eager_counterparts() {
    let _serial = serial();
    let x = Tensor::randn(&[3, 5]);
    tracegrad::manual_seed(17);
    let lazy = LazyLinear::new(4);
    let y = lazy.call(&x);
    tracegrad::manual_seed(17);
    let eager = Linear::new(5, 4);
    assert_eq!(lazy.weight().to_vec_f32(), eager.weight.to_vec_f32());
    assert_eq!(lazy.bias().unwrap().to_vec_f32(), eager.bias.as_ref().unwrap().to_vec_f32());
    assert_eq!(y.to_vec_f32(), eager.call(&x).to_vec_f32());
    // Parameters are trainable leaves.
    assert!(lazy.weight().requires_grad() && lazy.weight().is_leaf());

    let x = Tensor::randn(&[2, 3, 6, 6]);
    tracegrad::manual_seed(18);
    let lazy = LazyConv2d::new(4, (3, 2)).stride(2).padding(1);
    let y = lazy.call(&x);
    tracegrad::manual_seed(18);
    let eager = Conv2d::new(3, 4, (3, 2)).stride(2).padding(1);
    assert_eq!(lazy.weight().to_vec_f32(), eager.weight.to_vec_f32());
    assert_eq!(lazy.bias().unwrap().to_vec_f32(), eager.bias.as_ref().unwrap().to_vec_f32());
    assert_eq!(y.to_vec_f32(), eager.call(&x).to_vec_f32());
    assert_eq!(lazy.repr(), eager.repr());
}

#[test]
fn lazy_conv2d_before_and_after() {
    let _serial = serial();
    let conv = LazyConv2d::new(8, 3);
    assert_eq!(conv.repr(), "LazyConv2d(0, 8, kernel_size=(3, 3), stride=(1, 1))");
    assert_eq!(conv.type_name(), "LazyConv2d");
    let names: Vec<String> = conv.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["weight", "bias"]);
    assert!(conv.parameters().iter().all(is_uninitialized));
    let y = conv.call(&Tensor::randn(&[2, 3, 7, 7]));
    assert_eq!(y.shape(), vec![2, 8, 5, 5]);
    assert_eq!(conv.repr(), "Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))");
    assert_eq!(conv.type_name(), "Conv2d");
    assert_eq!(conv.weight().shape(), vec![8, 3, 3, 3]);
    assert_eq!((conv.in_channels(), conv.out_channels(), conv.kernel_size()), (3, 8, [3, 3]));

    let nobias = LazyConv2d::with_bias(2, 1, false);
    assert_eq!(nobias.repr(), "LazyConv2d(0, 2, kernel_size=(1, 1), stride=(1, 1), bias=False)");
    assert_eq!(nobias.named_parameters().len(), 1);
    // An input that is neither CHW nor NCHW, in PyTorch's words; nothing is materialized.
    let msg = panic_text(|| {
        nobias.call(&Tensor::randn(&[2, 3]));
    });
    assert_eq!(
        msg,
        "Expected 3D (unbatched) or 4D (batched) input to LazyConv2d, but got input of size: torch.Size([2, 3])"
    );
    assert!(!nobias.is_materialized());

    let lin = LazyLinear::with_bias(2, false);
    assert_eq!(lin.repr(), "LazyLinear(in_features=0, out_features=2, bias=False)");
    assert_eq!(lin.named_parameters().len(), 1);
    lin.call(&Tensor::randn(&[1, 4]));
    assert_eq!(lin.repr(), "Linear(in_features=4, out_features=2, bias=False)");
}

#[test]
fn materializing_keeps_the_parameter_identity_and_gradients_flow() {
    let _serial = serial();
    let layer = LazyLinear::new(2);
    let before: Vec<(String, Tensor)> = layer.named_parameters();
    assert!(before.iter().all(|(_, t)| is_uninitialized(t) && t.shape() == vec![0]));
    // A detached copy is an ordinary tensor; clones share the mark.
    assert!(!is_uninitialized(&before[0].1.detach()));
    assert!(is_uninitialized(&before[0].1.clone()));

    let x = Tensor::randn(&[4, 3]);
    layer.call(&x).sum_all().backward();
    let after = layer.named_parameters();
    for ((n0, t0), (n1, t1)) in before.iter().zip(&after) {
        assert_eq!(n0, n1);
        assert!(t0.same(t1), "{n0}: the handle taken before the first call is the parameter");
        assert_eq!(t0.shape(), t1.shape());
        assert!(t1.grad().is_some(), "{n0} has a gradient");
    }
    assert_eq!(layer.bias().unwrap().grad().unwrap().to_vec_f32(), vec![4.0, 4.0]);

    // A later call with another input size fails as Linear would; explicit materialize says why.
    assert!(catch_unwind(AssertUnwindSafe(|| layer.call(&Tensor::randn(&[4, 7])))).is_err());
    assert!(layer.materialize(3).is_ok());
    assert_eq!(
        layer.materialize(7).unwrap_err().to_string(),
        "RuntimeError: LazyLinear was already materialized with in_features=3, not 7"
    );
}

#[test]
fn optimizers_refuse_uninitialized_parameters() {
    let _serial = serial();
    let model = Sequential::new().add(LazyLinear::new(4)).add(ReLU::new()).add(LazyLinear::new(1));
    let params = model.parameters();
    assert_eq!(params.len(), 4, "placeholders are listed, as PyTorch lists UninitializedParameters");

    let sgd = Sgd::with_options(params.clone(), SgdOptions { lr: 0.1, ..SgdOptions::default() }).err().unwrap();
    assert_eq!(sgd, OptimError::UninitializedParameter { optimizer: "Sgd", index: 0 });
    assert_eq!(
        sgd.to_string(),
        format!("Attempted to use an uninitialized parameter in Sgd (parameter 0){UNINIT_TAIL}")
    );
    let adam = Adam::new(params.clone(), 1e-3).err().unwrap();
    assert_eq!(
        adam.to_string(),
        format!("Attempted to use an uninitialized parameter in Adam (parameter 0){UNINIT_TAIL}")
    );
    let adamw = AdamW::new(params[2..].to_vec(), 1e-3).err().unwrap();
    assert_eq!(adamw, OptimError::UninitializedParameter { optimizer: "AdamW", index: 0 });
    // Sgd::new returns no Result: it panics with the same text.
    let msg = panic_text(|| {
        Sgd::new(vec![Tensor::zeros(&[1]).requires_grad_(true), params[1].clone()], 0.1);
    });
    assert_eq!(msg, format!("Attempted to use an uninitialized parameter in Sgd (parameter 1){UNINIT_TAIL}"));

    // The module-level check names the parameter.
    assert_eq!(
        check_initialized(&model).unwrap_err().to_string(),
        format!(
            "ValueError: Attempted to use an uninitialized parameter in check_initialized (`0.weight`){UNINIT_TAIL}"
        )
    );

    // A dry run materializes everything; the optimizer then works on the same tensors.
    let x = Tensor::randn(&[8, 3]);
    let y = Tensor::randn(&[8, 1]);
    model.call(&x);
    assert!(check_initialized(&model).is_ok());
    let mut opt = Adam::new(model.parameters(), 0.05).unwrap();
    let mse = |m: &Sequential| {
        let d = &m.call(&x) - &y;
        (&d * &d).mean_all()
    };
    let loss = |m: &Sequential| mse(m).item();
    let first = loss(&model);
    for _ in 0..20 {
        opt.zero_grad();
        mse(&model).backward();
        opt.step();
    }
    assert!(loss(&model) < first, "training a materialized lazy model lowers the loss");
    assert!(params[0].same(&model.parameters()[0]));
}

#[test]
fn explicit_materialize_then_load_state_dict() {
    let _serial = serial();
    let src = Linear::new(5, 3);
    let layer = LazyLinear::new(3);
    // Unmaterialized, the shapes do not match (PyTorch would materialize from the state dict).
    assert!(layer.load_state_dict(&src.state_dict(), true).is_err());
    assert!(!layer.is_materialized());
    layer.materialize(5).unwrap();
    layer.load_state_dict(&src.state_dict(), true).unwrap();
    let x = Tensor::randn(&[2, 5]);
    assert_eq!(layer.call(&x).to_vec_f32(), src.call(&x).to_vec_f32());
}

#[test]
fn compiling_an_unmaterialized_lazy_layer_is_an_error() {
    let _serial = serial();
    let layer = LazyLinear::new(3);
    let x = Tensor::randn(&[2, 5]);
    let err = tracegrad::compile(&layer).call(&x).expect_err("tracing refuses placeholders");
    assert!(err.to_string().contains("call the model eagerly once with a dummy batch before compiling it"), "{err}");
    assert!(!layer.is_materialized());
    // After an eager dry run the compiled layer agrees with the eager one.
    let eager = layer.call(&x);
    let compiled = tracegrad::compile(&layer).call(&x).unwrap();
    assert_eq!(compiled.shape(), eager.shape());
    for (a, b) in compiled.to_vec_f32().iter().zip(eager.to_vec_f32()) {
        assert!((a - b).abs() < 1e-5);
    }
}
