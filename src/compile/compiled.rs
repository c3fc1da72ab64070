//! `compile(&module)`: a [`CompiledModule`] that traces `forward` per input signature, optimizes
//! the graph, caches the plan and runs it on the reference interpreter. Hooks run at run time
//! as callback nodes, with real tensors.

use std::sync::Arc;

use tracegrad_compiler::autodiff::append_backward;
use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::interpret::{interpret, CallbackRunner, NoCallbacks};
use tracegrad_compiler::partition::partition;
use tracegrad_compiler::passes::PassManager;
use tracegrad_compiler::TensorType;
use tracegrad_runtime::{Buffer, ShapeDisplay};

use super::trace::{trace_module, CallbackSpec, CompileError};
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
}

/// One compiled specialisation.
pub struct Plan {
    /// The optimized forward graph. With a backward, its outputs are the result then the
    /// values saved for the backward.
    pub graph: tracegrad_compiler::graph::Graph,
    /// The optimized backward graph (saved values and the output gradient in, one gradient
    /// per `wrt` entry out), when the call needs gradients.
    pub backward: Option<Arc<tracegrad_compiler::graph::Graph>>,
    /// Which call arguments get gradients: indices into (data inputs ++ lifted tensors).
    wrt: Vec<usize>,
    /// Buffers the forward writes (BatchNorm running statistics); forward outputs
    /// `1..=updates.len()` hold their new values.
    updates: Vec<Tensor>,
    /// The pass manager's timings for this plan.
    pub pass_report: String,
    lifted: Vec<Tensor>,
    callbacks: Vec<CallbackSpec>,
}

/// A module compiled into static-graph plans (see [`compile`]).
pub struct CompiledModule<'m> {
    module: &'m dyn Module,
    plans: Vec<(Signature, Plan)>,
    reasons: Vec<String>,
    last: Option<Signature>,
}

/// Compiles `module`: each call looks up the plan for its input signature (shapes, dtypes,
/// requires_grad, train/eval, grad mode and the hook set), tracing and optimizing on a miss.
pub fn compile<M: Module>(module: &M) -> CompiledModule<'_> {
    compile_dyn(module)
}

/// [`compile`] for a `&dyn Module`.
pub fn compile_dyn(module: &dyn Module) -> CompiledModule<'_> {
    CompiledModule { module, plans: Vec::new(), reasons: Vec::new(), last: None }
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
    if why.is_empty() {
        why.push("new signature".into());
    }
    why.join("; ")
}

pub(crate) struct Runner<'a> {
    pub(crate) root: &'a dyn Module,
    pub(crate) specs: &'a [CallbackSpec],
}

fn to_tensors(bufs: &[Buffer]) -> Vec<Tensor> {
    bufs.iter().map(|b| Tensor::from_buffer(b.clone())).collect()
}

fn check_same(path: &str, what: &str, old: &Buffer, new: &Tensor) -> Result<Buffer, String> {
    let nb = new.buffer();
    if TensorType::of(&nb) != TensorType::of(old) {
        return Err(format!(
            "the {what} of {path} returned {} where {} was expected (a compiled module's hooks must keep shape and dtype)",
            TensorType::of(&nb),
            TensorType::of(old)
        ));
    }
    Ok(nb)
}

impl CallbackRunner for Runner<'_> {
    fn run(&self, id: usize, args: &[Buffer]) -> Result<Vec<Buffer>, String> {
        let spec = &self.specs[id];
        let path = spec.path();
        let module = self.root.get_submodule(path).map_err(|e| e.to_string())?;
        crate::no_grad(|| match spec {
            CallbackSpec::ForwardPre { hook, .. } => match hook(&*module, &to_tensors(args)) {
                None => Ok(args.to_vec()),
                Some(new) => {
                    if new.len() != args.len() {
                        return Err(format!(
                            "the forward pre-hook of {path} returned {} inputs, expected {}",
                            new.len(),
                            args.len()
                        ));
                    }
                    args.iter().zip(&new).map(|(a, n)| check_same(path, "forward pre-hook", a, n)).collect()
                }
            },
            CallbackSpec::Forward { hook, n_args, .. } => {
                let ts = to_tensors(args);
                let out = &ts[*n_args];
                match hook(&*module, &ts[..*n_args], out) {
                    None => Ok(vec![args[*n_args].clone()]),
                    Some(new) => Ok(vec![check_same(path, "forward hook", &args[*n_args], &new)?]),
                }
            }
        })
    }
}

pub(crate) fn op_error(e: tracegrad_compiler::OpError) -> CompileError {
    CompileError { op: e.op, module_path: String::new(), message: e.message }
}

pub(crate) fn optimize(g: &mut Graph) -> Result<String, CompileError> {
    let mut pm = PassManager::standard();
    pm.validate = cfg!(debug_assertions);
    pm.run(g).map_err(op_error)?;
    Ok(pm.report())
}

