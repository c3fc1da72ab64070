//! Tracing: `forward` runs once on symbolic tensors and every op lands in a [`Graph`].
//!
//! While a trace is active on this thread, eager code hands its work to the [`Tracer`] that
//! [`trace_with`] installs in the seam (`src/trace_seam.rs`): the `Eager` emitter each op,
//! `Tensor::assign` each buffer write, a module call its hooks. Operands that are symbolic are graph nodes already. A concrete operand that
//! is one of the module's parameters or buffers is *lifted* to a graph input, so the graph is a
//! pure function and optimizer updates need no recompile. Any other concrete tensor becomes a
//! constant. Module calls open a scope (so nodes carry their module path) and turn the module's
//! forward hooks into callback nodes.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use tracegrad_compiler::graph::{Graph, InputRole, NodeId};
use tracegrad_compiler::{Op, OpError, OpResult, TensorType};

use crate::autograd::GradHook;
use crate::nn::{module_id, BackwardHooks, CallBackend, ForwardHook, ForwardPreHook, Module, ModuleExt};
use crate::tensor::Tensor;
use crate::trace_seam::{is_tracing, set_tracer, Symbol, Tracer};

/// A hook captured as a callback node, with what the runtime needs to call it.
#[derive(Clone)]
pub(crate) enum CallbackSpec {
    /// A forward pre-hook (forward graph).
    ForwardPre { path: String, hook: ForwardPreHook },
    /// A forward hook over (args…, output) (forward graph).
    Forward { path: String, hook: ForwardHook, n_args: usize },
    /// Identity over a module's inputs that carries its full backward hooks (forward graph);
    /// `requires[i]`: whether input i takes a gradient.
    ModuleInputs { hooks: Arc<BackwardHooks>, requires: Vec<bool>, output_callback: usize },
    /// Identity over a module's output that carries its backward pre-hooks (forward graph).
    ModuleOutput { hooks: Arc<BackwardHooks> },
    /// Backward of a forward (pre-)hook: replays the hook's eager tape (backward graph).
    ReplayBackward { forward: usize },
    /// Full backward hooks on grad_input (backward graph).
    FullBackward { inputs_callback: usize },
    /// Backward pre-hooks on grad_output (backward graph).
    BackwardPre { output_callback: usize },
    /// A tensor hook on a traced tensor's gradient (backward graph).
    TensorHook { hook: GradHook },
    /// The train step's accumulation of its parameters' gradients, in eager's order, with
    /// their gradient and post-accumulate hooks (`param_hooks.rs`).
    ParamGrads { params: Vec<(String, Tensor)> },
}

pub(crate) struct TraceState {
    id: u64,
    pub(crate) graph: Graph,
    /// Concrete tensors already in the graph (lifted inputs and constants), by tensor id.
    lifted: HashMap<usize, NodeId>,
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
    pub(crate) updates: Vec<(Tensor, NodeId)>,
    /// Tensor hooks registered on traced tensors, by node.
    pub(crate) tensor_hooks: Vec<(NodeId, GradHook)>,
    /// Set when the handle of a hook in `tensor_hooks` is removed.
    pub(crate) hook_flags: Vec<Arc<AtomicBool>>,
    /// The nodes whose value requires grad: those eager autograd would have recorded, and
    /// the inputs that require grad.
    pub(crate) requires_grad: HashSet<NodeId>,
    /// The generator-state input, once a random op asked for it, and the blocks drawn so far.
    rng: Option<(NodeId, RngInput)>,
}

/// Where a plan takes the default generator's Philox state (`[seed, offset]`, an input among
/// the lifted ones) and how many blocks one call draws. Each call reads the state and
/// advances it by `blocks`, so successive calls draw fresh values, exactly as eager mode.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RngInput {
    /// Index of the state among the lifted tensors.
    pub(crate) lifted: usize,
    /// Blocks one call consumes.
    pub(crate) blocks: u64,
}

