//! `compile_train_step`: forward, loss, backward and the optimizer update in one graph.
//!
//! Parameters, buffers, optimizer state (momentum buffers, Adam moments, the step count) and
//! the learning rate are graph inputs; their new values are graph outputs written back after
//! each call. So an optimizer step, a learning-rate change or a scheduler needs no recompile.
//! The update formulas are the eager optimizers' own, from `crate::optim::rules`: the scalar
//! part (bias corrections, step size, the weight decay's form) and the per-element rule, here
//! emitted as graph ops through its `Nodes` instance.

use tracegrad_compiler::graph::{Graph, InputRole, NodeId, NodeKind};
use tracegrad_compiler::ops::CompareOp;
use tracegrad_compiler::{composite, Build, OpResult, TensorType};
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, DType};

use super::compiled::{signature_of, CachedPlan, CallState, PlanCache, Runner, Signature};
use super::param_hooks::hooked_parameters;
use super::pipeline::{self, grad_inputs, op_error, Goal, Options};
use super::trace::{trace_with, CompileError};
use crate::nn::{Module, ModuleExt};
use crate::optim::rules::{adam_rule, adam_scalars, sgd_rule, AdamCoeffs, AdamMoments, Nodes, SgdCoeffs, WeightDecay};
use crate::optim::{Adam, AdamOptions, AdamW, AdamWOptions, LrTarget, Optimizer, OptimizerStateDict, Sgd, SgdOptions};
use crate::tensor::Tensor;

/// The update rule compiled into the step.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOptimizer {
    /// SGD with momentum, dampening, nesterov, weight decay and maximize.
    Sgd(SgdOptions),
    /// Adam (with amsgrad and maximize).
    Adam(AdamOptions),
    /// AdamW: decoupled weight decay.
    AdamW(AdamWOptions),
}

impl StepOptimizer {
    fn lr(&self) -> f64 {
        match self {
            StepOptimizer::Sgd(o) => o.lr,
            StepOptimizer::Adam(o) => o.lr,
            StepOptimizer::AdamW(o) => o.lr,
        }
    }

    /// The same rule at learning rate `lr`.
    fn with_lr(&self, lr: f64) -> StepOptimizer {
        match self {
            StepOptimizer::Sgd(o) => StepOptimizer::Sgd(SgdOptions { lr, ..o.clone() }),
            StepOptimizer::Adam(o) => StepOptimizer::Adam(AdamOptions { lr, ..o.clone() }),
            StepOptimizer::AdamW(o) => StepOptimizer::AdamW(AdamWOptions { lr, ..o.clone() }),
        }
    }

    /// Names of the per-parameter state slots.
    fn slots(&self) -> Vec<&'static str> {
        match self {
            StepOptimizer::Sgd(o) => {
                if o.momentum != 0.0 {
                    vec!["momentum_buffer"]
                } else {
                    vec![]
                }
            }
            StepOptimizer::Adam(AdamOptions { amsgrad, .. }) | StepOptimizer::AdamW(AdamWOptions { amsgrad, .. }) => {
                if *amsgrad {
                    vec!["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
                } else {
                    vec!["exp_avg", "exp_avg_sq"]
                }
            }
        }
    }
}

struct StepPlan {
    graph: Graph,
    exec: Executable,
    compile_time: std::time::Duration,
    lifted: Vec<Tensor>,
    updates: Vec<Tensor>,
    /// Indices into `lifted` of the parameters this plan updates, in output order.
    updated: Vec<usize>,
    /// Whether the updated parameters' storage is handed to the executor (no hooks).
    donate: bool,
    callbacks: Vec<super::trace::CallbackSpec>,
    hook_flags: Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    rng: Option<super::trace::RngInput>,
}

impl CachedPlan for StepPlan {
    fn hook_flags(&self) -> &[std::sync::Arc<std::sync::atomic::AtomicBool>] {
        &self.hook_flags
    }
}

/// A loss of (module output, target).
type LossFn<'m> = Box<dyn Fn(&Tensor, &Tensor) -> Tensor + 'm>;

/// A compiled training step (see [`compile_train_step`]).
///
/// A `TrainStep` is neither `Send` nor `Sync`: it borrows its module as a `&dyn Module` and
/// owns the loss closure, and neither is required to be thread-safe. Build one per thread
/// (each compiles its own plans); a shared module's parameters are updated in place, so two
/// threads stepping one module need their own synchronisation, as in eager mode.
pub struct TrainStep<'m> {
    module: &'m dyn Module,
    loss_fn: LossFn<'m>,
    optimizer: StepOptimizer,
    lr: f64,
    /// The `initial_lr` an LR scheduler recorded (see [`LrTarget`]).
    initial_lr: Option<f64>,
    step: f32,
    /// Per parameter (by tensor id): its state slots.
    state: std::collections::HashMap<usize, Vec<Buffer>>,
    plans: PlanCache<StepPlan>,
    /// Gradient clipping and accumulation (see [`TrainStep::clip_grad_norm`]).
    grads: GradOptions,
}

