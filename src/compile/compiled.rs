//! `compile(&module)`: a [`CompiledModule`] that traces `forward` per input signature, optimizes
//! the graph, caches the plan and runs it on the JIT executor (fused Cranelift kernels) or,
//! when asked, on the reference interpreter. Hooks run at run time as callback nodes, with
//! real tensors.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracegrad_compiler::graph::{Graph, NodeId};
use tracegrad_compiler::Build;
use tracegrad_compiler::TensorType;
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, ShapeDisplay};

pub(crate) use super::callbacks::{CallState, Runner};
use super::pipeline::{self, grad_inputs, op_error, Goal, Options};
use super::trace::{trace_module, CallbackSpec, CompileError, RngInput};
use crate::nn::{Module, ModuleExt};
use crate::tensor::Tensor;

/// What a plan is specialised on. Any change recompiles.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Signature {
    pub(crate) inputs: Vec<(TensorType, bool)>,
    training: bool,
    grad_enabled: bool,
    /// The global hook set's version.
    global_hooks: u64,
    /// Per module path: hook-set version and hook count.
    hooks: Vec<(String, u64, usize)>,
    /// A train step's parameters with gradient hooks, which run inside its plan (a compiled
    /// module's parameters run theirs in the eager engine: empty there).
    pub(crate) param_hooks: Vec<String>,
}

/// A cached plan: the removal flags of the tensor hooks its forward registered.
pub(crate) trait CachedPlan {
    fn hook_flags(&self) -> &[Arc<AtomicBool>];
}

/// One compiled specialisation.
pub struct Plan {
    /// The optimized forward graph (what `tracegrad dump --stage optimized` shows). With a
    /// backward, its outputs are the result, the buffer updates, then the values saved for the
    /// backward.
    pub graph: Graph,
    /// The optimized backward graph (saved values and the output gradient in, one gradient
    /// per `wrt` entry out), when the call needs gradients.
    pub backward: Option<Arc<Graph>>,
    /// The forward graph compiled for the module's backend.
    pub exec: Executable,
    /// The backward graph compiled for the module's backend.
    pub backward_exec: Option<Arc<Executable>>,
    /// Wall time of tracing, autodiff, passes and code generation for this plan.
    pub compile_time: std::time::Duration,
    /// Which call arguments get gradients: indices into (data inputs ++ lifted tensors).
    wrt: Vec<usize>,
    /// Buffers the forward writes (BatchNorm running statistics); forward outputs
    /// `1..=updates.len()` hold their new values.
    updates: Vec<Tensor>,
    /// The pass manager's timings for this plan.
    pub pass_report: String,
    lifted: Vec<Tensor>,
    callbacks: Arc<Vec<CallbackSpec>>,
    hook_flags: Vec<Arc<AtomicBool>>,
    rng: Option<RngInput>,
}

impl CachedPlan for Plan {
    fn hook_flags(&self) -> &[Arc<AtomicBool>] {
        &self.hook_flags
    }
}

/// A module compiled into static-graph plans (see [`compile`]).
pub struct CompiledModule<'m> {
    module: &'m dyn Module,
    plans: PlanCache<Plan>,
}

/// Plans keyed by signature, with why each was compiled and which one the last call used
/// (shared by [`CompiledModule`] and the compiled train step).
pub(crate) struct PlanCache<P> {
    plans: Vec<(Signature, P)>,
    reasons: Vec<String>,
    last: Option<Signature>,
    /// The backend every cached plan runs on.
    backend: Backend,
}

impl<P> Default for PlanCache<P> {
    fn default() -> Self {
        PlanCache { plans: Vec::new(), reasons: Vec::new(), last: None, backend: Backend::default() }
    }
}