impl RngInput {
    /// Draws this call's state from the default generator into `args`, whose lifted tensors
    /// start at `first_lifted`.
    pub(crate) fn feed(&self, args: &mut [tracegrad_runtime::Buffer], first_lifted: usize) {
        let (seed, start) = tracegrad_runtime::random::with_default(|g| g.philox_draw(self.blocks));
        args[first_lifted + self.lifted] = tracegrad_runtime::Buffer::from_vec(vec![seed as i64, start as i64], &[2]);
    }
}

thread_local! {
    static SILENT_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static NEXT_TRACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The tracer of one trace, installed in the seam while `forward` runs.
struct ActiveTrace(RefCell<TraceState>);

impl TraceState {
    fn node_of(&mut self, t: &Tensor) -> OpResult<NodeId> {
        if let Some(s) = t.symbol() {
            if s.trace != self.id {
                return Err(OpError::new("trace", "a symbolic tensor from another trace was used".to_string()));
            }
            return Ok(s.node);
        }
        if let Some(&n) = self.lifted.get(&t.id()) {
            return Ok(n);
        }
        let n = match self.liftable.get(&t.id()).cloned() {
            Some((name, role, tensor)) => {
                // Lifted inputs belong to no module scope: they are the graph's arguments.
                let scope = std::mem::take(&mut self.graph.scope);
                let n = self.graph.add_input(&name, role, tensor.tensor_type());
                self.graph.scope = scope;
                if tensor.requires_grad() {
                    self.requires_grad.insert(n);
                }
                self.lifted_inputs.push(tensor);
                n
            }
            None => self.graph.add_op(Op::Constant(t.buffer()), &[])?,
        };
        self.lifted.insert(t.id(), n);
        self.keepalive.push(t.clone());
        Ok(n)
    }

    fn symbolic(&mut self, n: NodeId, requires_grad: bool) -> Tensor {
        if requires_grad {
            self.requires_grad.insert(n);
        }
        Tensor::symbolic(Symbol { trace: self.id, node: n, ty: self.graph.ty(n).clone() }, requires_grad)
    }

    /// Adds callback `spec` over `operands`. Its results mirror the last `requires.len()`
    /// operands (same types), with the given `requires_grad`. Returns the callback id too.
    fn callback(
        &mut self,
        spec: CallbackSpec,
        label: &str,
        operands: &[&Tensor],
        requires: &[bool],
    ) -> OpResult<(usize, Vec<Tensor>)> {
        let nodes: Vec<NodeId> = operands.iter().map(|a| self.node_of(a)).collect::<OpResult<_>>()?;
        let types: Vec<TensorType> =
            nodes[nodes.len() - requires.len()..].iter().map(|&n| self.graph.ty(n).clone()).collect();
        let id = self.callbacks.len();
        self.callbacks.push(spec);
        let outs = self.graph.add_callback(id, label, &nodes, &types);
        Ok((id, outs.iter().zip(requires).map(|(&n, &r)| self.symbolic(n, r)).collect()))
    }
}

impl Tracer for ActiveTrace {
    fn emit(&self, op: &Op, inputs: &[&Tensor]) -> OpResult<Tensor> {
        let st = &mut *self.0.borrow_mut();
        let nodes: Vec<NodeId> = inputs.iter().map(|t| st.node_of(t)).collect::<OpResult<_>>()?;
        let n = st.graph.add_op(op.clone(), &nodes)?;
        let rg =
            st.graph.ty(n).dtype.is_float() && crate::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad());
        Ok(st.symbolic(n, rg))
    }

    /// Later reads of `target` in this trace see the new value; the runtime writes it back
    /// after the call.
    fn assign(&self, target: &Tensor, value: &Tensor) -> Result<(), String> {
        let st = &mut *self.0.borrow_mut();
        if target.is_symbolic() || !st.liftable.contains_key(&target.id()) {
            return Err("assign: only a module buffer can be written inside a compiled forward".to_string());
        }
        let n = st.node_of(value).map_err(|e| e.to_string())?;
        let want = target.tensor_type();
        let n = if st.graph.ty(n).dtype != want.dtype {
            st.graph.add_op(Op::Cast(want.dtype), &[n]).map_err(|e| e.to_string())?
        } else {
            n
        };
        if *st.graph.ty(n) != want {
            return Err(format!("assign: cannot write {} into a buffer of type {want}", st.graph.ty(n)));
        }
        // Make sure the old value is an input (reads before the write keep seeing it).
        st.node_of(target).map_err(|e| e.to_string())?;
        st.lifted.insert(target.id(), n);
        st.updates.retain(|(t, _)| !t.same(target));
        st.updates.push((target.clone(), n));
        Ok(())
    }

    fn rng(&self, blocks: u64) -> (Tensor, u64) {
        let st = &mut *self.0.borrow_mut();
        let (graph, lifted) = (&mut st.graph, &mut st.lifted_inputs);
        let (node, rng) = st.rng.get_or_insert_with(|| {
            // The generator-state input is a lifted slot that `RngInput::feed` fills with the
            // default generator's (seed, offset) on every call; these zeros are never read.
            let scope = std::mem::take(&mut graph.scope);
            let n = graph.add_input("rng", InputRole::State, TensorType::new(tracegrad_runtime::DType::I64, &[2]));
            graph.scope = scope;
            lifted.push(Tensor::from_vec(vec![0i64, 0], &[2]));
            (n, RngInput { lifted: lifted.len() - 1, blocks: 0 })
        });
        let node = *node;
        let at = rng.blocks;
        rng.blocks += blocks;
        (st.symbolic(node, false), at)
    }

    fn tensor_hook(&self, t: &Tensor, hook: GradHook, removed: Arc<AtomicBool>) {
        let node = t.symbol().expect("a tensor hook is traced on a symbolic tensor").node;
        let st = &mut *self.0.borrow_mut();
        st.hook_flags.push(removed.clone());
        // A removed hook stops at once, even in a backward of a call made before the removal.
        let hook: GradHook = Arc::new(move |g| if removed.load(Ordering::Acquire) { None } else { hook(g) });
        st.tensor_hooks.push((node, hook));
    }

    fn module_call<'a>(&'a self, m: &'a dyn Module) -> Box<dyn CallBackend + 'a> {
        let st = &mut *self.0.borrow_mut();
        let path = st.module_paths.get(&module_id(m)).cloned().unwrap_or_else(|| format!("<{}>", m.type_name()));
        let type_name = m.type_name();
        st.graph.scope.push((path.clone(), type_name.clone()));
        Box::new(TracedCall { trace: &self.0, path, type_name, inputs_callback: None })
    }
}

