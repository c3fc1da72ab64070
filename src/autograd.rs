//! Eager autograd: grad mode, the eager [`Emitter`], graph nodes and the backward engine.
//!
//! A non-leaf tensor points at the `Node` that made it and its output index there. Nodes are
//! either an [`Op`] (one output; its derivative rule is `Op::vjp`, the same rule the AOT
//! autodiff pass uses) or a [`CustomBackward`] with several outputs (module backward hooks use
//! one to see all input gradients at once).
//!
//! The engine follows PyTorch's: it counts, for every node reachable from the root, how many
//! edges lead into it, and runs a node once all of them have delivered, choosing among ready
//! nodes the most recently created (highest sequence number) first, and leaf accumulation
//! before anything else. Gradients arriving at one output from several paths are summed first.
//! Tensor hooks run on that sum, in registration order, and may replace it.

use std::cell::Cell;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tracegrad_compiler::{Build, Emitter, Op, OpResult, TensorType};
use tracegrad_runtime::{Buffer, DType, ShapeDisplay};

use crate::tensor::{eager_ok, lock, Tensor, TensorImpl};
use crate::trace_seam::tracer;

/// A hook on a gradient: returns `Some(g)` to replace it.
pub type GradHook = Arc<dyn Fn(&Tensor) -> Option<Tensor> + Send + Sync>;
/// A hook run after a leaf's `.grad` was updated.
pub type PostAccumulateHook = Arc<dyn Fn(&Tensor) + Send + Sync>;
/// The backward function of a custom node: output gradients in, input gradients out.
pub type CustomBackward = Arc<dyn Fn(&[Option<Tensor>]) -> Result<Vec<Option<Tensor>>, String> + Send + Sync>;

pub(crate) enum NodeKind {
    Op { op: Op, output: Buffer },
    Custom { name: &'static str, backward: CustomBackward },
}

/// One recorded operation of the autograd graph.
pub(crate) struct Node {
    pub(crate) seq: u64,
    pub(crate) kind: NodeKind,
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) outputs: Mutex<Vec<Weak<TensorImpl>>>,
    /// Tensor hooks registered on this node's outputs: (hook id, output index, hook).
    pub(crate) hooks: Mutex<Vec<(u64, usize, GradHook)>>,
}

impl Node {
    pub(crate) fn name(&self) -> &str {
        match &self.kind {
            NodeKind::Op { op, .. } => op.name(),
            NodeKind::Custom { name, .. } => name,
        }
    }

    fn n_outputs(&self) -> usize {
        lock(&self.outputs).len()
    }
}

impl Drop for Node {
    /// Dropping a long chain of nodes would recurse once per node (tensor → node → operand
    /// tensor → …) and overflow the stack; unlink the chain iteratively instead.
    fn drop(&mut self) {
        let mut stack: Vec<Tensor> = std::mem::take(&mut self.inputs);
        while let Some(t) = stack.pop() {
            let Ok(inner) = Arc::try_unwrap(t.0) else { continue };
            let Some((node, _)) = inner.grad_fn else { continue };
            if let Ok(mut node) = Arc::try_unwrap(node) {
                stack.append(&mut node.inputs);
            }
        }
    }
}

static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);
static NEXT_HOOK_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh id for a hook registration.
pub(crate) fn next_hook_id() -> u64 {
    NEXT_HOOK_ID.fetch_add(1, Ordering::Relaxed)
}

fn new_node(kind: NodeKind, inputs: Vec<Tensor>) -> Arc<Node> {
    Arc::new(Node {
        seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
        kind,
        inputs,
        outputs: Mutex::new(Vec::new()),
        hooks: Mutex::new(Vec::new()),
    })
}

fn attach_output(node: &Arc<Node>, buffer: Buffer) -> Tensor {
    let mut outs = lock(&node.outputs);
    let t = Tensor::with_grad_fn(buffer, Some((node.clone(), outs.len())));
    outs.push(Arc::downgrade(&t.0));
    t
}

