//! The executor: a graph compiled to a plan of steps (JIT kernels, runtime kernels such as
//! gemm and conv, and hook callbacks), a liveness-based memory plan, and the run loop.
//!
//! Memory: every value is freed after its last use; freed storage goes to a pool that later
//! kernels draw their outputs from (same dtype and length), and a pointwise kernel writes an
//! output over an input that dies at that kernel when it owns the input's storage (in place).
//! The plan's `peak_bytes` is the high-water mark of live intermediate and output bytes.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use tracegrad_compiler::fusion::{fuse_with, GroupKind};
use tracegrad_compiler::graph::{node_error, Graph, NodeKind};
use tracegrad_compiler::interpret::{interpret, CallbackRunner};
use tracegrad_compiler::ops::{Op, OpError, OpResult, TensorType};
use tracegrad_runtime::{Buffer, DType, Data};

use crate::kernel::{lower, supported, Space};
use crate::module::{compile_kernels, CompiledKernel, JitCode};

/// How an [`Executable`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// Fused groups as Cranelift kernels (the default).
    #[default]
    Jit,
    /// The reference interpreter: one runtime kernel per node (the correctness oracle).
    Interpreter,
}

/// Work items (elements × program size) below which a kernel runs on the calling thread:
/// small graphs must not pay for thread hand-off.
const PARALLEL_WORK: usize = 1 << 16;

#[derive(Debug)]
enum Step {
    /// A JIT kernel.
    Kernel {
        kernel: usize,
        args: Vec<usize>,
        outs: Vec<usize>,
        /// Per output: an argument whose storage it may take (dies here, same type).
        reuse: Vec<Option<usize>>,
        nodes: Vec<NodeIndex>,
    },
    /// One node on the runtime's kernels (gemm, conv, gather, layout copies, ...).
    Eval { node: NodeIndex, args: Vec<usize>, out: usize },
    /// A hook.
    Callback { node: NodeIndex, args: Vec<usize>, out: usize },
}

/// A graph compiled for execution.
pub struct Executable {
    graph: Graph,
    backend: Backend,
    steps: Vec<Step>,
    /// Value id of every node.
    value: HashMap<NodeIndex, usize>,
    types: Vec<TensorType>,
    n_values: usize,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// Constants, evaluated once at build time.
    constants: Vec<(usize, Buffer)>,
    /// Values to drop after each step.
    free_after: Vec<Vec<usize>>,
    /// Freed values whose storage a later kernel output takes (the rest is released at once).
    recycle: Vec<bool>,
    /// Live bytes during each step (the memory plan).
    live_at: Vec<usize>,
    kernels: Vec<CompiledKernel>,
    /// Groups that could not be lowered, with the reason (they run node by node).
    fallbacks: Vec<String>,
    peak_bytes: usize,
    build_time: Duration,
    // Declared last: dropped after everything that holds kernel pointers.
    _code: Option<JitCode>,
}

impl std::fmt::Debug for Executable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executable")
            .field("backend", &self.backend)
            .field("steps", &self.steps.len())
            .field("kernels", &self.kernels.len())
            .field("peak_bytes", &self.peak_bytes)
            .finish()
    }
}

fn nbytes(t: &TensorType) -> usize {
    t.numel() * t.dtype.size()
}

/// Orders fused groups so every group runs after the groups it reads from.
fn order_groups(g: &Graph, groups: &[Vec<NodeIndex>]) -> Vec<usize> {
    let mut owner: HashMap<NodeIndex, usize> = HashMap::new();
    for (i, k) in groups.iter().enumerate() {
        for &n in k {
            owner.insert(n, i);
        }
    }
    let mut indeg = vec![0usize; groups.len()];
    let mut succ: Vec<HashSet<usize>> = vec![HashSet::new(); groups.len()];
    for (i, k) in groups.iter().enumerate() {
        for &n in k {
            for o in g.operands(n) {
                let j = owner[&o];
                if j != i && succ[j].insert(i) {
                    indeg[i] += 1;
                }
            }
        }
    }
    // Kahn's algorithm, preferring the earliest group (fusion lists them in program order).
    let mut ready: std::collections::BTreeSet<usize> = (0..groups.len()).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(groups.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &succ[i] {
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.insert(j);
            }
        }
    }
    assert_eq!(order.len(), groups.len(), "fusion produced a cycle between kernels");
    order
}