/// What the step does with the gradients before the update.
#[derive(Default)]
struct GradOptions {
    /// `clip_grad_norm(max_norm)`.
    clip_norm: Option<f64>,
    /// Micro-batches per update (1: every call updates).
    accumulate: usize,
    /// Micro-batches accumulated since the last update.
    pending: usize,
    /// Per parameter (by tensor id): the gradient summed over the pending micro-batches.
    sums: std::collections::HashMap<usize, Buffer>,
    /// The plans of the micro-batches that only accumulate.
    plans: PlanCache<StepPlan>,
}

/// Compiles one training step of `module` under `loss_fn(output, target)` with `optimizer`.
/// Each [`TrainStep::step`] runs forward, loss, backward and the update as one plan, updates
/// the parameters (and buffers such as BatchNorm statistics) in place, and returns the loss.
pub fn compile_train_step<'m>(
    module: &'m dyn Module,
    loss_fn: impl Fn(&Tensor, &Tensor) -> Tensor + 'm,
    optimizer: StepOptimizer,
) -> TrainStep<'m> {
    let lr = optimizer.lr();
    TrainStep {
        module,
        loss_fn: Box::new(loss_fn),
        optimizer,
        lr,
        initial_lr: None,
        step: 0.0,
        state: Default::default(),
        plans: PlanCache::default(),
        grads: GradOptions { accumulate: 1, ..Default::default() },
    }
}

/// Emits one parameter's update; returns (new parameter, new state slots).
#[allow(clippy::too_many_arguments)]
fn emit_update(
    g: &mut Graph,
    opt: &StepOptimizer,
    p: NodeId,
    grad: NodeId,
    state: &[NodeId],
    lr: NodeId,
    step: NodeId,
    new_step: NodeId,
) -> OpResult<(NodeId, Vec<NodeId>)> {
    let lr = g.cast(&lr, g.dtype(&p))?;
    match opt {
        StepOptimizer::Sgd(o) => emit_sgd(g, o, p, grad, state, lr, step),
        StepOptimizer::Adam(AdamOptions { betas, eps, weight_decay, amsgrad: _, maximize, .. })
        | StepOptimizer::AdamW(AdamWOptions { betas, eps, weight_decay, amsgrad: _, maximize, .. }) => {
            let decay = WeightDecay::new(*weight_decay, matches!(opt, StepOptimizer::AdamW(_)));
            let h = AdamHyper { betas: *betas, eps: *eps, decay, maximize: *maximize };
            emit_adam(g, &h, p, grad, state, lr, new_step)
        }
    }
}

/// SGD's update through the eager optimizer's own rule ([`sgd_rule`]); the momentum buffer
/// is fresh on the first step (`step == 0`).
fn emit_sgd(
    g: &mut Graph,
    o: &SgdOptions,
    p: NodeId,
    grad: NodeId,
    state: &[NodeId],
    lr: NodeId,
    step: NodeId,
) -> OpResult<(NodeId, Vec<NodeId>)> {
    let dtype = g.dtype(&p);
    let momentum = if o.momentum != 0.0 { Some(g.scalar(o.momentum, dtype)?) } else { None };
    let weight_decay = match WeightDecay::new(o.weight_decay, false).l2() {
        Some(wd) => Some(g.scalar(wd, dtype)?),
        None => None,
    };
    let c = SgdCoeffs {
        neg_lr: g.neg(&lr)?,
        weight_decay,
        momentum,
        one_minus_dampening: g.scalar(1.0 - o.dampening, dtype)?,
        nesterov: o.nesterov,
        maximize: o.maximize,
    };
    let buf = match momentum {
        Some(_) => {
            let zero = g.scalar(0.0, DType::F32)?;
            Some((state[0], g.compare(CompareOp::Eq, &step, &zero)?))
        }
        None => None,
    };
    let (np, nb) = sgd_rule(&mut Nodes(g), p, grad, buf, &c)?;
    Ok((np, nb.into_iter().collect()))
}

/// The host hyperparameters of an Adam or AdamW update.
struct AdamHyper {
    betas: (f64, f64),
    eps: f64,
    decay: WeightDecay,
    maximize: bool,
}