impl<P: CachedPlan> PlanCache<P> {
    /// The plan for `sig`; on a miss, `build` makes it and the reason is recorded (and logged
    /// with `TRACEGRAD_LOG`). A plan one of whose forward's tensor hooks was removed is
    /// dropped and built again.
    pub(crate) fn get_or_build(
        &mut self,
        module: &dyn Module,
        sig: Signature,
        build: impl FnOnce(&Signature) -> Result<P, CompileError>,
    ) -> Result<&P, CompileError> {
        let mut stale = None;
        if let Some(i) = self.plans.iter().position(|(s, _)| *s == sig) {
            let removed = self.plans[i].1.hook_flags().iter().filter(|f| f.load(Ordering::Acquire)).count();
            if removed > 0 {
                self.plans.remove(i);
                stale = Some(match removed {
                    1 => "a tensor hook registered inside forward was removed".to_string(),
                    n => format!("{n} tensor hooks registered inside forward were removed"),
                });
            }
        }
        let idx = match self.plans.iter().position(|(s, _)| *s == sig) {
            Some(i) => i,
            None => {
                let reason = match (stale, &self.last) {
                    (Some(why), _) => why,
                    (None, None) => "first call".to_string(),
                    (None, Some(old)) => describe_change(old, &sig),
                };
                log_recompile(module, &reason);
                let plan = build(&sig)?;
                self.reasons.push(reason);
                self.plans.push((sig.clone(), plan));
                self.plans.len() - 1
            }
        };
        self.last = Some(sig);
        Ok(&self.plans[idx].1)
    }
}

impl<P> PlanCache<P> {
    /// Files the last-used plan under `sig` instead: for a key that the build itself changed
    /// (a parameter hook registered inside the traced forward, which the plan runs).
    pub(crate) fn rekey_last(&mut self, sig: Signature) {
        if let Some(last) = self.last.take() {
            if let Some(entry) = self.plans.iter_mut().find(|(s, _)| *s == last) {
                entry.0 = sig.clone();
            }
            self.last = Some(sig);
        }
    }

    /// Drops every plan (the next call compiles afresh).
    pub(crate) fn clear(&mut self) {
        self.plans.clear();
        self.last = None;
    }

    /// Selects the backend for plans built from now on; cached plans of another backend are
    /// dropped, so every later call runs on `backend`.
    pub(crate) fn set_backend(&mut self, backend: Backend) {
        if backend != self.backend {
            self.clear();
        }
        self.backend = backend;
    }

    /// The backend plans run on.
    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    /// Why each plan was compiled, oldest first.
    pub(crate) fn reasons(&self) -> &[String] {
        &self.reasons
    }

    /// The plan the last call used.
    pub(crate) fn last(&self) -> Option<&P> {
        let last = self.last.as_ref()?;
        self.plans.iter().find(|(s, _)| s == last).map(|(_, p)| p)
    }

    /// Number of cached plans.
    pub(crate) fn len(&self) -> usize {
        self.plans.len()
    }
}

/// Compiles `module`: each call looks up the plan for its input signature (shapes, dtypes,
/// requires_grad, train/eval, grad mode and the hook set), tracing, optimizing and generating
/// code on a miss. Plans run on the JIT; [`CompiledModule::with_backend`] selects the
/// interpreter.
pub fn compile<M: Module>(module: &M) -> CompiledModule<'_> {
    compile_dyn(module)
}

/// [`compile`] for a `&dyn Module`.
pub fn compile_dyn(module: &dyn Module) -> CompiledModule<'_> {
    CompiledModule { module, plans: PlanCache::default() }
}

fn hook_states(m: &dyn Module) -> Vec<(String, u64, usize)> {
    m.named_modules()
        .into_iter()
        .map(|(p, sub)| {
            let (v, n) = crate::nn::hook_state(&*sub);
            (p, v, n)
        })
        .collect()
}

