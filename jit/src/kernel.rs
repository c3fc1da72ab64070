//! Kernel specifications: a fused group of graph nodes lowered to a small expression program
//! over a two-level iteration space, ready for code generation.
//!
//! Every kernel iterates over `rows × cols` (row-major). A *pointwise* kernel runs over a flat
//! range of that space; a *row* kernel runs whole rows and may reduce each row to one value.
//! Values live in one of two spaces: [`Space::Elem`] (one value per element) or
//! [`Space::Row`] (one value per row, e.g. a row's max). Inputs are read through an
//! [`InputMap`]: a per-row base offset computed from the row index and broadcast strides, plus
//! a unit or zero stride along the row, so broadcast operands are indexed, never copied.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use tracegrad_compiler::graph::{Graph, NodeId, NodeKind};
use tracegrad_compiler::ops::{keep_scale, keep_threshold, BinaryOp, CompareOp, Distribution, Op, ReduceKind, UnaryOp};
use tracegrad_runtime::shape::{numel, try_broadcast_strides};
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

/// A reduction of each row of a kernel to one value (not a loss's reduction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowReduction {
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

/// A constant of a kernel program. Equality and hashing compare its bits (a NaN equals
/// itself, 0.0 and -0.0 differ): equal kernels are those that compile to the same code.
#[derive(Clone, Copy)]
pub struct Imm(pub f64);