/// Adam's (or AdamW's) update through the eager optimizer's own rule ([`adam_rule`]), with
/// the scalars of [`adam_scalars`] at step `new_step`; `state` holds AMSGrad's running maximum
/// third when it is on.
fn emit_adam(
    g: &mut Graph,
    h: &AdamHyper,
    p: NodeId,
    grad: NodeId,
    state: &[NodeId],
    lr: NodeId,
    new_step: NodeId,
) -> OpResult<(NodeId, Vec<NodeId>)> {
    let dtype = g.dtype(&p);
    let t = g.cast(&new_step, dtype)?;
    let sc = adam_scalars(g, h.betas, h.decay, &lr, &t)?;
    let w = 1.0 - h.betas.0;
    let lerp_weight = g.scalar(w, dtype)?;
    let one = g.scalar(1.0, dtype)?;
    // The lerp's side is chosen on the weight rounded to the parameter dtype, as eager does.
    let lerp_from_start = if dtype == DType::F32 { (w as f32).abs() < 0.5 } else { w.abs() < 0.5 };
    let weight_decay = match h.decay.l2() {
        Some(wd) => Some(g.scalar(wd, dtype)?),
        None => None,
    };
    let c = AdamCoeffs {
        weight_decay,
        decay: sc.decay,
        lerp_weight,
        lerp_weight_complement: g.sub(&one, &lerp_weight)?,
        lerp_from_start,
        beta2: g.scalar(h.betas.1, dtype)?,
        one_minus_beta2: g.scalar(1.0 - h.betas.1, dtype)?,
        bias_correction2_sqrt: sc.bias_correction2_sqrt,
        eps: g.scalar(h.eps, dtype)?,
        neg_step_size: g.neg(&sc.step_size)?,
        maximize: h.maximize,
    };
    let s = AdamMoments { exp_avg: state[0], exp_avg_sq: state[1], max_exp_avg_sq: state.get(2).copied() };
    let (np, s) = adam_rule(&mut Nodes(g), p, grad, s, &c)?;
    Ok((np, [s.exp_avg, s.exp_avg_sq].into_iter().chain(s.max_exp_avg_sq).collect()))
}

