//! The static-graph IR: a petgraph `StableGraph` whose nodes are typed ops and whose edges are
//! ordered operands (the edge weight is the operand position).
//!
//! [`Graph`] implements [`Emitter`], so everything written against `Build` (derivative rules,
//! composites) builds graph nodes unchanged: the tracer records a forward pass this way, and
//! AOT autodiff ([`crate::autodiff`]) runs the very `Op::vjp` rules eager mode runs.
//!
//! Invariants (checked by [`Graph::validate`], which tests and debug builds run after every
//! pass): the graph is acyclic; every op node has exactly the operands its op takes, at
//! positions `0..n`; every node's stored type is what its shape rule infers; callback nodes
//! keep the type of the value they stand for.

use std::collections::HashMap;
use std::fmt::Write as _;

use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::{EdgeRef, IntoEdgeReferences};
use petgraph::Direction;

use crate::emitter::Emitter;
use crate::ops::{Op, OpError, OpResult, TensorType};

/// A node's identity in a [`Graph`]. Ids are stable: removing a node never renumbers others.
pub type NodeId = NodeIndex;

/// Why a graph input exists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum InputRole {
    /// A user-supplied tensor.
    Data,
    /// A module parameter lifted to an input.
    Parameter,
    /// A module buffer lifted to an input.
    Buffer,
    /// Optimizer state (momentum, moments, step) or a hyper-parameter such as the learning rate.
    State,
    /// A gradient fed into a backward graph.
    Grad,
    /// A value saved by a forward graph for its backward graph.
    Saved,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum NodeKind {
    /// A graph input.
    Input {
        /// Its name (`x`, `fc1.weight`, …).
        name: String,
        /// Its role.
        role: InputRole,
    },
    /// A primitive op applied to the node's operands.
    Op(Op),
    /// A runtime callback (a hook). It receives all operands as real tensors and yields
    /// `n_outputs` values of the operands' types; this node is output `output`. Passes never
    /// remove, reorder or merge callbacks.
    Callback {
        /// Which registered callback runs.
        id: usize,
        /// Which of its results this node is.
        output: usize,
        /// How many results it yields.
        n_outputs: usize,
        /// What it is, for dumps (`forward hook of fc1`).
        label: String,
    },
}

/// One node: what it computes, its output type, and where in the model it came from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GNode {
    /// The computation.
    pub kind: NodeKind,
    /// Output dtype and shape.
    pub ty: TensorType,
    /// Dotted module path of the module whose forward made it (`""` at the top level).
    pub path: String,
    /// That module's type name (`Linear`), empty at the top level.
    pub module_type: String,
}