/// Whether evaluating `op` on well-typed operands can fail at run time (an index out of
/// range, a singular matrix): such a step must not follow an in-place write over a donated
/// input, so that an error leaves every donated input intact.
fn fallible(op: &Op) -> bool {
    !matches!(
        op,
        Op::Full { .. }
            | Op::Constant(_)
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::Where
            | Op::Clamp { .. }
            | Op::Cast(_)
            | Op::StopGradient
            | Op::Reduce { .. }
            | Op::ArgReduce { .. }
            | Op::Softmax { .. }
            | Op::MatMul { .. }
            | Op::Reshape(_)
            | Op::Permute(_)
            | Op::Expand(_)
            | Op::Narrow { .. }
            | Op::Cat { .. }
            | Op::Conv2d { .. }
            | Op::Conv2dGradInput { .. }
            | Op::Conv2dGradWeight { .. }
            | Op::MaxPool2d { .. }
            | Op::MaxPool2dGrad { .. }
            | Op::AvgPool2d { .. }
            | Op::AvgPool2dGrad { .. }
            | Op::VectorNorm { .. }
    )
}

/// A failed [`Executable::run_donated`]: the error and every input, intact.
pub struct DonatedError {
    /// What failed.
    pub error: OpError,
    /// The inputs, in order, unchanged.
    pub inputs: Vec<Buffer>,
}

impl Executable {
    /// Compiles `g` for `backend`.
    pub fn new(g: &Graph, backend: Backend) -> Result<Executable, String> {
        Executable::with_donation(g, backend, &[])
    }

