//! Fusion: partitions a graph's nodes into kernels.
//!
//! - **Pointwise**: maximal regions of elementwise ops over one iteration space. Operands of
//!   a smaller (broadcast) shape are read with broadcast indexing rather than fused, so no
//!   value is recomputed per element.
//! - **Row**: reductions over the trailing dimensions together with their pointwise producers
//!   and the pointwise consumers that run over the same rows (softmax, log_softmax,
//!   logsumexp, layer_norm, cross_entropy, sum/mean): one sweep per row.
//! - **Epilogue**: a matmul plus the pointwise ops that consume its output with its shape
//!   (bias, activation): the epilogue runs in one pass over the product.
//! - **Single**: everything else (gather, conv, layout copies), one node per kernel.
//! - **Callback**: hooks are barriers; nothing fuses across them.
//!
//! Merging never creates a cycle between kernels: a node joins a kernel only if none of its
//! other operands depends on that kernel.

use std::collections::{HashMap, HashSet};

use crate::graph::{Graph, NodeId, NodeKind};
use crate::ops::Op;

/// What a kernel does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// An elementwise region.
    Pointwise,
    /// Reductions over trailing dims with their row-wise producers and consumers.
    Row,
    /// A matmul and its pointwise epilogue.
    Epilogue,
    /// One node that is not fused.
    Single,
    /// A hook callback.
    Callback,
    /// A graph input or a constant: no kernel.
    Source,
}

/// One kernel: its kind and its nodes in topological order.
#[derive(Clone, Debug)]
pub struct FusionGroup {
    /// The kind.
    pub kind: GroupKind,
    /// Member nodes, operands first.
    pub nodes: Vec<NodeId>,
}

/// A row op (a reduction over the trailing dims, softmax over the last), with its row length.
fn row_reduction(g: &Graph, n: NodeId) -> Option<usize> {
    let input = g.operands(n).first().copied()?;
    g.op(n)?.row_length(&g.ty(input).shape)
}

/// Whether the graph of kernels, with an edge wherever a value crosses from one kernel to
/// another, is acyclic; `kernel_of` names each node's kernel.
fn kernel_graph_acyclic(g: &Graph, kernel_of: impl Fn(NodeId) -> usize) -> bool {
    let mut edges: HashMap<usize, HashSet<usize>> = HashMap::new();
    let mut indeg: HashMap<usize, usize> = HashMap::new();
    for n in g.node_ids() {
        indeg.entry(kernel_of(n)).or_insert(0);
    }
    for (a, b, _) in g.edges() {
        let (ka, kb) = (kernel_of(a), kernel_of(b));
        if ka != kb && edges.entry(ka).or_default().insert(kb) {
            *indeg.entry(kb).or_insert(0) += 1;
        }
    }
    let mut ready: Vec<usize> = indeg.iter().filter(|(_, &d)| d == 0).map(|(&k, _)| k).collect();
    let mut done = 0;
    while let Some(k) = ready.pop() {
        done += 1;
        for &t in edges.get(&k).into_iter().flatten() {
            let d = indeg.get_mut(&t).expect("kernel");
            *d -= 1;
            if *d == 0 {
                ready.push(t);
            }
        }
    }
    done == indeg.len()
}

/// The most nodes one kernel takes. A longer pointwise chain becomes several kernels: Cranelift's
/// register allocation grows faster than linearly in a function's size (a 2000-op chain in one
/// function compiled 6x slower per op than a 500-op one), and past a few hundred ops the extra
/// buffer pass between kernels costs far less than one more op's arithmetic.
pub const MAX_KERNEL_NODES: usize = 256;

/// The kernels of `g`, in topological order of their first node.
pub fn fuse(g: &Graph) -> Vec<FusionGroup> {
    fuse_with(g, &|_, _| true)
}

/// [`fuse`], where only nodes for which `fusible` holds may join pointwise, row or epilogue
/// kernels (a backend passes what its code generator covers); the others are `Single`.
pub fn fuse_with(g: &Graph, fusible: &dyn Fn(&Graph, NodeId) -> bool) -> Vec<FusionGroup> {
    let order = g.topo_order().expect("fusion needs an acyclic graph");
    let mut k = Grouping { graph: g, group_of: HashMap::new(), groups: Vec::new(), row_space: HashMap::new() };
    for &n in &order {
        let gid = match g.kind(n) {
            NodeKind::Input { .. } | NodeKind::Op(Op::Full { .. } | Op::Constant(_)) => k.seed(n, GroupKind::Source),
            NodeKind::Callback { .. } => k.seed(n, GroupKind::Callback),
            NodeKind::Op(op) => k.place_op(n, op, fusible(g, n)),
        };
        k.group_of.insert(n, gid);
    }
    k.finish(&order)
}

