//! Hooks inside `compile_train_step`, against eager training (`zero_grad`, `backward`,
//! `step`): parameter gradient hooks, post-accumulate hooks (their order, once per step, and
//! `.grad` changed in place), tensor hooks registered inside forward, and the removal of a
//! hook registered inside a traced forward (the next call recompiles, with the reason), in
//! `compile_train_step` and in `compile`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracegrad::compile::{compile, compile_train_step, Backend, StepOptimizer};
use tracegrad::data;
use tracegrad::hooks::RemovableHandle;
use tracegrad::nn::{Linear, Module, ModuleCore, ModuleExt, ReLU, Sequential};
use tracegrad::optim::{Adam, AdamOptions, Optimizer, Sgd, SgdOptions};
use tracegrad::Tensor;

/// Tests run in parallel and share the default generator: seeding and building must not
/// interleave, or two "identical" models differ.
static SEEDED: Mutex<()> = Mutex::new(());

fn model() -> Sequential {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tracegrad::manual_seed(11);
    Sequential::new()
        .add(Linear::new(64, 32))
        .add(ReLU::new())
        .add(Linear::new(32, 16))
        .add(ReLU::new())
        .add(Linear::new(16, 10))
}

fn batches() -> Vec<(Tensor, Tensor)> {
    let (train, _) = data::digits().split(0.8, 0);
    train.batches(32).into_iter().take(6).map(|b| (b.x, b.y)).collect()
}

const BACKENDS: [Backend; 2] = [Backend::Jit, Backend::Interpreter];

fn sgd() -> SgdOptions {
    SgdOptions { lr: 0.1, momentum: 0.9, ..Default::default() }
}

fn adam() -> AdamOptions {
    AdamOptions { lr: 1e-2, ..Default::default() }
}

/// The two optimizers of the trajectory tests: (name, eager constructor, compiled spec).
type OptCase = (&'static str, fn(Vec<Tensor>) -> Box<dyn Optimizer>, StepOptimizer);

fn optimizers() -> Vec<OptCase> {
    vec![
        ("sgd", |p| Box::new(Sgd::with_options(p, sgd()).unwrap()), StepOptimizer::Sgd(sgd())),
        ("adam", |p| Box::new(Adam::with_options(p, adam()).unwrap()), StepOptimizer::Adam(adam())),
    ]
}

fn params(m: &Sequential) -> Vec<Vec<f64>> {
    m.parameters().iter().map(|p| p.to_vec_f64()).collect()
}

/// Trains `steps` steps eagerly and compiled, each model hooked by `hook`; asserts that the
/// losses and parameters agree, and returns the compiled model's parameters.
fn eager_vs_compiled(
    hook: &dyn Fn(&Sequential),
    (what, eager_opt, spec): &OptCase,
    backend: Backend,
    steps: usize,
) -> Vec<Vec<f64>> {
    let data = batches();
    let (eager_model, compiled_model) = (model(), model());
    hook(&eager_model);
    hook(&compiled_model);
    let mut opt = eager_opt(eager_model.parameters());
    let mut step =
        compile_train_step(&compiled_model, |out, y| out.cross_entropy(y), spec.clone()).with_backend(backend);
    for (i, (x, y)) in data.iter().cycle().take(steps).enumerate() {
        opt.zero_grad();
        let loss = eager_model.call(x).cross_entropy(y);
        loss.backward();
        opt.step();
        let (le, lc) = (loss.item(), step.step(x, y).unwrap().item());
        assert!((lc - le).abs() <= 1e-5 * le.abs(), "{what} {backend:?} step {i}: compiled loss {lc} vs eager {le}");
    }
    for (k, (a, b)) in params(&eager_model).iter().zip(params(&compiled_model)).enumerate() {
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{what} {backend:?}: parameter {k}: {p} vs {q}");
        }
    }
    assert_eq!(step.recompile_reasons(), &["first call".to_string()], "{what} {backend:?}");
    params(&compiled_model)
}

fn halve_gradients(m: &Sequential) {
    for p in m.parameters() {
        p.register_hook(|g| Some(g * 0.5));
    }
}

#[test]
fn a_gradient_hook_halving_gradients_changes_the_trajectory_as_in_eager() {
    for opt in optimizers() {
        for backend in BACKENDS {
            let hooked = eager_vs_compiled(&halve_gradients, &opt, backend, 5);
            let plain = eager_vs_compiled(&|_| {}, &opt, backend, 5);
            assert_ne!(hooked, plain, "{} {backend:?}: the hook changed nothing", opt.0);
        }
    }
}

#[test]
fn a_post_accumulate_hook_changing_grad_in_place_acts_as_in_eager() {
    // What a data-parallel hook does: replace .grad's value in place (here, with a scaled and
    // shifted one), so that the optimizer reads the new value.
    let rescale = |m: &Sequential| {
        for p in m.parameters() {
            p.register_post_accumulate_grad_hook(|p| {
                let g = p.grad().expect(".grad is set when the hook runs");
                g.assign(&(&(&g * 0.25) + 1e-3));
            });
        }
    };
    for opt in optimizers() {
        for backend in BACKENDS {
            let hooked = eager_vs_compiled(&rescale, &opt, backend, 4);
            let plain = eager_vs_compiled(&|_| {}, &opt, backend, 4);
            assert_ne!(hooked, plain, "{} {backend:?}: the hook changed nothing", opt.0);
        }
    }
}