impl TrainStep<'_> {
    /// Changes the learning rate (no recompile: it is a graph input).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Why each plan was compiled.
    pub fn recompile_reasons(&self) -> &[String] {
        self.plans.reasons()
    }

    /// The graph of the last step's plan.
    pub fn last_graph(&self) -> Option<&Graph> {
        self.last_plan().map(|p| &p.graph)
    }

    fn last_plan(&self) -> Option<&StepPlan> {
        self.plans.last()
    }

    /// The compiled form of the last step's plan (its plan dump, kernels and peak bytes).
    pub fn last_executable(&self) -> Option<&Executable> {
        self.last_plan().map(|p| &p.exec)
    }

    /// How long the last step's plan took to build (trace, autodiff, passes, codegen).
    pub fn last_compile_time(&self) -> Option<std::time::Duration> {
        self.last_plan().map(|p| p.compile_time)
    }

    /// Selects the backend for plans compiled from now on (cached plans are dropped).
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.plans.set_backend(backend);
        self.grads.plans.set_backend(backend);
        self
    }

    /// The backend plans run on.
    pub fn backend(&self) -> Backend {
        self.plans.backend()
    }

    /// The plan key of a step on `data` now: the module's, plus its hooked parameters.
    fn signature(&self, data: &[Tensor]) -> Signature {
        let mut sig = signature_of(self.module, data);
        sig.param_hooks = hooked_parameters(&self.module.named_parameters());
        sig
    }

    /// One training step on `(x, target)`; returns the loss (before the update).
    ///
    /// With [`accumulate(k)`](TrainStep::accumulate), calls 1 to k−1 of each cycle only add
    /// their gradients to the running sums and the k-th applies the update; each returns its
    /// own micro-batch's loss.
    ///
    /// Hooks run as in eager training (`zero_grad`, `backward`, `step`): forward and module
    /// hooks, tensor hooks registered inside forward, and the parameters' own gradient and
    /// post-accumulate hooks, in the order eager backward runs them. A parameter's `.grad` is
    /// set to its gradient while its hooks run and stays set after the step; the update
    /// reads `.grad` as the hooks leave it (a post-accumulate hook may change it in place).
    /// Parameter hooks together with `accumulate(k)` for k > 1 are an error.
    pub fn step(&mut self, x: &Tensor, target: &Tensor) -> Result<Tensor, CompileError> {
        self.check_grad_options()?;
        let data = [x.detach(), target.detach()];
        if self.grads.accumulate > 1 {
            if let Some(name) =
                self.module.named_parameters().into_iter().find(|(_, p)| p.has_grad_hooks()).map(|(n, _)| n)
            {
                return Err(CompileError {
                    op: String::new(),
                    module_path: name.clone(),
                    message: format!(
                        "compile_train_step: parameter {name} has gradient hooks, which a compiled step with accumulate({}) cannot run yet (they would see micro-batch sums); use accumulate(1) or an eager optimizer",
                        self.grads.accumulate
                    ),
                });
            }
        }
        if self.grads.pending + 1 < self.grads.accumulate {
            return self.accumulate_only(x, target);
        }
        let sig = self.signature(&data);
        let (module, backend) = (self.module, self.plans.backend());
        let loss_fn = &self.loss_fn;
        let tail = self.grads.tail(&self.optimizer, false);
        self.plans.get_or_build(module, sig.clone(), |sig| build_step(module, loss_fn, tail, backend, sig))?;
        // A parameter hook registered inside the traced forward is in the plan already.
        let now = self.signature(&data);
        if now != sig {
            self.plans.rekey_last(now);
        }
        let plan = self.plans.last().expect("the plan just built or found");
        let slots = self.optimizer.slots().len();
        // Optimizer state starts at zero (made before any parameter storage is donated).
        for &j in &plan.updated {
            let p = &plan.lifted[j];
            self.state.entry(p.id()).or_insert_with(|| vec![Buffer::zeros(p.dtype(), &p.shape()); slots]);
        }
        let mut args: Vec<Buffer> = vec![x.buffer(), target.buffer()];
        let donated: Vec<bool> = (0..plan.lifted.len()).map(|j| plan.donate && plan.updated.contains(&j)).collect();
        args.extend(plan.lifted.iter().zip(&donated).map(|(t, &d)| if d { t.take_storage() } else { t.buffer() }));
        args.extend(self.grads.sum_args(plan));
        if let Some(rng) = &plan.rng {
            rng.feed(&mut args, 2);
        }
        args.push(Buffer::scalar(self.lr, DType::F32));
        args.push(Buffer::scalar(self.step as f64, DType::F32));
        for &j in &plan.updated {
            let p = &plan.lifted[j];
            args.extend(self.state[&p.id()].iter().cloned());
        }
        // Backward callbacks (module backward hooks, a forward hook's replay) share one call's
        // state with the forward callbacks, in this one graph.
        let state = (!plan.callbacks.is_empty()).then(|| std::sync::Arc::new(CallState::default()));
        let runner = Runner { root: Some(self.module), specs: &plan.callbacks, state };
        let out = match plan.exec.run_donated(args, &runner) {
            Ok(out) => out,
            Err(e) => {
                // Hand the donated parameters back untouched.
                for (j, b) in e.inputs.into_iter().skip(2).take(plan.lifted.len()).enumerate() {
                    if donated[j] {
                        plan.lifted[j].restore_storage(b);
                    }
                }
                return Err(op_error(e.error));
            }
        };
        let mut out = out.into_iter();
        let loss = out.next().expect("the loss");
        for t in &plan.updates {
            t.set_buffer(out.next().expect("a buffer update"));
        }
        for &j in &plan.updated {
            let p = &plan.lifted[j];
            let new = out.next().expect("a new parameter");
            if donated[j] {
                p.restore_storage(new);
            } else {
                p.set_buffer(new);
            }
            let st = self.state.get_mut(&p.id()).expect("state");
            for s in st.iter_mut() {
                *s = out.next().expect("new state");
            }
        }
        self.step += 1.0;
        self.grads.clear_sums();
        Ok(Tensor::from_buffer(loss))
    }
}