/// A module path for messages: the root module's is empty.
pub(crate) fn module_at(path: &str) -> &str {
    if path.is_empty() {
        "the root module"
    } else {
        path
    }
}

/// One traced module call: a scope for the module's nodes, its hooks as callback nodes.
struct TracedCall<'a> {
    trace: &'a RefCell<TraceState>,
    path: String,
    type_name: String,
    /// The inputs identity's callback, which learns its output callback's id once that
    /// exists (children and forward hooks add callbacks in between).
    inputs_callback: Option<usize>,
}

impl TracedCall<'_> {
    fn callback(
        &self,
        spec: CallbackSpec,
        what: &str,
        operands: &[&Tensor],
        requires: &[bool],
    ) -> (usize, Vec<Tensor>) {
        let label = format!("{what} of {} ({})", module_at(&self.path), self.type_name);
        self.trace.borrow_mut().callback(spec, &label, operands, requires).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl CallBackend for TracedCall<'_> {
    fn forward_pre_hook(&mut self, _: &dyn Module, hook: &ForwardPreHook, args: Vec<Tensor>) -> Vec<Tensor> {
        let spec = CallbackSpec::ForwardPre { path: self.path.clone(), hook: hook.clone() };
        let requires: Vec<bool> = args.iter().map(Tensor::requires_grad).collect();
        self.callback(spec, "forward pre-hook", &args.iter().collect::<Vec<_>>(), &requires).1
    }

    fn wire_inputs(&mut self, args: Vec<Tensor>, hooks: &Arc<BackwardHooks>) -> Vec<Tensor> {
        let requires: Vec<bool> = args.iter().map(Tensor::requires_grad).collect();
        let spec = CallbackSpec::ModuleInputs {
            hooks: hooks.clone(),
            requires: requires.clone(),
            output_callback: usize::MAX,
        };
        let (id, args) = self.callback(spec, "full backward hooks", &args.iter().collect::<Vec<_>>(), &requires);
        self.inputs_callback = Some(id);
        args
    }

    fn forward_hook(&mut self, _: &dyn Module, hook: &ForwardHook, args: &[Tensor], out: Tensor) -> Tensor {
        let spec = CallbackSpec::Forward { path: self.path.clone(), hook: hook.clone(), n_args: args.len() };
        let operands: Vec<&Tensor> = args.iter().chain([&out]).collect();
        self.callback(spec, "forward hook", &operands, &[out.requires_grad()]).1.remove(0)
    }

    fn wire_output(&mut self, out: Tensor, hooks: &Arc<BackwardHooks>) -> Tensor {
        let spec = CallbackSpec::ModuleOutput { hooks: hooks.clone() };
        let (id, mut out) = self.callback(spec, "backward pre-hooks", &[&out], &[true]);
        if let Some(i) = self.inputs_callback {
            if let CallbackSpec::ModuleInputs { output_callback, .. } = &mut self.trace.borrow_mut().callbacks[i] {
                *output_callback = id;
            }
        }
        out.remove(0)
    }

    fn finish(&mut self) {
        self.trace.borrow_mut().graph.scope.pop();
    }
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
    pub(crate) tensor_hooks: Vec<(NodeId, GradHook)>,
    /// One flag per tensor hook, set when its handle is removed: the plan is then stale.
    pub(crate) hook_flags: Vec<Arc<AtomicBool>>,
    /// The nodes whose value requires grad (see `TraceState::requires_grad`).
    pub(crate) requires_grad: HashSet<NodeId>,
    /// The generator-state input, when the trace drew random values.
    pub(crate) rng: Option<RngInput>,
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
        hook_flags: Vec::new(),
        requires_grad: HashSet::new(),
        rng: None,
    };
    let args: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, (ty, rg))| {
            let n = st.graph.add_input(&format!("input{i}"), InputRole::Data, ty.clone());
            st.symbolic(n, *rg)
        })
        .collect();
    let trace = Rc::new(ActiveTrace(RefCell::new(st)));
    set_tracer(Some(trace.clone()));
    install_quiet_hook();
    SILENT_PANICS.with(|s| s.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| f(&args)));
    SILENT_PANICS.with(|s| s.set(false));
    set_tracer(None);
    let mut st = Rc::try_unwrap(trace).ok().expect("the tracer is released when the trace ends").0.into_inner();
    let out = match result {
        Ok(out) => out,
        Err(payload) => {
            let message = tracegrad_runtime::panic_message(&*payload).unwrap_or("forward panicked").to_string();
            let module_path = st.graph.scope.last().map(|(p, _)| p.clone()).unwrap_or_default();
            let op = message.split(':').next().filter(|s| !s.contains(' ')).unwrap_or("").to_string();
            return Err(CompileError { op, module_path, message });
        }
    };
    let n = st.node_of(&out).map_err(|e| CompileError { op: e.op, module_path: String::new(), message: e.message })?;
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
        hook_flags: st.hook_flags,
        requires_grad: st.requires_grad,
        rng: st.rng.map(|(_, r)| r),
    })
}