/// Forward, backward pre- and full backward hooks on the layers: their callbacks run inside
/// the step's one graph (the forward hook's own math replayed in the backward).
fn module_hooks(m: &Sequential) {
    let grad_times = |k: f64| {
        move |gs: &[Option<Tensor>]| -> Option<Vec<Option<Tensor>>> {
            Some(gs.iter().map(|g| g.as_ref().map(|g| g * k)).collect())
        }
    };
    let hidden = m.get_submodule("2").unwrap();
    hidden.register_forward_hook(|_, _, out| Some(out * 0.5 + 0.1));
    hidden.register_full_backward_pre_hook(grad_times(3.0));
    let head = m.get_submodule("4").unwrap();
    head.register_full_backward_hook(move |gi, _| grad_times(2.0)(gi));
}

#[test]
fn module_hooks_run_in_the_train_step_as_in_eager() {
    for opt in optimizers() {
        for backend in BACKENDS {
            let hooked = eager_vs_compiled(&module_hooks, &opt, backend, 4);
            let plain = eager_vs_compiled(&|_| {}, &opt, backend, 4);
            assert_ne!(hooked, plain, "{} {backend:?}: the hooks changed nothing", opt.0);
        }
    }
}

type Log = Arc<Mutex<Vec<String>>>;

/// Logs every parameter's gradient hook (`grad NAME`) and post-accumulate hook (`post NAME`,
/// with whether `.grad` was set).
fn log_hooks(m: &Sequential, log: &Log) {
    for (name, p) in m.named_parameters() {
        let (l, n) = (log.clone(), name.clone());
        p.register_hook(move |_| {
            l.lock().unwrap().push(format!("grad {n}"));
            None
        });
        let (l, n) = (log.clone(), name);
        p.register_post_accumulate_grad_hook(move |p| {
            l.lock().unwrap().push(format!("post {n} {}", p.grad().is_some()));
        });
    }
}

#[test]
fn parameter_hooks_fire_once_per_step_in_eager_order() {
    let data = batches();
    let (x, y) = &data[0];
    let eager_model = model();
    let eager_log = Log::default();
    log_hooks(&eager_model, &eager_log);
    eager_model.call(x).cross_entropy(y).backward();
    let eager_order = eager_log.lock().unwrap().clone();
    assert_eq!(eager_order.len(), 12, "{eager_order:?}");
    for backend in BACKENDS {
        let m = model();
        let log = Log::default();
        log_hooks(&m, &log);
        let mut step =
            compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(sgd())).with_backend(backend);
        for k in 1..=3 {
            step.step(x, y).unwrap();
            let got = log.lock().unwrap().clone();
            assert_eq!(got.len(), 12 * k, "{backend:?}: step {k}: {got:?}");
            assert_eq!(got[12 * (k - 1)..], eager_order[..], "{backend:?}: step {k}");
        }
    }
}

#[test]
fn adding_and_removing_a_parameter_hook_recompiles_with_the_reason() {
    let data = batches();
    let m = model();
    let mut step = compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(sgd()));
    step.step(&data[0].0, &data[0].1).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handle = m.get_parameter("2.bias").unwrap().register_post_accumulate_grad_hook(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    });
    step.step(&data[1].0, &data[1].1).unwrap();
    step.step(&data[2].0, &data[2].1).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    handle.remove();
    step.step(&data[3].0, &data[3].1).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "a removed hook fired");
    // The plan without hooks is cached under its old key: no third compile.
    assert_eq!(
        step.recompile_reasons(),
        &["first call".to_string(), "gradient hook added on parameter 2.bias".to_string()]
    );
}

#[test]
fn a_hook_that_breaks_the_gradient_is_an_error() {
    let data = batches();
    let m = model();
    m.get_parameter("0.bias").unwrap().register_hook(|g| Some(g.sum_all()));
    let mut step = compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(sgd()));
    let e = step.step(&data[0].0, &data[0].1).unwrap_err().to_string();
    assert!(e.contains("parameter 0.bias") && e.contains("returned a gradient of"), "{e}");
    let m = model();
    m.get_parameter("4.weight").unwrap().register_post_accumulate_grad_hook(|p| p.set_grad(None));
    let before = params(&m);
    let mut step = compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(sgd()));
    let e = step.step(&data[0].0, &data[0].1).unwrap_err().to_string();
    assert!(e.contains("cleared the gradient of parameter 4.weight"), "{e}");
    assert_eq!(before, params(&m), "a failed step changed the parameters");
}

/// An MLP whose forward, while `enabled`, registers a tensor hook on its hidden activation
/// that scales that gradient by 0.5 and counts its calls; the last handle is kept for the test
/// to remove. (Eagerly the hook is registered anew on every call; a compiled plan keeps the
/// one its trace registered.)
#[derive(tracegrad::nn::Module)]
struct HookedMlp {
    #[module]
    fc1: Linear,
    #[module]
    fc2: Linear,
    core: ModuleCore,
    handle: Mutex<Option<RemovableHandle>>,
    enabled: AtomicBool,
    calls: Arc<AtomicUsize>,
}