/// A typed dataflow graph with ordered inputs and named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// The nodes and operand edges (weight = operand position).
    g: StableGraph<GNode, usize>,
    /// Inputs, in calling order.
    pub inputs: Vec<NodeIndex>,
    /// Named outputs, in order.
    pub outputs: Vec<(String, NodeIndex)>,
    /// The module scope new nodes are attributed to: (path, type name).
    pub scope: Vec<(String, String)>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    fn scoped(&self, kind: NodeKind, ty: TensorType) -> GNode {
        let (path, module_type) = self.scope.last().cloned().unwrap_or_default();
        GNode { kind, ty, path, module_type }
    }

    /// Adds an input.
    pub fn add_input(&mut self, name: &str, role: InputRole, ty: TensorType) -> NodeIndex {
        let n = self.g.add_node(self.scoped(NodeKind::Input { name: name.to_string(), role }, ty));
        self.inputs.push(n);
        n
    }

    /// Adds an op node after checking its shape rule.
    pub fn add_op(&mut self, op: Op, operands: &[NodeIndex]) -> OpResult<NodeIndex> {
        let types: Vec<TensorType> = operands.iter().map(|&o| self.g[o].ty.clone()).collect();
        let ty = op.infer(&types)?;
        let n = self.g.add_node(self.scoped(NodeKind::Op(op), ty));
        for (i, &o) in operands.iter().enumerate() {
            self.g.add_edge(o, n, i);
        }
        Ok(n)
    }

    /// Adds the callback projections for callback `id` over `operands`; returns one node per
    /// output, typed like `out_types`.
    pub fn add_callback(
        &mut self,
        id: usize,
        label: &str,
        operands: &[NodeIndex],
        out_types: &[TensorType],
    ) -> Vec<NodeIndex> {
        (0..out_types.len())
            .map(|k| {
                let kind = NodeKind::Callback { id, output: k, n_outputs: out_types.len(), label: label.to_string() };
                let n = self.g.add_node(self.scoped(kind, out_types[k].clone()));
                for (i, &o) in operands.iter().enumerate() {
                    self.g.add_edge(o, n, i);
                }
                n
            })
            .collect()
    }

    /// The node `n`. Panics if `n` was removed (an invariant violation of the caller).
    pub fn node(&self, n: NodeId) -> &GNode {
        &self.g[n]
    }

    /// The node `n`, mutably (its kind, type or attribution; operand edges stay).
    pub fn node_mut(&mut self, n: NodeId) -> &mut GNode {
        &mut self.g[n]
    }

    /// The node `n`, or `None` if there is no such node.
    pub fn try_node(&self, n: NodeId) -> Option<&GNode> {
        self.g.node_weight(n)
    }

    /// What `n` computes.
    pub fn kind(&self, n: NodeId) -> &NodeKind {
        &self.g[n].kind
    }

    /// `n`'s op, if it is an op node.
    pub fn op(&self, n: NodeId) -> Option<&Op> {
        match &self.g[n].kind {
            NodeKind::Op(op) => Some(op),
            _ => None,
        }
    }

    /// `n`'s output type.
    pub fn ty(&self, n: NodeId) -> &TensorType {
        &self.g[n].ty
    }

    /// Whether `n` is a callback node.
    pub fn is_callback(&self, n: NodeId) -> bool {
        matches!(self.g[n].kind, NodeKind::Callback { .. })
    }

    /// Whether `n` is a node of this graph.
    pub fn contains(&self, n: NodeId) -> bool {
        self.g.contains_node(n)
    }

    /// How many nodes the graph has.
    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// Every node id, in creation order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    /// Every operand edge as `(operand, user, position)`.
    pub fn edges(&self) -> impl Iterator<Item = (NodeId, NodeId, usize)> + '_ {
        self.g.edge_references().map(|e| (e.source(), e.target(), *e.weight()))
    }

    /// How many operand slots read `n` (a node reading it twice counts twice).
    pub fn use_count(&self, n: NodeId) -> usize {
        self.g.edges_directed(n, Direction::Outgoing).count()
    }

    /// Adds a copy of `node` reading `operands` in order, without checking its shape rule (for
    /// passes that copy nodes between graphs; [`Graph::validate`] checks the result).
    pub fn add_node_unchecked(&mut self, node: GNode, operands: &[NodeId]) -> NodeId {
        let n = self.g.add_node(node);
        for (i, &o) in operands.iter().enumerate() {
            self.g.add_edge(o, n, i);
        }
        n
    }

    /// Removes `n` and its edges. The caller keeps `inputs` and `outputs` consistent.
    pub fn remove_node(&mut self, n: NodeId) -> Option<GNode> {
        self.g.remove_node(n)
    }

    /// Points every use of `old` (operand edges and graph outputs) at `new`.
    pub fn replace_all_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<(NodeId, usize)> =
            self.g.edges_directed(old, Direction::Outgoing).map(|e| (e.target(), *e.weight())).collect();
        let ids: Vec<_> = self.g.edges_directed(old, Direction::Outgoing).map(|e| e.id()).collect();
        for id in ids {
            self.g.remove_edge(id);
        }
        for (t, w) in uses {
            self.g.add_edge(new, t, w);
        }
        for (_, o) in self.outputs.iter_mut() {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Marks `n` as an output called `name`.
    pub fn add_output(&mut self, name: &str, n: NodeIndex) {
        self.outputs.push((name.to_string(), n));
    }

    /// A node's operands in order.
    pub fn operands(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut e: Vec<(usize, NodeIndex)> =
            self.g.edges_directed(n, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
        e.sort_unstable_by_key(|(i, _)| *i);
        e.into_iter().map(|(_, s)| s).collect()
    }

    /// Nodes that use `n`.
    pub fn users(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut u: Vec<NodeIndex> = self.g.neighbors_directed(n, Direction::Outgoing).collect();
        u.sort_unstable();
        u.dedup();
        u
    }

    /// Nodes in a topological order (operands first; ties by creation order, so the order
    /// is deterministic and callbacks keep their relative order).
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>, String> {
        let mut indeg: HashMap<NodeIndex, usize> = HashMap::new();
        for n in self.g.node_indices() {
            indeg.insert(n, self.g.edges_directed(n, Direction::Incoming).count());
        }
        let mut ready: std::collections::BTreeSet<NodeIndex> =
            indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| n).collect();
        let mut out = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            out.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("node");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        if out.len() != self.g.node_count() {
            return Err("graph has a cycle".into());
        }
        Ok(out)
    }

    /// Checks the invariants listed in the module docs.
    pub fn validate(&self) -> Result<(), String> {
        self.topo_order()?;
        for n in self.g.node_indices() {
            let node = &self.g[n];
            let mut pos: Vec<usize> = self.g.edges_directed(n, Direction::Incoming).map(|e| *e.weight()).collect();
            pos.sort_unstable();
            if pos.iter().enumerate().any(|(i, &p)| i != p) {
                return Err(format!("%{}: operand positions {pos:?} are not 0..n", n.index()));
            }
            let operands = self.operands(n);
            match &node.kind {
                NodeKind::Input { .. } => {
                    if !operands.is_empty() {
                        return Err(format!("%{}: an input has operands", n.index()));
                    }
                }
                NodeKind::Op(op) => {
                    let types: Vec<TensorType> = operands.iter().map(|&o| self.g[o].ty.clone()).collect();
                    let ty = op.infer(&types).map_err(|e| format!("%{}: {e}", n.index()))?;
                    if ty != node.ty {
                        return Err(format!("%{}: {} infers {ty} but the node says {}", n.index(), op.name(), node.ty));
                    }
                }
                NodeKind::Callback { output, n_outputs, .. } => {
                    if output >= n_outputs {
                        return Err(format!("%{}: callback output {output} of {n_outputs}", n.index()));
                    }
                }
            }
        }
        for (name, o) in &self.outputs {
            if !self.g.contains_node(*o) {
                return Err(format!("output {name} refers to a removed node"));
            }
        }
        let mut listed = std::collections::HashSet::new();
        for i in &self.inputs {
            if !matches!(self.g.node_weight(*i).map(|n| &n.kind), Some(NodeKind::Input { .. })) {
                return Err(format!("input %{} is not an input node", i.index()));
            }
            if !listed.insert(*i) {
                return Err(format!("input %{} is listed twice", i.index()));
            }
        }
        if let Some(n) =
            self.g.node_indices().find(|n| matches!(self.g[*n].kind, NodeKind::Input { .. }) && !listed.contains(n))
        {
            return Err(format!("%{}: an input node missing from the graph's inputs", n.index()));
        }
        Ok(())
    }

    /// The typed-SSA text form: `%7: f32[64,256] = matmul %1, %3   # fc1 (Linear)`.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let order = self.topo_order().unwrap_or_else(|_| self.g.node_indices().collect());
        let ins: Vec<String> = self
            .inputs
            .iter()
            .map(|&i| match &self.g[i].kind {
                NodeKind::Input { name, .. } => format!("%{}: {} ({name})", i.index(), self.g[i].ty),
                _ => format!("%{}", i.index()),
            })
            .collect();
        let _ = writeln!(s, "graph({}) {{", ins.join(", "));
        for n in order {
            let node = &self.g[n];
            let args: Vec<String> = self.operands(n).iter().map(|o| format!("%{}", o.index())).collect();
            let rhs = match &node.kind {
                NodeKind::Input { role, .. } => {
                    if self.inputs.contains(&n) {
                        continue;
                    }
                    format!("input {role:?}")
                }
                NodeKind::Op(op) => {
                    let attrs = op_attrs(op);
                    format!("{}{} {}", op.name(), attrs, args.join(", "))
                }
                NodeKind::Callback { id, output, n_outputs, label } => {
                    format!("callback#{id}[{output}/{n_outputs}] {}   !! {label}", args.join(", "))
                }
            };
            let note =
                if node.path.is_empty() { String::new() } else { format!("   # {} ({})", node.path, node.module_type) };
            let _ = writeln!(s, "  %{}: {} = {}{}", n.index(), node.ty, rhs.trim_end(), note);
        }
        let outs: Vec<String> = self.outputs.iter().map(|(name, o)| format!("{name}=%{}", o.index())).collect();
        let _ = writeln!(s, "  return {}", outs.join(", "));
        s.push('}');
        s
    }
}