/// The kernels built so far while [`fuse_with`] visits the nodes in topological order.
struct Grouping<'a> {
    graph: &'a Graph,
    /// The kernel of each node visited.
    group_of: HashMap<NodeId, usize>,
    groups: Vec<FusionGroup>,
    /// Row space of a row kernel: (numel of the reduced input, row length).
    row_space: HashMap<usize, (usize, usize)>,
}

impl Grouping<'_> {
    /// Starts a kernel of `kind` with `n`.
    fn seed(&mut self, n: NodeId, kind: GroupKind) -> usize {
        self.groups.push(FusionGroup { kind, nodes: vec![n] });
        self.groups.len() - 1
    }

    /// Puts op node `n` into a kernel: an operand's kernel it fits, the epilogue of a matmul,
    /// or a new kernel. `can` says whether the backend may fuse `n` at all.
    fn place_op(&mut self, n: NodeId, op: &Op, can: bool) -> usize {
        let operands = self.graph.operands(n);
        let pointwise = can && op.is_elementwise();
        let row_red = if can { row_reduction(self.graph, n) } else { None };
        let candidate =
            if pointwise || row_red.is_some() { self.operand_kernel(n, &operands, pointwise, row_red) } else { None };
        match (candidate, row_red) {
            (Some(og), Some(row)) => self.attach_row(n, og, operands[0], row),
            (Some(og), None) => {
                self.merge_pointwise(n, og, &operands);
                og
            }
            (None, Some(row)) => {
                let id = self.seed(n, GroupKind::Row);
                self.row_space.insert(id, (self.graph.ty(operands[0]).numel(), row));
                id
            }
            (None, None) if pointwise => self.attach_epilogue(n, &operands),
            (None, None) => self.seed(n, GroupKind::Single),
        }
    }

    /// The first kernel of an operand that `n` (pointwise, or a row reduction of rows of
    /// length `row_red`) fits into without making the kernels cyclic.
    fn operand_kernel(
        &mut self,
        n: NodeId,
        operands: &[NodeId],
        pointwise: bool,
        row_red: Option<usize>,
    ) -> Option<usize> {
        let numel = self.graph.ty(n).numel();
        for &o in operands {
            let Some(&og) = self.group_of.get(&o) else { continue };
            if self.groups[og].nodes.len() >= MAX_KERNEL_NODES {
                continue;
            }
            if self.fits(o, og, numel, pointwise, row_red) && self.joins_acyclic(n, og) {
                return Some(og);
            }
        }
        None
    }

    /// Whether a node of `numel` elements reading `o` (in kernel `og`) iterates over `og`'s space.
    fn fits(&self, o: NodeId, og: usize, numel: usize, pointwise: bool, row_red: Option<usize>) -> bool {
        let okind = &self.groups[og].kind;
        let onumel = self.graph.ty(o).numel();
        match okind {
            GroupKind::Pointwise | GroupKind::Epilogue => {
                // Same iteration space (a reduction may consume it whole).
                (row_red.is_some() || onumel == numel) && (pointwise || okind == &GroupKind::Pointwise)
            }
            GroupKind::Row => {
                let (space, row) = self.row_space[&og];
                // Pointwise over the rows, or over one value per row, or another reduction of
                // the same rows.
                (pointwise && (numel == space || numel * row == space))
                    || row_red.is_some_and(|r| r == row && onumel == space)
            }
            _ => false,
        }
    }

    /// Whether `n` can join kernel `k` with the kernels still acyclic.
    fn joins_acyclic(&mut self, n: NodeId, k: usize) -> bool {
        self.merge_acyclic(n, &[k])
    }

    /// Whether the kernels `members` and the node `n` (being placed: its users are not) can
    /// become one kernel with the kernel graph still acyclic. The graph is acyclic now, so a
    /// new cycle leaves the merged kernel and comes back; it leaves from a smaller member or
    /// from the largest, and the search walks out from the small side only (forward from the
    /// smaller members, backward from them and from `n`'s other operand kernels), never
    /// through the largest member, so growing one long kernel costs O(1) per node rather
    /// than a walk over the whole graph.
    fn merge_acyclic(&self, n: NodeId, members: &[usize]) -> bool {
        let largest = members.iter().copied().max_by_key(|&k| self.groups[k].nodes.len());
        let small: Vec<usize> = members.iter().copied().filter(|&k| Some(k) != largest).collect();
        let inside = |k: usize| members.contains(&k);
        let outside_operands = self.graph.operands(n).into_iter().filter_map(|o| self.group_of.get(&o).copied());
        let mut back: Vec<usize> = outside_operands.filter(|&k| !inside(k)).collect();
        back.extend(small.iter().copied());
        !self.reaches(&small, members, n, true) && !self.reaches(&back, members, n, false)
    }

    /// Whether a kernel path of at least one edge (`forward`: along uses, else along operands)
    /// from a kernel in `from` through kernels outside `members` reaches a member or `n`.
    fn reaches(&self, from: &[usize], members: &[usize], n: NodeId, forward: bool) -> bool {
        let mut seen: HashSet<usize> = from.iter().copied().collect();
        let mut stack: Vec<usize> = from.to_vec();
        while let Some(k) = stack.pop() {
            // Edges out of a member into the merged kernel are internal, not a path.
            let from_member = members.contains(&k);
            for &m in &self.groups[k].nodes {
                let next = if forward { self.graph.users(m) } else { self.graph.operands(m) };
                for x in next {
                    let xk = if x == n { None } else { self.group_of.get(&x).copied() };
                    let into_merged = x == n || xk.is_some_and(|xk| members.contains(&xk));
                    if into_merged && !from_member {
                        return true;
                    }
                    if let Some(xk) = xk.filter(|_| !into_merged) {
                        if seen.insert(xk) {
                            stack.push(xk);
                        }
                    }
                }
            }
        }
        false
    }

    /// Adds the row reduction `n` of `input` to `og`, which becomes a row kernel.
    fn attach_row(&mut self, n: NodeId, og: usize, input: NodeId, row: usize) -> usize {
        if self.groups[og].kind != GroupKind::Row {
            let space = self.graph.ty(input).numel();
            self.groups[og].kind = GroupKind::Row;
            self.row_space.insert(og, (space, row));
        }
        self.groups[og].nodes.push(n);
        og
    }

    /// Adds pointwise `n` to `og`, then pulls in the sibling pointwise kernels over the same
    /// space that `n` also reads, when no outside node lies between them (no cycle).
    fn merge_pointwise(&mut self, n: NodeId, og: usize, operands: &[NodeId]) {
        let numel = self.graph.ty(n).numel();
        self.groups[og].nodes.push(n);
        for &o in operands {
            let Some(&ob) = self.group_of.get(&o) else { continue };
            if ob == og || self.groups[ob].kind != GroupKind::Pointwise || self.graph.ty(o).numel() != numel {
                continue;
            }
            if self.groups[og].nodes.len() + self.groups[ob].nodes.len() > MAX_KERNEL_NODES {
                continue;
            }
            if self.merge_acyclic(n, &[og, ob]) {
                let moved = std::mem::take(&mut self.groups[ob].nodes);
                for &m in &moved {
                    self.group_of.insert(m, og);
                }
                self.groups[og].nodes.extend(moved);
            }
        }
    }

    /// Makes pointwise `n` the epilogue of a matmul operand with its shape that only `n`
    /// reads, or else starts a pointwise kernel with it.
    fn attach_epilogue(&mut self, n: NodeId, operands: &[NodeId]) -> usize {
        let numel = self.graph.ty(n).numel();
        let mm = operands.iter().copied().find(|o| {
            matches!(self.graph.kind(*o), NodeKind::Op(Op::MatMul { .. }))
                && self.graph.ty(*o).numel() == numel
                && self.groups[self.group_of[o]].kind == GroupKind::Single
                && self.graph.users(*o).len() == 1
        });
        if let Some(o) = mm {
            let og = self.group_of[&o];
            if self.joins_acyclic(n, og) {
                self.groups[og].kind = GroupKind::Epilogue;
                self.groups[og].nodes.push(n);
                return og;
            }
        }
        self.seed(n, GroupKind::Pointwise)
    }

    /// The non-empty kernels, each with its nodes in topological order (`order`).
    fn finish(mut self, order: &[NodeId]) -> Vec<FusionGroup> {
        let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        self.groups.retain(|k| !k.nodes.is_empty());
        for k in &mut self.groups {
            k.nodes.sort_by_key(|n| position[n]);
        }
        self.groups
    }
}

