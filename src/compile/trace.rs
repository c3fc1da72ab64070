//! Tracing: `forward` runs once on symbolic tensors and every op lands in a [`Graph`].
//!
//! While a trace is active on this thread, the `Eager` emitter hands each op to
//! [`trace_emit`]. Operands that are symbolic are graph nodes already. A concrete operand that
//! is one of the module's parameters or buffers is *lifted* to a graph input, so the graph is a
//! pure function and optimizer updates need no recompile. Any other concrete tensor becomes a
//! constant. Module calls open a scope (so nodes carry their module path) and turn the module's
//! forward hooks into callback nodes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use petgraph::stable_graph::NodeIndex;
use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::{Op, OpError, OpResult, TensorType};

use crate::autograd::GradHook;
use crate::nn::{module_id, BackwardHook, BackwardPreHook, ForwardHook, ForwardPreHook, Module, ModuleExt};
use crate::tensor::Tensor;

/// The graph node a symbolic tensor stands for.
#[derive(Clone, Debug)]
pub struct Symbol {
    pub(crate) trace: u64,
    pub(crate) node: NodeIndex,
    pub(crate) ty: TensorType,
}

/// A hook captured as a callback node, with what the runtime needs to call it.
#[derive(Clone)]
pub(crate) enum CallbackSpec {
    /// A forward pre-hook (forward graph).
    ForwardPre { path: String, hook: ForwardPreHook },
    /// A forward hook over (args…, output) (forward graph).
    Forward { path: String, hook: ForwardHook, n_args: usize },
    /// Identity over a module's inputs that carries its full backward hooks (forward graph);
    /// `requires[i]`: whether input i takes a gradient.
    ModuleInputs { path: String, hooks: Vec<BackwardHook>, requires: Vec<bool>, output_callback: usize },
    /// Identity over a module's output that carries its backward pre-hooks (forward graph).
    ModuleOutput {
        path: String,
        pre: Vec<BackwardPreHook>,
        hooks: Vec<BackwardHook>,
        n_inputs: usize,
        inputs_wired: bool,
    },
    /// Backward of a forward (pre-)hook: replays the hook's eager tape (backward graph).
    ReplayBackward { forward: usize },
    /// Full backward hooks on grad_input (backward graph).
    FullBackward { inputs_callback: usize },
    /// Backward pre-hooks on grad_output (backward graph).
    BackwardPre { output_callback: usize },
    /// A tensor hook on a traced tensor's gradient (backward graph).
    TensorHook { hook: GradHook },
}

impl CallbackSpec {
    pub(crate) fn path(&self) -> &str {
        match self {
            CallbackSpec::ForwardPre { path, .. }
            | CallbackSpec::Forward { path, .. }
            | CallbackSpec::ModuleInputs { path, .. }
            | CallbackSpec::ModuleOutput { path, .. } => path,
            _ => "",
        }
    }
}

pub(crate) struct TraceState {
    id: u64,
    pub(crate) graph: Graph,
    /// Concrete tensors already in the graph (lifted inputs and constants), by tensor id.
    lifted: HashMap<usize, NodeIndex>,
    /// Keeps every tensor keyed in `lifted` alive for the whole trace: a tensor id is an
    /// address, and a freed temporary's address can be reused by the next one.
    keepalive: Vec<Tensor>,
    /// The module's parameters and buffers, by tensor id: (name, role, tensor).
    pub(crate) liftable: HashMap<usize, (String, InputRole, Tensor)>,
    /// Lifted tensors in graph-input order (after the data inputs).
    pub(crate) lifted_inputs: Vec<Tensor>,
    module_paths: HashMap<usize, String>,
    pub(crate) callbacks: Vec<CallbackSpec>,
    /// In-place buffer writes (`Tensor::assign`): the target and the node of its new value.
    pub(crate) updates: Vec<(Tensor, NodeIndex)>,
    /// Tensor hooks registered on traced tensors, by node.
    pub(crate) tensor_hooks: Vec<(NodeIndex, GradHook)>,
}