/// The attributes of an op as they appear in dumps (`[dims=[1], keepdim]`).
pub fn op_attrs(op: &Op) -> String {
    let a = match op {
        Op::Full { value, .. } => format!("{value}"),
        Op::Constant(b) => format!("{:?}", b),
        Op::Unary(crate::ops::UnaryOp::PowScalar(p)) => format!("p={p}"),
        Op::Clamp { min, max } => format!("min={min:?}, max={max:?}"),
        Op::Cast(d) => format!("{d}"),
        Op::Reduce { dims, keepdim, .. } => format!("dims={dims:?}{}", if *keepdim { ", keepdim" } else { "" }),
        Op::ArgReduce { dim, keepdim, .. } => format!("dim={dim:?}{}", if *keepdim { ", keepdim" } else { "" }),
        Op::Softmax { dim, .. } => format!("dim={dim}"),
        Op::MatMul { trans_a, trans_b } => match (trans_a, trans_b) {
            (false, false) => String::new(),
            _ => format!("{}{}", if *trans_a { "Tᵃ" } else { "" }, if *trans_b { "Tᵇ" } else { "" }),
        },
        Op::Reshape(s) | Op::Expand(s) => format!("{s:?}"),
        Op::Permute(p) => format!("{p:?}"),
        Op::Narrow { dim, start, len } => format!("dim={dim}, {start}..{}", start + len),
        Op::Cat { dim }
        | Op::IndexSelect { dim }
        | Op::IndexAdd { dim }
        | Op::Gather { dim }
        | Op::ScatterAdd { dim }
        | Op::Scatter { dim } => {
            format!("dim={dim}")
        }
        Op::ScatterReduce { dim, reduce, include_self } => {
            format!("dim={dim}, reduce={}{}", reduce.name(), if *include_self { "" } else { ", exclude_self" })
        }
        Op::VectorNorm { ord, dims, keepdim } => {
            format!("ord={ord}, dims={dims:?}{}", if *keepdim { ", keepdim" } else { "" })
        }
        Op::Conv2d { stride, padding } => format!("stride={stride:?}, padding={padding:?}"),
        Op::MaxPool2d { kernel, stride, .. } | Op::AvgPool2d { kernel, stride, .. } => {
            format!("kernel={kernel:?}, stride={stride:?}")
        }
        _ => String::new(),
    };
    if a.is_empty() {
        a
    } else {
        format!("[{a}]")
    }
}

