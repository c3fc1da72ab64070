//! `compile_train_step` against eager training: 50 steps on the digits set track eager's
//! losses within 1e-4 relative for plain SGD, SGD with momentum, Adam and AdamW(amsgrad), on
//! the JIT and on the interpreter.

use tracegrad::compile::{compile_train_step, Backend, StepOptimizer};
use tracegrad::data;
use tracegrad::nn::{Linear, ModuleExt, ReLU, Sequential};
use tracegrad::optim::{Adam, AdamOptions, AdamW, AdamWOptions, Optimizer, Sgd, SgdOptions};
use tracegrad::Tensor;

/// Tests run in parallel and share the default generator: seeding and building must not
/// interleave, or two "identical" models differ.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn model() -> Sequential {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tracegrad::manual_seed(7);
    Sequential::new().add(Linear::new(64, 32)).add(ReLU::new()).add(Linear::new(32, 10))
}

fn batches() -> Vec<(Tensor, Tensor)> {
    let (train, _) = data::digits().split(0.8, 0);
    train.batches(32).into_iter().map(|b| (b.x, b.y)).collect()
}

fn track(opt_eager: &mut dyn FnMut(Vec<Tensor>) -> Box<dyn Optimizer>, spec: StepOptimizer, what: &str) {
    for backend in [Backend::Jit, Backend::Interpreter] {
        track_on(opt_eager, spec.clone(), &format!("{what} ({backend:?})"), backend);
    }
}

fn track_on(
    opt_eager: &mut dyn FnMut(Vec<Tensor>) -> Box<dyn Optimizer>,
    spec: StepOptimizer,
    what: &str,
    backend: Backend,
) {
    let data = batches();
    let eager_model = model();
    let mut opt = opt_eager(eager_model.parameters());
    let compiled_model = model();
    let mut step = compile_train_step(&compiled_model, |out, y| out.cross_entropy(y), spec).with_backend(backend);
    for i in 0..50 {
        let (x, y) = &data[i % data.len()];
        let loss = eager_model.call(x).cross_entropy(y);
        opt.zero_grad();
        loss.backward();
        opt.step();
        let lc = step.step(x, y).unwrap().item();
        let le = loss.item();
        assert!((lc - le).abs() <= 1e-4 * le.abs(), "{what} step {i}: compiled loss {lc} vs eager {le}");
    }
    for ((n, a), (_, b)) in eager_model.named_parameters().iter().zip(compiled_model.named_parameters()) {
        for (p, q) in a.to_vec_f64().iter().zip(b.to_vec_f64()) {
            assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{what}: parameter {n} drifted: {p} vs {q}");
        }
    }
    // 1438 samples leave a last batch of 30: that shape compiles a second plan, and the next
    // full batch reuses the first.
    let reasons = step.recompile_reasons();
    assert_eq!(reasons.len(), 2, "{what}: {reasons:?}");
    assert_eq!(reasons[1], "input 0 shape [32, 64] -> [30, 64]; input 1 shape [32] -> [30]");
}

#[test]
fn plain_sgd_tracks_eager() {
    // Plain SGD is the update the JIT fuses into the weight gradients' products.
    let o = SgdOptions { lr: 0.1, ..Default::default() };
    track(&mut |p| Box::new(Sgd::with_options(p, o.clone()).unwrap()), StepOptimizer::Sgd(o.clone()), "plain sgd");
}

#[test]
fn sgd_with_momentum_tracks_eager() {
    let o = SgdOptions { lr: 0.1, momentum: 0.9, ..Default::default() };
    track(&mut |p| Box::new(Sgd::with_options(p, o.clone()).unwrap()), StepOptimizer::Sgd(o.clone()), "sgd");
}

#[test]
fn sgd_nesterov_with_weight_decay_tracks_eager() {
    let o = SgdOptions { lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 1e-3, ..Default::default() };
    track(&mut |p| Box::new(Sgd::with_options(p, o.clone()).unwrap()), StepOptimizer::Sgd(o.clone()), "nesterov");
}

#[test]
fn adam_tracks_eager() {
    let o = AdamOptions { lr: 1e-3, ..Default::default() };
    track(&mut |p| Box::new(Adam::with_options(p, o.clone()).unwrap()), StepOptimizer::Adam(o.clone()), "adam");
}

#[test]
fn adamw_amsgrad_tracks_eager() {
    let o = AdamWOptions { lr: 2e-3, amsgrad: true, ..Default::default() };
    track(&mut |p| Box::new(AdamW::with_options(p, o.clone()).unwrap()), StepOptimizer::AdamW(o.clone()), "adamw");
}

#[test]
fn a_learning_rate_change_does_not_recompile() {
    let m = model();
    let data = batches();
    let mut step = compile_train_step(
        &m,
        |out, y| out.cross_entropy(y),
        StepOptimizer::Sgd(SgdOptions { lr: 0.1, ..Default::default() }),
    );
    let before = m.get_parameter("0.weight").unwrap().to_vec_f32();
    step.step(&data[0].0, &data[0].1).unwrap();
    step.set_lr(0.0);
    let mid = m.get_parameter("0.weight").unwrap().to_vec_f32();
    assert_ne!(before, mid, "the first step updated the parameters in place");
    step.step(&data[1].0, &data[1].1).unwrap();
    assert_eq!(mid, m.get_parameter("0.weight").unwrap().to_vec_f32(), "lr 0 leaves them");
    assert_eq!(step.recompile_reasons(), &["first call".to_string()]);
    let text = step.last_graph().unwrap().to_text();
    assert!(text.contains("(lr)") && text.contains("param:0.weight"), "{text}");
}

#[test]
fn a_failing_step_leaves_the_parameters_untouched() {
    // The compiled step donates the parameters it replaces (their new values are written
    // over the old storage); a step that fails — here a class index out of range in the
    // loss — must hand them back unchanged, and the step must stay usable.
    for backend in [Backend::Jit, Backend::Interpreter] {
        let m = model();
        let before: Vec<Vec<f32>> = m.parameters().iter().map(|p| p.to_vec_f32()).collect();
        let o = SgdOptions { lr: 0.1, ..Default::default() };
        let mut step =
            compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(o)).with_backend(backend);
        let x = Tensor::randn(&[4, 64]);
        let bad = Tensor::from_vec(vec![0i64, 1, 99, 2], &[4]);
        let e = step.step(&x, &bad).unwrap_err();
        assert!(e.to_string().contains("99") || e.to_string().contains("index"), "{backend:?}: {e}");
        let after: Vec<Vec<f32>> = m.parameters().iter().map(|p| p.to_vec_f32()).collect();
        assert_eq!(before, after, "{backend:?}: a failed step changed the parameters");
        let good = Tensor::from_vec(vec![0i64, 1, 9, 2], &[4]);
        let loss = step.step(&x, &good).unwrap().item();
        assert!(loss.is_finite());
        let moved: Vec<Vec<f32>> = m.parameters().iter().map(|p| p.to_vec_f32()).collect();
        assert_ne!(before, moved, "{backend:?}: the next step trains");
        assert_eq!(m.parameters()[0].shape(), vec![32, 64]);
    }
}
