//! The compile pipeline, written once: from a traced graph through autodiff, partitioning and
//! the optimization passes to code generation.
//!
//! `compile` (compiled.rs), `compile_train_step` (train_step.rs) and `tracegrad dump` (dump.rs)
//! all call [`run`], and pick which call arguments get gradients with [`grad_inputs`], so a
//! dumped stage is a snapshot of exactly the graph `compile` runs at that point.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tracegrad_compiler::autodiff::append_backward_hooked;
use tracegrad_compiler::graph::{Graph, InputRole, NodeId, NodeKind};
use tracegrad_compiler::partition::partition;
use tracegrad_compiler::passes::PassManager;
use tracegrad_compiler::{OpError, TensorType};
use tracegrad_jit::{Backend, Executable};

use super::compiled::callback_vjp;
use super::param_hooks::append_param_hooks;
use super::trace::{CallbackSpec, CompileError, RngInput, Traced};
use super::train_step::{append_tail, StepTail};
use crate::autograd::GradHook;
use crate::tensor::Tensor;

/// What the pipeline builds.
pub(crate) enum Goal<'a> {
    /// `compile`: the forward and, when some argument gets a gradient, a backward that takes
    /// the output gradient as an input. The joint graph is partitioned into the two.
    Call,
    /// `compile_train_step`: one graph computing the scalar loss (the traced output), its
    /// gradients and what the step does with them (`StepTail`: clipping, accumulation and the
    /// optimizer's update of every parameter that gets one).
    TrainStep(StepTail<'a>),
}

/// How to run the pipeline.
pub(crate) struct Options<'a> {
    pub(crate) goal: Goal<'a>,
    /// Graph inputs (indices into `Graph::inputs`: data inputs, then lifted tensors) to
    /// differentiate with respect to; see [`grad_inputs`].
    pub(crate) wrt: Vec<usize>,
    /// Train step: the updated parameters' storage may be overwritten in place.
    pub(crate) donate: bool,
    pub(crate) backend: Backend,
    /// A dump asked: keep a copy of every intermediate stage, validate after every pass, and
    /// generate no code. (The copies cost a clone per stage, so `compile` never makes them.)
    pub(crate) dump: bool,
}

/// Copies of the intermediate graphs, made only for a dump ([`Options::dump`]). (The traced
/// graph is the pipeline's input: the caller has it.)
#[derive(Default)]
pub(crate) struct Snapshots {
    /// Forward plus backward, with one output per gradient appended.
    pub(crate) joint: Option<Graph>,
    /// The forward half of the partition, before the passes (the traced graph when nothing
    /// gets a gradient).
    pub(crate) forward: Option<Graph>,
    /// The backward half of the partition, before the passes.
    pub(crate) backward: Option<Graph>,
}

/// Everything the pipeline made.
pub(crate) struct Built {
    /// The optimized forward graph; for a train step, the whole step.
    pub(crate) forward: Graph,
    /// The optimized backward graph (`Goal::Call` with gradients).
    pub(crate) backward: Option<Graph>,
    /// `forward` compiled for the backend (none for a dump).
    pub(crate) exec: Option<Executable>,
    /// `backward` compiled for the backend (none for a dump).
    pub(crate) backward_exec: Option<Executable>,
    /// The entries of [`Options::wrt`] that got a gradient, in order: an argument that does
    /// not influence the result gets none, as in eager mode.
    pub(crate) wrt: Vec<usize>,
    /// The trace's callbacks, then those the backward added.
    pub(crate) callbacks: Vec<CallbackSpec>,
    /// The trace's lifted tensors (graph inputs after the data inputs).
    pub(crate) lifted: Vec<Tensor>,
    /// The buffers the forward writes (graph outputs `1..=updates.len()`).
    pub(crate) updates: Vec<Tensor>,
    /// Set when a tensor hook registered inside the traced forward is removed: the plan
    /// is stale from then on.
    pub(crate) hook_flags: Vec<Arc<AtomicBool>>,
    /// The pass manager's timings.
    pub(crate) report: String,
    /// The generator-state input, when the trace drew random values.
    pub(crate) rng: Option<RngInput>,
    pub(crate) snapshots: Snapshots,
}

impl Built {
    /// The forward's executable, which every run but a dump's has.
    pub(crate) fn take_exec(&mut self) -> Result<Executable, CompileError> {
        self.exec.take().ok_or_else(|| internal("the pipeline ran without code generation"))
    }
}

fn internal(message: &str) -> CompileError {
    CompileError { op: "pipeline".into(), module_path: String::new(), message: format!("internal: {message}") }
}