impl PartialEq for Imm {
    fn eq(&self, other: &Imm) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Imm {}

impl std::hash::Hash for Imm {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

impl std::fmt::Debug for Imm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One operation of a kernel program; operands are earlier node indices.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KOp {
    /// Reads input `i`.
    Input(usize),
    /// A constant.
    Const(Imm),
    /// A unary function.
    Unary(UnaryOp, usize),
    /// A binary function.
    Binary(BinaryOp, usize, usize),
    /// A comparison (yields a bool).
    Compare(CompareOp, usize, usize),
    /// `cond ? a : b`.
    Where(usize, usize, usize),
    /// Clamp (NaN propagates).
    Clamp(Option<Imm>, Option<Imm>, usize),
    /// `x != 0`.
    ToBool(usize),
    /// `b ? 1 : 0`.
    ToFloat(usize),
    /// A reduction of an `Elem` value over its row, giving a `Row` value.
    Reduce(RowReduction, usize),
    /// `e^x·2^shift` (x, shift), with [`crate::math::exp_scaled`]'s domain: softmax's exp.
    ExpScaled(usize, usize),
    /// A counter-based draw (`Op::Random`): element `i` of the kernel's space is computed
    /// from Philox word `i` of the draw starting `at` blocks past the offset in the generator
    /// state read from input `state` (`[seed, offset]`, two i64s). With `mask`
    /// `(threshold, scale)`, dropout's mask: `scale` where `word >> 8 >= threshold`, else 0;
    /// without, the uniform `(word >> 8) / 2^24`.
    Random {
        /// The input holding the state.
        state: usize,
        /// Blocks between the state's offset and the draw's start.
        at: u64,
        /// Dropout's keep threshold and scale.
        mask: Option<(u32, Imm)>,
    },
}

/// A node of the kernel program.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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

/// A kernel: a program over inputs producing outputs in a `rows × cols` space. Equal specs
/// (`Eq`, `Hash`) compile to the same code, so a module compiles each once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
    pub args: Vec<NodeId>,
    /// The graph node each output stores.
    pub outs: Vec<NodeId>,
}

/// Whether the JIT can compute `n` inside a fused kernel (its op and dtypes are covered): the
/// fusion predicate the JIT passes to [`tracegrad_compiler::fusion::fuse_with`].
pub fn supported(g: &Graph, n: NodeId) -> bool {
    let Some(op) = g.op(n) else { return false };
    let operands: Vec<DType> = g.operands(n).iter().map(|&o| g.ty(o).dtype).collect();
    op.jit_lowerable(&operands, g.ty(n).dtype)
}

/// How a row op becomes kernel nodes: given the lowering so far, the op's node, the kernel
/// node of its operand and the space of its result, it pushes the nodes and returns the
/// result's.
type RowLowering = fn(&mut Lowering, NodeId, usize, Space) -> Result<usize, LowerError>;

/// The JIT side of every row op, in one table. layer_norm, cross_entropy, logsumexp and
/// their backward are composites of these and pointwise ops, lowered into one row kernel.
fn row_lowering(op: &Op) -> Option<RowLowering> {
    Some(match op {
        Op::Softmax { log: false, .. } => lower_softmax,
        Op::Softmax { log: true, .. } => lower_log_softmax,
        Op::Reduce { kind: ReduceKind::Sum, .. } => lower_row_sum,
        Op::Reduce { kind: ReduceKind::Max, .. } => lower_row_max,
        Op::Reduce { kind: ReduceKind::Min, .. } => lower_row_min,
        _ => return None,
    })
}

/// Whether `op` reduces rows (its group is then a row kernel over its operand's rows).
pub fn is_row_op(op: &Op) -> bool {
    row_lowering(op).is_some()
}

fn lower_softmax(cx: &mut Lowering, n: NodeId, x: usize, space: Space) -> Result<usize, LowerError> {
    cx.softmax(n, x, space, false)
}

fn lower_log_softmax(cx: &mut Lowering, n: NodeId, x: usize, space: Space) -> Result<usize, LowerError> {
    cx.softmax(n, x, space, true)
}

fn lower_row_sum(cx: &mut Lowering, n: NodeId, x: usize, space: Space) -> Result<usize, LowerError> {
    cx.row_reduce(n, x, space, RowReduction::Sum)
}

fn lower_row_max(cx: &mut Lowering, n: NodeId, x: usize, space: Space) -> Result<usize, LowerError> {
    cx.row_reduce(n, x, space, RowReduction::Max)
}

fn lower_row_min(cx: &mut Lowering, n: NodeId, x: usize, space: Space) -> Result<usize, LowerError> {
    cx.row_reduce(n, x, space, RowReduction::Min)
}

fn strip(shape: &[usize]) -> &[usize] {
    let lead = shape.iter().take_while(|&&d| d == 1).count();
    &shape[lead..]
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
    nodes: &[NodeId],
    row_kernel: bool,
    live: &dyn Fn(NodeId) -> bool,
) -> Result<Lowered, LowerError> {
    let float = kernel_float(g, nodes)?;
    let space = if row_kernel { row_space(g, nodes)? } else { pointwise_space(g, nodes)? };
    let spec = KernelSpec {
        float,
        row_kernel,
        rows: space.rows,
        cols: space.cols,
        inputs: Vec::new(),
        nodes: Vec::new(),
        outputs: Vec::new(),
    };
    let mut cx = Lowering { graph: g, space, spec, args: Vec::new(), input_ids: HashMap::new(), knode: HashMap::new() };
    for &n in nodes {
        cx.node(n)?;
    }
    cx.finish(nodes, live)
}

/// The kernel's float type: every value is of it or bool.
fn kernel_float(g: &Graph, nodes: &[NodeId]) -> Result<Float, LowerError> {
    let float = nodes
        .iter()
        .map(|&n| g.ty(n).dtype)
        .find(|d| matches!(d, DType::F32 | DType::F64))
        .ok_or("no float value in the group")?;
    let float = if float == DType::F32 { Float::F32 } else { Float::F64 };
    for &n in nodes {
        let d = g.ty(n).dtype;
        if d != float.dtype() && d != DType::Bool {
            return Err(format!("%{} has dtype {d:?} in a {float:?} kernel", n.index()));
        }
    }
    Ok(float)
}

/// A kernel's iteration space: `shape[..split]` indexes its rows, `shape[split..]` a row.
struct IterSpace {
    /// At least rank 1.
    shape: Vec<usize>,
    split: usize,
    rows: usize,
    cols: usize,
    row_kernel: bool,
}

impl IterSpace {
    /// Where node `n`'s value lives: over the whole space, or (row kernels) one per row.
    fn space_of(&self, g: &Graph, n: NodeId) -> Result<Space, LowerError> {
        let s = &g.ty(n).shape;
        if strip(s) == strip(&self.shape) {
            Ok(Space::Elem)
        } else if self.row_kernel && numel(s) == self.rows {
            Ok(Space::Row)
        } else {
            Err(format!("%{} has shape {s:?}, outside the kernel's space {:?}", n.index(), self.shape))
        }
    }
}

/// A row kernel's space: the rows of the first row op's operand.
fn row_space(g: &Graph, nodes: &[NodeId]) -> Result<IterSpace, LowerError> {
    let first = *nodes.iter().find(|&&n| g.op(n).is_some_and(is_row_op)).ok_or("row kernel without a reduction")?;
    let shape = g.ty(g.operands(first)[0]).shape.to_vec();
    let k = match g.op(first) {
        Some(Op::Reduce { dims, .. }) => dims.len(),
        _ => 1,
    };
    let shape = if shape.is_empty() { vec![1] } else { shape };
    let rank = shape.len();
    if k > rank {
        return Err("reduction rank exceeds the space".into());
    }
    let cols: usize = shape[rank - k..].iter().product();
    if cols <= 1 {
        return Err("row length 1".into());
    }
    Ok(IterSpace { rows: numel(&shape) / cols, cols, split: rank - k, shape, row_kernel: true })
}

/// A pointwise kernel's space: the widest member shape, split where every operand read from
/// outside stops being contiguous or broadcast along the row.
fn pointwise_space(g: &Graph, nodes: &[NodeId]) -> Result<IterSpace, LowerError> {
    let widest = nodes.iter().map(|&n| strip(&g.ty(n).shape).to_vec()).max_by_key(|s| s.len()).unwrap_or_default();
    let shape = if widest.is_empty() { vec![1] } else { widest };
    let mut space = IterSpace { shape, split: 0, rows: 0, cols: 0, row_kernel: false };
    let members: HashSet<NodeId> = nodes.iter().copied().collect();
    let mut leaf_shapes: Vec<Vec<usize>> = Vec::new();
    for &n in nodes {
        space.space_of(g, n)?;
        // A random draw's state operand is read whole, not over the space.
        let draws = matches!(g.op(n), Some(Op::Random { .. }));
        for o in g.operands(n) {
            if !members.contains(&o) && scalar_const(g, o).is_none() && !draws {
                leaf_shapes.push(g.ty(o).shape.to_vec());
            }
        }
    }
    // The largest suffix over which every leaf is contiguous or broadcast.
    let rank = space.shape.len();
    let mut k = rank;
    'shrink: while k > 1 {
        for shape in &leaf_shapes {
            let st = try_broadcast_strides(shape, &space.shape).ok_or("operand does not broadcast")?;
            let contiguous = (rank - k..rank).all(|d| st[d] != 0 || space.shape[d] == 1);
            let bcast = st[rank - k..].iter().all(|&s| s == 0);
            if !contiguous && !bcast {
                k -= 1;
                continue 'shrink;
            }
        }
        break;
    }
    let cols = space.shape[rank - k..].iter().product::<usize>().max(1);
    (space.rows, space.cols, space.split) = (numel(&space.shape) / cols, cols, rank - k);
    Ok(space)
}