/// Passes `inputs` through unchanged, recording one node with an output per input whose
/// backward is `backward`. Inputs that do not require grad (or grad mode off) pass through
/// untouched, and their output gradient slot stays `None`.
pub(crate) fn custom_identity(name: &'static str, inputs: &[Tensor], backward: CustomBackward) -> Vec<Tensor> {
    if !is_grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
        return inputs.to_vec();
    }
    let node = new_node(NodeKind::Custom { name, backward }, inputs.to_vec());
    inputs
        .iter()
        .map(|t| {
            if t.requires_grad() {
                attach_output(&node, t.buffer())
            } else {
                // An empty slot: no gradient ever reaches it, as PyTorch's non-differentiable outputs.
                lock(&node.outputs).push(Weak::new());
                t.clone()
            }
        })
        .collect()
}

/// Records one node computing `outputs` from `inputs` (already computed elsewhere, e.g. by a
/// compiled plan) whose backward is `backward`. When grad mode is off or no input requires
/// grad, the outputs are returned as plain tensors.
pub(crate) fn custom_op(
    name: &'static str,
    inputs: &[Tensor],
    outputs: Vec<Buffer>,
    backward: CustomBackward,
) -> Vec<Tensor> {
    if !is_grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
        return outputs.into_iter().map(Tensor::from_buffer).collect();
    }
    let node = new_node(NodeKind::Custom { name, backward }, inputs.to_vec());
    outputs.into_iter().map(|b| attach_output(&node, b)).collect()
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops record autograd history on this thread.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Restores the previous grad mode when dropped.
pub struct GradModeGuard(bool);

impl GradModeGuard {
    /// Sets grad mode to `enabled` until the guard drops.
    pub fn new(enabled: bool) -> GradModeGuard {
        GradModeGuard(GRAD_ENABLED.with(|g| g.replace(enabled)))
    }
}

impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

/// Runs `f` with autograd recording off (`with torch.no_grad():`).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _g = GradModeGuard::new(false);
    f()
}

/// Runs `f` with autograd recording on (`with torch.enable_grad():`).
pub fn enable_grad<R>(f: impl FnOnce() -> R) -> R {
    let _g = GradModeGuard::new(true);
    f()
}

/// The eager emitter: computes each op at once with the reference kernels and records a node
/// when grad mode is on and some operand requires grad.
pub struct Eager;

impl Emitter for Eager {
    type Value = Tensor;

    fn emit(&mut self, op: Op, inputs: &[&Tensor]) -> OpResult<Tensor> {
        if let Some(tracer) = tracer() {
            return tracer.emit(&op, inputs);
        }
        let bufs: Vec<Buffer> = inputs.iter().map(|t| t.buffer()).collect();
        let types: Vec<TensorType> = bufs.iter().map(TensorType::of).collect();
        let out_type = op.infer(&types)?;
        let refs: Vec<&Buffer> = bufs.iter().collect();
        let out = match vector_math(&op, &refs) {
            Some(out) => out,
            None => op.eval(&refs, &out_type)?,
        };
        let record = out_type.dtype.is_float() && is_grad_enabled() && inputs.iter().any(|t| t.requires_grad());
        Ok(if record {
            let node = new_node(NodeKind::Op { op, output: out.clone() }, inputs.iter().map(|&t| t.clone()).collect());
            attach_output(&node, out)
        } else {
            Tensor::from_buffer(out)
        })
    }

    fn value_type(&self, v: &Tensor) -> TensorType {
        v.tensor_type()
    }
}

/// An f32 transcendental (exp, log, tanh, sigmoid, silu, erf, gelu, gelu_tanh) on the JIT's own
/// vector math at the machine's full width (`tracegrad_jit::lanes`): bit for bit what a
/// compiled kernel computes, within the same documented error bounds. f64 keeps the reference
/// kernels (libm), as does `TRACEGRAD_EAGER_KERNELS=reference`.
fn vector_math(op: &Op, inputs: &[&Buffer]) -> Option<Buffer> {
    if inputs.first()?.dtype() != DType::F32 || !crate::eager_kernels::enabled() {
        return None;
    }
    tracegrad_jit::lanes::eval_unary(op, inputs)
}