/// Traces, differentiates (when the signature needs gradients), partitions and optimizes.
fn build_plan(module: &dyn Module, sig: &Signature) -> Result<Plan, CompileError> {
    let traced = trace_module(module, &sig.inputs)?;
    let mut graph = traced.graph;
    let n_data = sig.inputs.len();
    let wrt: Vec<usize> = if sig.grad_enabled {
        (0..n_data)
            .filter(|&i| sig.inputs[i].1 && sig.inputs[i].0.dtype.is_float())
            .chain(traced.lifted_inputs.iter().enumerate().filter(|(_, t)| t.requires_grad()).map(|(j, _)| n_data + j))
            .collect()
    } else {
        Vec::new()
    };
    if wrt.is_empty() {
        let pass_report = optimize(&mut graph)?;
        return Ok(Plan {
            graph,
            backward: None,
            wrt,
            updates: traced.updates,
            pass_report,
            lifted: traced.lifted_inputs,
            callbacks: traced.callbacks,
        });
    }
    let y = graph.outputs[0].1;
    let seed = graph.add_input("grad_out", InputRole::Grad, graph.g[y].ty.clone());
    let wrt_nodes: Vec<_> = wrt.iter().map(|&i| graph.inputs[i]).collect();
    let grads = append_backward(&mut graph, &[(y, seed)], &wrt_nodes, &mut |g, group, _| {
        let label = match &g.g[group[0]].kind {
            tracegrad_compiler::graph::NodeKind::Callback { label, .. } => label.clone(),
            _ => String::new(),
        };
        Err(tracegrad_compiler::OpError::new(
            "autodiff",
            format!("compiled backward through a {label} is not supported yet: run the compiled module under no_grad(), or train eagerly"),
        ))
    })
    .map_err(op_error)?;
    // Arguments that do not influence the output get no gradient, as in eager mode.
    let (wrt, grads): (Vec<usize>, Vec<_>) = wrt.into_iter().zip(grads).filter_map(|(w, g)| g.map(|g| (w, g))).unzip();
    let fwd_outputs: Vec<_> = graph.outputs.iter().map(|(_, n)| *n).collect();
    let p = partition(&graph, &fwd_outputs, &[seed], &grads, true).map_err(op_error)?;
    let (mut forward, mut backward) = (p.forward, p.backward);
    let mut report = optimize(&mut forward)?;
    report.push_str("\n-- backward --\n");
    report.push_str(&optimize(&mut backward)?);
    Ok(Plan {
        graph: forward,
        backward: Some(Arc::new(backward)),
        wrt,
        updates: traced.updates,
        pass_report: report,
        lifted: traced.lifted_inputs,
        callbacks: traced.callbacks,
    })
}

/// The plan key for calling `module` on `inputs` now.
pub(crate) fn signature_of(module: &dyn Module, inputs: &[Tensor]) -> Signature {
    Signature {
        inputs: inputs.iter().map(|t| (t.tensor_type(), t.requires_grad())).collect(),
        training: module.training(),
        grad_enabled: crate::is_grad_enabled(),
        global_hooks: crate::nn::global_hooks_version(),
        hooks: hook_states(module),
    }
}

impl CompiledModule<'_> {
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
        let idx = match self.plans.iter().position(|(s, _)| *s == sig) {
            Some(i) => i,
            None => {
                let reason = match &self.last {
                    None => "first call".to_string(),
                    Some(old) => describe_change(old, &sig),
                };
                let plan = build_plan(self.module, &sig)?;
                self.reasons.push(reason);
                self.plans.push((sig.clone(), plan));
                self.plans.len() - 1
            }
        };
        self.last = Some(sig);
        let plan = &self.plans[idx].1;
        let mut all: Vec<Tensor> = inputs.to_vec();
        all.extend(plan.lifted.iter().cloned());
        let args: Vec<Buffer> = all.iter().map(|t| t.buffer()).collect();
        let runner = Runner { root: self.module, specs: &plan.callbacks };
        let mut out = interpret(&plan.graph, &args, &runner).map_err(op_error)?;
        let y = out.remove(0);
        for (t, b) in plan.updates.iter().zip(out.drain(..plan.updates.len())) {
            t.set_buffer(b);
        }
        let Some(backward) = plan.backward.clone() else {
            return Ok(Tensor::from_buffer(y));
        };
        // The compiled output joins eager autograd: one node whose backward runs the
        // backward graph on the saved values.
        let saved = out;
        let wrt_tensors: Vec<Tensor> = plan.wrt.iter().map(|&i| all[i].clone()).collect();
        let f: crate::autograd::CustomBackward = Arc::new(move |grads: &[Option<Tensor>]| {
            let Some(g) = &grads[0] else { return Ok(vec![None; backward.outputs.len()]) };
            let mut bargs = saved.clone();
            bargs.push(g.buffer());
            let gs = interpret(&backward, &bargs, &NoCallbacks).map_err(|e| e.to_string())?;
            Ok(gs.into_iter().map(|b| Some(Tensor::from_buffer(b))).collect())
        });
        Ok(crate::autograd::custom_op("CompiledFunction", &wrt_tensors, vec![y], f).remove(0))
    }

    /// Why each plan was compiled, oldest first (`first call`, `input 0 shape [64, 784] -> [32, 784]`,
    /// `hook added on fc1`).
    pub fn recompile_reasons(&self) -> &[String] {
        &self.reasons
    }

    /// The plan the last call used.
    pub fn last_plan(&self) -> Option<&Plan> {
        let last = self.last.as_ref()?;
        self.plans.iter().find(|(s, _)| s == last).map(|(_, p)| p)
    }

    /// Number of cached plans.
    pub fn plan_count(&self) -> usize {
        self.plans.len()
    }
}