thread_local! {
    static TRACE: RefCell<Option<TraceState>> = const { RefCell::new(None) };
    static SILENT_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static NEXT_TRACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Whether a trace is active on this thread.
pub fn is_tracing() -> bool {
    TRACE.with(|t| t.borrow().is_some())
}

fn with_trace<R>(f: impl FnOnce(&mut TraceState) -> R) -> Option<R> {
    TRACE.with(|t| t.borrow_mut().as_mut().map(f))
}

fn node_of(st: &mut TraceState, t: &Tensor) -> OpResult<NodeIndex> {
    if let Some(s) = t.symbol() {
        if s.trace != st.id {
            return Err(OpError::new("trace", "a symbolic tensor from another trace was used".to_string()));
        }
        return Ok(s.node);
    }
    if let Some(&n) = st.lifted.get(&t.id()) {
        return Ok(n);
    }
    let n = match st.liftable.get(&t.id()).cloned() {
        Some((name, role, tensor)) => {
            // Lifted inputs belong to no module scope: they are the graph's arguments.
            let scope = std::mem::take(&mut st.graph.scope);
            let n = st.graph.add_input(&name, role, tensor.tensor_type());
            st.graph.scope = scope;
            st.lifted_inputs.push(tensor);
            n
        }
        None => st.graph.add_op(Op::Constant(t.buffer()), &[])?,
    };
    st.lifted.insert(t.id(), n);
    st.keepalive.push(t.clone());
    Ok(n)
}

/// Records `op` in the active trace; `None` when no trace is active.
pub(crate) fn trace_emit(op: &Op, inputs: &[&Tensor]) -> Option<OpResult<Tensor>> {
    with_trace(|st| {
        let nodes: Vec<NodeIndex> = inputs.iter().map(|t| node_of(st, t)).collect::<OpResult<_>>()?;
        let n = st.graph.add_op(op.clone(), &nodes)?;
        let ty = st.graph.g[n].ty.clone();
        let rg = ty.dtype.is_float() && crate::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad());
        Ok(Tensor::symbolic(Symbol { trace: st.id, node: n, ty }, rg))
    })
}

fn symbolic_like(st: &TraceState, n: NodeIndex, requires_grad: bool) -> Tensor {
    Tensor::symbolic(Symbol { trace: st.id, node: n, ty: st.graph.g[n].ty.clone() }, requires_grad)
}

/// Records `target ← value` in the active trace. Later reads of `target` in this trace see
/// the new value; the runtime writes it back after the call. `None` when not tracing.
pub(crate) fn trace_assign(target: &Tensor, value: &Tensor) -> Option<Result<(), String>> {
    with_trace(|st| {
        if target.is_symbolic() || !st.liftable.contains_key(&target.id()) {
            return Err("assign: only a module buffer can be written inside a compiled forward".to_string());
        }
        let n = node_of(st, value).map_err(|e| e.to_string())?;
        let want = target.tensor_type();
        let n = if st.graph.g[n].ty.dtype != want.dtype {
            st.graph.add_op(Op::Cast(want.dtype), &[n]).map_err(|e| e.to_string())?
        } else {
            n
        };
        if st.graph.g[n].ty != want {
            return Err(format!("assign: cannot write {} into a buffer of type {want}", st.graph.g[n].ty));
        }
        // Make sure the old value is an input (reads before the write keep seeing it).
        node_of(st, target).map_err(|e| e.to_string())?;
        st.lifted.insert(target.id(), n);
        st.updates.retain(|(t, _)| !t.same(target));
        st.updates.push((target.clone(), n));
        Ok(())
    })
}

/// Records a tensor hook on a traced tensor; `None` when `t` is not symbolic.
pub(crate) fn trace_tensor_hook(t: &Tensor, hook: GradHook) -> Option<()> {
    let node = t.symbol()?.node;
    with_trace(|st| st.tensor_hooks.push((node, hook)))
}