pub(crate) fn describe_change(old: &Signature, new: &Signature) -> String {
    let mut why = Vec::new();
    if old.inputs.len() != new.inputs.len() {
        why.push(format!("{} inputs -> {}", old.inputs.len(), new.inputs.len()));
    }
    for (i, ((a, ga), (b, gb))) in old.inputs.iter().zip(&new.inputs).enumerate() {
        if a.shape != b.shape {
            why.push(format!("input {i} shape {} -> {}", ShapeDisplay(&a.shape), ShapeDisplay(&b.shape)));
        }
        if a.dtype != b.dtype {
            why.push(format!("input {i} dtype {} -> {}", a.dtype, b.dtype));
        }
        if ga != gb {
            why.push(format!("input {i} requires_grad {ga} -> {gb}"));
        }
    }
    if old.training != new.training {
        why.push(format!(
            "mode {} -> {}",
            if old.training { "train" } else { "eval" },
            if new.training { "train" } else { "eval" }
        ));
    }
    if old.grad_enabled != new.grad_enabled {
        why.push(format!("grad mode {} -> {}", old.grad_enabled, new.grad_enabled));
    }
    if old.global_hooks != new.global_hooks {
        why.push("global module hooks changed".into());
    }
    for ((p, va, a), (_, vb, b)) in old.hooks.iter().zip(&new.hooks) {
        if va != vb {
            let at = if p.is_empty() { "the root module" } else { p };
            why.push(match b.cmp(a) {
                std::cmp::Ordering::Greater => format!("hook added on {at}"),
                std::cmp::Ordering::Less => format!("hook removed on {at}"),
                std::cmp::Ordering::Equal => format!("hooks replaced on {at}"),
            });
        }
    }
    for p in new.param_hooks.iter().filter(|p| !old.param_hooks.contains(p)) {
        why.push(format!("gradient hook added on parameter {p}"));
    }
    for p in old.param_hooks.iter().filter(|p| !new.param_hooks.contains(p)) {
        why.push(format!("gradient hooks removed from parameter {p}"));
    }
    if why.is_empty() {
        why.push("new signature".into());
    }
    why.join("; ")
}

/// Traces, then runs the pipeline: differentiates when the signature needs gradients,
/// partitions, optimizes and compiles for `backend`.
fn build_plan(module: &dyn Module, sig: &Signature, backend: Backend) -> Result<Plan, CompileError> {
    let t0 = std::time::Instant::now();
    let traced = trace_module(module, &sig.inputs)?;
    let wrt = grad_inputs(&sig.inputs, &traced.lifted_inputs, sig.grad_enabled);
    let opts = Options { goal: Goal::Call, wrt, donate: false, backend, dump: false };
    let mut built = pipeline::run(traced, &opts)?;
    let exec = built.take_exec()?;
    Ok(Plan {
        graph: built.forward,
        backward: built.backward.map(Arc::new),
        exec,
        backward_exec: built.backward_exec.map(Arc::new),
        compile_time: t0.elapsed(),
        wrt: built.wrt,
        updates: built.updates,
        pass_report: built.report,
        lifted: built.lifted,
        callbacks: Arc::new(built.callbacks),
        hook_flags: built.hook_flags,
        rng: built.rng,
    })
}

/// The backward of a callback group: a backward-graph callback whose operands are the
/// group's output gradients (zeros where none arrives) and whose results are the gradients
/// of the forward callback's operands.
pub(crate) fn callback_vjp(
    g: &mut Graph,
    callbacks: &mut Vec<CallbackSpec>,
    group: &[NodeId],
    grads: &[Option<NodeId>],
) -> tracegrad_compiler::OpResult<Vec<Option<NodeId>>> {
    use tracegrad_compiler::graph::NodeKind;
    let NodeKind::Callback { id, label, .. } = g.kind(group[0]).clone() else { unreachable!("callback group") };
    let operands = g.operands(group[0]);
    let grad_nodes: Vec<_> = group
        .iter()
        .zip(grads)
        .map(|(&p, gr)| match gr {
            Some(n) => Ok(*n),
            None => g.zeros_like(&p),
        })
        .collect::<tracegrad_compiler::OpResult<_>>()?;
    let (spec, what) = match &callbacks[id] {
        CallbackSpec::ForwardPre { .. } | CallbackSpec::Forward { .. } => {
            (CallbackSpec::ReplayBackward { forward: id }, format!("backward of the {label}"))
        }
        CallbackSpec::ModuleInputs { .. } => (CallbackSpec::FullBackward { inputs_callback: id }, label.clone()),
        CallbackSpec::ModuleOutput { .. } => (CallbackSpec::BackwardPre { output_callback: id }, label.clone()),
        _ => return Err(tracegrad_compiler::OpError::new("autodiff", format!("callback {label} has no derivative"))),
    };
    let out_types: Vec<TensorType> = match &callbacks[id] {
        // Grads of a module's inputs/outputs have the types of those values.
        CallbackSpec::ModuleInputs { .. } | CallbackSpec::ModuleOutput { .. } => {
            group.iter().map(|&p| g.ty(p).clone()).collect()
        }
        _ => operands.iter().map(|&o| g.ty(o).clone()).collect(),
    };
    let new_id = callbacks.len();
    callbacks.push(spec);
    let outs = g.add_callback(new_id, &what, &grad_nodes, &out_types);
    Ok(outs.into_iter().zip(&operands).map(|(n, &o)| g.ty(o).dtype.is_float().then_some(n)).collect())
}

