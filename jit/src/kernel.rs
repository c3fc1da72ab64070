//! Kernel specifications: a fused group of graph nodes lowered to a small expression program
//! over a two-level iteration space, ready for code generation.
//!
//! Every kernel iterates over `rows × cols` (row-major). A *pointwise* kernel runs over a flat
//! range of that space; a *row* kernel runs whole rows and may reduce each row to one value.
//! Values live in one of two spaces: [`Space::Elem`] (one value per element) or
//! [`Space::Row`] (one value per row, e.g. a row's max). Inputs are read through an
//! [`InputMap`]: a per-row base offset computed from the row index and broadcast strides, plus
//! a unit or zero stride along the row, so broadcast operands are indexed, never copied.

use std::collections::HashMap;
use std::fmt::Write;

use petgraph::stable_graph::NodeIndex;
use tracegrad_compiler::graph::{Graph, NodeKind};
use tracegrad_compiler::ops::{BinaryOp, CompareOp, Op, ReduceKind, UnaryOp};
use tracegrad_runtime::DType;

/// The float type of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Float {
    /// `f32`, 4 lanes per vector.
    F32,
    /// `f64`, 2 lanes per vector.
    F64,
}

impl Float {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F64 => 8,
        }
    }
    /// The runtime dtype.
    pub fn dtype(self) -> DType {
        match self {
            Float::F32 => DType::F32,
            Float::F64 => DType::F64,
        }
    }
}

/// The type of a kernel value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VType {
    /// The kernel's float type.
    Float,
    /// A boolean (stored as one byte, 0 or 1).
    Bool,
}

/// Where a value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// One value per element of the `rows × cols` space.
    Elem,
    /// One value per row.
    Row,
}

/// A row reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Sum.
    Sum,
    /// Maximum (NaN propagates).
    Max,
    /// Minimum (NaN propagates).
    Min,
    /// Maximum of the non-NaN values (−inf if there are none), with −0 and +0 unordered:
    /// softmax's shift, where neither a NaN (whose own exp makes the row NaN anyway) nor the
    /// sign of a zero shift can change the result. Much cheaper on the loop-carried chain.
    MaxSkipNan,
}

/// One operation of a kernel program; operands are earlier node indices.
#[derive(Clone, Debug, PartialEq)]
pub enum KOp {
    /// Reads input `i`.
    Input(usize),
    /// A constant.
    Const(f64),
    /// A unary function.
    Unary(UnaryOp, usize),
    /// A binary function.
    Binary(BinaryOp, usize, usize),
    /// A comparison (yields a bool).
    Compare(CompareOp, usize, usize),
    /// `cond ? a : b`.
    Where(usize, usize, usize),
    /// Clamp (NaN propagates).
    Clamp(Option<f64>, Option<f64>, usize),
    /// `x != 0`.
    ToBool(usize),
    /// `b ? 1 : 0`.
    ToFloat(usize),
    /// A reduction of an `Elem` value over its row, giving a `Row` value.
    Reduce(Reduction, usize),
    /// `e^x·2^shift` (x, shift), with [`crate::math::exp_scaled`]'s domain: softmax's exp.
    ExpScaled(usize, usize),
}

/// A node of the kernel program.
#[derive(Clone, Debug, PartialEq)]
pub struct KNode {
    /// What it computes.
    pub op: KOp,
    /// Its type.
    pub ty: VType,
    /// Where it lives.
    pub space: Space,
}

/// How a kernel reads one input buffer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InputMap {
    /// Element type.
    pub ty: VType,
    /// `Elem`: indexed by (row, col); `Row`: indexed by row only.
    pub space: Space,
    /// Base offset of a row: the sum of `(row / div % modulo) * stride` over these terms.
    pub outer: Vec<(usize, usize, usize)>,
    /// For `Elem` inputs: whether the index advances along the row (`true`) or stays at the
    /// base (a value broadcast along the row).
    pub contiguous: bool,
}