/// The kernels that do work (not sources), as lists of nodes: the test API for asserting
/// which nodes share a kernel.
pub fn kernel_groups(g: &Graph) -> Vec<Vec<NodeId>> {
    fuse(g).into_iter().filter(|k| k.kind != GroupKind::Source).map(|k| k.nodes).collect()
}

/// The text dump of the kernels: each group with its members in typed SSA.
pub fn fused_text(g: &Graph) -> String {
    fused_text_with(g, &|_, _| true)
}

/// [`fused_text`] for the groups of [`fuse_with`].
pub fn fused_text_with(g: &Graph, fusible: &dyn Fn(&Graph, NodeId) -> bool) -> String {
    let mut s = String::new();
    for (i, k) in fuse_with(g, fusible).iter().enumerate().filter(|(_, k)| k.kind != GroupKind::Source) {
        s.push_str(&format!("kernel {i} ({:?}, {} nodes):\n", k.kind, k.nodes.len()));
        for &n in &k.nodes {
            let node = &g.node(n);
            let what = match &node.kind {
                NodeKind::Op(op) => format!("{}{}", op.name(), crate::graph::op_attrs(op)),
                NodeKind::Callback { label, .. } => format!("callback !! {label}"),
                NodeKind::Input { name, .. } => format!("input {name}"),
            };
            let args: Vec<String> = g.operands(n).iter().map(|o| format!("%{}", o.index())).collect();
            s.push_str(&format!("  %{}: {} = {} {}\n", n.index(), node.ty, what, args.join(", ")));
        }
    }
    s
}