/// Which call arguments `compile` differentiates with respect to, as indices into (data
/// inputs ++ lifted tensors), the traced graph's inputs: with grad mode on, every float data
/// input that requires grad and every lifted tensor that requires grad.
pub(crate) fn grad_inputs(data: &[(TensorType, bool)], lifted: &[Tensor], grad_enabled: bool) -> Vec<usize> {
    if !grad_enabled {
        return Vec::new();
    }
    let n_data = data.len();
    (0..n_data)
        .filter(|&i| data[i].1 && data[i].0.dtype.is_float())
        .chain(lifted.iter().enumerate().filter(|(_, t)| t.requires_grad()).map(|(j, _)| n_data + j))
        .collect()
}

pub(crate) fn op_error(e: OpError) -> CompileError {
    CompileError { op: e.op, module_path: String::new(), message: e.message }
}

/// Runs the standard passes on `g`; returns their report.
fn optimize(g: &mut Graph, validate: bool) -> Result<String, CompileError> {
    let mut pm = PassManager::standard();
    pm.validate = validate || cfg!(debug_assertions);
    pm.run(g).map_err(op_error)?;
    Ok(pm.report())
}

/// Compiles a graph for `backend`, with the inputs marked in `donated` writable in place.
fn executable(g: &Graph, backend: Backend, donated: &[bool]) -> Result<Executable, CompileError> {
    Executable::with_donation(g, backend, donated).map_err(|message| CompileError {
        op: "codegen".into(),
        module_path: String::new(),
        message,
    })
}

/// Runs the pipeline on `traced` (see [`Goal`] for what it builds).
pub(crate) fn run(traced: Traced, opts: &Options<'_>) -> Result<Built, CompileError> {
    let Traced { graph, lifted_inputs, callbacks, updates, tensor_hooks, hook_flags, requires_grad, rng } = traced;
    let mut built = Built {
        forward: Graph::new(),
        backward: None,
        exec: None,
        backward_exec: None,
        wrt: Vec::new(),
        callbacks: Vec::new(),
        lifted: lifted_inputs,
        updates,
        hook_flags,
        report: String::new(),
        rng,
        snapshots: Snapshots::default(),
    };
    let mut hooks = Hooks { callbacks: RefCell::new(callbacks), tensor_hooks, requires_grad };
    match opts.goal {
        Goal::TrainStep(tail) => train_step(graph, tail, &mut hooks, opts, &mut built)?,
        Goal::Call if opts.wrt.is_empty() => forward_only(graph, opts, &mut built)?,
        Goal::Call => forward_backward(graph, &mut hooks, opts, &mut built)?,
    }
    built.callbacks = hooks.callbacks.into_inner();
    Ok(built)
}

/// The trace's hooks, which the backward extends.
struct Hooks {
    callbacks: RefCell<Vec<CallbackSpec>>,
    tensor_hooks: Vec<(NodeId, GradHook)>,
    /// The traced nodes that require grad (eager's recorded nodes).
    requires_grad: HashSet<NodeId>,
}

/// Appends the backward of `output` (its gradient held by `seed`) w.r.t. the graph inputs
/// `wrt`; returns those that got a gradient and their gradient nodes.
fn differentiate(
    g: &mut Graph,
    output: NodeId,
    seed: NodeId,
    wrt: &[usize],
    hooks: &mut Hooks,
) -> Result<(Vec<usize>, Vec<NodeId>), CompileError> {
    let wrt_nodes: Vec<NodeId> = wrt.iter().map(|&i| g.inputs[i]).collect();
    let Hooks { callbacks, tensor_hooks, .. } = hooks;
    let grads = append_backward_hooked(
        g,
        &[(output, seed)],
        &wrt_nodes,
        &mut |g, group, grads| callback_vjp(g, &mut callbacks.borrow_mut(), group, grads),
        &mut |g, n, mut grad| {
            for (_, hook) in tensor_hooks.iter().filter(|(node, _)| *node == n) {
                let id = callbacks.borrow().len();
                callbacks.borrow_mut().push(CallbackSpec::TensorHook { hook: hook.clone() });
                let ty = g.ty(grad).clone();
                grad = g.add_callback(id, "tensor hook", &[grad], &[ty])[0];
            }
            Ok(grad)
        },
    )
    .map_err(op_error)?;
    Ok(wrt.iter().zip(grads).filter_map(|(&w, g)| g.map(|g| (w, g))).unzip())
}