impl Emitter for Graph {
    type Value = NodeIndex;

    fn emit(&mut self, op: Op, inputs: &[&NodeIndex]) -> OpResult<NodeIndex> {
        let ops: Vec<NodeIndex> = inputs.iter().map(|&&n| n).collect();
        self.add_op(op, &ops)
    }

    fn value_type(&self, v: &NodeIndex) -> TensorType {
        self.g[*v].ty.clone()
    }
}

/// Errors of graph construction and passes carry the op, the module path and the shapes.
pub fn node_error(g: &Graph, n: NodeIndex, e: OpError) -> OpError {
    let node = &g.g[n];
    if node.path.is_empty() {
        e
    } else {
        OpError::new(e.op.clone(), format!("{} (in {} ({}))", e.message, node.path, node.module_type))
    }
}

/// The JSON form of a graph (`tracegrad dump --format json`). Schema, version 1:
///
/// ```text
/// { "format": "tracegrad-graph", "version": 1,
///   "inputs":  [node id, ...],                 // calling order
///   "outputs": [[name, node id], ...],
///   "nodes":   [{ "id": n,
///                 "node": { "kind": {"Input": {"name", "role"}} | {"Op": <op>} |
///                                   {"Callback": {"id", "output", "n_outputs", "label"}},
///                           "ty": {"dtype": "F32", "shape": [..]},
///                           "path": "fc1", "module_type": "Linear" },
///                 "operands": [node id, ...] }, ...] }   // ordered operands
/// ```
///
/// An `<op>` is the op's variant name with its attributes, e.g. `{"Softmax": {"dim": 1,
/// "log": false}}`, `{"Unary": "Tanh"}`, `"Where"`; literals are `{"dtype", "shape", "data"}`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct GraphJson {
    /// Always `tracegrad-graph`.
    pub format: String,
    /// Schema version (1).
    pub version: u32,
    /// Input node ids.
    pub inputs: Vec<usize>,
    /// Named outputs.
    pub outputs: Vec<(String, usize)>,
    /// Nodes with their ordered operands.
    pub nodes: Vec<NodeJson>,
}