/// Runs a rule on the eager emitter, panicking with the op's message on misuse.
#[track_caller]
pub(crate) fn eager<R>(f: impl FnOnce(&mut Eager) -> OpResult<R>) -> R {
    eager_ok(f(&mut Eager))
}

/// Why a backward pass failed.
#[derive(Clone, Debug, PartialEq)]
pub struct BackwardError(pub String);

impl fmt::Display for BackwardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackwardError {}

fn add_into(slot: &mut Option<Tensor>, g: Tensor) -> Result<(), BackwardError> {
    *slot = Some(match slot.take() {
        None => g,
        Some(prev) => Eager.add(&prev, &g).map_err(|e| BackwardError(e.to_string()))?,
    });
    Ok(())
}

/// Checks a hook's replacement against the gradient it replaces.
pub(crate) fn check_replacement(what: &str, old: &Tensor, new: &Tensor) -> Result<(), String> {
    if old.shape() != new.shape() || old.dtype() != new.dtype() {
        return Err(format!(
            "{what} returned a gradient of {}{} where {}{} was expected",
            new.dtype(),
            ShapeDisplay(&new.shape()),
            old.dtype(),
            ShapeDisplay(&old.shape())
        ));
    }
    Ok(())
}

fn run_hooks(hooks: &[GradHook], mut g: Tensor, what: &str) -> Result<Tensor, BackwardError> {
    for h in hooks {
        if let Some(new) = h(&g) {
            check_replacement(what, &g, &new).map_err(BackwardError)?;
            g = new;
        }
    }
    Ok(g)
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    // Field order matters for the derived ordering: priority first.
    Ready(u64, usize),
}

/// A leaf's accumulation, as the engine runs it: its tensor hooks on `g` (each may replace
/// it), the sum into `.grad`, then its post-accumulate hooks. A compiled train step runs the
/// same sequence on its parameters' gradients.
pub(crate) fn accumulate_leaf(t: &Tensor, g: Tensor) -> Result<(), BackwardError> {
    let hooks: Vec<GradHook> = lock(&t.0.hooks).iter().map(|(_, h)| h.clone()).collect();
    let g = run_hooks(&hooks, g, "a tensor hook")?;
    add_into(&mut lock(&t.0.grad), g)?;
    let post: Vec<PostAccumulateHook> = lock(&t.0.post_hooks).iter().map(|(_, h)| h.clone()).collect();
    for h in post {
        h(t);
    }
    Ok(())
}

