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
use tracegrad_compiler::{Build, OpResult, TensorType};
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, DType};

use super::compiled::{signature_of, PlanCache, Runner, Signature};
use super::pipeline::{self, grad_inputs, op_error, Goal, Options};
use super::trace::{trace_with, CompileError};
use crate::nn::{Module, ModuleExt};
use crate::optim::rules::{adam_rule, adam_scalars, sgd_rule, AdamCoeffs, AdamMoments, Nodes, SgdCoeffs, WeightDecay};
use crate::optim::{AdamOptions, AdamWOptions, SgdOptions};
use crate::tensor::Tensor;

/// The update rule compiled into the step.
#[derive(Clone, Debug)]
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
    rng: Option<super::trace::RngInput>,
}

/// A loss of (module output, target).
type LossFn<'m> = Box<dyn Fn(&Tensor, &Tensor) -> Tensor + 'm>;

/// A compiled training step (see [`compile_train_step`]).
pub struct TrainStep<'m> {
    module: &'m dyn Module,
    loss_fn: LossFn<'m>,
    optimizer: StepOptimizer,
    lr: f64,
    step: f32,
    /// Per parameter (by tensor id): its state slots.
    state: std::collections::HashMap<usize, Vec<Buffer>>,
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
        step: 0.0,
        state: Default::default(),
        plans: PlanCache::default(),
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
        self
    }

    /// The backend plans run on.
    pub fn backend(&self) -> Backend {
        self.plans.backend()
    }

    /// One training step on `(x, target)`; returns the loss (before the update).
    pub fn step(&mut self, x: &Tensor, target: &Tensor) -> Result<Tensor, CompileError> {
        // Parameter gradients never leave the graph here, so hooks on them could not fire.
        for (name, p) in self.module.named_parameters() {
            if p.has_grad_hooks() {
                return Err(CompileError {
                    op: String::new(),
                    module_path: name.clone(),
                    message: format!(
                        "compile_train_step: parameter {name} has gradient hooks, which a compiled train step cannot run yet; use compile() with an eager optimizer"
                    ),
                });
            }
        }
        let sig = signature_of(self.module, &[x.detach(), target.detach()]);
        let (module, backend) = (self.module, self.plans.backend());
        let (loss_fn, optimizer) = (&self.loss_fn, &self.optimizer);
        let plan = self.plans.get_or_build(module, sig, |sig| build_step(module, loss_fn, optimizer, backend, sig))?;
        let slots = self.optimizer.slots().len();
        // Optimizer state starts at zero (made before any parameter storage is donated).
        for &j in &plan.updated {
            let p = &plan.lifted[j];
            self.state.entry(p.id()).or_insert_with(|| vec![Buffer::zeros(p.dtype(), &p.shape()); slots]);
        }
        let mut args: Vec<Buffer> = vec![x.buffer(), target.buffer()];
        let donated: Vec<bool> = (0..plan.lifted.len()).map(|j| plan.donate && plan.updated.contains(&j)).collect();
        args.extend(plan.lifted.iter().zip(&donated).map(|(t, &d)| if d { t.take_storage() } else { t.buffer() }));
        if let Some(rng) = &plan.rng {
            rng.feed(&mut args, 2);
        }
        args.push(Buffer::scalar(self.lr, DType::F32));
        args.push(Buffer::scalar(self.step as f64, DType::F32));
        for &j in &plan.updated {
            let p = &plan.lifted[j];
            args.extend(self.state[&p.id()].iter().cloned());
        }
        let runner = Runner { root: Some(self.module), specs: &plan.callbacks, state: None };
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
        Ok(Tensor::from_buffer(loss))
    }
}

/// Traces `loss_fn(module(x), y)` and runs the pipeline: differentiates w.r.t. the
/// parameters, emits the optimizer's update, optimizes and compiles the plan for `backend`.
fn build_step(
    module: &dyn Module,
    loss_fn: &LossFn<'_>,
    optimizer: &StepOptimizer,
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
    let donate = traced.callbacks.is_empty();
    let opts = Options { goal: Goal::TrainStep(optimizer), wrt, hooked: false, donate, backend, dump: false };
    let mut built = pipeline::run(traced, &opts)?;
    Ok(StepPlan {
        exec: built.take_exec()?,
        graph: built.forward,
        compile_time: t0.elapsed(),
        lifted: built.lifted,
        updates: built.updates,
        updated: built.wrt.iter().map(|&i| i - n_data).collect(),
        callbacks: built.callbacks,
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