/// `module(args)` during a trace: a scope for the module's nodes, and its forward hooks as
/// callback nodes around `forward`.
pub(crate) fn traced_call(
    m: &dyn Module,
    args: &[Tensor],
    pre: &[ForwardPreHook],
    post: &[ForwardHook],
    bw_pre: &[BackwardPreHook],
    bw: &[BackwardHook],
) -> Tensor {
    let path =
        with_trace(|st| st.module_paths.get(&module_id(m)).cloned().unwrap_or_else(|| format!("<{}>", m.type_name())))
            .expect("tracing");
    let type_name = m.type_name();
    with_trace(|st| st.graph.scope.push((path.clone(), type_name.clone())));
    let mut args = args.to_vec();
    for hook in pre {
        args = with_trace(|st| -> OpResult<Vec<Tensor>> {
            let nodes: Vec<NodeIndex> = args.iter().map(|a| node_of(st, a)).collect::<OpResult<_>>()?;
            let types: Vec<TensorType> = nodes.iter().map(|&n| st.graph.g[n].ty.clone()).collect();
            let id = st.callbacks.len();
            st.callbacks.push(CallbackSpec::ForwardPre { path: path.clone(), hook: hook.clone() });
            let outs = st.graph.add_callback(id, &format!("forward pre-hook of {path} ({type_name})"), &nodes, &types);
            Ok(outs.iter().zip(&args).map(|(&n, a)| symbolic_like(st, n, a.requires_grad())).collect())
        })
        .expect("tracing")
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let wire = crate::is_grad_enabled() && (!bw.is_empty() || !bw_pre.is_empty());
    // Backward-hook errors name the module as eager mode does: its path, or its type at the root.
    let shown = if path.is_empty() { type_name.clone() } else { path.clone() };
    let requires: Vec<bool> = args.iter().map(|a| a.requires_grad()).collect();
    let inputs_wired = wire && requires.iter().any(|&r| r);
    // The inputs callback learns its output callback's id once that exists (children and
    // forward hooks add callbacks in between).
    let mut inputs_callback = None;
    if inputs_wired {
        args = with_trace(|st| -> OpResult<Vec<Tensor>> {
            let nodes: Vec<NodeIndex> = args.iter().map(|a| node_of(st, a)).collect::<OpResult<_>>()?;
            let types: Vec<TensorType> = nodes.iter().map(|&n| st.graph.g[n].ty.clone()).collect();
            let id = st.callbacks.len();
            inputs_callback = Some(id);
            st.callbacks.push(CallbackSpec::ModuleInputs {
                path: shown.clone(),
                hooks: bw.to_vec(),
                requires: requires.clone(),
                output_callback: usize::MAX,
            });
            let outs =
                st.graph.add_callback(id, &format!("full backward hooks of {path} ({type_name})"), &nodes, &types);
            Ok(outs.iter().zip(&args).map(|(&n, a)| symbolic_like(st, n, a.requires_grad())).collect())
        })
        .expect("tracing")
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut out = m.forward_many(&args);
    for hook in post {
        out = with_trace(|st| -> OpResult<Tensor> {
            let mut nodes: Vec<NodeIndex> = args.iter().map(|a| node_of(st, a)).collect::<OpResult<_>>()?;
            nodes.push(node_of(st, &out)?);
            let ty = st.graph.g[*nodes.last().unwrap()].ty.clone();
            let id = st.callbacks.len();
            st.callbacks.push(CallbackSpec::Forward { path: path.clone(), hook: hook.clone(), n_args: args.len() });
            let n = st.graph.add_callback(id, &format!("forward hook of {path} ({type_name})"), &nodes, &[ty])[0];
            Ok(symbolic_like(st, n, out.requires_grad()))
        })
        .expect("tracing")
        .unwrap_or_else(|e| panic!("{e}"));
    }
    if wire && out.requires_grad() {
        out = with_trace(|st| -> OpResult<Tensor> {
            let n = node_of(st, &out)?;
            let ty = st.graph.g[n].ty.clone();
            let id = st.callbacks.len();
            if let Some(CallbackSpec::ModuleInputs { output_callback, .. }) =
                inputs_callback.map(|i| &mut st.callbacks[i])
            {
                *output_callback = id;
            }
            st.callbacks.push(CallbackSpec::ModuleOutput {
                path: shown.clone(),
                pre: bw_pre.to_vec(),
                hooks: bw.to_vec(),
                n_inputs: args.len(),
                inputs_wired,
            });
            let c = st.graph.add_callback(id, &format!("backward pre-hooks of {path} ({type_name})"), &[n], &[ty])[0];
            Ok(symbolic_like(st, c, true))
        })
        .expect("tracing")
        .unwrap_or_else(|e| panic!("{e}"));
    }
    with_trace(|st| st.graph.scope.pop());
    out
}

/// Why compiling failed: the op, the module path and the shapes, in one message.
#[derive(Clone, Debug, PartialEq)]
pub struct CompileError {
    /// The op that failed (empty when the failure is not an op's).
    pub op: String,
    /// Dotted path of the module whose forward failed (`""`: the top level).
    pub module_path: String,
    /// The full message.
    pub message: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.module_path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{} (in module {})", self.message, self.module_path)
        }
    }
}

