//! The plan phase: a graph's live nodes, fused and ordered, lowered to steps (JIT kernels,
//! runtime kernels and hooks) over numbered values.

use std::collections::{BTreeSet, HashMap, HashSet};

use tracegrad_compiler::fusion::{fuse_with, GroupKind};
use tracegrad_compiler::graph::{node_error, Graph, NodeId};
use tracegrad_compiler::ops::{BinaryOp, Op, TensorType};
use tracegrad_runtime::Buffer;

use crate::kernel::{is_row_op, lower, supported, KernelSpec};

/// One step of a plan.
#[derive(Debug)]
pub(super) enum Step {
    /// A JIT kernel.
    Kernel {
        kernel: usize,
        args: Vec<usize>,
        outs: Vec<usize>,
        /// Per output: an argument whose storage it may take (dies here, same type); chosen
        /// by the memory phase.
        reuse: Vec<Option<usize>>,
        nodes: Vec<NodeId>,
    },
    /// One node on the runtime's kernels (gemm, conv, gather, layout copies, ...).
    Eval { node: NodeId, args: Vec<usize>, out: usize },
    /// A hook.
    Callback { node: NodeId, args: Vec<usize>, out: usize },
    /// A matmul whose only use is `p ± s·product` (SGD's `p − lr·g` on a weight gradient),
    /// run as one gemm that accumulates `±s·op(a)·op(b)` into a copy of `p`, or into `p`'s own
    /// storage when the memory phase lets it take `p` over: the product is never
    /// materialized. `args` are `[p, a, b, s]`; `nodes` the matmul, the scaling and the update.
    Accumulate { args: Vec<usize>, out: usize, trans: (bool, bool), negate: bool, in_place: bool, nodes: Vec<NodeId> },
}

impl Step {
    /// The values the step reads.
    pub(super) fn args(&self) -> &[usize] {
        match self {
            Step::Kernel { args, .. }
            | Step::Eval { args, .. }
            | Step::Callback { args, .. }
            | Step::Accumulate { args, .. } => args,
        }
    }
}

/// The steps of a graph and the values they pass: every node is one value, numbered in
/// topological order.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Value id of every node.
    pub value: HashMap<NodeId, usize>,
    /// Type of every value.
    pub types: Vec<TensorType>,
    pub inputs: Vec<usize>,
    pub outputs: Vec<usize>,
    pub steps: Vec<Step>,
    /// Constants, evaluated once at build time (those folded into kernels are dropped).
    pub constants: Vec<(usize, Buffer)>,
    /// The kernel of each `Step::Kernel`, by its `kernel` index.
    pub specs: Vec<KernelSpec>,
    /// Groups that could not be lowered, with the reason (they run node by node).
    pub fallbacks: Vec<String>,
}

/// Plans `g` for the JIT: dead code dropped, fused groups in dependency order, each lowered
/// to a kernel where it can be and run node by node where not.
pub(super) fn plan(g: &Graph) -> Result<Plan, String> {
    let order = g.topo_order()?;
    let mut p = Plan::default();
    for &n in &order {
        p.value.insert(n, p.types.len());
        p.types.push(g.ty(n).clone());
    }
    p.inputs = g.inputs.iter().map(|n| p.value[n]).collect();
    p.outputs = g.outputs.iter().map(|(_, n)| p.value[n]).collect();
    let live = g.live_nodes();
    let groups: Vec<(GroupKind, Vec<NodeId>)> = fuse_with(g, &supported)
        .into_iter()
        .map(|k| (k.kind, k.nodes.into_iter().filter(|n| live.contains(n)).collect::<Vec<_>>()))
        .filter(|(_, ns)| !ns.is_empty())
        .collect();
    let mut planner = Planner { graph: g, live: &live, plan: p };
    for gi in order_groups(g, &groups) {
        let (kind, nodes) = &groups[gi];
        planner.group(kind, nodes)?;
    }
    let mut p = planner.plan;
    // Constants folded into kernels as immediates need no buffer.
    let read: HashSet<usize> =
        p.steps.iter().flat_map(|s| s.args().iter().copied()).chain(p.outputs.iter().copied()).collect();
    p.constants.retain(|(v, _)| read.contains(v));
    Ok(p)
}