/// One node of [`GraphJson`].
#[derive(serde::Serialize, serde::Deserialize)]
pub struct NodeJson {
    /// The node id (its index in the graph).
    pub id: usize,
    /// The node.
    pub node: GNode,
    /// Operand ids in order.
    pub operands: Vec<usize>,
}

impl Graph {
    /// The graph as [`GraphJson`] text.
    pub fn to_json(&self) -> String {
        let nodes = self
            .g
            .node_indices()
            .map(|n| NodeJson {
                id: n.index(),
                node: self.g[n].clone(),
                operands: self.operands(n).iter().map(|o| o.index()).collect(),
            })
            .collect();
        let j = GraphJson {
            format: "tracegrad-graph".into(),
            version: 1,
            inputs: self.inputs.iter().map(|i| i.index()).collect(),
            outputs: self.outputs.iter().map(|(s, o)| (s.clone(), o.index())).collect(),
            nodes,
        };
        serde_json::to_string_pretty(&j).expect("graphs serialise")
    }

    /// Reads [`GraphJson`] text back, keeping node ids, and validates the result.
    pub fn from_json(text: &str) -> Result<Graph, String> {
        let j: GraphJson = serde_json::from_str(text).map_err(|e| format!("graph JSON: {e}"))?;
        if j.format != "tracegrad-graph" || j.version != 1 {
            return Err(format!("graph JSON: unsupported format {:?} version {}", j.format, j.version));
        }
        let mut g = Graph::new();
        // Ids survive the round trip, so the holes between them are allocated: bound them by
        // the node count (passes leave holes, never this many).
        let limit = j.nodes.len().saturating_mul(16).max(1 << 16);
        if let Some(n) = j.nodes.iter().find(|n| n.id >= limit) {
            return Err(format!(
                "graph JSON: node id {} is out of range for {} nodes (ids must be below {limit})",
                n.id,
                j.nodes.len()
            ));
        }
        let max = j.nodes.iter().map(|n| n.id).max().map_or(0, |m| m + 1);
        let mut slots: Vec<Option<&NodeJson>> = vec![None; max];
        for n in &j.nodes {
            if slots[n.id].replace(n).is_some() {
                return Err(format!("graph JSON: node id {} appears twice", n.id));
            }
        }
        // Add nodes in id order; fill holes with placeholders removed afterwards, so ids survive.
        let mut holes = Vec::new();
        for (id, slot) in slots.iter().enumerate() {
            let node = match slot {
                Some(n) => n.node.clone(),
                None => GNode {
                    kind: NodeKind::Input { name: String::new(), role: InputRole::Data },
                    ty: TensorType::new(tracegrad_runtime::DType::F32, &[]),
                    path: String::new(),
                    module_type: String::new(),
                },
            };
            let idx = g.g.add_node(node);
            debug_assert_eq!(idx.index(), id);
            if slot.is_none() {
                holes.push(idx);
            }
        }
        for n in &j.nodes {
            for (i, &o) in n.operands.iter().enumerate() {
                if o >= max || slots[o].is_none() {
                    return Err(format!("graph JSON: node {} reads missing node {o}", n.id));
                }
                g.g.add_edge(NodeIndex::new(o), NodeIndex::new(n.id), i);
            }
        }
        for h in holes {
            g.g.remove_node(h);
        }
        let exists = |i: usize| i < max && slots[i].is_some();
        for &i in &j.inputs {
            if !exists(i) {
                return Err(format!("graph JSON: input {i} is not a node"));
            }
            g.inputs.push(NodeIndex::new(i));
        }
        for (name, o) in j.outputs {
            if !exists(o) {
                return Err(format!("graph JSON: output {name} is not a node"));
            }
            g.outputs.push((name, NodeIndex::new(o)));
        }
        g.validate().map_err(|e| format!("graph JSON: {e}"))?;
        Ok(g)
    }