/// Checks that kernels can run in some order: the graph of kernels (an edge where a value
/// crosses from one kernel to another) is acyclic, and every node is in exactly one kernel.
pub fn check_kernels(g: &Graph, groups: &[FusionGroup]) -> Result<(), String> {
    let mut owner: HashMap<NodeId, usize> = HashMap::new();
    for (i, k) in groups.iter().enumerate() {
        for &n in &k.nodes {
            if owner.insert(n, i).is_some() {
                return Err(format!("%{} is in two kernels", n.index()));
            }
        }
    }
    if owner.len() != g.node_count() {
        return Err(format!("{} nodes but {} placed in kernels", g.node_count(), owner.len()));
    }
    if !kernel_graph_acyclic(g, |n| owner[&n]) {
        return Err("kernels form a cycle".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::composite;
    use crate::emitter::Build;
    use crate::graph::InputRole;
    use crate::ops::{ReduceKind, TensorType, UnaryOp};
    use tracegrad_runtime::DType;

    fn input(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
        g.add_input(name, InputRole::Data, TensorType::new(DType::F32, shape))
    }

    fn group_of(groups: &[Vec<NodeId>], n: NodeId) -> usize {
        groups.iter().position(|k| k.contains(&n)).expect("node in a kernel")
    }

    #[test]
    fn the_pointwise_chain_is_one_kernel() {
        // tanh(a*x + b) * sigmoid(x) + 0.5*x
        let mut g = Graph::new();
        let (x, a, b) = (input(&mut g, "x", &[1024]), input(&mut g, "a", &[1024]), input(&mut g, "b", &[1024]));
        let ax = g.mul(&a, &x).unwrap();
        let axb = g.add(&ax, &b).unwrap();
        let t = g.unary(UnaryOp::Tanh, &axb).unwrap();
        let s = g.unary(UnaryOp::Sigmoid, &x).unwrap();
        let ts = g.mul(&t, &s).unwrap();
        let hx = g.mul_scalar(&x, 0.5).unwrap();
        let y = g.add(&ts, &hx).unwrap();
        g.add_output("y", y);
        let k = kernel_groups(&g);
        assert_eq!(k.len(), 1, "{}", fused_text(&g));
        assert_eq!(k[0].len(), 7);
    }

    #[test]
    fn a_long_chain_splits_into_kernels_of_at_most_the_cap() {
        let mut g = Graph::new();
        let mut y = input(&mut g, "x", &[64]);
        let ops = 2 * MAX_KERNEL_NODES + 10;
        for _ in 0..ops {
            y = g.unary(UnaryOp::Tanh, &y).unwrap();
        }
        g.add_output("y", y);
        let sizes: Vec<usize> = kernel_groups(&g).iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_KERNEL_NODES, MAX_KERNEL_NODES, 10]);
    }

    #[test]
    fn random_graphs_fuse_into_acyclic_kernels() {
        // Random DAGs of pointwise ops, broadcasts and row sums: the local cycle check must
        // leave the whole kernel graph acyclic, whatever merges it allowed.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize % n
        };
        for _ in 0..300 {
            let mut g = Graph::new();
            let mut wide = vec![input(&mut g, "x", &[8, 4]), input(&mut g, "y", &[8, 4])];
            let mut narrow = vec![input(&mut g, "z", &[8, 1])];
            for _ in 0..4 + next(20) {
                let a = wide[next(wide.len())];
                let v = match next(4) {
                    0 => g.unary(UnaryOp::Tanh, &a).unwrap(),
                    1 => g.add(&a, &wide[next(wide.len())]).unwrap(),
                    2 => g.mul(&a, &narrow[next(narrow.len())]).unwrap(),
                    _ => {
                        let r = g.reduce(ReduceKind::Sum, &a, &[1], true).unwrap();
                        narrow.push(r);
                        continue;
                    }
                };
                wide.push(v);
            }
            g.add_output("out", *wide.last().unwrap());
            g.add_output("row", *narrow.last().unwrap());
            check_kernels(&g, &fuse(&g)).unwrap_or_else(|e| panic!("{e}\n{}", g.to_text()));
        }
    }

    #[test]
    fn decomposed_softmax_is_one_row_sweep() {
        // exp(x - max) / sum(exp(x - max)) over the last dim of [8, 16].
        let mut g = Graph::new();
        let x = input(&mut g, "x", &[8, 16]);
        let m = g.reduce(ReduceKind::Max, &x, &[1], true).unwrap();
        let c = g.sub(&x, &m).unwrap();
        let e = g.unary(UnaryOp::Exp, &c).unwrap();
        let s = g.sum(&e, &[1], true).unwrap();
        let y = g.div(&e, &s).unwrap();
        g.add_output("y", y);
        let fused = fuse(&g);
        let work: Vec<_> = fused.iter().filter(|k| k.kind != GroupKind::Source).collect();
        assert_eq!(work.len(), 1, "{}", fused_text(&g));
        assert_eq!(work[0].kind, GroupKind::Row);
        // The primitive softmax and layer_norm are row kernels too.
        let mut g = Graph::new();
        let x = input(&mut g, "x", &[8, 16]);
        let y = composite::softmax(&mut g, &x, -1).unwrap();
        let z = composite::layer_norm(&mut g, &y, &[16], None, None, 1e-5).unwrap();
        g.add_output("z", z);
        let k = kernel_groups(&g);
        assert!(k.len() <= 2, "{}", fused_text(&g));
    }

    #[test]
    fn linear_bias_relu_is_a_gemm_plus_one_pass() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", &[4, 8]);
        let w = input(&mut g, "w", &[16, 8]);
        let b = input(&mut g, "b", &[16]);
        let y = composite::linear(&mut g, &x, &w, Some(&b)).unwrap();
        let r = g.unary(UnaryOp::Relu, &y).unwrap();
        g.add_output("r", r);
        let fused = fuse(&g);
        let work: Vec<_> = fused.iter().filter(|k| k.kind != GroupKind::Source).collect();
        assert_eq!(work.len(), 1, "{}", fused_text(&g));
        assert_eq!(work[0].kind, GroupKind::Epilogue);
    }

    #[test]
    fn callbacks_are_barriers_and_groups_never_form_cycles() {
        let mut g = Graph::new();
        let x = input(&mut g, "x", &[32]);
        let a = g.unary(UnaryOp::Exp, &x).unwrap();
        let ty = g.ty(a).clone();
        let c = g.add_callback(0, "hook", &[a], &[ty])[0];
        let b = g.unary(UnaryOp::Tanh, &c).unwrap();
        // d uses both the pre-callback and post-callback values: it must not join `a`'s
        // kernel (that would need the callback inside it).
        let d = g.add(&a, &b).unwrap();
        g.add_output("d", d);
        let k = kernel_groups(&g);
        assert_ne!(group_of(&k, a), group_of(&k, c));
        assert_ne!(group_of(&k, c), group_of(&k, b));
        assert_ne!(group_of(&k, a), group_of(&k, d), "{}", fused_text(&g));
        assert_eq!(group_of(&k, b), group_of(&k, d));
    }
}