impl std::error::Error for CompileError {}

/// Installs (once) a panic hook that stays quiet while a trace catches its own panics, so a
/// failed trace is an `Err`, not noise on stderr.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !SILENT_PANICS.with(|s| s.get()) {
                prev(info)
            }
        }));
    });
}

/// The result of tracing one call.
pub(crate) struct Traced {
    pub(crate) graph: Graph,
    pub(crate) lifted_inputs: Vec<Tensor>,
    pub(crate) callbacks: Vec<CallbackSpec>,
    /// Buffers written by the forward; graph outputs `1..=updates.len()` hold their values.
    pub(crate) updates: Vec<Tensor>,
    /// Tensor hooks on traced values, by node.
    pub(crate) tensor_hooks: Vec<(NodeIndex, GradHook)>,
}

/// Traces `module(inputs)` for inputs of the given types.
pub(crate) fn trace_module(m: &dyn Module, inputs: &[(TensorType, bool)]) -> Result<Traced, CompileError> {
    trace_with(m, inputs, &|args| m.call_many(args))
}

/// Traces `f(inputs)`, lifting `m`'s parameters and buffers to graph inputs.
pub(crate) fn trace_with(
    m: &dyn Module,
    inputs: &[(TensorType, bool)],
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> Result<Traced, CompileError> {
    if is_tracing() {
        return Err(CompileError {
            op: String::new(),
            module_path: String::new(),
            message: "nested compile: a trace is already active on this thread".into(),
        });
    }
    let mut liftable = HashMap::new();
    for (name, t) in m.named_parameters() {
        liftable.insert(t.id(), (name, InputRole::Parameter, t));
    }
    for (name, t) in m.named_buffers() {
        liftable.insert(t.id(), (name, InputRole::Buffer, t));
    }
    let module_paths: HashMap<usize, String> =
        m.named_modules().into_iter().map(|(p, sub)| (module_id(&*sub), p)).collect();
    let id = NEXT_TRACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut st = TraceState {
        id,
        graph: Graph::new(),
        lifted: HashMap::new(),
        keepalive: Vec::new(),
        liftable,
        lifted_inputs: Vec::new(),
        module_paths,
        callbacks: Vec::new(),
        updates: Vec::new(),
        tensor_hooks: Vec::new(),
    };
    let args: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, (ty, rg))| {
            let n = st.graph.add_input(&format!("input{i}"), InputRole::Data, ty.clone());
            Tensor::symbolic(Symbol { trace: id, node: n, ty: ty.clone() }, *rg)
        })
        .collect();
    TRACE.with(|t| *t.borrow_mut() = Some(st));
    install_quiet_hook();
    SILENT_PANICS.with(|s| s.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| f(&args)));
    SILENT_PANICS.with(|s| s.set(false));
    let mut st = TRACE.with(|t| t.borrow_mut().take()).expect("trace state");
    let out = match result {
        Ok(out) => out,
        Err(payload) => {
            let message = tracegrad_runtime::panic_message(&*payload).unwrap_or("forward panicked").to_string();
            let module_path = st.graph.scope.last().map(|(p, _)| p.clone()).unwrap_or_default();
            let op = message.split(':').next().filter(|s| !s.contains(' ')).unwrap_or("").to_string();
            return Err(CompileError { op, module_path, message });
        }
    };
    let n = node_of(&mut st, &out).map_err(|e| CompileError {
        op: e.op,
        module_path: String::new(),
        message: e.message,
    })?;
    st.graph.add_output("out", n);
    let mut updates = Vec::new();
    for (t, node) in std::mem::take(&mut st.updates) {
        let name = st.liftable.get(&t.id()).map(|(n, _, _)| n.clone()).unwrap_or_default();
        st.graph.add_output(&format!("update:{name}"), node);
        updates.push(t);
    }
    Ok(Traced {
        graph: st.graph,
        lifted_inputs: st.lifted_inputs,
        callbacks: st.callbacks,
        updates,
        tensor_hooks: st.tensor_hooks,
    })
}