/// Runs backward from `root` seeded with `grad` (already checked against `root`).
fn run_backward(root: &Tensor, grad: Tensor) -> Result<(), BackwardError> {
    let Some((root_node, root_idx)) = root.grad_fn() else {
        return accumulate_leaf(root, grad);
    };
    // Discover the graph: nodes by address, leaves by tensor id; count incoming edges.
    let mut nodes: HashMap<usize, Arc<Node>> = HashMap::new();
    let mut leaves: HashMap<usize, Tensor> = HashMap::new();
    let mut deps: HashMap<usize, usize> = HashMap::new();
    let key = |n: &Arc<Node>| Arc::as_ptr(n) as usize;
    nodes.insert(key(&root_node), root_node.clone());
    let mut stack = vec![root_node.clone()];
    while let Some(n) = stack.pop() {
        for input in n.inputs.iter().filter(|t| t.requires_grad()) {
            match input.grad_fn() {
                Some((m, _)) => {
                    *deps.entry(key(&m)).or_insert(0) += 1;
                    if nodes.insert(key(&m), m.clone()).is_none() {
                        stack.push(m);
                    }
                }
                None => {
                    *deps.entry(input.id()).or_insert(0) += 1;
                    leaves.insert(input.id(), input.clone());
                }
            }
        }
    }
    let mut node_grads: HashMap<usize, Vec<Option<Tensor>>> = HashMap::new();
    let mut leaf_grads: HashMap<usize, Option<Tensor>> = HashMap::new();
    let mut slots = vec![None; root_node.n_outputs()];
    slots[root_idx] = Some(grad);
    node_grads.insert(key(&root_node), slots);
    let mut ready = BinaryHeap::new();
    ready.push(Task::Ready(root_node.seq, key(&root_node)));
    while let Some(Task::Ready(priority, k)) = ready.pop() {
        if priority == u64::MAX {
            let leaf = &leaves[&k];
            if let Some(Some(g)) = leaf_grads.remove(&k) {
                accumulate_leaf(leaf, g)?;
            }
            continue;
        }
        let node = nodes[&k].clone();
        let mut grads = node_grads.remove(&k).unwrap_or_else(|| vec![None; node.n_outputs()]);
        // Tensor hooks on this node's outputs, then retain_grad.
        let hooks: Vec<(usize, GradHook)> = lock(&node.hooks).iter().map(|(_, i, h)| (*i, h.clone())).collect();
        for (i, h) in hooks {
            if let Some(g) = grads[i].take() {
                grads[i] = Some(run_hooks(&[h], g, "a tensor hook")?);
            }
        }
        let outputs: Vec<Weak<TensorImpl>> = lock(&node.outputs).clone();
        for (i, w) in outputs.iter().enumerate() {
            if let (Some(t), Some(g)) = (w.upgrade(), &grads[i]) {
                let t = Tensor(t);
                if t.retains_grad() {
                    add_into(&mut lock(&t.0.grad), g.clone())?;
                }
            }
        }
        let input_grads: Vec<Option<Tensor>> = match &node.kind {
            NodeKind::Op { op, output } => match &grads[0] {
                None => vec![None; node.inputs.len()],
                Some(g) => {
                    let inputs: Vec<&Tensor> = node.inputs.iter().collect();
                    let out = Tensor::from_buffer(output.clone());
                    let needs: Vec<bool> = inputs.iter().map(|t| t.requires_grad()).collect();
                    let mut gs =
                        op.vjp_for(&mut Eager, &inputs, &out, g, &needs).map_err(|e| BackwardError(e.to_string()))?;
                    gs.resize(node.inputs.len(), None);
                    gs
                }
            },
            NodeKind::Custom { name, backward } => {
                let mut gs = backward(&grads).map_err(BackwardError)?;
                if gs.len() != node.inputs.len() {
                    return Err(BackwardError(format!(
                        "{name}: backward returned {} gradients for {} inputs",
                        gs.len(),
                        node.inputs.len()
                    )));
                }
                gs.resize(node.inputs.len(), None);
                gs
            }
        };
        for (input, g) in node.inputs.iter().zip(input_grads) {
            if !input.requires_grad() {
                continue;
            }
            let (dep_key, prio) = match input.grad_fn() {
                Some((m, idx)) => {
                    if let Some(g) = g {
                        let slots = node_grads.entry(key(&m)).or_insert_with(|| vec![None; m.n_outputs()]);
                        add_into(&mut slots[idx], g)?;
                    }
                    (key(&m), m.seq)
                }
                None => {
                    if let Some(g) = g {
                        add_into(leaf_grads.entry(input.id()).or_insert(None), g)?;
                    }
                    (input.id(), u64::MAX)
                }
            };
            let d = deps.get_mut(&dep_key).expect("every edge was counted");
            *d -= 1;
            if *d == 0 {
                ready.push(Task::Ready(prio, dep_key));
            }
        }
    }
    Ok(())
}