impl HookedMlp {
    fn new() -> HookedMlp {
        let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
        tracegrad::manual_seed(5);
        HookedMlp {
            fc1: Linear::new(64, 16),
            fc2: Linear::new(16, 10),
            core: ModuleCore::new(),
            handle: Mutex::new(None),
            enabled: AtomicBool::new(true),
            calls: Arc::default(),
        }
    }

    fn remove_hook(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        self.handle.lock().unwrap().as_ref().expect("the forward registered its hook").remove();
    }
}

impl Module for HookedMlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.fc1.call(x).relu();
        if self.enabled.load(Ordering::SeqCst) {
            let calls = self.calls.clone();
            *self.handle.lock().unwrap() = Some(h.register_hook(move |g| {
                calls.fetch_add(1, Ordering::SeqCst);
                Some(g * 0.5)
            }));
        }
        self.fc2.call(&h)
    }
}

const REMOVED: &str = "a tensor hook registered inside forward was removed";

#[test]
fn removing_a_hook_registered_inside_a_traced_forward_recompiles_a_compiled_module() {
    let data = batches();
    let (x, y) = &data[0];
    for backend in BACKENDS {
        let m = HookedMlp::new();
        let mut c = compile(&m).with_backend(backend);
        let grad_of_fc1 = |c: &mut tracegrad::compile::CompiledModule<'_>| {
            m.zero_grad();
            c.call(x).unwrap().cross_entropy(y).backward();
            m.fc1.weight.grad().unwrap().to_vec_f64()
        };
        let hooked = grad_of_fc1(&mut c);
        assert_eq!(grad_of_fc1(&mut c), hooked);
        assert_eq!(m.calls.load(Ordering::SeqCst), 2);
        m.remove_hook();
        let plain = grad_of_fc1(&mut c);
        assert_eq!(m.calls.load(Ordering::SeqCst), 2, "{backend:?}: the removed hook fired");
        for (h, p) in hooked.iter().zip(&plain) {
            assert!((h - 0.5 * p).abs() <= 1e-6 * (1.0 + p.abs()), "{backend:?}: {h} vs half of {p}");
        }
        assert_eq!(c.recompile_reasons(), &["first call".to_string(), REMOVED.to_string()], "{backend:?}");
        grad_of_fc1(&mut c);
        assert_eq!(c.recompile_reasons().len(), 2, "{backend:?}: the rebuilt plan is cached");
    }
}

#[test]
fn a_hook_removed_between_forward_and_backward_does_not_fire() {
    let data = batches();
    let m = HookedMlp::new();
    let mut c = compile(&m);
    let loss = c.call(&data[0].0).unwrap().cross_entropy(&data[0].1);
    m.remove_hook();
    loss.backward();
    assert_eq!(m.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn tensor_hooks_inside_forward_run_in_the_train_step_and_their_removal_recompiles_it() {
    let data = batches();
    for backend in BACKENDS {
        let (eager_model, m) = (HookedMlp::new(), HookedMlp::new());
        let mut opt = Sgd::with_options(eager_model.parameters(), sgd()).unwrap();
        let mut step =
            compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(sgd())).with_backend(backend);
        for (i, (x, y)) in data.iter().enumerate() {
            if i == 3 {
                eager_model.remove_hook();
                m.remove_hook();
            }
            opt.zero_grad();
            let loss = eager_model.call(x).cross_entropy(y);
            loss.backward();
            opt.step();
            let (le, lc) = (loss.item(), step.step(x, y).unwrap().item());
            assert!((lc - le).abs() <= 1e-5 * le.abs(), "{backend:?} step {i}: compiled loss {lc} vs eager {le}");
        }
        assert_eq!(m.calls.load(Ordering::SeqCst), 3, "{backend:?}");
        assert_eq!(eager_model.calls.load(Ordering::SeqCst), 3);
        for ((n, a), (_, b)) in eager_model.named_parameters().iter().zip(m.named_parameters()) {
            for (p, q) in a.to_vec_f64().iter().zip(b.to_vec_f64()) {
                assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{backend:?}: {n}: {p} vs {q}");
            }
        }
        assert_eq!(step.recompile_reasons(), &["first call".to_string(), REMOVED.to_string()], "{backend:?}");
    }
}

/// Parameter hooks with `accumulate(k > 1)` would see micro-batch sums, not eager's
/// per-backward gradients: the step refuses them, naming the parameter, and changes nothing.
#[test]
fn parameter_hooks_with_accumulation_are_an_error() {
    let m = model();
    let _h = m.get_parameter("2.weight").unwrap().register_hook(|g| Some(g * 0.5));
    let before = params(&m);
    let mut step = compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(sgd())).accumulate(2);
    let (x, y) = &batches()[0];
    let err = step.step(x, y).unwrap_err();
    assert!(err.to_string().contains("2.weight") && err.to_string().contains("accumulate(2)"), "{err}");
    assert_eq!(params(&m), before);
}