/// A group being lowered: the kernel program so far and the graph values it binds.
struct Lowering<'g> {
    graph: &'g Graph,
    space: IterSpace,
    spec: KernelSpec,
    args: Vec<NodeId>,
    /// Each distinct (value, map) read, as an input index.
    input_ids: HashMap<(NodeId, InputMap), usize>,
    /// The kernel node of each member lowered so far.
    knode: HashMap<NodeId, usize>,
}

fn vty(d: DType) -> VType {
    if d == DType::Bool {
        VType::Bool
    } else {
        VType::Float
    }
}

impl Lowering<'_> {
    fn push(&mut self, op: KOp, ty: VType, space: Space) -> usize {
        self.spec.nodes.push(KNode { op, ty, space });
        self.spec.nodes.len() - 1
    }

    /// Lowers member `n`: its operands, then its op.
    fn node(&mut self, n: NodeId) -> Result<(), LowerError> {
        let g = self.graph;
        let NodeKind::Op(op) = g.kind(n) else { return Err("callback in a kernel".into()) };
        let space = self.space.space_of(g, n)?;
        if let Op::Random { .. } = op {
            let k = self.random(n, op, space)?;
            self.knode.insert(n, k);
            return Ok(());
        }
        let ty = vty(g.ty(n).dtype);
        // A reduction reads its operand over the whole row.
        let read_space = if matches!(op, Op::Reduce { .. }) { Space::Elem } else { space };
        let mut refs = Vec::new();
        for o in g.operands(n) {
            refs.push(self.operand(n, o, space, read_space)?);
        }
        let k = match row_lowering(op) {
            Some(lower_row_op) => lower_row_op(self, n, refs[0], space)?,
            None => self.pointwise(op, &refs, ty, space)?,
        };
        // A pass-through (cast to the same type) keeps the operand's space; make sure an
        // output stored in Elem space is an Elem value.
        let k = if self.spec.nodes[k].space != space {
            // Elem value defined by a per-row value (a stop_gradient of a broadcast input):
            // materialize with an identity op in the right space.
            self.push(KOp::Clamp(None, None, k), ty, space)
        } else {
            k
        };
        self.knode.insert(n, k);
        Ok(())
    }

    /// The kernel node for operand `o` of member `n` (in `space`): a member's node, a folded
    /// constant, or an input read through a map.
    fn operand(&mut self, n: NodeId, o: NodeId, space: Space, read_space: Space) -> Result<usize, LowerError> {
        let (g, shape, split) = (self.graph, &self.space.shape, self.space.split);
        if let Some(&k) = self.knode.get(&o) {
            if self.spec.nodes[k].space == Space::Row && space == Space::Elem {
                // A per-row value broadcast along rows: its shape must be the row shape with
                // ones in the reduced dims.
                let st = try_broadcast_strides(&g.ty(o).shape, shape)
                    .ok_or_else(|| format!("%{} does not broadcast", o.index()))?;
                if st[split..].iter().any(|&s| s != 0) || (0..split).any(|d| st[d] == 0 && shape[d] != 1) {
                    return Err(format!("%{} is not a per-row value of {shape:?}", o.index()));
                }
            }
            return Ok(k);
        }
        if let Some(c) = scalar_const(g, o) {
            return Ok(self.push(KOp::Const(Imm(c)), vty(g.ty(o).dtype), Space::Row));
        }
        let map = self.input_map(o, read_space, &g.ty(n).shape)?;
        let map_space = map.space;
        let id = *self.input_ids.entry((o, map.clone())).or_insert_with(|| {
            self.spec.inputs.push(map);
            self.args.push(o);
            self.spec.inputs.len() - 1
        });
        Ok(self.push(KOp::Input(id), vty(g.ty(o).dtype), map_space))
    }

    /// How the kernel reads graph value `o` in `read_space` for a member of shape
    /// `user_shape`: broadcast indexing, never a copy.
    fn input_map(&self, o: NodeId, read_space: Space, user_shape: &[usize]) -> Result<InputMap, LowerError> {
        let (g, shape, split) = (self.graph, &self.space.shape, self.space.split);
        let rank = shape.len();
        let oshape = &g.ty(o).shape;
        Ok(match read_space {
            Space::Elem => {
                let st = try_broadcast_strides(oshape, shape)
                    .ok_or_else(|| format!("%{} {oshape:?} does not broadcast to {shape:?}", o.index()))?;
                let contiguous = (split..rank).all(|d| st[d] != 0 || shape[d] == 1);
                let bcast = st[split..].iter().all(|&s| s == 0);
                if !contiguous && !bcast {
                    return Err(format!("%{} {oshape:?} is neither contiguous nor broadcast along rows", o.index()));
                }
                InputMap {
                    ty: vty(g.ty(o).dtype),
                    space: if bcast && split < rank { Space::Row } else { Space::Elem },
                    outer: outer_terms(shape, &st, split),
                    contiguous: !bcast || split == rank,
                }
            }
            Space::Row => {
                let target = if user_shape.is_empty() { vec![1] } else { user_shape.to_vec() };
                let st = try_broadcast_strides(oshape, &target)
                    .ok_or_else(|| format!("%{} {oshape:?} does not broadcast to {target:?}", o.index()))?;
                InputMap {
                    ty: vty(g.ty(o).dtype),
                    space: Space::Row,
                    outer: outer_terms(&target, &st, target.len()),
                    contiguous: false,
                }
            }
        })
    }

    /// A pointwise member: one kernel op (casts between equal types pass through).
    fn pointwise(&mut self, op: &Op, refs: &[usize], ty: VType, space: Space) -> Result<usize, LowerError> {
        Ok(match op {
            Op::Unary(u) => self.push(KOp::Unary(*u, refs[0]), ty, space),
            Op::Binary(b) => self.push(KOp::Binary(*b, refs[0], refs[1]), ty, space),
            Op::Compare(c) => self.push(KOp::Compare(*c, refs[0], refs[1]), ty, space),
            Op::Where => self.push(KOp::Where(refs[0], refs[1], refs[2]), ty, space),
            Op::Clamp { min, max } => self.push(KOp::Clamp(min.map(Imm), max.map(Imm), refs[0]), ty, space),
            Op::StopGradient => refs[0],
            Op::Cast(to) => {
                let from = self.spec.nodes[refs[0]].ty;
                match (from, *to == DType::Bool) {
                    (VType::Bool, true) | (VType::Float, false) => refs[0],
                    (VType::Float, true) => self.push(KOp::ToBool(refs[0]), ty, space),
                    (VType::Bool, false) => self.push(KOp::ToFloat(refs[0]), ty, space),
                }
            }
            other => return Err(format!("{} is not a kernel op", other.name())),
        })
    }

    /// A uniform or dropout-mask draw over the kernel's whole space (so its element `i` is the
    /// kernel's flat position `i`), reading the generator state as an unindexed input.
    fn random(&mut self, n: NodeId, op: &Op, space: Space) -> Result<usize, LowerError> {
        let g = self.graph;
        let Op::Random { dist, at, .. } = op else { unreachable!("random lowers a Random") };
        if space != Space::Elem || g.ty(n).numel() != self.spec.rows * self.spec.cols {
            return Err(format!("%{} draws other than over the kernel's space", n.index()));
        }
        let mask = match dist {
            Distribution::Uniform => None,
            Distribution::DropoutMask { p } => Some((keep_threshold(*p), Imm(keep_scale(*p)))),
            Distribution::Normal => return Err(format!("%{} normal draws are not a kernel op", n.index())),
        };
        let o = g.operands(n)[0];
        // The state is never indexed: an empty map, read only by this op.
        let map = InputMap { ty: VType::Float, space: Space::Row, outer: Vec::new(), contiguous: false };
        let state = *self.input_ids.entry((o, map.clone())).or_insert_with(|| {
            self.spec.inputs.push(map);
            self.args.push(o);
            self.spec.inputs.len() - 1
        });
        Ok(self.push(KOp::Random { state, at: *at, mask }, VType::Float, Space::Elem))
    }

    /// A sum, max or min over the kernel's rows (the trailing dims of `n`'s operand).
    fn row_reduce(&mut self, n: NodeId, x: usize, space: Space, r: RowReduction) -> Result<usize, LowerError> {
        let g = self.graph;
        let Some(Op::Reduce { dims, .. }) = g.op(n) else { unreachable!("a row reduction is a Reduce") };
        let ishape = &g.ty(g.operands(n)[0]).shape;
        let irank = ishape.len();
        let trailing = dims.iter().enumerate().all(|(i, &d)| d == irank - dims.len() + i);
        if !trailing
            || numel(&ishape[irank - dims.len()..]) != self.spec.cols
            || space != Space::Row
            || self.spec.nodes[x].space != Space::Elem
        {
            return Err(format!("%{} reduces other than the kernel's rows", n.index()));
        }
        Ok(self.push(KOp::Reduce(r, x), vty(g.ty(n).dtype), Space::Row))
    }

    /// Softmax or log_softmax of `x` over the kernel's rows.
    fn softmax(&mut self, n: NodeId, x: usize, space: Space, log: bool) -> Result<usize, LowerError> {
        let g = self.graph;
        let shape = &g.ty(n).shape;
        let Some(&Op::Softmax { dim, .. }) = g.op(n) else { unreachable!("softmax lowers a Softmax") };
        if dim + 1 != shape.len() || shape[dim] != self.spec.cols || space != Space::Elem {
            return Err(format!("%{} softmax is not over the kernel's rows", n.index()));
        }
        let (f, b, row, elem) = (VType::Float, VType::Bool, Space::Row, Space::Elem);
        let max = self.push(KOp::Reduce(RowReduction::MaxSkipNan, x), f, row);
        // The shift is the row max when finite, 0 when it is +inf (PyTorch's results for rows
        // holding +inf), and NaN when no element is above -inf (all -inf or NaN: every output
        // is NaN, as PyTorch's; `exp_scaled` needs no exact zero for -inf then).
        let abs = self.push(KOp::Unary(UnaryOp::Abs, max), f, row);
        let inf = self.push(KOp::Const(Imm(f64::INFINITY)), f, row);
        let finite = self.push(KOp::Compare(CompareOp::Lt, abs, inf), b, row);
        let zero = self.push(KOp::Const(Imm(0.0)), f, row);
        let nan = self.push(KOp::Const(Imm(f64::NAN)), f, row);
        let above = self.push(KOp::Compare(CompareOp::Gt, max, zero), b, row);
        let other = self.push(KOp::Where(above, zero, nan), f, row);
        let m = self.push(KOp::Where(finite, max, other), f, row);
        let d = self.push(KOp::Binary(BinaryOp::Sub, x, m), f, elem);
        // exp(d)·2^shift, d ≤ 0 (or anything, where the max is not finite: shift 0 there).
        // Softmax scales by 2^64, which keeps every term that can round to a nonzero (even
        // subnormal) output normal, so one scale suffices and e·(1/s) rounds once, as with
        // the exact exp; log_softmax needs only the sum, where the terms below 2^−124 that
        // `exp_scaled` raises to about 2^−124 vanish against its 1 (and in softmax, times
        // 1/s ≤ 2^−64, round to zero).
        let shift = if log {
            zero
        } else {
            let s64 = self.push(KOp::Const(Imm(64.0)), f, row);
            self.push(KOp::Where(finite, s64, zero), f, row)
        };
        let e = self.push(KOp::ExpScaled(d, shift), f, elem);
        let s = self.push(KOp::Reduce(RowReduction::Sum, e), f, row);
        Ok(if log {
            let ls = self.push(KOp::Unary(UnaryOp::Log, s), f, row);
            self.push(KOp::Binary(BinaryOp::Sub, d, ls), f, elem)
        } else {
            // e · (1/s), as PyTorch's (and the reference) kernel: one division per row.
            let inv = self.push(KOp::Unary(UnaryOp::Reciprocal, s), f, row);
            self.push(KOp::Binary(BinaryOp::Mul, e, inv), f, elem)
        })
    }

    /// The kernel's outputs: members used outside the group (by a live node) or by the
    /// graph's outputs.
    fn finish(mut self, nodes: &[NodeId], live: &dyn Fn(NodeId) -> bool) -> Result<Lowered, LowerError> {
        let g = self.graph;
        let graph_outs: HashSet<NodeId> = g.outputs.iter().map(|(_, o)| *o).collect();
        let mut outs = Vec::new();
        for &n in nodes {
            let escapes =
                graph_outs.contains(&n) || g.users(n).iter().any(|&u| !self.knode.contains_key(&u) && live(u));
            if escapes {
                self.spec.outputs.push(self.knode[&n]);
                outs.push(n);
            }
        }
        if self.spec.outputs.is_empty() {
            return Err("the group has no outputs".into());
        }
        Ok(Lowered { spec: self.spec, args: self.args, outs })
    }
}

/// A one-element `full` or constant: folded into the kernel as an immediate.
fn scalar_const(g: &Graph, n: NodeId) -> Option<f64> {
    match g.op(n)? {
        Op::Full { value, dtype, shape } if numel(shape) == 1 && *dtype != DType::I64 => Some(*value),
        Op::Constant(b) if b.numel() == 1 && matches!(b.dtype(), DType::F32 | DType::F64) => Some(b.item()),
        _ => None,
    }
}