impl Tensor {
    /// Backpropagates from a scalar (`loss.backward()`). Panics with the reason on failure.
    #[track_caller]
    pub fn backward(&self) {
        self.try_backward().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Backpropagates `grad` as the gradient of this tensor (`t.backward(grad)`).
    #[track_caller]
    pub fn backward_with(&self, grad: &Tensor) {
        self.try_backward_with(grad).unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`backward`](Self::backward), returning errors (a hook's bad replacement, a missing
    /// derivative rule) instead of panicking.
    pub fn try_backward(&self) -> Result<(), BackwardError> {
        if self.numel() != 1 {
            return Err(BackwardError("grad can be implicitly created only for scalar outputs".into()));
        }
        let ones = Tensor::full_dtype(&self.shape(), 1.0, self.dtype());
        self.try_backward_with(&ones)
    }

    /// [`backward_with`](Self::backward_with), returning errors instead of panicking.
    pub fn try_backward_with(&self, grad: &Tensor) -> Result<(), BackwardError> {
        if !self.requires_grad() {
            return Err(BackwardError("element 0 of tensors does not require grad and does not have a grad_fn".into()));
        }
        if grad.shape() != self.shape() {
            return Err(BackwardError(format!(
                "Mismatch in shape: grad_output[0] has a shape of torch.Size({:?}) and output[0] has a shape of torch.Size({:?}).",
                grad.shape(),
                self.shape()
            )));
        }
        let _mode = GradModeGuard::new(false);
        let grad = if grad.dtype() == self.dtype() {
            grad.detach()
        } else {
            Eager.cast(&grad.detach(), self.dtype()).map_err(|e| BackwardError(e.to_string()))?
        };
        run_backward(self, grad)
    }

    /// Registers a hook on this tensor's gradient (`Tensor.register_hook`). It runs when the
    /// gradient w.r.t. this tensor is complete, and a returned tensor (same shape and dtype)
    /// replaces it.
    #[track_caller]
    pub fn register_hook(
        &self,
        hook: impl Fn(&Tensor) -> Option<Tensor> + Send + Sync + 'static,
    ) -> crate::hooks::RemovableHandle {
        assert!(self.requires_grad(), "cannot register a hook on a tensor that doesn't require gradient");
        let id = next_hook_id();
        let hook: GradHook = Arc::new(hook);
        if let Some(tracer) = tracer().filter(|_| self.is_symbolic()) {
            // The hook becomes part of the compiled plan; removing it stops it at once and
            // makes the plan stale, so the next call traces again.
            let (handle, removed) = crate::hooks::RemovableHandle::with_flag();
            tracer.tensor_hook(self, hook, removed);
            return handle;
        }
        match self.grad_fn() {
            None => {
                lock(&self.0.hooks).push((id, hook));
                let weak = Arc::downgrade(&self.0);
                crate::hooks::RemovableHandle::new(move || {
                    if let Some(t) = weak.upgrade() {
                        lock(&t.hooks).retain(|(i, _)| *i != id);
                    }
                })
            }
            Some((node, idx)) => {
                lock(&node.hooks).push((id, idx, hook));
                let weak = Arc::downgrade(&node);
                crate::hooks::RemovableHandle::new(move || {
                    if let Some(n) = weak.upgrade() {
                        lock(&n.hooks).retain(|(i, _, _)| *i != id);
                    }
                })
            }
        }
    }

    /// Registers a hook that runs after a leaf's `.grad` has been updated
    /// (`register_post_accumulate_grad_hook`).
    #[track_caller]
    pub fn register_post_accumulate_grad_hook(
        &self,
        hook: impl Fn(&Tensor) + Send + Sync + 'static,
    ) -> crate::hooks::RemovableHandle {
        assert!(self.is_leaf(), "post accumulate grad hooks cannot be registered on non-leaf tensors");
        assert!(self.requires_grad(), "cannot register a hook on a tensor that doesn't require gradient");
        let id = next_hook_id();
        lock(&self.0.post_hooks).push((id, Arc::new(hook)));
        let weak = Arc::downgrade(&self.0);
        crate::hooks::RemovableHandle::new(move || {
            if let Some(t) = weak.upgrade() {
                lock(&t.post_hooks).retain(|(i, _)| *i != id);
            }
        })
    }
}
