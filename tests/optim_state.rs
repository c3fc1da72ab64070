//! Optimizer and scheduler `state_dict()` against PyTorch (`../shared/reference/optim_state.json`):
//! three steps of SGD (nesterov), Adam (amsgrad) with StepLR and AdamW with CosineAnnealingLR
//! give PyTorch's losses, state tensors, param_groups and scheduler fields; loading PyTorch's
//! state into fresh objects and taking a fourth step gives PyTorch's fourth step.

mod common;

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tracegrad::nn::{self, Module, ModuleExt};
use tracegrad::optim::{
    Adam, AdamOptions, AdamW, AdamWOptions, CosineAnnealingLR, LrScheduler, Optimizer, OptimizerStateDict, Sgd,
    SgdOptions, StepLR,
};
use tracegrad::{Buffer, LossReduction, Tensor};

const TOL: f64 = 1e-6;

/// `{"tensor": {"dtype", "shape", "data"}}` as a tensor of its dtype.
fn tensor(v: &Value) -> Tensor {
    let t = &v["tensor"];
    let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let data: Vec<f64> = t["data"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap()).collect();
    let dtype = match t["dtype"].as_str().unwrap() {
        "float32" => tracegrad::DType::F32,
        "float64" => tracegrad::DType::F64,
        other => panic!("dtype {other}"),
    };
    Tensor::from_vec(data, &shape).to_dtype(dtype)
}

fn state_of(v: &Value) -> Vec<(String, Tensor)> {
    v.as_object().unwrap().iter().map(|(k, t)| (k.clone(), tensor(t))).collect()
}

#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOL * w.abs().max(1.0), "{what}[{i}]: got {g}, PyTorch {w}");
    }
}

fn model(init: &Value) -> nn::Sequential {
    let m = nn::Sequential::new().add(nn::Linear::new(3, 4)).add(nn::Tanh::new()).add(nn::Linear::new(4, 2));
    m.load_state_dict(&state_of(init), true).unwrap();
    m
}

fn loss(m: &nn::Sequential, x: &Tensor, y: &Tensor) -> Tensor {
    m.forward(x).mse_loss(y, LossReduction::Mean)
}

/// PyTorch's optimizer state dict as ours.
fn optimizer_state(v: &Value) -> OptimizerStateDict {
    let state = v["state"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(i, st)| {
            let named: BTreeMap<String, Buffer> =
                st.as_object().unwrap().iter().map(|(k, t)| (k.clone(), tensor(t).buffer())).collect();
            (i.parse().unwrap(), named)
        })
        .collect();
    let param_groups = v["param_groups"].as_array().unwrap().iter().map(|g| g.as_object().unwrap().clone()).collect();
    OptimizerStateDict { state, param_groups }
}

/// Every key of PyTorch's map is in ours with an equal value (numbers within 1e-12 relative).
#[track_caller]
fn same_fields(what: &str, got: &Map<String, Value>, want: &Map<String, Value>) {
    for (k, w) in want {
        let g = got.get(k).unwrap_or_else(|| panic!("{what}: no {k:?} in {got:?}"));
        let eq = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * y.abs().max(1.0),
            _ => a == b,
        };
        let ok = match (g.as_array(), w.as_array()) {
            (Some(ga), Some(wa)) => ga.len() == wa.len() && ga.iter().zip(wa).all(|(a, b)| eq(a, b)),
            _ => eq(g, w),
        };
        assert!(ok, "{what}: {k} is {g}, PyTorch {w}");
    }
    assert_eq!(got.len(), want.len(), "{what}: keys {:?} vs PyTorch's {:?}", got.keys(), want.keys());
}

/// The model's state equals PyTorch's, key by key.
#[track_caller]
fn same_model(what: &str, m: &nn::Sequential, want: &Value) {
    let want: BTreeMap<String, Tensor> = state_of(want).into_iter().collect();
    let got = m.state_dict();
    assert_eq!(got.len(), want.len(), "{what}: keys");
    for (k, p) in got {
        close(&format!("{what}: {k}"), &p.to_vec_f64(), &want[&k].to_vec_f64());
    }
}

type Build = fn(Vec<Tensor>) -> Box<dyn Optimizer>;
type Sched = fn(&mut dyn Optimizer) -> Option<Box<dyn LrScheduler>>;