/// Traces `loss_fn(module(x), y)` and runs the pipeline: differentiates w.r.t. the
/// parameters, emits the optimizer's update, optimizes and compiles the plan for `backend`.
fn build_step(
    module: &dyn Module,
    loss_fn: &LossFn<'_>,
    tail: StepTail<'_>,
    backend: Backend,
    sig: &Signature,
) -> Result<StepPlan, CompileError> {
    let t0 = std::time::Instant::now();
    let traced = crate::enable_grad(|| trace_with(module, &sig.inputs, &|a| loss_fn(&module.call(&a[0]), &a[1])))?;
    let g = &traced.graph;
    let loss = g.ty(g.outputs[0].1);
    if loss.numel() != 1 || !loss.dtype.is_float() {
        return Err(CompileError {
            op: String::new(),
            module_path: String::new(),
            message: format!("compile_train_step: the loss must be a float scalar, got {loss}"),
        });
    }
    let n_data = sig.inputs.len();
    // Only parameters (lifted tensors) are updated, never the data inputs.
    let wrt: Vec<usize> = grad_inputs(&[], &traced.lifted_inputs, true).into_iter().map(|j| n_data + j).collect();
    // The parameters being replaced are donated: their new values may be written over the
    // old storage (only when no hook could observe a parameter mid-step).
    // (A micro-batch that only accumulates replaces no parameter, so donates none.)
    let hooked_params = traced.lifted_inputs.iter().any(Tensor::has_grad_hooks);
    let donate =
        traced.callbacks.is_empty() && traced.tensor_hooks.is_empty() && !hooked_params && !tail.accumulate_only;
    let opts = Options { goal: Goal::TrainStep(tail), wrt, donate, backend, dump: false };
    let mut built = pipeline::run(traced, &opts)?;
    Ok(StepPlan {
        exec: built.take_exec()?,
        graph: built.forward,
        compile_time: t0.elapsed(),
        lifted: built.lifted,
        updates: built.updates,
        updated: built.wrt.iter().map(|&i| i - n_data).collect(),
        callbacks: built.callbacks,
        hook_flags: built.hook_flags,
        rng: built.rng,
        donate,
    })
}

/// Appends the update of each parameter in `params` from its gradient in `grads`: the
/// learning rate, the step count and each parameter's state slots become graph inputs; the
/// new parameter (`param:NAME`) and state (`state:NAME.SLOT`) become outputs.
pub(crate) fn append_update(
    g: &mut Graph,
    optimizer: &StepOptimizer,
    params: &[NodeId],
    grads: &[NodeId],
) -> OpResult<()> {
    let lr = g.add_input("lr", InputRole::State, TensorType::new(DType::F32, &[]));
    let step = g.add_input("step", InputRole::State, TensorType::new(DType::F32, &[]));
    let new_step = g.add_scalar(&step, 1.0)?;
    let slots = optimizer.slots();
    for (&p, &grad) in params.iter().zip(grads) {
        let ty = g.ty(p).clone();
        let name = match g.kind(p) {
            NodeKind::Input { name, .. } => name.clone(),
            _ => String::new(),
        };
        let state: Vec<_> =
            slots.iter().map(|s| g.add_input(&format!("{name}.{s}"), InputRole::State, ty.clone())).collect();
        let (np, ns) = emit_update(g, optimizer, p, grad, &state, lr, step, new_step)?;
        g.add_output(&format!("param:{name}"), np);
        for (s, n) in slots.iter().zip(ns) {
            g.add_output(&format!("state:{name}.{s}"), n);
        }
    }
    Ok(())
}

/// What a compiled step does with its gradients: the optimizer, the options set by
/// [`TrainStep::clip_grad_norm`] and [`TrainStep::accumulate`], and which of an accumulating
/// step's two plans this is.
#[derive(Clone, Copy)]
pub(crate) struct StepTail<'a> {
    pub(crate) optimizer: &'a StepOptimizer,
    pub(crate) clip_norm: Option<f64>,
    /// Micro-batches per update (1: every call updates).
    pub(crate) accumulate: usize,
    /// A micro-batch before the k-th: add the gradients to the sums, update nothing.
    pub(crate) accumulate_only: bool,
}

impl StepTail<'_> {
    /// The gradient the backward starts from: 1, or `1 / k` when accumulating over k
    /// micro-batches, which is the gradient of `loss / k`, the loss users backpropagate when
    /// they accumulate in eager mode (so k micro-batches of a mean loss give the gradient of
    /// the mean over the k·n samples).
    pub(crate) fn loss_seed(&self, g: &mut Graph, ty: &TensorType) -> OpResult<NodeId> {
        let one = g.full(1.0, ty.dtype, &ty.shape)?;
        if self.accumulate <= 1 {
            return Ok(one);
        }
        let k = g.scalar(self.accumulate as f64, ty.dtype)?;
        g.div(&one, &k)
    }
}