/// A kernel: a program over inputs producing outputs in a `rows × cols` space.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSpec {
    /// Float type.
    pub float: Float,
    /// Row kernel (with reductions, iterated by whole rows) or pointwise (a flat range).
    pub row_kernel: bool,
    /// Number of rows.
    pub rows: usize,
    /// Row length.
    pub cols: usize,
    /// Inputs, in argument order.
    pub inputs: Vec<InputMap>,
    /// The program, operands first.
    pub nodes: Vec<KNode>,
    /// Stored nodes, in output-argument order: `Elem` values are written at `row*cols + col`,
    /// `Row` values at `row`.
    pub outputs: Vec<usize>,
}

impl KernelSpec {
    /// The cache key: equal signatures compile to the same code.
    pub fn signature(&self) -> String {
        format!("{self:?}")
    }

    /// Number of work items the executor splits: elements for a pointwise kernel, rows for a
    /// row kernel.
    pub fn items(&self) -> usize {
        if self.row_kernel {
            self.rows
        } else {
            self.rows * self.cols
        }
    }

    /// A short readable form of the program (for plan dumps).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let sp = if n.space == Space::Row { "row " } else { "" };
            let _ = write!(s, "v{i}={sp}{:?}; ", n.op);
        }
        s
    }
}

/// A lowered group: the kernel and the graph values bound to its arguments.
#[derive(Clone, Debug)]
pub struct Lowered {
    /// The kernel.
    pub spec: KernelSpec,
    /// The graph node read by each input (a node may be read through several maps).
    pub args: Vec<NodeIndex>,
    /// The graph node each output stores.
    pub outs: Vec<NodeIndex>,
}

/// Whether the JIT can compute `n` inside a fused kernel (its op and dtypes are covered).
pub fn supported(g: &Graph, n: NodeIndex) -> bool {
    let NodeKind::Op(op) = &g.g[n].kind else { return false };
    let dt = g.g[n].ty.dtype;
    let float = |d: DType| matches!(d, DType::F32 | DType::F64);
    let operands = g.operands(n);
    let all_float = operands.iter().all(|&o| float(g.g[o].ty.dtype));
    match op {
        Op::Unary(u) => float(dt) && all_float && !matches!(u, UnaryOp::Sin | UnaryOp::Cos),
        Op::Binary(b) => float(dt) && all_float && *b != BinaryOp::Pow,
        Op::Compare(_) => all_float,
        Op::Where => {
            float(dt)
                && g.g[operands[0]].ty.dtype == DType::Bool
                && operands[1..].iter().all(|&o| float(g.g[o].ty.dtype))
        }
        Op::Clamp { .. } | Op::StopGradient => float(dt),
        Op::Cast(to) => {
            let from = g.g[operands[0]].ty.dtype;
            (float(*to) && (from == *to || from == DType::Bool)) || (*to == DType::Bool && float(from))
        }
        Op::Reduce { kind: ReduceKind::Sum | ReduceKind::Max | ReduceKind::Min, .. } | Op::Softmax { .. } => {
            float(dt) && all_float
        }
        _ => false,
    }
}