fn run_case(name: &str, build: Build, sched: Sched) {
    let r = &common::reference("optim_state.json")[name];
    let (x, y) = (tensor(&r["x"]), tensor(&r["y"]));
    let m = model(&r["init_state"]);
    let mut opt = build(m.parameters());
    let mut s = sched(&mut *opt);
    let mut losses = Vec::new();
    for _ in 0..3 {
        opt.zero_grad();
        let l = loss(&m, &x, &y);
        losses.push(l.item());
        l.backward();
        opt.step();
        if let Some(s) = s.as_mut() {
            s.step(&mut *opt);
        }
    }
    let want: Vec<f64> = r["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    close(&format!("{name} losses"), &losses, &want);

    let ours = opt.state_dict();
    let theirs = optimizer_state(&r["optimizer_state_dict"]);
    assert_eq!(ours.state.keys().collect::<Vec<_>>(), theirs.state.keys().collect::<Vec<_>>(), "{name}: state keys");
    for (i, named) in &theirs.state {
        let got = &ours.state[i];
        assert_eq!(got.keys().collect::<Vec<_>>(), named.keys().collect::<Vec<_>>(), "{name}: state[{i}] keys");
        for (k, t) in named {
            assert_eq!(got[k].shape(), t.shape(), "{name}: state[{i}].{k} shape");
            assert_eq!(got[k].dtype(), t.dtype(), "{name}: state[{i}].{k} dtype");
            close(&format!("{name} state[{i}].{k}"), &got[k].to_f64_vec(), &t.to_f64_vec());
        }
    }
    same_fields(&format!("{name} param_groups[0]"), &ours.param_groups[0], &theirs.param_groups[0]);
    match (&s, r["scheduler_state_dict"].as_object()) {
        (Some(s), Some(want)) => same_fields(&format!("{name} scheduler"), &s.state_dict(), want),
        (None, None) => {}
        _ => panic!("{name}: scheduler presence differs"),
    }
    same_model(&format!("{name} after 3 steps"), &m, &r["model_state_after"]);

    // Resume from PyTorch's state into fresh objects; the fourth step must be PyTorch's.
    let fresh = model(&r["model_state_after"]);
    let mut opt2 = build(fresh.parameters());
    let mut s2 = sched(&mut *opt2);
    opt2.load_state_dict(&theirs).unwrap();
    if let (Some(s2), Some(sd)) = (s2.as_mut(), r["scheduler_state_dict"].as_object()) {
        s2.load_state_dict(sd).unwrap();
    }
    assert_eq!(opt2.lr(), opt.lr(), "{name}: the loaded learning rate");
    opt2.zero_grad();
    let l = loss(&fresh, &x, &y);
    l.backward();
    opt2.step();
    let fourth = &r["fourth_step"];
    close(&format!("{name} fourth loss"), &[l.item()], &[fourth["loss"].as_f64().unwrap()]);
    same_model(&format!("{name} after the resumed step"), &fresh, &fourth["model_state_after"]);
}

#[test]
fn sgd_nesterov_state_dict_is_pytorchs() {
    run_case(
        "sgd_momentum_nesterov",
        |p| {
            let o = SgdOptions { lr: 0.1, momentum: 0.9, weight_decay: 0.01, nesterov: true, ..Default::default() };
            Box::new(Sgd::with_options(p, o).unwrap())
        },
        |_| None,
    );
}

#[test]
fn adam_amsgrad_with_step_lr_state_dict_is_pytorchs() {
    run_case(
        "adam_amsgrad_steplr",
        |p| Box::new(Adam::with_options(p, AdamOptions { lr: 0.01, amsgrad: true, ..Default::default() }).unwrap()),
        |o| Some(Box::new(StepLR::new(o, 2, 0.5))),
    );
}

#[test]
fn adamw_with_cosine_state_dict_is_pytorchs() {
    run_case(
        "adamw_cosine",
        |p| {
            Box::new(
                AdamW::with_options(p, AdamWOptions { lr: 0.01, weight_decay: 0.1, ..Default::default() }).unwrap(),
            )
        },
        |o| Some(Box::new(CosineAnnealingLR::new(o, 10, 0.0))),
    );
}

#[test]
fn mismatched_loads_are_errors_that_change_nothing() {
    let p = || vec![Tensor::zeros(&[2, 3]).requires_grad_(true), Tensor::zeros(&[3]).requires_grad_(true)];
    let params = p();
    let mut sgd =
        Sgd::with_options(params.clone(), SgdOptions { lr: 0.1, momentum: 0.9, ..Default::default() }).unwrap();
    for t in &params {
        t.set_grad(Some(Tensor::ones(&t.shape())));
    }
    sgd.step();
    let before = sgd.state_dict();
    let mut adam = Adam::new(p(), 0.1).unwrap();
    let adam_sd = adam.state_dict();
    // Another optimizer kind.
    assert!(sgd.load_state_dict(&adam_sd).unwrap_err().contains("not a SGD state dict"));
    assert!(adam.load_state_dict(&before).unwrap_err().contains("not a Adam state dict"));
    let mut adamw = AdamW::new(p(), 0.1).unwrap();
    assert!(adamw.load_state_dict(&adam_sd).unwrap_err().contains("decoupled_weight_decay"));
    // Another parameter count.
    let mut short = before.clone();
    short.param_groups[0].insert("params".into(), serde_json::json!([0]));
    assert!(sgd.load_state_dict(&short).unwrap_err().contains("doesn't match the size"));
    // A state tensor of the wrong shape.
    let mut bad = before.clone();
    bad.state.get_mut(&1).unwrap().insert("momentum_buffer".into(), Buffer::zeros(tracegrad::DType::F32, &[4]));
    let e = sgd.load_state_dict(&bad).unwrap_err();
    assert!(e.contains("momentum_buffer of parameter 1"), "{e}");
    // An invalid hyperparameter.
    let mut neg = before.clone();
    neg.param_groups[0].insert("lr".into(), serde_json::json!(-1.0));
    assert_eq!(sgd.load_state_dict(&neg).unwrap_err(), "Invalid learning rate: -1.0");
    assert_eq!(sgd.state_dict(), before, "a failed load changed the optimizer");
    // A scheduler of another kind.
    let mut cos = CosineAnnealingLR::new(&mut sgd, 4, 0.0);
    let step_sd = StepLR::new(&mut Sgd::new(p(), 0.1), 2, 0.5).state_dict();
    assert!(cos.load_state_dict(&step_sd).unwrap_err().contains("not a CosineAnnealingLR state dict"));
}