/// Appends what the step does with the gradients `grads` of `params`. Accumulating, each
/// gradient is added to its running sum (graph input `NAME.grad_sum`); a micro-batch that only
/// accumulates returns the new sums (`grad_sum:NAME`) and stops there. Otherwise the
/// gradients (or sums) are clipped if asked and the optimizer's update follows
/// ([`append_update`]).
pub(crate) fn append_tail(g: &mut Graph, tail: StepTail<'_>, params: &[NodeId], grads: &[NodeId]) -> OpResult<()> {
    let mut grads = grads.to_vec();
    if tail.accumulate > 1 {
        for (&p, grad) in params.iter().zip(grads.iter_mut()) {
            let sum = g.add_input(&format!("{}.grad_sum", input_name(g, p)), InputRole::State, g.ty(*grad).clone());
            // The running sum on the left, as eager's `.grad += new` adds.
            *grad = g.add(&sum, grad)?;
        }
        if tail.accumulate_only {
            for (&p, &grad) in params.iter().zip(&grads) {
                g.add_output(&format!("grad_sum:{}", input_name(g, p)), grad);
            }
            return Ok(());
        }
    }
    if let Some(max_norm) = tail.clip_norm {
        grads = clip_grad_norm(g, &grads, max_norm)?;
    }
    append_update(g, tail.optimizer, params, &grads)
}

/// The name of a graph input (empty for any other node).
fn input_name(g: &Graph, n: NodeId) -> String {
    match g.kind(n) {
        NodeKind::Input { name, .. } => name.clone(),
        _ => String::new(),
    }
}

/// `clip_grad_norm_(max_norm)` with norm type 2 as graph ops, in eager's
/// ([`crate::nn::utils::clip_grad_norm_`]) and PyTorch's arithmetic: the 2-norm of each
/// gradient, the 2-norm of those norms, and every gradient scaled by
/// `min(1, max_norm / (total + 1e-6))`.
fn clip_grad_norm(g: &mut Graph, grads: &[NodeId], max_norm: f64) -> OpResult<Vec<NodeId>> {
    if grads.is_empty() {
        return Ok(Vec::new());
    }
    let norms = grads.iter().map(|gr| composite::vector_norm(g, gr, 2.0, &[], false)).collect::<OpResult<Vec<_>>>()?;
    let stacked = composite::stack(g, &norms.iter().collect::<Vec<_>>(), 0)?;
    let total = composite::vector_norm(g, &stacked, 2.0, &[], false)?;
    let dtype = g.dtype(&total);
    let eps = g.scalar(1e-6, dtype)?;
    let max = g.scalar(max_norm, dtype)?;
    let denominator = g.add(&total, &eps)?;
    let ratio = g.div(&max, &denominator)?;
    let coef = composite::clamp(g, &ratio, None, Some(1.0))?;
    grads
        .iter()
        .map(|gr| {
            let c = g.cast(&coef, g.dtype(gr))?;
            g.mul(gr, &c)
        })
        .collect()
}

impl GradOptions {
    fn tail<'a>(&self, optimizer: &'a StepOptimizer, accumulate_only: bool) -> StepTail<'a> {
        StepTail { optimizer, clip_norm: self.clip_norm, accumulate: self.accumulate.max(1), accumulate_only }
    }

    /// The running sums of `plan`'s parameters (zeros before the first micro-batch), in input
    /// order; none when not accumulating.
    fn sum_args(&mut self, plan: &StepPlan) -> Vec<Buffer> {
        if self.accumulate <= 1 {
            return Vec::new();
        }
        plan.updated
            .iter()
            .map(|&j| {
                let p = &plan.lifted[j];
                self.sums.entry(p.id()).or_insert_with(|| Buffer::zeros(p.dtype(), &p.shape())).clone()
            })
            .collect()
    }

    /// After an update: the next call starts a new accumulation cycle.
    fn clear_sums(&mut self) {
        self.pending = 0;
        self.sums.clear();
    }
}