    /// Compiles `g` for `backend`; the inputs marked in `donated` may be overwritten in place
    /// when they are passed to [`Executable::run_donated`] as sole owners (a training step
    /// donates the parameters it replaces, as `jax.jit(donate_argnums=...)` does). An
    /// overwrite happens only after the last step that can fail.
    pub fn with_donation(g: &Graph, backend: Backend, donated: &[bool]) -> Result<Executable, String> {
        let t0 = Instant::now();
        let order = g.topo_order()?;
        let mut value: HashMap<NodeIndex, usize> = HashMap::new();
        let mut types = Vec::new();
        for &n in &order {
            value.insert(n, types.len());
            types.push(g.g[n].ty.clone());
        }
        let inputs: Vec<usize> = g.inputs.iter().map(|n| value[n]).collect();
        let outputs: Vec<usize> = g.outputs.iter().map(|(_, n)| value[n]).collect();
        let mut steps = Vec::new();
        let mut constants = Vec::new();
        let mut specs = Vec::new();
        let mut fallbacks = Vec::new();
        let ids = |ns: &[NodeIndex]| -> Vec<usize> { ns.iter().map(|n| value[n]).collect() };

        let groups: Vec<(GroupKind, Vec<NodeIndex>)> = match backend {
            Backend::Jit => fuse_with(g, &supported).into_iter().map(|k| (k.kind, k.nodes)).collect(),
            Backend::Interpreter => order
                .iter()
                .map(|&n| {
                    let kind = match g.g[n].kind {
                        NodeKind::Input { .. } => GroupKind::Source,
                        NodeKind::Callback { .. } => GroupKind::Callback,
                        _ => GroupKind::Single,
                    };
                    (kind, vec![n])
                })
                .collect(),
        };
        // Dead code: only nodes that outputs or callbacks (hooks have effects) depend on run.
        let mut needed: HashSet<NodeIndex> = HashSet::new();
        let mut stack: Vec<NodeIndex> = g.outputs.iter().map(|(_, n)| *n).collect();
        stack.extend(order.iter().copied().filter(|&n| matches!(g.g[n].kind, NodeKind::Callback { .. })));
        while let Some(n) = stack.pop() {
            if needed.insert(n) {
                stack.extend(g.operands(n));
            }
        }
        let groups: Vec<(GroupKind, Vec<NodeIndex>)> = groups
            .into_iter()
            .map(|(k, ns)| {
                (k, ns.into_iter().filter(|n| needed.contains(n) || g.inputs.contains(n)).collect::<Vec<_>>())
            })
            .filter(|(_, ns)| !ns.is_empty())
            .collect();
        let node_lists: Vec<Vec<NodeIndex>> = groups.iter().map(|(_, ns)| ns.clone()).collect();
        for gi in order_groups(g, &node_lists) {
            let (kind, nodes) = &groups[gi];
            let eval_all = |steps: &mut Vec<Step>, nodes: &[NodeIndex]| {
                for &n in nodes {
                    steps.push(Step::Eval { node: n, args: ids(&g.operands(n)), out: value[&n] });
                }
            };
            match kind {
                GroupKind::Source => {
                    for &n in nodes {
                        if let NodeKind::Op(op) = &g.g[n].kind {
                            let b = op.eval(&[], &g.g[n].ty).map_err(|e| node_error(g, n, e).to_string())?;
                            constants.push((value[&n], b));
                        }
                    }
                }
                GroupKind::Callback => {
                    for &n in nodes {
                        steps.push(Step::Callback { node: n, args: ids(&g.operands(n)), out: value[&n] });
                    }
                }
                GroupKind::Single => eval_all(&mut steps, nodes),
                GroupKind::Pointwise | GroupKind::Row | GroupKind::Epilogue => {
                    let (head, rest) = if *kind == GroupKind::Epilogue {
                        eval_all(&mut steps, &nodes[..1]);
                        (&nodes[..1], &nodes[1..])
                    } else {
                        (&nodes[..0], &nodes[..])
                    };
                    let _ = head;
                    let row = *kind == GroupKind::Row
                        && rest
                            .iter()
                            .any(|&n| matches!(g.g[n].kind, NodeKind::Op(Op::Reduce { .. } | Op::Softmax { .. })));
                    match lower(g, rest, row, &|n| needed.contains(&n)) {
                        Ok(l) => {
                            specs.push(l.spec);
                            steps.push(Step::Kernel {
                                kernel: specs.len() - 1,
                                args: ids(&l.args),
                                outs: ids(&l.outs),
                                reuse: Vec::new(),
                                nodes: rest.to_vec(),
                            });
                        }
                        Err(why) => {
                            let list: Vec<String> = rest.iter().map(|n| format!("%{}", n.index())).collect();
                            fallbacks.push(format!("{} run node by node: {why}", list.join(" ")));
                            eval_all(&mut steps, rest);
                        }
                    }
                }
            }
        }

        // Constants folded into kernels as immediates need no buffer.
        let read: HashSet<usize> = steps
            .iter()
            .flat_map(|s| match s {
                Step::Kernel { args, .. } | Step::Eval { args, .. } | Step::Callback { args, .. } => args.clone(),
            })
            .chain(outputs.iter().copied())
            .collect();
        constants.retain(|(v, _)| read.contains(v));

        // Liveness: the last step reading each value; outputs live to the end.
        let n_values = types.len();
        let mut last_use = vec![None::<usize>; n_values];
        for (si, s) in steps.iter().enumerate() {
            let args = match s {
                Step::Kernel { args, .. } | Step::Eval { args, .. } | Step::Callback { args, .. } => args,
            };
            for &a in args {
                last_use[a] = Some(si);
            }
        }
        // Outputs live to the end; so do inputs (the caller's, or donated and handed back on
        // an error), unless a kernel takes one over in place.
        let keep: HashSet<usize> = outputs.iter().chain(&inputs).copied().collect();
        let mut free_after = vec![Vec::new(); steps.len()];
        for (v, lu) in last_use.iter().enumerate() {
            if let Some(si) = lu {
                if !keep.contains(&v) {
                    free_after[*si].push(v);
                }
            }
        }
        // In place: a pointwise kernel's output may take the storage of an argument that dies
        // there, has the same type and is read elementwise (same element count); a donated
        // input only after the last step that can fail.
        let last_fallible = steps
            .iter()
            .rposition(|s| match s {
                Step::Callback { .. } => true,
                Step::Eval { node, .. } => matches!(&g.g[*node].kind, NodeKind::Op(op) if fallible(op)),
                Step::Kernel { .. } => false,
            })
            .map_or(0, |i| i + 1);
        let donated_vals: HashSet<usize> = inputs
            .iter()
            .zip(donated.iter().chain(std::iter::repeat(&false)))
            .filter(|(_, &d)| d)
            .map(|(&v, _)| v)
            .collect();
        let graph_inputs: HashSet<usize> = inputs.iter().copied().collect();
        let const_vals: HashSet<usize> = constants.iter().map(|(v, _)| *v).collect();
        for (si, s) in steps.iter_mut().enumerate() {
            if let Step::Kernel { kernel, args, outs, reuse, .. } = s {
                let spec = &specs[*kernel];
                let mut taken = HashSet::new();
                *reuse = outs
                    .iter()
                    .enumerate()
                    .map(|(o, &out)| {
                        if spec.row_kernel || spec.nodes[spec.outputs[o]].space != Space::Elem {
                            return None;
                        }
                        // Prefer a donated input: the intermediate is then freed instead.
                        let ok = |a: usize| {
                            let owned = if graph_inputs.contains(&a) {
                                donated_vals.contains(&a) && si >= last_fallible && last_use[a] == Some(si)
                            } else {
                                free_after[si].contains(&a)
                            };
                            types[a] == types[out] && owned && !const_vals.contains(&a) && !taken.contains(&a)
                        };
                        let cand = args
                            .iter()
                            .copied()
                            .filter(|a| graph_inputs.contains(a))
                            .chain(args.iter().copied().filter(|a| !graph_inputs.contains(a)))
                            .find(|&a| ok(a))?;
                        taken.insert(cand);
                        Some(cand)
                    })
                    .collect();
            }
        }
        // Storage recycling and peak bytes, by simulating a run. Freed storage is kept for a
        // later kernel output of the same type and length (the pool) only if one will take
        // it; otherwise it goes back to the allocator at once. Graph inputs are the caller's
        // and reshapes share their operand's storage, so neither counts.
        let aliasing = |n: NodeIndex| matches!(g.g[n].kind, NodeKind::Op(Op::Reshape(_)));
        let node_of: HashMap<usize, NodeIndex> = value.iter().map(|(&n, &v)| (v, n)).collect();
        // First pass: which freed values a later kernel output takes from the pool.
        let mut counted = vec![false; n_values];
        let mut recycle = vec![false; n_values];
        let mut pool: HashMap<(DType, usize), Vec<usize>> = HashMap::new();
        for (si, s) in steps.iter().enumerate() {
            match s {
                Step::Kernel { outs, reuse, .. } => {
                    for (o, r) in outs.iter().zip(reuse) {
                        match r {
                            Some(r) => counted[*o] = std::mem::take(&mut counted[*r]),
                            None => {
                                if let Some(v) =
                                    pool.get_mut(&(types[*o].dtype, types[*o].numel())).and_then(|p| p.pop())
                                {
                                    recycle[v] = true;
                                }
                                counted[*o] = true;
                            }
                        }
                    }
                }
                Step::Eval { node, out, .. } => counted[*out] = !aliasing(*node),
                Step::Callback { out, .. } => counted[*out] = true,
            }
            for &v in &free_after[si] {
                if std::mem::take(&mut counted[v]) && !aliasing(node_of[&v]) {
                    pool.entry((types[v].dtype, types[v].numel())).or_default().push(v);
                }
            }
        }
        // Second pass: now that `recycle` is known, recompute the peak with unrecycled
        // storage released at its last use.
        let mut live: usize = constants.iter().map(|(_, b)| b.data().nbytes()).sum();
        let mut peak_bytes = live;
        let mut counted = vec![false; n_values];
        let mut pooled: HashMap<(DType, usize), Vec<usize>> = HashMap::new();
        let mut live_at = vec![0; steps.len()];
        for (si, s) in steps.iter().enumerate() {
            match s {
                Step::Kernel { outs, reuse, .. } => {
                    for (o, r) in outs.iter().zip(reuse) {
                        match r {
                            Some(r) => {
                                counted[*o] = counted[*r];
                                counted[*r] = false;
                            }
                            None => {
                                let key = (types[*o].dtype, types[*o].numel());
                                if pooled.get_mut(&key).and_then(|p| p.pop()).is_none() {
                                    live += nbytes(&types[*o]);
                                }
                                counted[*o] = true;
                            }
                        }
                    }
                }
                Step::Eval { node, out, .. } => {
                    if !aliasing(*node) {
                        live += nbytes(&types[*out]);
                        counted[*out] = true;
                    }
                }
                Step::Callback { out, .. } => {
                    live += nbytes(&types[*out]);
                    counted[*out] = true;
                }
            }
            peak_bytes = peak_bytes.max(live);
            live_at[si] = live;
            for &v in &free_after[si] {
                if std::mem::take(&mut counted[v]) {
                    if recycle[v] {
                        pooled.entry((types[v].dtype, types[v].numel())).or_default().push(v);
                    } else {
                        live -= nbytes(&types[v]);
                    }
                }
            }
        }
        let peak = peak_bytes;

        let (code, kernels) = if specs.is_empty() {
            (None, Vec::new())
        } else {
            let (code, kernels) = compile_kernels(&specs)?;
            (Some(code), kernels)
        };
        Ok(Executable {
            graph: g.clone(),
            backend,
            steps,
            value,
            types,
            n_values,
            inputs,
            outputs,
            constants,
            free_after,
            recycle,
            live_at,
            kernels,
            fallbacks,
            peak_bytes: peak,
            build_time: t0.elapsed(),
            _code: code,
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The graph this plan runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Peak bytes of intermediate and output values during one run (the memory plan's
    /// high-water mark; graph inputs are the caller's and not counted).
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes
    }

    /// Time spent compiling (fusion, lowering, code generation, memory planning).
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// Number of JIT kernel launches per run.
    pub fn kernel_steps(&self) -> usize {
        self.steps.iter().filter(|s| matches!(s, Step::Kernel { .. })).count()
    }

    /// Number of distinct compiled kernels (equal kernels share one function).
    pub fn distinct_kernels(&self) -> usize {
        let mut seen = HashSet::new();
        self.kernels.iter().filter(|k| seen.insert(k.f as usize)).count()
    }

    /// The Cranelift IR of every kernel.
    pub fn clif_text(&self) -> String {
        let mut s = String::new();
        let mut seen = HashSet::new();
        for (i, k) in self.kernels.iter().enumerate() {
            if !seen.insert(k.f as usize) {
                let _ = writeln!(s, "; kernel {i}: same code as an earlier kernel (cached by signature)\n");
                continue;
            }
            let _ = writeln!(
                s,
                "; kernel {i}: {} {}×{}",
                if k.spec.row_kernel { "rows" } else { "pointwise" },
                k.spec.rows,
                k.spec.cols
            );
            let _ = writeln!(s, "{}", k.clif);
        }
        s
    }

    /// The plan: steps, buffer assignments and the peak.
    pub fn plan_text(&self) -> String {
        let v = |x: &usize| format!("v{x}");
        let list = |xs: &[usize]| xs.iter().map(v).collect::<Vec<_>>().join(", ");
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plan ({:?}): {} steps, {} values, peak {} bytes",
            self.backend,
            self.steps.len(),
            self.n_values,
            self.peak_bytes
        );
        for i in &self.inputs {
            let node = self.value.iter().find(|(_, &x)| x == *i).map(|(n, _)| n.index()).unwrap_or(0);
            let _ = writeln!(s, "  input v{i} = %{node}: {}", self.types[*i]);
        }
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Kernel { kernel, args, outs, reuse, nodes } => {
                    let k = &self.kernels[*kernel].spec;
                    let placed: Vec<String> = outs
                        .iter()
                        .zip(reuse)
                        .map(|(o, r)| match r {
                            Some(r) => format!("v{o}: {} (in place of v{r})", self.types[*o]),
                            None => format!("v{o}: {}", self.types[*o]),
                        })
                        .collect();
                    let members: Vec<String> = nodes.iter().map(|n| format!("%{}", n.index())).collect();
                    let _ = writeln!(
                        s,
                        "  {i:3}: kernel {kernel} ({}, {} × {}) [{}] <- {} ; nodes {}",
                        if k.row_kernel { "rows" } else { "pointwise" },
                        k.rows,
                        k.cols,
                        placed.join(", "),
                        list(args),
                        members.join(" ")
                    );
                }
                Step::Eval { node, args, out } => {
                    let name = match &self.graph.g[*node].kind {
                        NodeKind::Op(op) => op.name(),
                        _ => "?",
                    };
                    let _ = writeln!(
                        s,
                        "  {i:3}: {name} v{out}: {} <- {} ; %{}",
                        self.types[*out],
                        list(args),
                        node.index()
                    );
                }
                Step::Callback { node, args, out } => {
                    let label = match &self.graph.g[*node].kind {
                        NodeKind::Callback { label, .. } => label.clone(),
                        _ => String::new(),
                    };
                    let _ = writeln!(s, "  {i:3}: callback !! {label} v{out} <- {}", list(args));
                }
            }
            let _ = write!(s, "       live {} bytes", self.live_at[i]);
            if !self.free_after[i].is_empty() {
                let _ = write!(s, "; free {}", list(&self.free_after[i]));
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "  outputs {}", list(&self.outputs));
        for f in &self.fallbacks {
            let _ = writeln!(s, "  note: {f}");
        }
        s
    }

    /// Runs the plan on `inputs` (one per graph input, in order); returns the outputs.
    pub fn run(&self, inputs: &[Buffer], callbacks: &dyn CallbackRunner) -> OpResult<Vec<Buffer>> {
        self.run_donated(inputs.to_vec(), callbacks).map_err(|e| e.error)
    }

    /// [`Executable::run`], taking the inputs by value: a donated input (see
    /// [`Executable::with_donation`]) that is passed as its storage's only owner may be
    /// overwritten by an output. On an error every input comes back unchanged.
    pub fn run_donated(
        &self,
        inputs: Vec<Buffer>,
        callbacks: &dyn CallbackRunner,
    ) -> Result<Vec<Buffer>, DonatedError> {
        if self.backend == Backend::Interpreter {
            return interpret(&self.graph, &inputs, &CatchingRunner(callbacks))
                .map_err(|error| DonatedError { error, inputs });
        }
        if inputs.len() != self.inputs.len() {
            let error =
                OpError::new("run", format!("the graph takes {} inputs, got {}", self.inputs.len(), inputs.len()));
            return Err(DonatedError { error, inputs });
        }
        for (&v, b) in self.inputs.iter().zip(&inputs) {
            if TensorType::of(b) != self.types[v] {
                let error = OpError::new(
                    "run",
                    format!("input v{v} should be {} but got {}", self.types[v], TensorType::of(b)),
                );
                return Err(DonatedError { error, inputs });
            }
        }
        let mut vals: Vec<Option<Buffer>> = vec![None; self.n_values];
        for (&v, b) in self.inputs.iter().zip(inputs) {
            vals[v] = Some(b);
        }
        match self.execute(&mut vals, callbacks) {
            Ok(()) => Ok(self.outputs.iter().map(|&v| vals[v].clone().expect("output computed")).collect()),
            Err(error) => {
                let inputs =
                    self.inputs.iter().map(|&v| vals[v].take().expect("inputs are kept until the end")).collect();
                Err(DonatedError { error, inputs })
            }
        }
    }

    fn execute(&self, vals: &mut [Option<Buffer>], callbacks: &dyn CallbackRunner) -> OpResult<()> {
        let g = &self.graph;
        for (v, b) in &self.constants {
            vals[*v] = Some(b.clone());
        }
        let mut pool: HashMap<(DType, usize), Vec<Data>> = HashMap::new();
        let mut callback_results: HashMap<usize, Vec<Buffer>> = HashMap::new();
        for (si, step) in self.steps.iter().enumerate() {
            match step {
                Step::Kernel { kernel, args, outs, reuse, .. } => {
                    self.run_kernel(*kernel, args, outs, reuse, vals, &mut pool);
                }
                Step::Eval { node, args, out } => {
                    let NodeKind::Op(op) = &g.g[*node].kind else { unreachable!("eval of a non-op") };
                    let a: Vec<&Buffer> = args.iter().map(|&x| vals[x].as_ref().expect("live argument")).collect();
                    let r = op.eval(&a, &self.types[*out]).map_err(|e| node_error(g, *node, e))?;
                    vals[*out] = Some(r);
                }
                Step::Callback { node, args, out } => {
                    let NodeKind::Callback { id, output, n_outputs, label } = &g.g[*node].kind else {
                        unreachable!("callback step of a non-callback")
                    };
                    if !callback_results.contains_key(id) {
                        let a: Vec<Buffer> = args.iter().map(|&x| vals[x].clone().expect("live argument")).collect();
                        let res = CatchingRunner(callbacks)
                            .run(*id, &a)
                            .map_err(|e| OpError::new("callback", format!("{label}: {e}")))?;
                        if res.len() != *n_outputs {
                            return Err(OpError::new(
                                "callback",
                                format!("{label} returned {} values, expected {n_outputs}", res.len()),
                            ));
                        }
                        callback_results.insert(*id, res);
                    }
                    let r = callback_results[id][*output].clone();
                    if TensorType::of(&r) != self.types[*out] {
                        return Err(OpError::new(
                            "callback",
                            format!("{label} returned {} where {} was expected", TensorType::of(&r), self.types[*out]),
                        ));
                    }
                    vals[*out] = Some(r);
                }
            }
            for &v in &self.free_after[si] {
                if let Some(b) = vals[v].take() {
                    if self.recycle[v] {
                        if let Ok(d) = b.into_data() {
                            pool.entry((d.dtype(), d.len())).or_default().push(d);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn run_kernel(
        &self,
        kernel: usize,
        args: &[usize],
        outs: &[usize],
        reuse: &[Option<usize>],
        vals: &mut [Option<Buffer>],
        pool: &mut HashMap<(DType, usize), Vec<Data>>,
    ) {
        let k = &self.kernels[kernel];
        // Output storage: an argument's (in place), pooled, or fresh.
        let mut out_data: Vec<Data> = Vec::with_capacity(outs.len());
        let mut taken: Vec<(usize, usize)> = Vec::new(); // (arg value, output index)
        for (o, (&out, r)) in outs.iter().zip(reuse).enumerate() {
            let ty = &self.types[out];
            let mut data = None;
            if let Some(a) = r {
                if let Some(b) = vals[*a].take() {
                    match b.into_data() {
                        Ok(d) => {
                            taken.push((*a, o));
                            data = Some(d);
                        }
                        Err(b) => vals[*a] = Some(b),
                    }
                }
            }
            let data = data.unwrap_or_else(|| {
                pool.get_mut(&(ty.dtype, ty.numel()))
                    .and_then(|p| p.pop())
                    .unwrap_or_else(|| fresh(ty.dtype, ty.numel()))
            });
            out_data.push(data);
        }
        let out_ptrs: Vec<*mut u8> = out_data.iter_mut().map(|d| d.as_mut_ptr()).collect();
        let arg_ptrs: Vec<*const u8> = args
            .iter()
            .map(|a| match taken.iter().find(|(t, _)| t == a) {
                Some(&(_, o)) => out_ptrs[o] as *const u8,
                None => vals[*a].as_ref().expect("live argument").data().as_ptr(),
            })
            .collect();
        let items = k.spec.items();
        let work = k.spec.rows * k.spec.cols * k.spec.nodes.len().max(1);
        let threads = rayon::current_num_threads();
        let ptrs = KernelArgs { args: arg_ptrs, outs: out_ptrs };
        if work < PARALLEL_WORK || threads == 1 || items < 2 {
            // SAFETY: the pointers address live storage of the types and lengths the kernel was
            // generated for (checked when the plan was built), outputs do not overlap inputs
            // except an in-place output over an argument it reads elementwise.
            unsafe { (k.f)(ptrs.args.as_ptr(), ptrs.outs.as_ptr(), 0, items as i64) };
        } else {
            let chunks = (threads * 4).min(items);
            let per = items.div_ceil(chunks);
            let per = if k.spec.row_kernel { per } else { per.next_multiple_of(16) };
            let f = k.f;
            (0..items.div_ceil(per)).into_par_iter().for_each(|c| {
                let (s, e) = (c * per, ((c + 1) * per).min(items));
                let p = &ptrs;
                // SAFETY: as above; chunks write disjoint ranges of the outputs.
                unsafe { f(p.args.as_ptr(), p.outs.as_ptr(), s as i64, e as i64) };
            });
        }
        for (&out, mut d) in outs.iter().zip(out_data) {
            let n = self.types[out].numel();
            if d.len() != n {
                // SAFETY: a fresh output (capacity n, see `fresh`); the kernel has written all
                // n elements (its ranges cover [0, items), and every item writes its elements).
                unsafe { d.set_len(n) };
            }
            vals[out] = Some(Buffer::new(d, &self.types[out].shape));
        }
    }
}

/// Fresh storage for a kernel output, not initialized (no memset: the kernel writes every
/// element; the caller sets the length after it ran). A large buffer comes straight from
/// `mmap` untouched; asking for transparent huge pages before the kernel's first write turns
/// thousands of 4 KiB page faults into a few 2 MiB ones (a fresh 64 MiB output: ~15 ms less on
/// the pointwise chain).
fn fresh(dtype: DType, n: usize) -> Data {
    let mut d = Data::with_capacity(dtype, n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n * dtype.size();
        if bytes >= 4 * HUGE {
            let start = d.as_mut_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            let end = (start + bytes) / HUGE * HUGE;
            if end > aligned {
                // SAFETY: [aligned, end) lies inside this allocation, which we own; MADV_HUGEPAGE
                // only changes how the kernel backs the pages, never their contents (fresh
                // pages read as zero either way). A failure is harmless and ignored.
                unsafe { libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE) };
            }
        }
    }
    d
}

struct KernelArgs {
    args: Vec<*const u8>,
    outs: Vec<*mut u8>,
}

// SAFETY: the pointers are only dereferenced by kernels, which read inputs and write
// disjoint ranges of outputs; the storage outlives the parallel section.
unsafe impl Sync for KernelArgs {}

/// Runs callbacks, turning a panicking hook into an error (the caller stays usable).
struct CatchingRunner<'a>(&'a dyn CallbackRunner);

impl CallbackRunner for CatchingRunner<'_> {
    fn run(&self, id: usize, args: &[Buffer]) -> Result<Vec<Buffer>, String> {
        match catch_unwind(AssertUnwindSafe(|| self.0.run(id, args))) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(format!("hook panicked: {msg}"))
            }
        }
    }
}
