//! Optimizer state of the compiled train step, and checkpoints (issue 12, acceptance line 2):
//! the compiled step's `state_dict` has the eager optimizers' layout; train 20 steps, save,
//! load into fresh objects and train 20 more gives the parameters of 40 uninterrupted steps
//! bit for bit, eager and compiled, SGD with momentum and Adam with a StepLR; a mismatched
//! load is an error that changes nothing.

use tracegrad::compile::{compile_train_step, StepOptimizer};
use tracegrad::data;
use tracegrad::nn::{Linear, ModuleExt, ReLU, Sequential};
use tracegrad::optim::{Adam, AdamOptions, Optimizer, OptimizerStateDict, Sgd, SgdOptions};
use tracegrad::Tensor;

/// Seeding and building must not interleave with another test doing the same.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model_seeded(seed: u64, hidden: usize) -> Sequential {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tracegrad::manual_seed(seed);
    Sequential::new().add(Linear::new(64, hidden)).add(ReLU::new()).add(Linear::new(hidden, 10))
}

fn model() -> Sequential {
    model_seeded(5, 32)
}

fn batches() -> Vec<(Tensor, Tensor)> {
    let (train, _) = data::digits().split(0.8, 0);
    train.batches(32).into_iter().take(8).map(|b| (b.x, b.y)).collect()
}

fn sgd() -> SgdOptions {
    SgdOptions { lr: 0.1, momentum: 0.9, ..Default::default() }
}

fn adam() -> AdamOptions {
    AdamOptions { lr: 1e-2, amsgrad: true, ..Default::default() }
}

fn eager_opt(spec: &StepOptimizer, params: Vec<Tensor>) -> Box<dyn Optimizer> {
    match spec {
        StepOptimizer::Sgd(o) => Box::new(Sgd::with_options(params, o.clone()).unwrap()),
        StepOptimizer::Adam(o) => Box::new(Adam::with_options(params, o.clone()).unwrap()),
        StepOptimizer::AdamW(_) => unreachable!("not used here"),
    }
}

fn params_of(m: &Sequential) -> Vec<Vec<f32>> {
    m.parameters().iter().map(Tensor::to_vec_f32).collect()
}

fn same_layout(c: &OptimizerStateDict, e: &OptimizerStateDict, what: &str) {
    assert_eq!(c.param_groups, e.param_groups, "{what}: param_groups");
    assert_eq!(c.state.keys().collect::<Vec<_>>(), e.state.keys().collect::<Vec<_>>(), "{what}: state indices");
    for (i, st) in &e.state {
        let cs = &c.state[i];
        assert_eq!(cs.keys().collect::<Vec<_>>(), st.keys().collect::<Vec<_>>(), "{what}: slots of {i}");
        for (slot, b) in st {
            let cb = &cs[slot];
            assert_eq!((cb.dtype(), cb.shape()), (b.dtype(), b.shape()), "{what}: {slot} of {i}");
            let (x, y) = (Tensor::from_buffer(cb.clone()).to_vec_f64(), Tensor::from_buffer(b.clone()).to_vec_f64());
            for (u, v) in x.iter().zip(&y) {
                assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{what}: {slot} of {i}: {u} vs {v}");
            }
        }
    }
}

fn compiled_state_dict_has_the_eager_layout(spec: StepOptimizer, what: &str) {
    let (em, cm) = (model(), model());
    let mut opt = eager_opt(&spec, em.parameters());
    let mut step = compile_train_step(&cm, |out, y| out.cross_entropy(y), spec);
    assert!(step.state_dict().unwrap().state.is_empty(), "{what}: no state before the first step");
    assert_eq!(step.state_dict().unwrap(), opt.state_dict(), "{what}: fresh state dicts");
    for (x, y) in batches().iter().take(3) {
        opt.zero_grad();
        em.call(x).cross_entropy(y).backward();
        opt.step();
        step.step(x, y).unwrap();
    }
    same_layout(&step.state_dict().unwrap(), &opt.state_dict(), what);
}

#[test]
fn compiled_state_dict_has_the_eager_layout_sgd() {
    compiled_state_dict_has_the_eager_layout(StepOptimizer::Sgd(sgd()), "sgd");
}

#[test]
fn compiled_state_dict_has_the_eager_layout_adam() {
    compiled_state_dict_has_the_eager_layout(StepOptimizer::Adam(adam()), "adam");
}

/// A compiled step that loads another's state (and the model's) continues exactly as the
/// original does, and one that loads an eager optimizer's state continues like it.
#[test]
fn compiled_load_state_dict_continues_exactly() {
    for spec in [StepOptimizer::Sgd(sgd()), StepOptimizer::Adam(adam())] {
        let data = batches();
        let (a, b) = (model(), model_seeded(99, 32));
        let mut sa = compile_train_step(&a, |out, y| out.cross_entropy(y), spec.clone());
        for (x, y) in &data[..4] {
            sa.step(x, y).unwrap();
        }
        let mut sb = compile_train_step(&b, |out, y| out.cross_entropy(y), spec.clone());
        sb.set_lr(0.5);
        b.load_state_dict(&a.state_dict(), true).unwrap();
        sb.load_state_dict(&sa.state_dict().unwrap()).unwrap();
        assert_eq!(sb.lr(), sa.lr(), "the learning rate comes with the state");
        for (x, y) in &data[4..] {
            sa.step(x, y).unwrap();
            sb.step(x, y).unwrap();
        }
        assert_eq!(params_of(&a), params_of(&b), "{spec:?}");
    }
}

#[test]
fn compiled_load_state_dict_refuses_another_kind_and_changes_nothing() {
    let m = model();
    let mut s = compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(sgd()));
    let (x, y) = &batches()[0];
    s.step(x, y).unwrap();
    let before = s.state_dict().unwrap();
    let adam_sd = Adam::with_options(m.parameters(), adam()).unwrap().state_dict();
    let e = s.load_state_dict(&adam_sd).unwrap_err();
    assert!(e.contains("not a SGD state dict"), "{e}");
    let other = model_seeded(1, 16);
    let wrong_count = Sgd::with_options(other.parameters()[..2].to_vec(), sgd()).unwrap().state_dict();
    assert!(s.load_state_dict(&wrong_count).is_err());
    assert_eq!(s.state_dict().unwrap(), before);
}