fn strip(shape: &[usize]) -> &[usize] {
    let lead = shape.iter().take_while(|&&d| d == 1).count();
    &shape[lead..]
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Broadcast strides of `leaf` read at each coordinate of `target` (right-aligned): `None`
/// if `leaf` does not broadcast to `target`.
fn bcast_strides(leaf: &[usize], target: &[usize]) -> Option<Vec<usize>> {
    let leaf = strip(leaf);
    if leaf.len() > target.len() {
        return None;
    }
    let pad = target.len() - leaf.len();
    let mut strides = vec![0; target.len()];
    let mut acc = 1;
    for d in (0..leaf.len()).rev() {
        let t = target[pad + d];
        if leaf[d] == t && t != 1 {
            strides[pad + d] = acc;
        } else if leaf[d] != 1 {
            return None;
        }
        acc *= leaf[d];
    }
    Some(strides)
}

/// The outer terms of a map over `shape[..split]` with `strides`.
fn outer_terms(shape: &[usize], strides: &[usize], split: usize) -> Vec<(usize, usize, usize)> {
    let mut terms = Vec::new();
    for d in 0..split {
        if strides[d] == 0 || shape[d] == 1 {
            continue;
        }
        let div: usize = shape[d + 1..split].iter().product();
        terms.push((div, shape[d], strides[d]));
    }
    // Merge adjacent terms that form one contiguous run (div·mod of the inner one equals the
    // div of the outer, and strides chain the same way).
    let mut merged: Vec<(usize, usize, usize)> = Vec::new();
    for t in terms.into_iter().rev() {
        if let Some(last) = merged.last_mut() {
            if t.0 == last.0 * last.1 && t.2 == last.2 * last.1 {
                *last = (last.0, last.1 * t.1, last.2);
                continue;
            }
        }
        merged.push(t);
    }
    merged.reverse();
    // A single term covering the whole row range needs no modulo: keep it, the codegen
    // skips a modulo equal to the row count.
    merged
}

/// Why a group could not be lowered (it then runs node by node on the reference kernels).
pub type LowerError = String;

/// Lowers a fused group (`nodes`, topologically ordered, all [`supported`]) to a kernel.
/// `row_kernel` selects the row form (the group has reductions).
///
/// `live` tells which users count: a member is stored only if a live node outside the group
/// (or a graph output) reads it.
pub fn lower(
    g: &Graph,
    nodes: &[NodeIndex],
    row_kernel: bool,
    live: &dyn Fn(NodeIndex) -> bool,
) -> Result<Lowered, LowerError> {
    let members: HashMap<NodeIndex, usize> = nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    // The float type.
    let float = nodes
        .iter()
        .map(|&n| g.g[n].ty.dtype)
        .find(|d| matches!(d, DType::F32 | DType::F64))
        .ok_or("no float value in the group")?;
    let float = if float == DType::F32 { Float::F32 } else { Float::F64 };
    for &n in nodes {
        let d = g.g[n].ty.dtype;
        if d != float.dtype() && d != DType::Bool {
            return Err(format!("%{} has dtype {d:?} in a {float:?} kernel", n.index()));
        }
    }
    // The iteration space.
    let (space_shape, inner_rank): (Vec<usize>, Option<usize>) = if row_kernel {
        let first = nodes
            .iter()
            .find(|&&n| matches!(g.g[n].kind, NodeKind::Op(Op::Reduce { .. } | Op::Softmax { .. })))
            .ok_or("row kernel without a reduction")?;
        let input = g.operands(*first)[0];
        let shape = g.g[input].ty.shape.to_vec();
        let k = match &g.g[*first].kind {
            NodeKind::Op(Op::Reduce { dims, .. }) => dims.len(),
            _ => 1,
        };
        (shape, Some(k))
    } else {
        let widest =
            nodes.iter().map(|&n| strip(&g.g[n].ty.shape).to_vec()).max_by_key(|s| s.len()).unwrap_or_default();
        (widest, None)
    };
    let space_shape = if space_shape.is_empty() { vec![1] } else { space_shape };
    let total = numel(&space_shape);
    let rank = space_shape.len();

    // Elem-space shape check, and the inner split for pointwise kernels.
    let mut elem_reads: Vec<(NodeIndex, Vec<usize>)> = Vec::new(); // external leaf shapes read in Elem space
    let (rows, cols, split) = match inner_rank {
        Some(k) => {
            if k > rank {
                return Err("reduction rank exceeds the space".into());
            }
            let cols: usize = space_shape[rank - k..].iter().product();
            if cols <= 1 {
                return Err("row length 1".into());
            }
            (total / cols, cols, rank - k)
        }
        None => (0, 0, 0), // decided below
    };
    let space_of = |n: NodeIndex, rows: usize| -> Result<Space, LowerError> {
        let s = &g.g[n].ty.shape;
        if strip(s) == strip(&space_shape) {
            Ok(Space::Elem)
        } else if row_kernel && numel(s) == rows {
            Ok(Space::Row)
        } else {
            Err(format!("%{} has shape {s:?}, outside the kernel's space {space_shape:?}", n.index()))
        }
    };
    // For pointwise kernels, collect leaf shapes to choose the inner split.
    let (rows, cols, split) = if row_kernel {
        (rows, cols, split)
    } else {
        for &n in nodes {
            space_of(n, 0)?;
            for o in g.operands(n) {
                if !members.contains_key(&o) && !is_scalar_const(g, o) {
                    elem_reads.push((o, g.g[o].ty.shape.to_vec()));
                }
            }
        }
        // The largest suffix over which every leaf is contiguous or broadcast.
        let mut k = rank;
        'shrink: while k > 1 {
            for (_, shape) in &elem_reads {
                let st = bcast_strides(shape, &space_shape).ok_or("operand does not broadcast")?;
                let inner = &st[rank - k..];
                let contiguous = (rank - k..rank).all(|d| st[d] != 0 || space_shape[d] == 1);
                let bcast = inner.iter().all(|&s| s == 0);
                if !contiguous && !bcast {
                    k -= 1;
                    continue 'shrink;
                }
            }
            break;
        }
        let cols: usize = space_shape[rank - k..].iter().product();
        (total / cols.max(1), cols.max(1), rank - k)
    };
    let mut spec =
        KernelSpec { float, row_kernel, rows, cols, inputs: Vec::new(), nodes: Vec::new(), outputs: Vec::new() };
    let mut args: Vec<NodeIndex> = Vec::new();
    let mut input_ids: HashMap<(NodeIndex, InputMap), usize> = HashMap::new();
    let mut knode: HashMap<NodeIndex, usize> = HashMap::new();
    let vty = |d: DType| if d == DType::Bool { VType::Bool } else { VType::Float };

    let push = |spec: &mut KernelSpec, op: KOp, ty: VType, space: Space| {
        spec.nodes.push(KNode { op, ty, space });
        spec.nodes.len() - 1
    };

    for &n in nodes {
        let node = &g.g[n];
        let NodeKind::Op(op) = &node.kind else { return Err("callback in a kernel".into()) };
        let space = space_of(n, rows)?;
        let ty = vty(node.ty.dtype);
        // Operand references, reading external values through input maps.
        let mut refs = Vec::new();
        for o in g.operands(n) {
            if let Some(&k) = knode.get(&o) {
                let from = spec.nodes[k].space;
                if from == Space::Row && space == Space::Elem {
                    // A per-row value broadcast along rows: its shape must be the row shape with
                    // ones in the reduced dims.
                    let st = bcast_strides(&g.g[o].ty.shape, &space_shape)
                        .ok_or_else(|| format!("%{} does not broadcast", o.index()))?;
                    if st[split..].iter().any(|&s| s != 0) || (0..split).any(|d| st[d] == 0 && space_shape[d] != 1) {
                        return Err(format!("%{} is not a per-row value of {space_shape:?}", o.index()));
                    }
                }
                refs.push(k);
                continue;
            }
            if let Some(c) = scalar_const(g, o) {
                let k = push(&mut spec, KOp::Const(c), vty(g.g[o].ty.dtype), Space::Row);
                refs.push(k);
                continue;
            }
            let oshape = &g.g[o].ty.shape;
            // A reduction reads its operand over the whole row.
            let read_space = if matches!(op, Op::Reduce { .. }) { Space::Elem } else { space };
            let map = match read_space {
                Space::Elem => {
                    let st = bcast_strides(oshape, &space_shape)
                        .ok_or_else(|| format!("%{} {oshape:?} does not broadcast to {space_shape:?}", o.index()))?;
                    let contiguous = (split..rank).all(|d| st[d] != 0 || space_shape[d] == 1);
                    let bcast = st[split..].iter().all(|&s| s == 0);
                    if !contiguous && !bcast {
                        return Err(format!(
                            "%{} {oshape:?} is neither contiguous nor broadcast along rows",
                            o.index()
                        ));
                    }
                    InputMap {
                        ty: vty(g.g[o].ty.dtype),
                        space: if bcast && split < rank { Space::Row } else { Space::Elem },
                        outer: outer_terms(&space_shape, &st, split),
                        contiguous: !bcast || split == rank,
                    }
                }
                Space::Row => {
                    let target = if node.ty.shape.is_empty() { vec![1] } else { node.ty.shape.to_vec() };
                    let st = bcast_strides(oshape, &target)
                        .ok_or_else(|| format!("%{} {oshape:?} does not broadcast to {target:?}", o.index()))?;
                    InputMap {
                        ty: vty(g.g[o].ty.dtype),
                        space: Space::Row,
                        outer: outer_terms(&target, &st, target.len()),
                        contiguous: false,
                    }
                }
            };
            let map_space = map.space;
            let id = *input_ids.entry((o, map.clone())).or_insert_with(|| {
                spec.inputs.push(map);
                args.push(o);
                spec.inputs.len() - 1
            });
            let k = push(&mut spec, KOp::Input(id), vty(g.g[o].ty.dtype), map_space);
            refs.push(k);
        }
        let k = match op {
            Op::Unary(u) => push(&mut spec, KOp::Unary(*u, refs[0]), ty, space),
            Op::Binary(b) => push(&mut spec, KOp::Binary(*b, refs[0], refs[1]), ty, space),
            Op::Compare(c) => push(&mut spec, KOp::Compare(*c, refs[0], refs[1]), ty, space),
            Op::Where => push(&mut spec, KOp::Where(refs[0], refs[1], refs[2]), ty, space),
            Op::Clamp { min, max } => push(&mut spec, KOp::Clamp(*min, *max, refs[0]), ty, space),
            Op::StopGradient => refs[0],
            Op::Cast(to) => {
                let from = spec.nodes[refs[0]].ty;
                match (from, *to == DType::Bool) {
                    (VType::Bool, true) | (VType::Float, false) => refs[0],
                    (VType::Float, true) => push(&mut spec, KOp::ToBool(refs[0]), ty, space),
                    (VType::Bool, false) => push(&mut spec, KOp::ToFloat(refs[0]), ty, space),
                }
            }
            Op::Reduce { kind, dims, .. } => {
                let input = g.operands(n)[0];
                let ishape = &g.g[input].ty.shape;
                let irank = ishape.len();
                let trailing = dims.iter().enumerate().all(|(i, &d)| d == irank - dims.len() + i);
                if !trailing
                    || numel(&ishape[irank - dims.len()..]) != cols
                    || space != Space::Row
                    || spec.nodes[refs[0]].space != Space::Elem
                {
                    return Err(format!("%{} reduces other than the kernel's rows", n.index()));
                }
                let r = match kind {
                    ReduceKind::Sum => Reduction::Sum,
                    ReduceKind::Max => Reduction::Max,
                    _ => Reduction::Min,
                };
                push(&mut spec, KOp::Reduce(r, refs[0]), ty, Space::Row)
            }
            Op::Softmax { dim, log } => {
                let shape = &node.ty.shape;
                if *dim + 1 != shape.len() || shape[*dim] != cols || space != Space::Elem {
                    return Err(format!("%{} softmax is not over the kernel's rows", n.index()));
                }
                let x = refs[0];
                let max = push(&mut spec, KOp::Reduce(Reduction::MaxSkipNan, x), VType::Float, Space::Row);
                // The shift is the row max when finite, 0 when it is +inf (PyTorch's results
                // for rows holding +inf), and NaN when no element is above -inf (all -inf or
                // NaN: every output is NaN, as PyTorch's; `exp_scaled` needs no exact zero
                // for -inf then).
                let abs = push(&mut spec, KOp::Unary(UnaryOp::Abs, max), VType::Float, Space::Row);
                let inf = push(&mut spec, KOp::Const(f64::INFINITY), VType::Float, Space::Row);
                let finite = push(&mut spec, KOp::Compare(CompareOp::Lt, abs, inf), VType::Bool, Space::Row);
                let zero = push(&mut spec, KOp::Const(0.0), VType::Float, Space::Row);
                let nan = push(&mut spec, KOp::Const(f64::NAN), VType::Float, Space::Row);
                let above = push(&mut spec, KOp::Compare(CompareOp::Gt, max, zero), VType::Bool, Space::Row);
                let other = push(&mut spec, KOp::Where(above, zero, nan), VType::Float, Space::Row);
                let m = push(&mut spec, KOp::Where(finite, max, other), VType::Float, Space::Row);
                let d = push(&mut spec, KOp::Binary(BinaryOp::Sub, x, m), VType::Float, Space::Elem);
                // exp(d)·2^shift, d ≤ 0 (or anything, where the max is not finite: shift 0
                // there). Softmax scales by 2^64, which keeps every term that can round to a
                // nonzero (even subnormal) output normal, so one scale suffices and e·(1/s)
                // rounds once, as with the exact exp; log_softmax needs only the sum, where the
                // terms below 2^−124 that `exp_scaled` raises to about 2^−124 vanish against its
                // 1 (and in softmax, times 1/s ≤ 2^−64, round to zero).
                let shift = if *log {
                    zero
                } else {
                    let s64 = push(&mut spec, KOp::Const(64.0), VType::Float, Space::Row);
                    push(&mut spec, KOp::Where(finite, s64, zero), VType::Float, Space::Row)
                };
                let e = push(&mut spec, KOp::ExpScaled(d, shift), VType::Float, Space::Elem);
                let s = push(&mut spec, KOp::Reduce(Reduction::Sum, e), VType::Float, Space::Row);
                if *log {
                    let ls = push(&mut spec, KOp::Unary(UnaryOp::Log, s), VType::Float, Space::Row);
                    push(&mut spec, KOp::Binary(BinaryOp::Sub, d, ls), VType::Float, Space::Elem)
                } else {
                    // e · (1/s), as PyTorch's (and the reference) kernel: one division per row.
                    let inv = push(&mut spec, KOp::Unary(UnaryOp::Reciprocal, s), VType::Float, Space::Row);
                    push(&mut spec, KOp::Binary(BinaryOp::Mul, e, inv), VType::Float, Space::Elem)
                }
            }
            other => return Err(format!("{} is not a kernel op", other.name())),
        };
        // A pass-through (cast to the same type) keeps the operand's space; make sure an
        // output stored in Elem space is an Elem value.
        let k = if spec.nodes[k].space != space {
            // Elem value defined by a per-row value (a stop_gradient of a broadcast input):
            // materialize with an identity op in the right space.
            push(&mut spec, KOp::Clamp(None, None, k), ty, space)
        } else {
            k
        };
        knode.insert(n, k);
    }
    // Outputs: members used outside the group or by the graph's outputs.
    let graph_outs: std::collections::HashSet<NodeIndex> = g.outputs.iter().map(|(_, o)| *o).collect();
    let mut outs = Vec::new();
    for &n in nodes {
        let escapes = graph_outs.contains(&n) || g.users(n).iter().any(|&u| !members.contains_key(&u) && live(u));
        if escapes {
            spec.outputs.push(knode[&n]);
            outs.push(n);
        }
    }
    if spec.outputs.is_empty() {
        return Err("the group has no outputs".into());
    }
    Ok(Lowered { spec, args, outs })
}

/// A one-element `full` or constant: folded into the kernel as an immediate.
fn scalar_const(g: &Graph, n: NodeIndex) -> Option<f64> {
    match &g.g[n].kind {
        NodeKind::Op(Op::Full { value, dtype, shape }) if numel(shape) == 1 && *dtype != DType::I64 => Some(*value),
        NodeKind::Op(Op::Constant(b)) if b.numel() == 1 && matches!(b.dtype(), DType::F32 | DType::F64) => {
            Some(b.item())
        }
        _ => None,
    }
}

fn is_scalar_const(g: &Graph, n: NodeIndex) -> bool {
    scalar_const(g, n).is_some()
}