/// `Goal::Call` with nothing to differentiate: the traced graph, optimized.
fn forward_only(mut graph: Graph, opts: &Options<'_>, built: &mut Built) -> Result<(), CompileError> {
    if opts.dump {
        built.snapshots.joint = Some(graph.clone());
        built.snapshots.forward = Some(graph.clone());
    }
    built.report = optimize(&mut graph, opts.dump)?;
    if !opts.dump {
        built.exec = Some(executable(&graph, opts.backend, &[])?);
    }
    built.forward = graph;
    Ok(())
}

/// `Goal::Call` with gradients: the joint graph, partitioned into a forward that also returns
/// the values the backward saves, and a backward from those and the output gradient.
fn forward_backward(
    mut graph: Graph,
    hooks: &mut Hooks,
    opts: &Options<'_>,
    built: &mut Built,
) -> Result<(), CompileError> {
    let y = graph.outputs[0].1;
    let seed = graph.add_input("grad_out", InputRole::Grad, graph.ty(y).clone());
    let (wrt, grads) = differentiate(&mut graph, y, seed, &opts.wrt, hooks)?;
    let fwd_outputs: Vec<NodeId> = graph.outputs.iter().map(|(_, n)| *n).collect();
    if opts.dump {
        let mut joint = graph.clone();
        for (k, &gr) in grads.iter().enumerate() {
            joint.add_output(&format!("grad{k}"), gr);
        }
        built.snapshots.joint = Some(joint);
    }
    let p = partition(&graph, &fwd_outputs, &[seed], &grads, true).map_err(op_error)?;
    let (mut forward, mut backward) = (p.forward, p.backward);
    if opts.dump {
        built.snapshots.forward = Some(forward.clone());
        built.snapshots.backward = Some(backward.clone());
    }
    let mut report = optimize(&mut forward, opts.dump)?;
    report.push_str("\n-- backward --\n");
    report.push_str(&optimize(&mut backward, opts.dump)?);
    if !opts.dump {
        built.exec = Some(executable(&forward, opts.backend, &[])?);
        built.backward_exec = Some(executable(&backward, opts.backend, &[])?);
    }
    (built.forward, built.backward, built.wrt, built.report) = (forward, Some(backward), wrt, report);
    Ok(())
}

/// When a parameter has gradient hooks, the gradients of `params` pass through their
/// callback ([`append_param_hooks`]) before the update reads them.
fn parameter_hooks(
    graph: &mut Graph,
    loss: NodeId,
    params: &[NodeId],
    grads: Vec<NodeId>,
    lifted: &[Tensor],
    n_data: usize,
    hooks: &Hooks,
) -> Vec<NodeId> {
    let named: Vec<(NodeId, Tensor, String)> = params
        .iter()
        .map(|&p| {
            let k = graph.inputs.iter().position(|&i| i == p).expect("a parameter is a graph input") - n_data;
            let name = match graph.kind(p) {
                NodeKind::Input { name, .. } => name.clone(),
                _ => String::new(),
            };
            (p, lifted[k].clone(), name)
        })
        .collect();
    if !named.iter().any(|(_, t, _)| t.has_grad_hooks()) {
        return grads;
    }
    let callbacks = &mut hooks.callbacks.borrow_mut();
    append_param_hooks(graph, callbacks, &named, &grads, loss, &hooks.requires_grad)
}

/// `Goal::TrainStep`: loss, gradients and the update in one graph; the updated parameters
/// are donated when `opts.donate`.
fn train_step(
    mut graph: Graph,
    tail: StepTail<'_>,
    hooks: &mut Hooks,
    opts: &Options<'_>,
    built: &mut Built,
) -> Result<(), CompileError> {
    let loss = graph.outputs[0].1;
    let n_data = graph.inputs.len() - built.lifted.len();
    let ty = graph.ty(loss).clone();
    let seed = tail.loss_seed(&mut graph, &ty).map_err(op_error)?;
    let (wrt, grads) = differentiate(&mut graph, loss, seed, &opts.wrt, hooks)?;
    let params: Vec<NodeId> = wrt.iter().map(|&i| graph.inputs[i]).collect();
    let grads = parameter_hooks(&mut graph, loss, &params, grads, &built.lifted[..], n_data, hooks);
    append_tail(&mut graph, tail, &params, &grads).map_err(op_error)?;
    if opts.dump {
        built.snapshots.joint = Some(graph.clone());
    }
    built.report = optimize(&mut graph, opts.dump)?;
    if !opts.dump {
        let mut donated = vec![false; graph.inputs.len()];
        if opts.donate {
            for &i in &wrt {
                donated[i] = true;
            }
        }
        built.exec = Some(executable(&graph, opts.backend, &donated)?);
    }
    (built.forward, built.wrt) = (graph, wrt);
    Ok(())
}