/// Orders fused groups so every group runs after the groups it reads from.
fn order_groups(g: &Graph, groups: &[(GroupKind, Vec<NodeId>)]) -> Vec<usize> {
    let mut owner: HashMap<NodeId, usize> = HashMap::new();
    for (i, (_, k)) in groups.iter().enumerate() {
        for &n in k {
            owner.insert(n, i);
        }
    }
    let mut indeg = vec![0usize; groups.len()];
    let mut succ: Vec<HashSet<usize>> = vec![HashSet::new(); groups.len()];
    for (i, (_, k)) in groups.iter().enumerate() {
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
    let mut ready: BTreeSet<usize> = (0..groups.len()).filter(|&i| indeg[i] == 0).collect();
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

/// Lowers groups to steps, in order.
struct Planner<'a> {
    graph: &'a Graph,
    live: &'a HashSet<NodeId>,
    plan: Plan,
}

impl Planner<'_> {
    fn ids(&self, ns: &[NodeId]) -> Vec<usize> {
        ns.iter().map(|n| self.plan.value[n]).collect()
    }

    fn group(&mut self, kind: &GroupKind, nodes: &[NodeId]) -> Result<(), String> {
        match kind {
            GroupKind::Source => self.constants(nodes)?,
            GroupKind::Callback => {
                for &n in nodes {
                    let (args, out) = (self.ids(&self.graph.operands(n)), self.plan.value[&n]);
                    self.plan.steps.push(Step::Callback { node: n, args, out });
                }
            }
            GroupKind::Single => self.node_by_node(nodes),
            GroupKind::Epilogue => {
                if let Some(step) = self.accumulate(nodes) {
                    self.plan.steps.push(step);
                    return Ok(());
                }
                // The head (a matmul or conv) runs on the runtime's kernels, its epilogue fused.
                self.node_by_node(&nodes[..1]);
                self.kernel(&nodes[1..], false);
            }
            GroupKind::Pointwise => self.kernel(nodes, false),
            GroupKind::Row => {
                let row = nodes.iter().any(|&n| self.graph.op(n).is_some_and(is_row_op));
                self.kernel(nodes, row);
            }
        }
        Ok(())
    }

    /// The [`Step::Accumulate`] for an epilogue group that is exactly `p ± s·(a·b)` over a 2-D
    /// float product used nowhere else, with `s` a scalar and `p` of the product's type.
    fn accumulate(&self, nodes: &[NodeId]) -> Option<Step> {
        let g = self.graph;
        let &[mm, mul, upd] = nodes else { return None };
        let Some(&Op::MatMul { trans_a, trans_b }) = g.op(mm) else { return None };
        let ty = g.ty(mm);
        let [a, b] = g.operands(mm)[..] else { return None };
        if ty.rank() != 2 || g.ty(a).rank() != 2 || g.ty(b).rank() != 2 || !ty.dtype.is_float() {
            return None;
        }
        let only_use = |n: NodeId, user: NodeId| {
            g.users(n).into_iter().filter(|u| self.live.contains(u)).all(|u| u == user)
                && !g.outputs.iter().any(|(_, o)| *o == n)
        };
        if g.op(mul) != Some(&Op::Binary(BinaryOp::Mul)) || !only_use(mm, mul) || !only_use(mul, upd) {
            return None;
        }
        let s = match g.operands(mul)[..] {
            [x, s] | [s, x] if x == mm && s != mm => s,
            _ => return None,
        };
        let (p, negate) = match (g.op(upd)?, &g.operands(upd)[..]) {
            (Op::Binary(BinaryOp::Add), &[p, m] | &[m, p]) if m == mul && p != mul => (p, false),
            (Op::Binary(BinaryOp::Sub), &[p, m]) if m == mul && p != mul => (p, true),
            _ => return None,
        };
        let scalar = g.ty(s);
        if scalar.rank() != 0 || scalar.dtype != ty.dtype || g.ty(p) != ty || g.ty(upd) != ty || [a, b, s].contains(&p)
        {
            return None;
        }
        Some(Step::Accumulate {
            args: self.ids(&[p, a, b, s]),
            out: self.plan.value[&upd],
            trans: (trans_a, trans_b),
            negate,
            in_place: false,
            nodes: nodes.to_vec(),
        })
    }

    /// Evaluates a source group's constants now (inputs have nothing to evaluate).
    fn constants(&mut self, nodes: &[NodeId]) -> Result<(), String> {
        for &n in nodes {
            if let Some(op) = self.graph.op(n) {
                let b = op.eval(&[], self.graph.ty(n)).map_err(|e| node_error(self.graph, n, e).to_string())?;
                self.plan.constants.push((self.plan.value[&n], b));
            }
        }
        Ok(())
    }

    fn node_by_node(&mut self, nodes: &[NodeId]) {
        for &n in nodes {
            let (args, out) = (self.ids(&self.graph.operands(n)), self.plan.value[&n]);
            self.plan.steps.push(Step::Eval { node: n, args, out });
        }
    }

    /// One JIT kernel for `nodes`, or node-by-node steps (with a note) if it cannot be lowered.
    fn kernel(&mut self, nodes: &[NodeId], row: bool) {
        match lower(self.graph, nodes, row, &|n| self.live.contains(&n)) {
            Ok(l) => {
                self.plan.specs.push(l.spec);
                let (args, outs) = (self.ids(&l.args), self.ids(&l.outs));
                let kernel = self.plan.specs.len() - 1;
                self.plan.steps.push(Step::Kernel { kernel, args, outs, reuse: Vec::new(), nodes: nodes.to_vec() });
            }
            Err(why) => {
                let list: Vec<String> = nodes.iter().map(|n| format!("%{}", n.index())).collect();
                self.plan.fallbacks.push(format!("{} run node by node: {why}", list.join(" ")));
                self.node_by_node(nodes);
            }
        }
    }
}