impl TrainStep<'_> {
    /// Clips the gradients inside the compiled step before the update, as
    /// `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)` between `backward()` and
    /// `optimizer.step()` does: norm type 2, every gradient scaled by
    /// `min(1, max_norm / (total_norm + 1e-6))`. With [`accumulate`](TrainStep::accumulate),
    /// the summed gradients are clipped, once per update. `max_norm` must be finite and
    /// non-negative (checked by the first [`step`](TrainStep::step)).
    pub fn clip_grad_norm(mut self, max_norm: f64) -> Self {
        self.grads.clip_norm = Some(max_norm);
        self.drop_plans();
        self
    }

    /// Accumulates gradients over `k` micro-batches per update: calls 1 to k−1 of each cycle
    /// add their gradients to running sums and the k-th adds its own and applies the update
    /// (with the step count, learning rate and optimizer state advancing once per update).
    /// The semantics are those of the usual eager loop, which backpropagates `loss / k` on
    /// each micro-batch and calls `optimizer.step()` after the k-th: with a mean-reduced loss,
    /// k micro-batches of n samples update exactly like one batch of k·n. `k` must be at
    /// least 1 (checked by the first [`step`](TrainStep::step)); 1 updates on every call.
    pub fn accumulate(mut self, k: usize) -> Self {
        self.grads.accumulate = k;
        self.grads.clear_sums();
        self.drop_plans();
        self
    }

    /// Micro-batches accumulated since the last update (always 0 without
    /// [`accumulate`](TrainStep::accumulate)).
    pub fn pending_micro_batches(&self) -> usize {
        self.grads.pending
    }

    fn drop_plans(&mut self) {
        self.plans.clear();
        self.grads.plans.clear();
    }

    fn check_grad_options(&self) -> Result<(), CompileError> {
        let message = match (self.grads.clip_norm, self.grads.accumulate) {
            (Some(m), _) if !(m.is_finite() && m >= 0.0) => {
                format!("compile_train_step: clip_grad_norm needs a finite, non-negative max_norm, got {m}")
            }
            (_, 0) => "compile_train_step: accumulate needs at least 1 micro-batch per update, got 0".to_string(),
            _ => return Ok(()),
        };
        Err(CompileError { op: String::new(), module_path: String::new(), message })
    }

    /// A micro-batch that only adds its gradients to the running sums.
    fn accumulate_only(&mut self, x: &Tensor, target: &Tensor) -> Result<Tensor, CompileError> {
        let sig = signature_of(self.module, &[x.detach(), target.detach()]);
        let (module, loss_fn) = (self.module, &self.loss_fn);
        let tail = self.grads.tail(&self.optimizer, true);
        let grads = &mut self.grads;
        let backend = grads.plans.backend();
        let plan = grads.plans.get_or_build(module, sig, |sig| build_step(module, loss_fn, tail, backend, sig))?;
        let mut args: Vec<Buffer> = vec![x.buffer(), target.buffer()];
        args.extend(plan.lifted.iter().map(Tensor::buffer));
        // Each micro-batch draws fresh random values, as eager's k backward passes do.
        if let Some(rng) = &plan.rng {
            rng.feed(&mut args, 2);
        }
        for &j in &plan.updated {
            let p = &plan.lifted[j];
            args.push(grads.sums.entry(p.id()).or_insert_with(|| Buffer::zeros(p.dtype(), &p.shape())).clone());
        }
        let runner = Runner { root: Some(self.module), specs: &plan.callbacks, state: None };
        let out = plan.exec.run_donated(args, &runner).map_err(|e| op_error(e.error))?;
        let mut out = out.into_iter();
        let loss = out.next().expect("the loss");
        for t in &plan.updates {
            t.set_buffer(out.next().expect("a buffer update"));
        }
        for &j in &plan.updated {
            grads.sums.insert(plan.lifted[j].id(), out.next().expect("a gradient sum"));
        }
        grads.pending += 1;
        Ok(Tensor::from_buffer(loss))
    }
}

/// The eager optimizer with `opt`'s hyperparameters at learning rate `lr` over `params`: it
/// writes and checks the state dicts' parameter groups, so the compiled step's state dicts
/// are the eager ones, field for field.
fn eager_twin(opt: &StepOptimizer, lr: f64, params: Vec<Tensor>) -> Result<Box<dyn Optimizer>, String> {
    let twin: Box<dyn Optimizer> = match opt {
        StepOptimizer::Sgd(o) => Box::new(Sgd::with_options(params, SgdOptions { lr, ..o.clone() }).map_err(err)?),
        StepOptimizer::Adam(o) => Box::new(Adam::with_options(params, AdamOptions { lr, ..o.clone() }).map_err(err)?),
        StepOptimizer::AdamW(o) => {
            Box::new(AdamW::with_options(params, AdamWOptions { lr, ..o.clone() }).map_err(err)?)
        }
    };
    Ok(twin)
}

fn err(e: crate::optim::OptimError) -> String {
    e.to_string()
}

/// The hyperparameters of a state dict loaded into an eager optimizer of `opt`'s kind, which
/// checks it (kind, parameter count, every state tensor's shape and dtype) first.
fn loaded_options(opt: &StepOptimizer, params: Vec<Tensor>, sd: &OptimizerStateDict) -> Result<StepOptimizer, String> {
    Ok(match opt {
        StepOptimizer::Sgd(o) => {
            let mut t = Sgd::with_options(params, o.clone()).map_err(err)?;
            t.load_state_dict(sd)?;
            StepOptimizer::Sgd(t.options().clone())
        }
        StepOptimizer::Adam(o) => {
            let mut t = Adam::with_options(params, o.clone()).map_err(err)?;
            t.load_state_dict(sd)?;
            StepOptimizer::Adam(t.options())
        }
        StepOptimizer::AdamW(o) => {
            let mut t = AdamW::with_options(params, o.clone()).map_err(err)?;
            t.load_state_dict(sd)?;
            StepOptimizer::AdamW(t.options())
        }
    })
}

