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

// --- Checkpoints: resume is exact. ---

use tracegrad::checkpoint::{self, Progress};
use tracegrad::compile::TrainStep;
use tracegrad::optim::{CosineAnnealingLR, LrScheduler, StepLR};

/// A checkpoint path of its own for each test, removed when dropped.
struct TempPath(std::path::PathBuf);

impl TempPath {
    fn new(name: &str) -> TempPath {
        let dir = std::env::temp_dir().join(format!("tracegrad-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempPath(dir.join(name))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Eager steps `range` (cycling over `data`), with the scheduler stepped after each.
fn eager_run(
    m: &Sequential,
    opt: &mut dyn Optimizer,
    mut sched: Option<&mut StepLR>,
    data: &[(Tensor, Tensor)],
    range: std::ops::Range<usize>,
) {
    for i in range {
        let (x, y) = &data[i % data.len()];
        opt.zero_grad();
        m.call(x).cross_entropy(y).backward();
        opt.step();
        if let Some(s) = sched.as_mut() {
            s.step(opt);
        }
    }
}

fn scheduler(opt: &mut dyn Optimizer, with: bool) -> Option<StepLR> {
    with.then(|| StepLR::new(opt, 5, 0.5))
}

fn eager_resume_is_exact(spec: StepOptimizer, with_sched: bool, what: &str) {
    let data = batches();
    let path = TempPath::new(&format!("eager-{what}.safetensors"));
    let m1 = model();
    let mut o1 = eager_opt(&spec, m1.parameters());
    let mut s1 = scheduler(&mut *o1, with_sched);
    eager_run(&m1, &mut *o1, s1.as_mut(), &data, 0..40);

    let m2 = model();
    let mut o2 = eager_opt(&spec, m2.parameters());
    let mut s2 = scheduler(&mut *o2, with_sched);
    eager_run(&m2, &mut *o2, s2.as_mut(), &data, 0..20);
    let progress = Progress { step: 20, generator: Some(tracegrad::get_rng_state()) };
    checkpoint::save(&path.0, &m2, &*o2, s2.as_ref().map(|s| s as &dyn LrScheduler), progress).unwrap();
    drop((m2, o2, s2));

    // Fresh objects: other initial weights, and an optimizer and scheduler at step 0.
    let m3 = model_seeded(77, 32);
    let mut o3 = eager_opt(&spec, m3.parameters());
    let mut s3 = scheduler(&mut *o3, with_sched);
    let p = checkpoint::load(&path.0, &m3, &mut *o3, s3.as_mut().map(|s| s as &mut dyn LrScheduler)).unwrap();
    assert_eq!(p, progress);
    eager_run(&m3, &mut *o3, s3.as_mut(), &data, 20..40);
    assert_eq!(params_of(&m3), params_of(&m1), "{what}: resumed run differs from the uninterrupted one");
    assert_eq!(o3.lr(), o1.lr());
}

#[test]
fn eager_resume_is_exact_sgd_momentum() {
    eager_resume_is_exact(StepOptimizer::Sgd(sgd()), false, "sgd");
}

#[test]
fn eager_resume_is_exact_adam_steplr() {
    eager_resume_is_exact(StepOptimizer::Adam(adam()), true, "adam");
}

fn compiled_run(
    step: &mut TrainStep<'_>,
    mut sched: Option<&mut StepLR>,
    data: &[(Tensor, Tensor)],
    range: std::ops::Range<usize>,
) {
    for i in range {
        let (x, y) = &data[i % data.len()];
        step.step(x, y).unwrap();
        // The compiled step is an `LrTarget`: the scheduler drives it as an optimizer.
        if let Some(s) = sched.as_mut() {
            s.step(step);
        }
    }
}

fn compiled_resume_is_exact(spec: StepOptimizer, with_sched: bool, what: &str) {
    let data = batches();
    let path = TempPath::new(&format!("compiled-{what}.safetensors"));
    let schedule = |t: &mut TrainStep<'_>| with_sched.then(|| StepLR::new(t, 5, 0.5));
    let m1 = model();
    let mut t1 = compile_train_step(&m1, |out, y| out.cross_entropy(y), spec.clone());
    let mut s1 = schedule(&mut t1);
    compiled_run(&mut t1, s1.as_mut(), &data, 0..40);

    let m2 = model();
    let mut t2 = compile_train_step(&m2, |out, y| out.cross_entropy(y), spec.clone());
    let mut s2 = schedule(&mut t2);
    compiled_run(&mut t2, s2.as_mut(), &data, 0..20);
    let progress = Progress { step: 20, generator: Some(tracegrad::get_rng_state()) };
    checkpoint::save(&path.0, &m2, &t2, s2.as_ref().map(|s| s as &dyn LrScheduler), progress).unwrap();
    drop((t2, s2));

    let m3 = model_seeded(77, 32);
    let mut t3 = compile_train_step(&m3, |out, y| out.cross_entropy(y), spec);
    let mut s3 = schedule(&mut t3);
    let p = checkpoint::load(&path.0, &m3, &mut t3, s3.as_mut().map(|s| s as &mut dyn LrScheduler)).unwrap();
    assert_eq!(p, progress);
    compiled_run(&mut t3, s3.as_mut(), &data, 20..40);
    assert_eq!(params_of(&m3), params_of(&m1), "{what}: resumed run differs from the uninterrupted one");
    assert_eq!(t3.lr(), t1.lr());
}

#[test]
fn compiled_resume_is_exact_sgd_momentum() {
    compiled_resume_is_exact(StepOptimizer::Sgd(sgd()), false, "sgd");
}

#[test]
fn compiled_resume_is_exact_adam_steplr() {
    compiled_resume_is_exact(StepOptimizer::Adam(adam()), true, "adam");
}

// --- A mismatched load is an error that changes nothing. ---

/// A saved SGD-with-StepLR checkpoint of `model()` after a few steps.
fn saved(name: &str) -> TempPath {
    let path = TempPath::new(name);
    let m = model();
    let mut o = Sgd::with_options(m.parameters(), sgd()).unwrap();
    let mut s = StepLR::new(&mut o, 5, 0.5);
    eager_run(&m, &mut o, Some(&mut s), &batches(), 0..3);
    checkpoint::save(&path.0, &m, &o, Some(&s), Progress { step: 3, generator: None }).unwrap();
    path
}

/// Loads `path` into `m`, `opt` and `sched`; asserts that it fails with `want` in the message
/// and that none of the three changed.
fn refused(
    path: &TempPath,
    m: &dyn tracegrad::nn::Module,
    opt: &mut dyn Optimizer,
    mut sched: Option<&mut dyn LrScheduler>,
    want: &str,
) {
    let params: Vec<Vec<f32>> = m.parameters().iter().map(Tensor::to_vec_f32).collect();
    let state = opt.state_dict();
    let sched_state = sched.as_ref().map(|s| s.state_dict());
    let e = checkpoint::load(&path.0, m, opt, sched.as_deref_mut()).unwrap_err();
    assert!(e.contains(want), "{want:?} not in {e:?}");
    assert_eq!(m.parameters().iter().map(Tensor::to_vec_f32).collect::<Vec<_>>(), params, "the model changed");
    assert_eq!(opt.state_dict(), state, "the optimizer changed");
    assert_eq!(sched.as_ref().map(|s| s.state_dict()), sched_state, "the scheduler changed");
}

#[test]
fn a_load_with_another_parameter_count_changes_nothing() {
    let path = saved("count.safetensors");
    let m = {
        let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
        Sequential::new().add(Linear::new(64, 32)).add(ReLU::new()).add(Linear::new(32, 32)).add(Linear::new(32, 10))
    };
    let mut o = Sgd::with_options(m.parameters(), sgd()).unwrap();
    let mut s = StepLR::new(&mut o, 5, 0.5);
    refused(&path, &m, &mut o, Some(&mut s), "the checkpoint's model has 4 tensors, this model 6");
}

#[test]
fn a_load_with_other_shapes_changes_nothing() {
    let path = saved("shapes.safetensors");
    let m = model_seeded(3, 16);
    let mut o = Sgd::with_options(m.parameters(), sgd()).unwrap();
    let mut s = StepLR::new(&mut o, 5, 0.5);
    refused(&path, &m, &mut o, Some(&mut s), "size mismatch for 0.weight");
}

#[test]
fn a_load_into_another_optimizer_kind_changes_nothing() {
    let path = saved("kind.safetensors");
    let m = model_seeded(3, 32);
    let mut o = Adam::with_options(m.parameters(), adam()).unwrap();
    eager_run(&m, &mut o, None, &batches(), 0..2);
    let mut s = StepLR::new(&mut o, 5, 0.5);
    refused(&path, &m, &mut o, Some(&mut s), "optimizer: loaded state dict is not a Adam state dict");
    // The compiled step refuses it too.
    let mut step = compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Adam(adam()));
    let before: Vec<Vec<f32>> = params_of(&m);
    let e = checkpoint::load(&path.0, &m, &mut step, None).unwrap_err();
    assert!(e.contains("no scheduler was given"), "{e}");
    let mut sched = StepLR::new(&mut step, 5, 0.5);
    let e = checkpoint::load(&path.0, &m, &mut step, Some(&mut sched)).unwrap_err();
    assert!(e.contains("not a Adam state dict"), "{e}");
    assert_eq!(params_of(&m), before);
    assert!(step.state_dict().unwrap().state.is_empty());
}

#[test]
fn a_load_into_another_scheduler_kind_changes_nothing() {
    let path = saved("scheduler.safetensors");
    let m = model_seeded(3, 32);
    let mut o = Sgd::with_options(m.parameters(), sgd()).unwrap();
    let mut s = CosineAnnealingLR::new(&mut o, 10, 0.0);
    refused(&path, &m, &mut o, Some(&mut s), "scheduler: ");
    assert_eq!(s.last_epoch(), 0);
}

#[test]
fn files_that_are_not_checkpoints_are_errors() {
    let path = TempPath::new("plain.safetensors");
    let m = model();
    tracegrad::nn::save_safetensors(&m, &path.0).unwrap();
    let mut o = Sgd::with_options(m.parameters(), sgd()).unwrap();
    let e = checkpoint::load(&path.0, &m, &mut o, None).unwrap_err();
    assert!(e.contains("not a tracegrad checkpoint"), "{e}");
    std::fs::write(&path.0, b"\x10\0\0\0\0\0\0\0{not json").unwrap();
    assert!(checkpoint::load(&path.0, &m, &mut o, None).is_err());
    let missing = TempPath::new("missing.safetensors");
    let e = checkpoint::load(&missing.0, &m, &mut o, None).unwrap_err();
    assert!(e.contains("missing.safetensors"), "{e}");
}

// --- With dropout in the model. ---

/// The MLP with dropout 0.1 after its hidden layer.
fn dropout_model(seed: u64) -> Sequential {
    tracegrad::manual_seed(seed);
    Sequential::new()
        .add(Linear::new(64, 32))
        .add(ReLU::new())
        .add(tracegrad::nn::Dropout::new(0.1))
        .add(Linear::new(32, 10))
}

/// Resume with dropout: the masks come from the default generator, so the checkpoint keeps its
/// state ([`Progress::generator`]) and the resumed run restores it after building fresh
/// objects (which reseeds the generator): model, optimizer, scheduler and generator restored
/// give the uninterrupted run's parameters bit for bit. The whole test holds the seeding lock,
/// since other tests draw from the same generator.
fn eager_resume_with_dropout(spec: StepOptimizer, with_sched: bool, what: &str) {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let data = batches();
    let path = TempPath::new(&format!("dropout-eager-{what}.safetensors"));
    let m1 = dropout_model(5);
    let mut o1 = eager_opt(&spec, m1.parameters());
    let mut s1 = scheduler(&mut *o1, with_sched);
    eager_run(&m1, &mut *o1, s1.as_mut(), &data, 0..40);

    let m2 = dropout_model(5);
    let mut o2 = eager_opt(&spec, m2.parameters());
    let mut s2 = scheduler(&mut *o2, with_sched);
    eager_run(&m2, &mut *o2, s2.as_mut(), &data, 0..20);
    let progress = Progress { step: 20, generator: Some(tracegrad::get_rng_state()) };
    checkpoint::save(&path.0, &m2, &*o2, s2.as_ref().map(|s| s as &dyn LrScheduler), progress).unwrap();
    let m3 = dropout_model(77);
    let mut o3 = eager_opt(&spec, m3.parameters());
    let mut s3 = scheduler(&mut *o3, with_sched);
    let p = checkpoint::load(&path.0, &m3, &mut *o3, s3.as_mut().map(|s| s as &mut dyn LrScheduler)).unwrap();
    tracegrad::set_rng_state(&p.generator.expect("the saved generator state"));
    eager_run(&m3, &mut *o3, s3.as_mut(), &data, 20..40);
    assert_eq!(params_of(&m3), params_of(&m1), "{what}: resumed run with dropout differs");
}

#[test]
fn eager_resume_with_dropout_is_exact_sgd_momentum() {
    eager_resume_with_dropout(StepOptimizer::Sgd(sgd()), false, "sgd");
}

#[test]
fn eager_resume_with_dropout_is_exact_adam_steplr() {
    eager_resume_with_dropout(StepOptimizer::Adam(adam()), true, "adam");
}

/// The compiled form of [`eager_resume_with_dropout`].
fn compiled_resume_with_dropout(spec: StepOptimizer, with_sched: bool, what: &str) {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let data = batches();
    let path = TempPath::new(&format!("dropout-compiled-{what}.safetensors"));
    let schedule = |t: &mut TrainStep<'_>| with_sched.then(|| StepLR::new(t, 5, 0.5));
    let m1 = dropout_model(5);
    let mut t1 = compile_train_step(&m1, |out, y| out.cross_entropy(y), spec.clone());
    let mut s1 = schedule(&mut t1);
    compiled_run(&mut t1, s1.as_mut(), &data, 0..40);

    let m2 = dropout_model(5);
    let mut t2 = compile_train_step(&m2, |out, y| out.cross_entropy(y), spec.clone());
    let mut s2 = schedule(&mut t2);
    compiled_run(&mut t2, s2.as_mut(), &data, 0..20);
    let progress = Progress { step: 20, generator: Some(tracegrad::get_rng_state()) };
    checkpoint::save(&path.0, &m2, &t2, s2.as_ref().map(|s| s as &dyn LrScheduler), progress).unwrap();
    let m3 = dropout_model(77);
    let mut t3 = compile_train_step(&m3, |out, y| out.cross_entropy(y), spec);
    let mut s3 = schedule(&mut t3);
    let p = checkpoint::load(&path.0, &m3, &mut t3, s3.as_mut().map(|s| s as &mut dyn LrScheduler)).unwrap();
    tracegrad::set_rng_state(&p.generator.expect("the saved generator state"));
    compiled_run(&mut t3, s3.as_mut(), &data, 20..40);
    assert_eq!(params_of(&m3), params_of(&m1), "{what}: resumed compiled run with dropout differs");
}

#[test]
fn compiled_resume_with_dropout_is_exact_sgd_momentum() {
    compiled_resume_with_dropout(StepOptimizer::Sgd(sgd()), false, "sgd");
}

#[test]
fn compiled_resume_with_dropout_is_exact_adam_steplr() {
    compiled_resume_with_dropout(StepOptimizer::Adam(adam()), true, "adam");
}

/// A scheduler drives a compiled step as it drives an eager optimizer: the rates follow
/// StepLR's, and the step's state dict records `initial_lr` as the eager one does.
#[test]
fn a_scheduler_drives_the_compiled_step_like_an_eager_optimizer() {
    let m = model_seeded(3, 32);
    let mut step = compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(sgd()));
    let mut eager = Sgd::with_options(m.parameters(), sgd()).unwrap();
    let mut s_step = StepLR::new(&mut step, 2, 0.5);
    let mut s_eager = StepLR::new(&mut eager, 2, 0.5);
    for _ in 0..5 {
        s_step.step(&mut step);
        s_eager.step(&mut eager);
        assert_eq!(step.lr(), eager.lr());
    }
    let (a, b) = (step.state_dict().unwrap(), eager.state_dict());
    assert_eq!(a.param_groups[0].get("initial_lr"), b.param_groups[0].get("initial_lr"));
    assert_eq!(a.param_groups[0].get("lr"), b.param_groups[0].get("lr"));
}