    /// Graphviz DOT: one box per node labelled like the text dump; callbacks are orange.
    pub fn to_dot(&self) -> String {
        let mut s = String::from("digraph tracegrad {\n  rankdir=TB;\n  node [shape=box, fontname=monospace];\n");
        let esc = |t: &str| t.replace('\\', "\\\\").replace('"', "\\\"");
        for n in self.g.node_indices() {
            let node = &self.g[n];
            let (what, extra) = match &node.kind {
                NodeKind::Input { name, .. } => (format!("input {name}"), ", style=filled, fillcolor=lightblue"),
                NodeKind::Op(op) => (format!("{}{}", op.name(), op_attrs(op)), ""),
                NodeKind::Callback { label, .. } => (format!("callback: {label}"), ", style=filled, fillcolor=orange"),
            };
            let what: String = what.chars().take(60).collect();
            // `\n` is DOT's line break: escaped with the text around it, it would show as is.
            let place = if node.path.is_empty() {
                String::new()
            } else {
                format!("\\n{}", esc(&format!("{} ({})", node.path, node.module_type)))
            };
            let _ = writeln!(
                s,
                "  n{} [label=\"%{}: {}\\n{}{}\"{}];",
                n.index(),
                n.index(),
                node.ty,
                esc(&what),
                place,
                extra
            );
        }
        for e in self.g.edge_indices() {
            let (a, b) = self.g.edge_endpoints(e).expect("edge");
            let _ = writeln!(s, "  n{} -> n{} [label=\"{}\"];", a.index(), b.index(), self.g[e]);
        }
        for (name, o) in &self.outputs {
            let _ = writeln!(
                s,
                "  out_{} [label=\"{}\", shape=ellipse];\n  n{} -> out_{};",
                esc(name).replace(|c: char| !c.is_alphanumeric(), "_"),
                esc(name),
                o.index(),
                esc(name).replace(|c: char| !c.is_alphanumeric(), "_")
            );
        }
        s.push_str("}\n");
        s
    }
}

/// Reachability, the one graph walk the passes share (autodiff, partitioning, DCE).
impl Graph {
    /// `from` and every node they read, transitively: what computing `from` needs.
    pub fn ancestors(&self, from: &[NodeId]) -> std::collections::HashSet<NodeId> {
        self.reachable(from, Direction::Incoming)
    }

    /// `from` and every node that reads them, transitively: what `from` influences.
    pub fn descendants(&self, from: &[NodeId]) -> std::collections::HashSet<NodeId> {
        self.reachable(from, Direction::Outgoing)
    }

    fn reachable(&self, from: &[NodeId], dir: Direction) -> std::collections::HashSet<NodeId> {
        let mut seen: std::collections::HashSet<NodeId> = from.iter().copied().collect();
        let mut stack = from.to_vec();
        while let Some(n) = stack.pop() {
            for m in self.g.neighbors_directed(n, dir) {
                if seen.insert(m) {
                    stack.push(m);
                }
            }
        }
        seen
    }
}

impl Graph {
    /// The nodes that must run: the graph's inputs, and every node an output or a callback
    /// (hooks have effects) depends on. Everything else is dead code.
    pub fn live_nodes(&self) -> std::collections::HashSet<NodeId> {
        let mut roots: Vec<NodeId> = self.outputs.iter().map(|(_, o)| *o).collect();
        roots.extend(self.node_ids().filter(|&n| self.is_callback(n)));
        roots.extend(self.inputs.iter().copied());
        self.ancestors(&roots)
    }
}