impl TrainStep<'_> {
    /// The optimizer's state and hyperparameters in the layout of the eager optimizers'
    /// [`Optimizer::state_dict`] (PyTorch's): `state` by index into `module.parameters()`
    /// (`momentum_buffer`; or `step`, `exp_avg`, `exp_avg_sq` and AMSGrad's
    /// `max_exp_avg_sq`), empty before the first update, and one parameter group. An error
    /// only when the step's hyperparameters are invalid (the eager optimizer's own text).
    pub fn state_dict(&self) -> Result<OptimizerStateDict, String> {
        let params = self.module.parameters();
        let mut twin = eager_twin(&self.optimizer, self.lr, params.clone())?;
        if let Some(lr) = self.initial_lr {
            twin.set_initial_lr(lr);
        }
        let mut sd = twin.state_dict();
        let slots = self.optimizer.slots();
        if self.step == 0.0 || slots.is_empty() {
            return Ok(sd);
        }
        let adam = !matches!(self.optimizer, StepOptimizer::Sgd(_));
        for (i, p) in params.iter().enumerate() {
            let Some(st) = self.state.get(&p.id()) else { continue };
            let mut m: std::collections::BTreeMap<String, Buffer> =
                slots.iter().zip(st).map(|(s, b)| (s.to_string(), b.clone())).collect();
            if adam {
                m.insert("step".into(), Buffer::scalar(self.step as f64, DType::F32));
            }
            sd.state.insert(i, m);
        }
        Ok(sd)
    }

    /// Restores a [`state_dict`](TrainStep::state_dict) (or an eager optimizer's of the same
    /// kind): hyperparameters, learning rate, step count and per-parameter state. A state
    /// dict of another optimizer kind or parameter count, with state of the wrong shape, or
    /// with state for only some of the trainable parameters (the compiled step keeps one
    /// step count for all) is an error, and then nothing changes. Hyperparameters other than
    /// the learning rate are compiled into the plans, so a change drops them (the next step
    /// recompiles). Accumulated micro-batch gradients are dropped.
    pub fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<(), String> {
        let params = self.module.parameters();
        let optimizer = loaded_options(&self.optimizer, params.clone(), sd)?;
        let slots = optimizer.slots();
        let mut state = std::collections::HashMap::new();
        let mut steps = Vec::new();
        for (i, p) in params.iter().enumerate() {
            match sd.state.get(&i) {
                Some(st) if !slots.is_empty() => {
                    // The eager load checked that every slot is there with the right shape.
                    state.insert(p.id(), slots.iter().map(|s| st[*s].clone()).collect::<Vec<_>>());
                    if let Some(t) = st.get("step") {
                        steps.push(Tensor::from_buffer(t.clone()).item());
                    }
                }
                None if !sd.state.is_empty() && !slots.is_empty() && p.requires_grad() => {
                    return Err(format!(
                        "loaded state dict has no state for parameter {i}: a compiled train step needs state for every trainable parameter or none"
                    ));
                }
                _ => {}
            }
        }
        if steps.windows(2).any(|w| w[0] != w[1]) {
            return Err(
                "loaded state dict has different step counts for different parameters; a compiled train step keeps one"
                    .into(),
            );
        }
        let step = match (steps.first(), state.is_empty()) {
            (Some(&t), _) => t as f32,
            // SGD keeps no count: its buffers only say that a first step was taken.
            (None, false) => 1.0,
            (None, true) => 0.0,
        };
        // The learning rate is a graph input; the other hyperparameters are compiled in.
        if optimizer.with_lr(0.0) != self.optimizer.with_lr(0.0) {
            self.drop_plans();
        }
        self.lr = optimizer.lr();
        self.initial_lr = sd.param_groups.first().and_then(|g| g.get("initial_lr")).and_then(|v| v.as_f64());
        (self.optimizer, self.state, self.step) = (optimizer, state, step);
        self.grads.clear_sums();
        Ok(())
    }
}

/// A compiled step is scheduled like an eager optimizer: `StepLR::new(&mut step, ..)` and
/// `sched.step(&mut step)` change the learning rate, which is a graph input (no recompile).
impl LrTarget for TrainStep<'_> {
    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn initial_lr(&self) -> Option<f64> {
        self.initial_lr
    }

    fn set_initial_lr(&mut self, lr: f64) {
        self.initial_lr.get_or_insert(lr);
    }
}