/// With `TRACEGRAD_LOG` set, says on stderr why a plan is being compiled.
pub(crate) fn log_recompile(module: &dyn Module, reason: &str) {
    if std::env::var_os("TRACEGRAD_LOG").is_some() {
        eprintln!("tracegrad: compiling {} ({reason})", module.type_name());
    }
}

/// The plan key for calling `module` on `inputs` now.
pub(crate) fn signature_of(module: &dyn Module, inputs: &[Tensor]) -> Signature {
    Signature {
        inputs: inputs.iter().map(|t| (t.tensor_type(), t.requires_grad())).collect(),
        training: module.training(),
        grad_enabled: crate::is_grad_enabled(),
        global_hooks: crate::nn::global_hooks_version(),
        hooks: hook_states(module),
        param_hooks: Vec::new(),
    }
}

impl CompiledModule<'_> {
    /// Selects the backend for plans compiled from now on (cached plans are dropped, so every
    /// later call runs on `backend`).
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.plans.set_backend(backend);
        self
    }

    /// The backend plans run on.
    pub fn backend(&self) -> Backend {
        self.plans.backend()
    }

    fn signature(&self, inputs: &[Tensor]) -> Signature {
        signature_of(self.module, inputs)
    }

    /// Runs the module on one input.
    pub fn call(&mut self, x: &Tensor) -> Result<Tensor, CompileError> {
        self.call_many(std::slice::from_ref(x))
    }

    /// Runs the module on several inputs.
    pub fn call_many(&mut self, inputs: &[Tensor]) -> Result<Tensor, CompileError> {
        let sig = self.signature(inputs);
        let (module, backend) = (self.module, self.plans.backend());
        let plan = self.plans.get_or_build(module, sig, |sig| build_plan(module, sig, backend))?;
        let mut all: Vec<Tensor> = inputs.to_vec();
        all.extend(plan.lifted.iter().cloned());
        let mut args: Vec<Buffer> = all.iter().map(|t| t.buffer()).collect();
        if let Some(rng) = &plan.rng {
            rng.feed(&mut args, inputs.len());
        }
        let state = plan.backward.as_ref().map(|_| Arc::new(CallState::default()));
        let runner = Runner { root: Some(self.module), specs: &plan.callbacks, state: state.clone() };
        let mut out = plan.exec.run(&args, &runner).map_err(op_error)?;
        let y = out.remove(0);
        for (t, b) in plan.updates.iter().zip(out.drain(..plan.updates.len())) {
            t.set_buffer(b);
        }
        let Some(backward) = plan.backward_exec.clone() else {
            return Ok(Tensor::from_buffer(y));
        };
        // The compiled output joins eager autograd: one node whose backward runs the
        // backward graph on the saved values.
        let saved = out;
        let wrt_tensors: Vec<Tensor> = plan.wrt.iter().map(|&i| all[i].clone()).collect();
        let specs = plan.callbacks.clone();
        let f: crate::autograd::CustomBackward = Arc::new(move |grads: &[Option<Tensor>]| {
            let Some(g) = &grads[0] else { return Ok(vec![None; backward.graph().outputs.len()]) };
            let mut bargs = saved.clone();
            bargs.push(g.buffer());
            let runner = Runner { root: None, specs: &specs, state: state.clone() };
            let gs = backward.run(&bargs, &runner).map_err(|e| e.to_string())?;
            Ok(gs.into_iter().map(|b| Some(Tensor::from_buffer(b))).collect())
        });
        Ok(crate::autograd::custom_op("CompiledFunction", &wrt_tensors, vec![y], f).remove(0))
    }

    /// Why each plan was compiled, oldest first (`first call`, `input 0 shape [64, 784] -> [32, 784]`,
    /// `hook added on fc1`).
    pub fn recompile_reasons(&self) -> &[String] {
        self.plans.reasons()
    }

    /// The plan the last call used.
    pub fn last_plan(&self) -> Option<&Plan> {
        self.plans.last()
    }

    /// Number of cached plans.
    pub fn plan_count(&self) -> usize {
        self.plans.len()
    }
}
