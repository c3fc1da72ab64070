//! Cranelift code generation: one function per [`KernelSpec`].
//!
//! Every kernel has the signature `fn(args: *const *const u8, outs: *const *mut u8, start: i64,
//! end: i64)`: input and output base pointers, and the range of work items (elements for a
//! pointwise kernel, rows for a row kernel) this call covers, so the executor can split a
//! kernel across threads.
//!
//! Loops run 128-bit vectors (F32X4 or F64X2; x64 Cranelift lowers no wider vectors), unrolled
//! twice and rotated (the exit test sits at the bottom, behind one guard), then one-vector
//! steps, then a scalar tail. Loads and stores never assume alignment. Row-constant values
//! (broadcast operands, per-row reduction results, constants) are computed once per row and
//! splatted. Transcendentals come from [`crate::math`], inline; on machines with vectors wider
//! than 128 bits a kernel instead hands them to [`crate::lanes::kernel_entry`] (the same math,
//! bit for bit, at full width), a tile at a time in a pointwise kernel and a row at a time in a
//! row kernel; a row kernel's last sweep of the form `((x − c) ∘ p)·w + b` goes to
//! [`crate::lanes::affine_entry`] whole.

use std::collections::{HashMap, HashSet};

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{
    types, AbiParam, Block, Endianness, Function, InstBuilder, MemFlagsData, Signature, StackSlot, StackSlotData,
    StackSlotKind, Type, Value,
};
use cranelift_codegen::isa::{CallConv, TargetFrontendConfig};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use tracegrad_compiler::ops::{BinaryOp, CompareOp, UnaryOp};

use crate::kernel::{Float, Imm, KOp, KernelSpec, RowReduction, Space, VType};
use crate::lanes;
use crate::math::{self, MathCtx};

/// One loop step: `(generator, builder, column, vector?, accumulators)`.
type StepFn<'a> = dyn FnMut(&mut Gen, &mut FunctionBuilder, Value, bool, &mut [Value]) + 'a;

/// Vectors per unrolled loop iteration of a pointwise kernel. More buys nothing there (each
/// vector is an independent chain, and the out-of-order window already overlaps them) and
/// costs code size and registers.
const UNROLL: i64 = 2;
/// The same for a row kernel's sweeps: reductions carry one accumulator per unrolled vector,
/// and independent chains hide an add's or a max's latency (softmax_rows: 1.49 → 1.37
/// ns/element on one Zen 5 core with four chains against two; 0.427 → 0.399 on one Xeon
/// AVX-512 core with eight against four). [`crate::lanes`] adds a row's sums in this order.
pub(crate) const ROW_UNROLL: i64 = 8;
/// Elements per tile of a pointwise kernel whose transcendentals run on [`crate::lanes`]. Short
/// tiles interleave the sweep that reads the inputs from memory with the lane calls finely
/// enough for the out-of-order window to overlap them (pointwise_chain, 2^24 elements, Xeon
/// AVX-512: 128 → 15.6 ms on two threads and 28.6 ms on one, against 19.3 and 38.3 ms with
/// tiles of 512 and 30 ms on one thread with 64; tracegrad bench, three alternating runs).
const TILE: usize = 128;
/// How many tiles ahead of the one it computes a pointwise kernel's first lane call of a tile
/// asks the cache for the kernel's outputs. Without it each tile's stores miss (reading the
/// lines for ownership), the store buffer fills, and the lane calls of the next tile wait
/// behind it. pointwise_chain (2^24 elements, two threads, Xeon, tracegrad bench, three
/// alternating runs): 15.2–17.0 → 12.5 ms, and 18.4–19.7 → 15.8–16.0 ms under
/// `TRACEGRAD_ISA=avx2`; 4 tiles ahead measured the same. In a Rust model of the kernel,
/// prefetching the inputs as well gained 1–2 % more, and prefetching only the inputs nothing.
const PREFETCH_TILES: i64 = 2;
/// Rows shorter than this keep the inline math (a call per short row costs more than it saves).
const MIN_TILE_COLS: usize = 64;
/// The most stack a row kernel's wide rows (an argument row and one result row per wide node,
/// a whole kernel row each) may take; longer rows keep the inline math.
const WIDE_ROW_BYTES: usize = 64 << 10;

/// The kernel signature.
pub fn signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    for _ in 0..4 {
        sig.params.push(AbiParam::new(types::I64));
    }
    sig
}

/// Flags for a `bitcast` between vector types: lanes in little-endian order.
fn little() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

struct Gen<'s> {
    spec: &'s KernelSpec,
    m: MathCtx,
    /// Scalar float type, vector float type, vector mask type.
    ft: Type,
    vt: Type,
    mt: Type,
    lanes: i64,
    shift: i64,
    in_ptr: Vec<Value>,
    out_ptr: Vec<Value>,
    /// Per-row state: base element index of each input.
    base: Vec<Value>,
    /// Per-row state: the row index (random draws index the flat space by it).
    row_index: Option<Value>,
    /// Per-row state: scalar values of `Row` nodes.
    row_val: HashMap<usize, Value>,
    /// Per-row state: vector splats of `Row` nodes.
    splat: HashMap<usize, Value>,
    /// Row kernels: the sweep being emitted.
    sweep: usize,
    /// Row kernels: `Elem` values kept in a per-row scratch row (a stack slot) by the sweep
    /// that first computes them, and reloaded by later sweeps instead of recomputed.
    scratch: HashMap<usize, (StackSlot, usize)>,
    /// The scratch rows' addresses in the current row (or tile).
    scratch_addr: HashMap<usize, Value>,
    /// `Elem` values whose scratch row [`lanes::kernel_entry`] has filled before any loop that
    /// reads them: always reloaded, never computed.
    filled: HashSet<usize>,
    /// Column values of an unrolled step, `j + k`, as (`j`, `k`): their loads and stores
    /// address `j` and carry `k` in the instruction's displacement.
    col_off: HashMap<Value, (Value, i64)>,
    /// Row kernels: reductions of the current row whose value a lane call returned.
    given: HashSet<usize>,
}

/// Emits the body of `spec` into `func` (whose signature must be [`signature`]).
pub fn emit(
    spec: &KernelSpec,
    func: &mut Function,
    fctx: &mut FunctionBuilderContext,
    m: MathCtx,
    config: TargetFrontendConfig,
) {
    let mut b = FunctionBuilder::new(func, fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    b.seal_block(entry);
    let p = b.block_params(entry).to_vec();
    let (args, outs, start, end) = (p[0], p[1], p[2], p[3]);
    let (ft, vt, mt, lanes) = match spec.float {
        Float::F32 => (types::F32, types::F32X4, types::I32X4, 4),
        Float::F64 => (types::F64, types::F64X2, types::I64X2, 2),
    };
    let in_ptr = (0..spec.inputs.len()).map(|i| b.ins().load(types::I64, flags(), args, (i * 8) as i32)).collect();
    let out_ptr = (0..spec.outputs.len()).map(|i| b.ins().load(types::I64, flags(), outs, (i * 8) as i32)).collect();
    let mut g = Gen {
        spec,
        m,
        ft,
        vt,
        mt,
        lanes,
        shift: spec.float.size().trailing_zeros() as i64,
        in_ptr,
        out_ptr,
        base: Vec::new(),
        row_index: None,
        row_val: HashMap::new(),
        splat: HashMap::new(),
        sweep: 0,
        scratch: HashMap::new(),
        scratch_addr: HashMap::new(),
        filled: HashSet::new(),
        col_off: HashMap::new(),
        given: HashSet::new(),
    };
    if spec.row_kernel {
        g.row_kernel(&mut b, start, end);
    } else {
        g.pointwise_kernel(&mut b, start, end);
    }
    b.ins().return_(&[]);
    b.finalize(config);
}

impl Gen<'_> {
    fn iconst(&self, b: &mut FunctionBuilder, v: i64) -> Value {
        b.ins().iconst(types::I64, v)
    }

    fn fconst(&self, b: &mut FunctionBuilder, vec: bool, v: f64) -> Value {
        math::constant(b, if vec { self.vt } else { self.ft }, v)
    }

    /// Starts a row: computes the base index of every input for row `r`.
    fn start_row(&mut self, b: &mut FunctionBuilder, r: Value) {
        self.row_val.clear();
        self.splat.clear();
        self.row_index = Some(r);
        let rows = self.spec.rows;
        self.base = (0..self.spec.inputs.len()).map(|i| self.input_base(b, i, r, rows)).collect();
    }

    /// The element offset of input `i`'s row `r`, for `r` in `0..rows` (terms whose period
    /// `rows` does not exceed skip the wrap).
    fn input_base(&mut self, b: &mut FunctionBuilder, i: usize, r: Value, rows: usize) -> Value {
        let mut acc: Option<Value> = None;
        for &(div, modulo, stride) in &self.spec.inputs[i].outer {
            let mut t = if div == 1 { r } else { b.ins().udiv_imm_s(r, div as i64) };
            if div * modulo < rows {
                t = b.ins().urem_imm_s(t, modulo as i64);
            }
            if stride != 1 {
                t = b.ins().imul_imm_s(t, stride as i64);
            }
            acc = Some(match acc {
                Some(a) => b.ins().iadd(a, t),
                None => t,
            });
        }
        acc.unwrap_or_else(|| self.iconst(b, 0))
    }

    fn addr(&self, b: &mut FunctionBuilder, ptr: Value, index: Value, shift: i64) -> Value {
        let off = if shift == 0 { index } else { b.ins().ishl_imm_s(index, shift) };
        b.ins().iadd(ptr, off)
    }

    /// The address of element `row + rc` of the array at `ptr` (elements of `1 << shift`
    /// bytes), as a register part and a displacement: `ptr + row·size` is the same for a whole
    /// loop (Cranelift computes it once, before the loop), and an unrolled step's column
    /// `j + k` (see [`Gen::col_off`]) becomes `j` in the address and `k·size` in the
    /// displacement, so x64 addresses every step's element as `disp(base, j, size)` with no
    /// instruction of its own.
    fn place(&self, b: &mut FunctionBuilder, ptr: Value, row: Option<Value>, rc: Value, shift: i64) -> (Value, i32) {
        let (j, k) = self.col_off.get(&rc).copied().unwrap_or((rc, 0));
        let base = match row {
            Some(r) => self.addr(b, ptr, r, shift),
            None => ptr,
        };
        let disp = i32::try_from(k << shift).expect("an unrolled step's displacement fits in 32 bits");
        (self.addr(b, base, j, shift), disp)
    }

    /// The scalar value of `Row` node `n` in the current row (computed where first asked:
    /// callers ask before entering loops, so the value dominates its uses).
    fn row(&mut self, b: &mut FunctionBuilder, n: usize) -> Value {
        if let Some(&v) = self.row_val.get(&n) {
            return v;
        }
        let node = &self.spec.nodes[n];
        let v = match &node.op {
            KOp::Input(i) => {
                let i = *i;
                match node.ty {
                    VType::Float => {
                        let a = self.addr(b, self.in_ptr[i], self.base[i], self.shift);
                        b.ins().load(self.ft, flags(), a, 0)
                    }
                    VType::Bool => {
                        let a = self.addr(b, self.in_ptr[i], self.base[i], 0);
                        let byte = b.ins().uload8(types::I32, flags(), a, 0);
                        b.ins().icmp_imm_s(IntCC::NotEqual, byte, 0)
                    }
                }
            }
            KOp::Const(Imm(c)) => match node.ty {
                VType::Float => self.fconst(b, false, *c),
                VType::Bool => b.ins().iconst(types::I8, i64::from(*c != 0.0)),
            },
            KOp::Reduce(..) => panic!("reduction v{n} read before its sweep"),
            KOp::Random { .. } => unreachable!("random draw v{n} in row space (lowering keeps draws in Elem space)"),
            op => {
                let args: Vec<Value> = operands(op).into_iter().map(|o| self.row(b, o)).collect();
                self.apply(b, op, &args, false)
            }
        };
        self.row_val.insert(n, v);
        v
    }

    /// `Row` node `n` at vector width (a splat, cached per row).
    fn row_splat(&mut self, b: &mut FunctionBuilder, n: usize) -> Value {
        if let Some(&v) = self.splat.get(&n) {
            return v;
        }
        let s = self.row(b, n);
        let v = match self.spec.nodes[n].ty {
            VType::Float => b.ins().splat(self.vt, s),
            VType::Bool => {
                let lane = self.mt.lane_type();
                let t = b.ins().iconst(lane, -1);
                let f = b.ins().iconst(lane, 0);
                let x = b.ins().select(s, t, f);
                b.ins().splat(self.mt, x)
            }
        };
        self.splat.insert(n, v);
        v
    }

    /// Computes, before a loop, every `Row` value the loop's `Elem` computations of `roots`
    /// read, so the loop body only reads them.
    fn hoist(&mut self, b: &mut FunctionBuilder, roots: &[usize], vec: bool) {
        let mut seen = vec![false; self.spec.nodes.len()];
        let mut stack: Vec<usize> = roots.to_vec();
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut seen[n], true) {
                continue;
            }
            let node = &self.spec.nodes[n];
            if node.space == Space::Row {
                self.row(b, n);
                if vec {
                    self.row_splat(b, n);
                }
            } else {
                stack.extend(operands(&node.op));
            }
        }
    }

    /// The value of `Elem` node `n` at column `j` (vector of lanes starting there, or scalar).
    /// The value of node `n` at element `rc`. Iterative (an explicit post-order stack) so a
    /// fused chain of any length needs no native stack; operands are still emitted first to
    /// last, depth first, as a recursive walk would, so the CLIF is unchanged.
    fn elem(
        &mut self,
        b: &mut FunctionBuilder,
        root: usize,
        rc: Value,
        vec: bool,
        memo: &mut HashMap<usize, Value>,
    ) -> Value {
        let mut stack = vec![(root, false)];
        while let Some((n, operands_done)) = stack.pop() {
            if memo.contains_key(&n) {
                continue;
            }
            if operands_done {
                let op = self.spec.nodes[n].op.clone();
                let args: Vec<Value> = operands(&op).into_iter().map(|o| memo[&o]).collect();
                let v = self.apply(b, &op, &args, vec);
                self.finish(b, n, v, rc, memo);
            } else if let Some(v) = self.leaf(b, n, rc, vec) {
                self.finish(b, n, v, rc, memo);
            } else {
                stack.push((n, true));
                let ops = operands(&self.spec.nodes[n].op);
                stack.extend(ops.into_iter().rev().filter(|o| !memo.contains_key(o)).map(|o| (o, false)));
            }
        }
        memo[&root]
    }

    /// The value of `n` when it needs no operand values: reloaded from scratch, a row value,
    /// an input load or a random draw. `None` for an op whose operands come first.
    fn leaf(&mut self, b: &mut FunctionBuilder, n: usize, rc: Value, vec: bool) -> Option<Value> {
        let reload = self.filled.contains(&n) || matches!(self.scratch.get(&n), Some(&(_, home)) if self.sweep > home);
        if reload {
            let (a, d) = self.place(b, self.scratch_addr[&n], None, rc, self.shift);
            return Some(b.ins().load(if vec { self.vt } else { self.ft }, flags(), a, d));
        }
        let node = &self.spec.nodes[n];
        if node.space == Space::Row {
            return Some(if vec { self.row_splat(b, n) } else { self.row(b, n) });
        }
        match node.op {
            KOp::Input(i) => {
                let ty = node.ty;
                Some(self.load(b, i, rc, ty, vec))
            }
            KOp::Random { state, at, mask } => Some(self.random(b, state, at, mask, rc, vec)),
            _ => None,
        }
    }

    /// Records `v` as the value of `n`, storing it to scratch in its home sweep.
    fn finish(&mut self, b: &mut FunctionBuilder, n: usize, v: Value, rc: Value, memo: &mut HashMap<usize, Value>) {
        if let Some(&(_, home)) = self.scratch.get(&n) {
            if self.sweep == home {
                let (a, d) = self.place(b, self.scratch_addr[&n], None, rc, self.shift);
                b.ins().store(flags(), v, a, d);
            }
        }
        memo.insert(n, v);
    }

    /// Input `i` at column `rc` of the current row.
    fn load(&mut self, b: &mut FunctionBuilder, i: usize, rc: Value, ty: VType, vec: bool) -> Value {
        let row = Some(self.base[i]);
        match (ty, vec) {
            (VType::Float, false) => {
                let (a, d) = self.place(b, self.in_ptr[i], row, rc, self.shift);
                b.ins().load(self.ft, flags(), a, d)
            }
            (VType::Float, true) => {
                let (a, d) = self.place(b, self.in_ptr[i], row, rc, self.shift);
                b.ins().load(self.vt, flags(), a, d)
            }
            (VType::Bool, false) => {
                let (a, d) = self.place(b, self.in_ptr[i], row, rc, 0);
                let byte = b.ins().uload8(types::I32, flags(), a, d);
                b.ins().icmp_imm_s(IntCC::NotEqual, byte, 0)
            }
            (VType::Bool, true) if self.mt == types::I32X4 => {
                // Four bytes at once, zero-extended to 32-bit lanes, then compared with 0.
                let (a, d) = self.place(b, self.in_ptr[i], row, rc, 0);
                let word = b.ins().load(types::I32, flags(), a, d);
                let v = b.ins().scalar_to_vector(types::I32X4, word);
                let bytes = b.ins().bitcast(types::I8X16, little(), v);
                let halves = b.ins().uwiden_low(bytes);
                let words = b.ins().uwiden_low(halves);
                let zero = b.ins().iconst(types::I32, 0);
                let zero = b.ins().splat(types::I32X4, zero);
                b.ins().icmp(IntCC::NotEqual, words, zero)
            }
            (VType::Bool, true) => {
                let (a, d) = self.place(b, self.in_ptr[i], row, rc, 0);
                let lane = self.mt.lane_type();
                let zero = b.ins().iconst(lane, 0);
                let mut v = b.ins().splat(self.mt, zero);
                for k in 0..self.lanes {
                    let byte = b.ins().uload8(lane, flags(), a, d + k as i32);
                    let mask = b.ins().ineg(byte);
                    v = b.ins().insertlane(v, mask, k as u8);
                }
                v
            }
        }
    }

    /// Stores `v` as output `out`'s element `row + j`.
    #[allow(clippy::too_many_arguments)]
    fn store(&mut self, b: &mut FunctionBuilder, out: usize, row: Value, j: Value, v: Value, ty: VType, vec: bool) {
        let row = Some(row);
        match (ty, vec) {
            (VType::Float, _) => {
                let (a, d) = self.place(b, self.out_ptr[out], row, j, self.shift);
                b.ins().store(flags(), v, a, d);
            }
            (VType::Bool, false) => {
                let (a, d) = self.place(b, self.out_ptr[out], row, j, 0);
                b.ins().store(flags(), v, a, d);
            }
            (VType::Bool, true) if self.mt == types::I32X4 => {
                // The 0/−1 lanes narrowed (saturating) to bytes, masked to 0/1, stored as one
                // 32-bit word.
                let (a, d) = self.place(b, self.out_ptr[out], row, j, 0);
                let halves = b.ins().snarrow(v, v);
                let bytes = b.ins().snarrow(halves, halves);
                let one = b.ins().iconst(types::I8, 1);
                let one = b.ins().splat(types::I8X16, one);
                let bits = b.ins().band(bytes, one);
                let words = b.ins().bitcast(types::I32X4, little(), bits);
                let word = b.ins().extractlane(words, 0);
                b.ins().store(flags(), word, a, d);
            }
            (VType::Bool, true) => {
                let (a, d) = self.place(b, self.out_ptr[out], row, j, 0);
                for k in 0..self.lanes {
                    let lane = b.ins().extractlane(v, k as u8);
                    let bit = b.ins().band_imm_s(lane, 1);
                    b.ins().istore8(flags(), bit, a, d + k as i32);
                }
            }
        }
    }

    /// Applies a pointwise op to already computed operands.
    fn apply(&mut self, b: &mut FunctionBuilder, op: &KOp, a: &[Value], vec: bool) -> Value {
        let m = self.m;
        let ft = if vec { self.vt } else { self.ft };
        match op {
            KOp::Unary(u, _) => {
                let x = a[0];
                match u {
                    UnaryOp::Neg => b.ins().fneg(x),
                    UnaryOp::Abs => b.ins().fabs(x),
                    UnaryOp::Sign => {
                        let zero = self.fconst(b, vec, 0.0);
                        let one = self.fconst(b, vec, 1.0);
                        let mone = self.fconst(b, vec, -1.0);
                        let pos = b.ins().fcmp(FloatCC::GreaterThan, x, zero);
                        let neg = b.ins().fcmp(FloatCC::LessThan, x, zero);
                        let z = b.ins().fmul(x, zero);
                        let r = self.select(b, neg, mone, z, vec);
                        self.select(b, pos, one, r, vec)
                    }
                    UnaryOp::Exp => math::exp(b, &m, x),
                    UnaryOp::Log => math::log(b, &m, x),
                    UnaryOp::Sqrt => b.ins().sqrt(x),
                    UnaryOp::Rsqrt => {
                        let one = self.fconst(b, vec, 1.0);
                        let s = b.ins().sqrt(x);
                        b.ins().fdiv(one, s)
                    }
                    UnaryOp::Tanh => math::tanh(b, &m, x),
                    UnaryOp::Sigmoid => math::sigmoid(b, &m, x),
                    UnaryOp::Relu => {
                        let zero = self.fconst(b, vec, 0.0);
                        b.ins().fmax(x, zero)
                    }
                    UnaryOp::Gelu => math::gelu(b, &m, x),
                    UnaryOp::GeluTanh => math::gelu_tanh(b, &m, x),
                    UnaryOp::Silu => math::silu(b, &m, x),
                    UnaryOp::Erf => math::erf(b, &m, x),
                    UnaryOp::Square => b.ins().fmul(x, x),
                    UnaryOp::Reciprocal => {
                        let one = self.fconst(b, vec, 1.0);
                        b.ins().fdiv(one, x)
                    }
                    UnaryOp::PowScalar(p) => self.pow_scalar(b, x, *p, vec),
                    UnaryOp::Sin | UnaryOp::Cos => unreachable!("not a kernel op (see kernel::supported)"),
                }
            }
            KOp::Binary(op, ..) => {
                let (x, y) = (a[0], a[1]);
                match op {
                    BinaryOp::Add => b.ins().fadd(x, y),
                    BinaryOp::Sub => b.ins().fsub(x, y),
                    BinaryOp::Mul => b.ins().fmul(x, y),
                    BinaryOp::Div => b.ins().fdiv(x, y),
                    // Cranelift's fmax/fmin return NaN if either operand is NaN, as PyTorch's
                    // maximum/minimum do.
                    BinaryOp::Maximum => b.ins().fmax(x, y),
                    BinaryOp::Minimum => b.ins().fmin(x, y),
                    BinaryOp::Pow => unreachable!("not a kernel op (see kernel::supported)"),
                }
            }
            KOp::Compare(c, ..) => {
                let cc = match c {
                    CompareOp::Eq => FloatCC::Equal,
                    CompareOp::Ne => FloatCC::NotEqual,
                    CompareOp::Lt => FloatCC::LessThan,
                    CompareOp::Le => FloatCC::LessThanOrEqual,
                    CompareOp::Gt => FloatCC::GreaterThan,
                    CompareOp::Ge => FloatCC::GreaterThanOrEqual,
                };
                b.ins().fcmp(cc, a[0], a[1])
            }
            KOp::Where(..) => self.select(b, a[0], a[1], a[2], vec),
            KOp::ExpScaled(..) => math::exp_scaled(b, &m, a[0], a[1]),
            KOp::Clamp(lo, hi, _) => {
                let mut x = a[0];
                if let Some(Imm(lo)) = lo {
                    let c = self.fconst(b, vec, *lo);
                    x = b.ins().fmax(x, c);
                }
                if let Some(Imm(hi)) = hi {
                    let c = self.fconst(b, vec, *hi);
                    x = b.ins().fmin(x, c);
                }
                x
            }
            KOp::ToBool(_) => {
                let zero = self.fconst(b, vec, 0.0);
                b.ins().fcmp(FloatCC::NotEqual, a[0], zero)
            }
            KOp::ToFloat(_) => {
                let one = self.fconst(b, vec, 1.0);
                if vec {
                    let mf = b.ins().bitcast(ft, MemFlagsData::new().with_endianness(Endianness::Little), a[0]);
                    b.ins().band(mf, one)
                } else {
                    let zero = self.fconst(b, vec, 0.0);
                    b.ins().select(a[0], one, zero)
                }
            }
            KOp::Input(_) | KOp::Const(_) | KOp::Reduce(..) | KOp::Random { .. } => unreachable!("not pointwise"),
        }
    }

    /// A random draw at column `rc` of the current row (each lane its own element): the
    /// reference kernel's arithmetic (`tracegrad_compiler::ops::Distribution`) on integers,
    /// converted to float exactly.
    fn random(
        &mut self,
        b: &mut FunctionBuilder,
        state: usize,
        at: u64,
        mask: Option<(u32, Imm)>,
        rc: Value,
        vec: bool,
    ) -> Value {
        let r = self.row_index.expect("a row is started before its elements");
        let row_first = b.ins().imul_imm_s(r, self.spec.cols as i64);
        let flat = b.ins().iadd(row_first, rc);
        let seed = b.ins().load(types::I64, flags(), self.in_ptr[state], 0);
        let offset = b.ins().load(types::I64, flags(), self.in_ptr[state], 8);
        let start = b.ins().iadd_imm_s(offset, at as i64);
        let lanes = if vec { self.lanes } else { 1 };
        let mut out = if vec { Some(self.fconst(b, true, 0.0)) } else { None };
        let mut scalar = None;
        for k in 0..lanes {
            let i = b.ins().iadd_imm_s(flat, k);
            let bits = philox_bits(b, seed, start, i);
            let v = match mask {
                None => {
                    let f = b.ins().fcvt_from_uint(self.ft, bits);
                    let unit = self.fconst(b, false, 1.0 / f64::from(1u32 << 24));
                    b.ins().fmul(f, unit)
                }
                Some((threshold, Imm(scale))) => {
                    let keep = b.ins().icmp_imm_s(IntCC::UnsignedGreaterThanOrEqual, bits, i64::from(threshold));
                    let one = self.fconst(b, false, scale);
                    let zero = self.fconst(b, false, 0.0);
                    b.ins().select(keep, one, zero)
                }
            };
            match out {
                Some(o) => out = Some(b.ins().insertlane(o, v, k as u8)),
                None => scalar = Some(v),
            }
        }
        out.or(scalar).expect("at least one lane")
    }

    /// `cond ? x : y` on a scalar bool (`i8`) or a vector mask.
    fn select(&mut self, b: &mut FunctionBuilder, cond: Value, x: Value, y: Value, vec: bool) -> Value {
        if vec {
            let mf = b.ins().bitcast(self.vt, MemFlagsData::new().with_endianness(Endianness::Little), cond);
            b.ins().bitselect(mf, x, y)
        } else {
            b.ins().select(cond, x, y)
        }
    }

    /// `x^p` for a constant `p`: exact products for small integer powers (as PyTorch's
    /// kernels do), sqrt forms for halves, `exp(p·log x)` otherwise (NaN for negative `x`, as
    /// `powf` gives for a non-integer power).
    fn pow_scalar(&mut self, b: &mut FunctionBuilder, x: Value, p: f64, vec: bool) -> Value {
        let one = self.fconst(b, vec, 1.0);
        if p == 0.0 {
            return one;
        }
        if p == 0.5 {
            return b.ins().sqrt(x);
        }
        if p == -0.5 {
            let s = b.ins().sqrt(x);
            return b.ins().fdiv(one, s);
        }
        if p.fract() == 0.0 && p.abs() <= 64.0 {
            let mut e = p.abs() as u32;
            let mut base = x;
            let mut acc: Option<Value> = None;
            while e > 0 {
                if e & 1 == 1 {
                    acc = Some(match acc {
                        Some(a) => b.ins().fmul(a, base),
                        None => base,
                    });
                }
                e >>= 1;
                if e > 0 {
                    base = b.ins().fmul(base, base);
                }
            }
            let r = acc.expect("nonzero power");
            return if p < 0.0 { b.ins().fdiv(one, r) } else { r };
        }
        let m = self.m;
        let l = math::log(b, &m, x);
        let c = self.fconst(b, vec, p);
        let t = b.ins().fmul(l, c);
        math::exp(b, &m, t)
    }

    /// Elementwise kernel over the flat range `[start, end)` of `rows × cols`.
    fn pointwise_kernel(&mut self, b: &mut FunctionBuilder, start: Value, end: Value) {
        let cols = self.spec.cols as i64;
        let wide = self.wide_nodes();
        let slots = if wide.is_empty() { Vec::new() } else { self.slots(b, wide.len() + 1, TILE) };
        let ahead = (!wide.is_empty()).then(|| {
            let bytes = 8 * self.spec.outputs.len() as u32;
            b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 3))
        });
        self.outer_loop(b, start, end, |g, b, i| {
            let r = if g.spec.rows == 1 { g.iconst(b, 0) } else { b.ins().udiv_imm_s(i, cols) };
            let row_start = b.ins().imul_imm_s(r, cols);
            let j0 = b.ins().isub(i, row_start);
            let rem = b.ins().isub(end, row_start);
            let c = g.iconst(b, cols);
            let jend = b.ins().smin(rem, c);
            g.start_row(b, r);
            let mut roots = g.spec.outputs.clone();
            roots.extend(wide.iter().flat_map(|&w| operands(&g.spec.nodes[w].op)));
            g.hoist(b, &roots, true);
            if wide.is_empty() {
                g.pointwise_outputs(b, row_start, j0, jend);
            } else {
                g.tiles(b, row_start, j0, jend, &wide, &slots, ahead.expect("a slot where there are wide nodes"));
            }
            b.ins().iadd(row_start, jend)
        });
    }

    /// Columns `[j0, jend)` of the current row: every output computed and stored.
    fn pointwise_outputs(&mut self, b: &mut FunctionBuilder, row_start: Value, j0: Value, jend: Value) {
        let outputs = self.spec.outputs.clone();
        let mut step = |g: &mut Gen, b: &mut FunctionBuilder, j: Value, vec: bool, _acc: &mut [Value]| {
            let mut memo = HashMap::new();
            // All values first, then the stores: an output may overwrite an input in place.
            let vals: Vec<Value> = outputs.iter().map(|&n| g.elem(b, n, j, vec, &mut memo)).collect();
            for (o, (&n, v)) in outputs.iter().zip(vals).enumerate() {
                let ty = g.spec.nodes[n].ty;
                g.store(b, o, row_start, j, v, ty, vec);
            }
        };
        self.columns(b, j0, jend, &[], &mut step);
    }

    /// Whether this kernel may call [`crate::lanes`]: a machine whose lanes are wider than
    /// Cranelift's 128 bits and round as this kernel's math does, calls switched on, and rows
    /// of at least [`MIN_TILE_COLS`].
    fn lane_calls(&self) -> bool {
        let w = lanes::Width::native();
        let wider = matches!(w, lanes::Width::Avx2 | lanes::Width::Avx512);
        wider && w.has_fma() == self.m.has_fma && lanes::kernel_calls() && self.spec.cols >= MIN_TILE_COLS
    }

    /// A row kernel's last sweep as one [`lanes::affine_entry`] call, when it has no
    /// reduction and one float output of that form over a row-major input or a wide node's
    /// row (`wide`), with row values for `c` and `p` and per-column inputs for `w` and `b`.
    fn affine_sweep(&self, sweeps: &Sweeps, wide: &[usize]) -> Option<Affine> {
        let spec = self.spec;
        let last = sweeps.count - 1;
        if last == 0 || !self.lane_calls() || sweeps.reductions.iter().any(|&rn| sweeps.of_reduction(spec, rn) == last)
        {
            return None;
        }
        let outs: Vec<(usize, usize)> =
            sweeps.elem_outputs.iter().copied().filter(|&(_, n)| sweeps.level[n] == last).collect();
        let [(out, root)] = outs[..] else { return None };
        let float = |n: usize| spec.nodes[n].ty == VType::Float;
        let row = |n: usize| spec.nodes[n].space == Space::Row && float(n);
        // An input of float rows read along the row: the same row for every row (`outer`
        // empty: a per-column input, layer_norm's weight and bias) or one that moves with it.
        let float_rows = |i: usize| {
            let m = &spec.inputs[i];
            m.space == Space::Elem && m.ty == VType::Float && m.contiguous
        };
        let column = |n: usize| match spec.nodes[n].op {
            KOp::Input(i) => float_rows(i) && spec.inputs[i].outer.is_empty(),
            _ => false,
        };
        let binary = |n: usize| match spec.nodes[n].op {
            KOp::Binary(op, a, b) if float(n) => Some((op, a, b)),
            _ => None,
        };
        let mut code = if spec.float == Float::F64 { lanes::AFFINE_F64 } else { 0 };
        let mut n = root;
        let (mut c, mut p, mut w, mut b) = (None, None, None, None);
        // Matched from the output inwards: + b, · w, ∘ p, − c.
        if let Some((BinaryOp::Add, l, r)) = binary(n) {
            if let Some((v, t)) = [(r, l), (l, r)].into_iter().find(|&(v, _)| column(v)) {
                (b, n, code) = (Some(v), t, code | lanes::AFFINE_B);
            }
        }
        if let Some((BinaryOp::Mul, l, r)) = binary(n) {
            if let Some((v, t)) = [(r, l), (l, r)].into_iter().find(|&(v, _)| column(v)) {
                (w, n, code) = (Some(v), t, code | lanes::AFFINE_W);
            }
        }
        match binary(n) {
            Some((BinaryOp::Mul, l, r)) if row(r) || row(l) => {
                let (v, t) = if row(r) { (r, l) } else { (l, r) };
                (p, n, code) = (Some(v), t, code | lanes::AFFINE_MUL_P);
            }
            Some((BinaryOp::Div, l, r)) if row(r) => (p, n, code) = (Some(r), l, code | lanes::AFFINE_DIV_P),
            Some((BinaryOp::Sub, l, r)) if row(r) => (p, n, code) = (Some(r), l, code | lanes::AFFINE_SUB_P),
            _ => {}
        }
        if let Some((BinaryOp::Sub, l, r)) = binary(n) {
            if row(r) {
                (c, n, code) = (Some(r), l, code | lanes::AFFINE_SUB_C);
            }
        }
        let node = &spec.nodes[n];
        let source = match node.op {
            KOp::Input(i) => {
                let m = &spec.inputs[i];
                node.space == Space::Elem && float(n) && m.contiguous && m.space == Space::Elem
            }
            _ => wide.contains(&n),
        };
        // The input whose next row the call prefetches: the kernel's row-major input (the
        // source itself when it is one), which its first sweep reads from the outer caches.
        let streamed = |i: usize| float_rows(i) && !spec.inputs[i].outer.is_empty();
        let ahead = match node.op {
            KOp::Input(i) if streamed(i) => Some(i),
            _ => (0..spec.inputs.len()).find(|&i| streamed(i)),
        };
        (source && n != root).then_some(Affine { out, x: n, c, p, w, b, code, ahead })
    }

    /// `Row` node `n`'s value in the current row as an f64 (a lanes call's scalar argument),
    /// or 0 without one.
    fn row_f64(&mut self, b: &mut FunctionBuilder, n: Option<usize>) -> Value {
        match n {
            Some(n) => {
                let v = self.row(b, n);
                if self.ft == types::F64 {
                    v
                } else {
                    b.ins().fpromote(types::F64, v)
                }
            }
            None => b.ins().f64const(0.0),
        }
    }

    /// The [`lanes::affine_entry`] call storing the current row of `a.out`.
    fn affine_call(&mut self, b: &mut FunctionBuilder, a: &Affine, row_start: Value, zero: Value, cols: Value) {
        let mut sig = Signature::new(b.func.signature.call_conv);
        sig.params.extend([AbiParam::new(types::I64); 6]);
        sig.params.extend([AbiParam::new(types::F64); 2]);
        sig.params.push(AbiParam::new(types::I64));
        let sig = b.import_signature(sig);
        let x = match self.input_at(b, a.x, zero) {
            Some(x) => x,
            None => self.scratch_addr[&a.x],
        };
        let null = self.iconst(b, 0);
        let w = a.w.and_then(|n| self.input_at(b, n, zero)).unwrap_or(null);
        let bias = a.b.and_then(|n| self.input_at(b, n, zero)).unwrap_or(null);
        let y = self.addr(b, self.out_ptr[a.out], row_start, self.shift);
        let c = self.row_f64(b, a.c);
        let p = self.row_f64(b, a.p);
        let code = self.iconst(b, a.code);
        let ahead = match a.ahead {
            Some(i) => {
                let r = self.row_index.expect("a row is started before its sweeps");
                let next = b.ins().iadd_imm_s(r, 1);
                // After the last row this may point past the input: the call only prefetches it.
                let base = self.input_base(b, i, next, self.spec.rows);
                self.addr(b, self.in_ptr[i], base, self.shift)
            }
            None => null,
        };
        let entry = b.ins().iconst(types::I64, lanes::affine_entry as *const () as usize as i64);
        b.ins().call_indirect(sig, entry, &[code, x, w, bias, y, cols, c, p, ahead]);
    }

    /// The transcendental nodes a kernel hands to [`crate::lanes`] (in node order, so each
    /// one's operand needs only earlier ones): all of them on a machine whose lanes are wider
    /// than Cranelift's 128 bits and round as this kernel's math does, for rows of at least one
    /// tile's worth of columns; none otherwise.
    fn wide_nodes(&self) -> Vec<usize> {
        if !self.lane_calls() {
            return Vec::new();
        }
        (0..self.spec.nodes.len()).filter(|&n| self.wide_func(n).is_some()).collect()
    }

    /// The lanes function computing `Elem` float node `n`, with the `Row` node of its parameter
    /// (if it has one), when it is a transcendental the lanes have.
    fn wide_func(&self, n: usize) -> Option<(lanes::Func, Option<usize>)> {
        let node = &self.spec.nodes[n];
        if node.space != Space::Elem || node.ty != VType::Float {
            return None;
        }
        match node.op {
            KOp::Unary(u, _) => lanes::Func::of(u).map(|f| (f, None)),
            KOp::ExpScaled(_, shift) if self.spec.nodes[shift].space == Space::Row => {
                Some((lanes::Func::ExpScaled, Some(shift)))
            }
            _ => None,
        }
    }

    /// The [`lanes::kernel_entry`] call computing wide node `w` for `len` elements from the
    /// operand at `arg` into `dst`. Its parameter, a `Row` value, must have been hoisted. With
    /// `sub`, a `Row` node, the lanes read `arg − sub` (the node's operand is that difference);
    /// with `sum`, the call returns the kernel-order sum of what it writes (see
    /// [`lanes::kernel_entry`]), as this kernel's float. `ahead` is an array of addresses and
    /// their count, for the call to prefetch.
    #[allow(clippy::too_many_arguments)]
    fn wide_call(
        &mut self,
        b: &mut FunctionBuilder,
        w: usize,
        arg: Value,
        dst: Value,
        len: Value,
        sub: Option<usize>,
        sum: bool,
        ahead: Option<(Value, usize)>,
    ) -> Option<Value> {
        let (f, param) = self.wide_func(w).expect("a wide node");
        let mut sig = Signature::new(b.func.signature.call_conv);
        sig.params.extend([AbiParam::new(types::I64); 6]);
        sig.params.extend([AbiParam::new(types::F64); 2]);
        sig.returns.push(AbiParam::new(types::F64));
        let sig = b.import_signature(sig);
        let p = self.row_f64(b, param);
        let c = self.row_f64(b, sub);
        let code = lanes::kernel_code(f, self.spec.float == Float::F64) + if sum { lanes::CODE_SUM } else { 0 };
        let entry = b.ins().iconst(types::I64, lanes::kernel_entry as *const () as usize as i64);
        let code = b.ins().iconst(types::I64, code);
        let (at, count) = match ahead {
            Some((at, count)) => (at, count as i64),
            None => (self.iconst(b, 0), 0),
        };
        let count = self.iconst(b, count);
        let call = b.ins().call_indirect(sig, entry, &[code, arg, dst, len, at, count, c, p]);
        let s = b.inst_results(call)[0];
        sum.then(|| if self.ft == types::F64 { s } else { b.ins().fdemote(types::F32, s) })
    }

    /// Where wide node `w`'s operand is `x − c` for a float input `x` and a `Row` value `c`
    /// (softmax's `x − max`), the input and `c`: the lanes compute the difference themselves.
    fn shifted_input(&self, w: usize) -> Option<(usize, usize)> {
        let x = operands(&self.spec.nodes[w].op)[0];
        let KOp::Binary(BinaryOp::Sub, i, c) = self.spec.nodes[x].op else { return None };
        let (input, shift) = (&self.spec.nodes[i], &self.spec.nodes[c]);
        let float_input = matches!(input.op, KOp::Input(_)) && input.space == Space::Elem && input.ty == VType::Float;
        (float_input && shift.space == Space::Row && shift.ty == VType::Float).then_some((i, c))
    }

    /// `count` stack slots of `elems` elements each.
    fn slots(&mut self, b: &mut FunctionBuilder, count: usize, elems: usize) -> Vec<StackSlot> {
        let bytes = (elems * self.spec.float.size()) as u32;
        (0..count)
            .map(|_| b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 6)))
            .collect()
    }

    /// Columns `[j0, jend)` in tiles of [`TILE`]: per tile, one sweep per wide node computes its
    /// operand into the argument row (`slots[0]`) and calls [`lanes::kernel_entry`], which
    /// writes the node's values into its result row; a last sweep computes the outputs, reading
    /// the wide nodes from their rows (through `scratch_addr`, as a row kernel reads a cached
    /// sweep value). The first call of a tile also prefetches every output [`PREFETCH_TILES`]
    /// tiles on, from the addresses the tile writes to `ahead`.
    #[allow(clippy::too_many_arguments)]
    fn tiles(
        &mut self,
        b: &mut FunctionBuilder,
        row_start: Value,
        j0: Value,
        jend: Value,
        wide: &[usize],
        slots: &[StackSlot],
        ahead: StackSlot,
    ) {
        self.outer_loop(b, j0, jend, |g, b, t0| {
            let t_end = b.ins().iadd_imm_s(t0, TILE as i64);
            let t1 = b.ins().smin(t_end, jend);
            let len = b.ins().isub(t1, t0);
            // A row's address minus t0 elements: indexing it by the column j lands in the tile.
            let off = b.ins().ishl_imm_s(t0, g.shift);
            g.filled.clear();
            // The outputs' addresses at column t0 + PREFETCH_TILES·TILE of this row (past its end
            // they point into the next rows or past the output: a prefetch cannot fault).
            let later = b.ins().iadd_imm_s(t0, PREFETCH_TILES * TILE as i64);
            let later = b.ins().iadd(row_start, later);
            for o in 0..g.spec.outputs.len() {
                let shift = if g.spec.nodes[g.spec.outputs[o]].ty == VType::Float { g.shift } else { 0 };
                let at = g.addr(b, g.out_ptr[o], later, shift);
                b.ins().stack_store(types::I64, at, ahead, (8 * o) as i32);
            }
            let ahead_at = b.ins().stack_addr(types::I64, ahead, 0);
            for (k, &w) in wide.iter().enumerate() {
                let arg = match g.input_row(b, w, t0) {
                    Some(arg) => arg,
                    None => {
                        let arg = b.ins().stack_addr(types::I64, slots[0], 0);
                        let arg_base = b.ins().isub(arg, off);
                        g.store_operand(b, w, arg_base, t0, t1);
                        arg
                    }
                };
                let dst = b.ins().stack_addr(types::I64, slots[k + 1], 0);
                g.wide_call(b, w, arg, dst, len, None, false, (k == 0).then_some((ahead_at, g.spec.outputs.len())));
                let base = b.ins().isub(dst, off);
                g.scratch_addr.insert(w, base);
                g.filled.insert(w);
            }
            g.pointwise_outputs(b, row_start, t0, t1);
            t1
        });
    }

    /// Where wide node `w`'s operand is a float input, the address of its element at column
    /// `j0` of the current row: the lanes read the input's row where it lies, and no sweep
    /// copies it to the argument row first.
    fn input_row(&mut self, b: &mut FunctionBuilder, w: usize, j0: Value) -> Option<Value> {
        self.input_at(b, operands(&self.spec.nodes[w].op)[0], j0)
    }

    /// The address of float input node `x`'s element at column `j0` of the current row.
    fn input_at(&mut self, b: &mut FunctionBuilder, x: usize, j0: Value) -> Option<Value> {
        let node = &self.spec.nodes[x];
        let KOp::Input(i) = node.op else { return None };
        if node.space != Space::Elem || node.ty != VType::Float {
            return None;
        }
        let (a, d) = self.place(b, self.in_ptr[i], Some(self.base[i]), j0, self.shift);
        Some(if d == 0 { a } else { b.ins().iadd_imm_s(a, i64::from(d)) })
    }

    /// Stores wide node `w`'s operand at columns `[j0, jend)` to the row at `base` (indexed by
    /// column).
    fn store_operand(&mut self, b: &mut FunctionBuilder, w: usize, base: Value, j0: Value, jend: Value) {
        let x = operands(&self.spec.nodes[w].op)[0];
        let mut step = |g: &mut Gen, b: &mut FunctionBuilder, j: Value, vec: bool, _acc: &mut [Value]| {
            let mut memo = HashMap::new();
            let v = g.elem(b, x, j, vec, &mut memo);
            let (a, d) = g.place(b, base, None, j, g.shift);
            b.ins().store(flags(), v, a, d);
        };
        self.columns(b, j0, jend, &[], &mut step);
    }

    /// `for (i = start; i < end; i = body(i))`: the outer loop of both kernel forms (over
    /// elements, a row at a time, or over rows).
    fn outer_loop(
        &mut self,
        b: &mut FunctionBuilder,
        start: Value,
        end: Value,
        body: impl FnOnce(&mut Self, &mut FunctionBuilder, Value) -> Value,
    ) {
        let var = b.declare_var(types::I64);
        b.def_var(var, start);
        let head = b.create_block();
        b.ins().jump(head, &[]);
        let done = |_: &mut Self, b: &mut FunctionBuilder, i: Value| {
            LoopTest::Until(b.ins().icmp(IntCC::SignedGreaterThanOrEqual, i, end))
        };
        let exit = self.head_tested_loop(b, head, var, done, body);
        b.switch_to_block(exit);
        b.seal_block(exit);
    }

    /// A loop tested at `head` (created, and jumped to, by the caller): `test(var)` decides
    /// whether `body(var)` runs, which returns the next value of `var`. Returns the exit
    /// block, for the caller to continue in.
    fn head_tested_loop(
        &mut self,
        b: &mut FunctionBuilder,
        head: Block,
        var: Variable,
        test: impl FnOnce(&mut Self, &mut FunctionBuilder, Value) -> LoopTest,
        body: impl FnOnce(&mut Self, &mut FunctionBuilder, Value) -> Value,
    ) -> Block {
        b.switch_to_block(head);
        let block = b.create_block();
        let exit = b.create_block();
        let i = b.use_var(var);
        match test(self, b, i) {
            LoopTest::While(c) => b.ins().brif(c, block, &[], exit, &[]),
            LoopTest::Until(c) => b.ins().brif(c, exit, &[], block, &[]),
        };
        b.switch_to_block(block);
        b.seal_block(block);
        let i = b.use_var(var);
        let next = body(self, b, i);
        b.def_var(var, next);
        b.ins().jump(head, &[]);
        b.seal_block(head);
        exit
    }

    /// Runs `step` over columns `[j0, jend)`: an unrolled, rotated vector loop, single-vector
    /// steps, then scalar steps. `accs` are loop-carried accumulators as (vector, scalar)
    /// initial values; `step` updates them in place. Returns each accumulator's final unrolled
    /// vector parts and scalar part.
    fn columns(
        &mut self,
        b: &mut FunctionBuilder,
        j0: Value,
        jend: Value,
        accs: &[(Value, Value)],
        step: &mut StepFn,
    ) -> Vec<(Vec<Value>, Value)> {
        // Accumulators: (vector, scalar) pairs; the vector one is carried `unroll` times.
        let unroll = if self.spec.row_kernel { ROW_UNROLL } else { UNROLL };
        let vec_vars: Vec<Vec<Variable>> =
            accs.iter().map(|&(v, _)| (0..unroll).map(|_| define(b, self.vt, v)).collect()).collect();
        let sc_vars: Vec<Variable> = accs.iter().map(|&(_, s)| define(b, self.ft, s)).collect();
        let j_var = define(b, types::I64, j0);
        let single_head = self.unrolled_loop(b, j0, jend, j_var, &vec_vars, step);
        let firsts: Vec<Variable> = vec_vars.iter().map(|vs| vs[0]).collect();
        let tail_head = self.step_loop(b, single_head, j_var, jend, true, &firsts, step);
        let done = self.step_loop(b, tail_head, j_var, jend, false, &sc_vars, step);
        b.switch_to_block(done);
        b.seal_block(done);

        // The final accumulators: each vector one's unrolled parts, and the scalar one.
        vec_vars
            .iter()
            .zip(&sc_vars)
            .map(|(vs, &s)| (vs.iter().map(|&v| b.use_var(v)).collect(), b.use_var(s)))
            .collect()
    }

    /// The unrolled vector loop of [`Gen::columns`], rotated (tested at the bottom, behind one
    /// guard): `unroll` vector steps per iteration, each with its own accumulators. Returns
    /// the block after it.
    fn unrolled_loop(
        &mut self,
        b: &mut FunctionBuilder,
        j0: Value,
        jend: Value,
        j_var: Variable,
        vec_vars: &[Vec<Variable>],
        step: &mut StepFn,
    ) -> Block {
        let unroll = if self.spec.row_kernel { ROW_UNROLL } else { UNROLL };
        let w = self.lanes;
        let big = w * unroll;
        let ubody = b.create_block();
        let after = b.create_block();
        let fits = b.ins().iadd_imm_s(j0, big);
        let c = b.ins().icmp(IntCC::SignedLessThanOrEqual, fits, jend);
        b.ins().brif(c, ubody, &[], after, &[]);
        b.switch_to_block(ubody);
        let j = b.use_var(j_var);
        for u in 0..unroll {
            let ju = b.ins().iadd_imm_s(j, u * w);
            self.col_off.insert(ju, (j, u * w));
            let mut vals: Vec<Value> = vec_vars.iter().map(|vs| b.use_var(vs[u as usize])).collect();
            step(self, b, ju, true, &mut vals);
            for (vs, v) in vec_vars.iter().zip(vals) {
                b.def_var(vs[u as usize], v);
            }
        }
        let jn = b.ins().iadd_imm_s(j, big);
        b.def_var(j_var, jn);
        let fits = b.ins().iadd_imm_s(jn, big);
        let c = b.ins().icmp(IntCC::SignedLessThanOrEqual, fits, jend);
        b.ins().brif(c, ubody, &[], after, &[]);
        b.seal_block(ubody);
        after
    }

    /// Single steps (one vector, or one scalar) of `step` from `head` while they fit before
    /// `jend`, on the accumulators `vars`. Returns the exit block.
    #[allow(clippy::too_many_arguments)]
    fn step_loop(
        &mut self,
        b: &mut FunctionBuilder,
        head: Block,
        j_var: Variable,
        jend: Value,
        vec: bool,
        vars: &[Variable],
        step: &mut StepFn,
    ) -> Block {
        let w = if vec { self.lanes } else { 1 };
        let fits = |_: &mut Self, b: &mut FunctionBuilder, j: Value| {
            LoopTest::While(if vec {
                let end = b.ins().iadd_imm_s(j, w);
                b.ins().icmp(IntCC::SignedLessThanOrEqual, end, jend)
            } else {
                b.ins().icmp(IntCC::SignedLessThan, j, jend)
            })
        };
        let body = |g: &mut Self, b: &mut FunctionBuilder, j: Value| {
            let mut vals: Vec<Value> = vars.iter().map(|&v| b.use_var(v)).collect();
            step(g, b, j, vec, &mut vals);
            for (&var, v) in vars.iter().zip(vals) {
                b.def_var(var, v);
            }
            b.ins().iadd_imm_s(j, w)
        };
        self.head_tested_loop(b, head, j_var, fits, body)
    }

    /// Row kernel over rows `[start, end)`: sweeps over each row, reductions between sweeps.
    /// Wide nodes (on machines wider than 128 bits) are computed a whole row at a time by
    /// [`lanes::kernel_entry`] at the start of the first sweep that can compute them, into
    /// scratch rows that every later loop reads.
    fn row_kernel(&mut self, b: &mut FunctionBuilder, start: Value, end: Value) {
        let spec = self.spec;
        let cols = spec.cols as i64;
        let sweeps = Sweeps::of(spec);
        let mut wide = self.wide_nodes();
        if (wide.len() + 1) * spec.cols * spec.float.size() > WIDE_ROW_BYTES {
            wide.clear();
        }
        self.plan_scratch(b, &sweeps, &wide);
        let wide_slots = if wide.is_empty() { Vec::new() } else { self.slots(b, wide.len() + 1, spec.cols) };
        let affine = self.affine_sweep(&sweeps, &wide);
        self.outer_loop(b, start, end, |g, b, r| {
            g.start_row(b, r);
            let slots: Vec<(usize, StackSlot)> = g.scratch.iter().map(|(&n, &(slot, _))| (n, slot)).collect();
            for (n, slot) in slots {
                let a = b.ins().stack_addr(types::I64, slot, 0);
                g.scratch_addr.insert(n, a);
            }
            g.filled.clear();
            g.given.clear();
            let row_start = b.ins().imul_imm_s(r, cols);
            let zero = g.iconst(b, 0);
            let c = g.iconst(b, cols);
            for s in 0..sweeps.count {
                g.sweep = s;
                for (k, &w) in wide.iter().enumerate().filter(|&(_, &w)| sweeps.level[w] == s) {
                    g.hoist(b, &operands(&spec.nodes[w].op), true);
                    // The operand: an input row read in place, `x − c` computed by the lanes
                    // from the input row, or a row this sweep stores first.
                    let shifted = g.shifted_input(w);
                    let direct = match shifted {
                        Some((x, _)) => g.input_at(b, x, zero),
                        None => g.input_row(b, w, zero),
                    };
                    let arg = match direct {
                        Some(arg) => arg,
                        None => {
                            let arg = b.ins().stack_addr(types::I64, wide_slots[0], 0);
                            g.store_operand(b, w, arg, zero, c);
                            arg
                        }
                    };
                    // A sum of the node over the row comes back with the call.
                    let sum = sweeps
                        .reductions
                        .iter()
                        .copied()
                        .find(|&rn| matches!(spec.nodes[rn].op, KOp::Reduce(RowReduction::Sum, x) if x == w));
                    let dst = b.ins().stack_addr(types::I64, wide_slots[k + 1], 0);
                    let sub = shifted.filter(|_| direct.is_some()).map(|(_, c)| c);
                    if let Some(total) = g.wide_call(b, w, arg, dst, c, sub, sum.is_some(), None) {
                        let rn = sum.expect("a sum was asked for");
                        g.row_val.insert(rn, total);
                        g.given.insert(rn);
                    }
                    g.scratch_addr.insert(w, dst);
                    g.filled.insert(w);
                }
                match &affine {
                    Some(a) if s + 1 == sweeps.count => g.affine_call(b, a, row_start, zero, c),
                    _ => g.sweep_row(b, &sweeps, row_start, zero, c),
                }
            }
            // Per-row outputs.
            for (o, &n) in spec.outputs.iter().enumerate() {
                if spec.nodes[n].space == Space::Row {
                    let v = g.row(b, n);
                    let zero = g.iconst(b, 0);
                    g.store(b, o, r, zero, v, spec.nodes[n].ty, false);
                }
            }
            b.ins().iadd_imm_s(r, 1)
        });
    }

    /// Keeps the expensive `Elem` values a later sweep needs again in scratch rows (stack
    /// slots), if they fit; the `wide` ones have rows of their own.
    fn plan_scratch(&mut self, b: &mut FunctionBuilder, sweeps: &Sweeps, wide: &[usize]) {
        let spec = self.spec;
        let mut cached = sweeps.reused_expensive(spec);
        cached.retain(|n, _| !wide.contains(n));
        let row_bytes = spec.cols * spec.float.size();
        if !cached.is_empty() && row_bytes * cached.len() <= 64 << 10 {
            for (n, home) in cached {
                let slot =
                    b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, row_bytes as u32, 4));
                self.scratch.insert(n, (slot, home));
            }
        }
    }

    /// One sweep (`self.sweep`) over the current row: the reductions it finishes and the
    /// `Elem` outputs it stores.
    fn sweep_row(&mut self, b: &mut FunctionBuilder, sweeps: &Sweeps, row_start: Value, zero: Value, c: Value) {
        let (spec, s) = (self.spec, self.sweep);
        let reds: Vec<usize> = sweeps
            .reductions
            .iter()
            .copied()
            .filter(|&n| sweeps.of_reduction(spec, n) == s && !self.given.contains(&n))
            .collect();
        let outs: Vec<(usize, usize)> =
            sweeps.elem_outputs.iter().copied().filter(|&(_, n)| sweeps.level[n] == s).collect();
        if reds.is_empty() && outs.is_empty() {
            return;
        }
        let kinds: Vec<(RowReduction, usize)> = reds
            .iter()
            .map(|&rn| match spec.nodes[rn].op {
                KOp::Reduce(k, x) => (k, x),
                _ => unreachable!(),
            })
            .collect();
        let roots: Vec<usize> = outs.iter().map(|&(_, n)| n).chain(kinds.iter().map(|&(_, x)| x)).collect();
        self.hoist(b, &roots, true);
        let inits: Vec<(Value, Value)> = kinds
            .iter()
            .map(|&(k, _)| {
                let v = match k {
                    RowReduction::Sum => 0.0,
                    RowReduction::Max | RowReduction::MaxSkipNan => f64::NEG_INFINITY,
                    RowReduction::Min => f64::INFINITY,
                };
                (self.fconst(b, true, v), self.fconst(b, false, v))
            })
            .collect();
        let mut step = |g: &mut Gen, b: &mut FunctionBuilder, j: Value, vec: bool, acc: &mut [Value]| {
            let mut memo = HashMap::new();
            for (a, &(k, x)) in acc.iter_mut().zip(&kinds) {
                let v = g.elem(b, x, j, vec, &mut memo);
                *a = combine(b, k, *a, v);
            }
            for &(o, n) in &outs {
                let v = g.elem(b, n, j, vec, &mut memo);
                let ty = g.spec.nodes[n].ty;
                g.store(b, o, row_start, j, v, ty, vec);
            }
        };
        let finals = self.columns(b, zero, c, &inits, &mut step);
        for ((&rn, &(k, _)), (parts, sacc)) in reds.iter().zip(&kinds).zip(finals) {
            let vacc = parts[1..].iter().fold(parts[0], |a, &p| combine(b, k, a, p));
            let mut t = sacc;
            for lane in 0..self.lanes {
                let x = b.ins().extractlane(vacc, lane as u8);
                t = combine(b, k, t, x);
            }
            self.row_val.insert(rn, t);
        }
    }
}

/// A row kernel's last sweep done by [`lanes::affine_entry`]: output `out` (an output index)
/// is `((x − c) ∘ p) · w + b` with the steps `code` names; `x` is a node (a row-major input,
/// or a wide node's row), `c` and `p` `Row` nodes, `w` and `b` per-column input nodes.
struct Affine {
    out: usize,
    x: usize,
    c: Option<usize>,
    p: Option<usize>,
    w: Option<usize>,
    b: Option<usize>,
    code: i64,
    /// The input whose next row the call prefetches.
    ahead: Option<usize>,
}

/// How a loop's head decides: run the body while the condition holds, or until it does.
enum LoopTest {
    While(Value),
    Until(Value),
}

/// A declared variable holding `v`.
fn define(b: &mut FunctionBuilder, ty: Type, v: Value) -> Variable {
    let var = b.declare_var(ty);
    b.def_var(var, v);
    var
}

/// How a row kernel splits into sweeps over each row: a reduction's result is known only
/// after the sweep that reads its operand, so everything that needs it runs in a later one.
struct Sweeps {
    /// The sweep in which each `Elem` value can be computed; the sweep after which each `Row`
    /// value is known.
    level: Vec<usize>,
    reductions: Vec<usize>,
    /// Stored `Elem` values, as (output index, node).
    elem_outputs: Vec<(usize, usize)>,
    count: usize,
}

impl Sweeps {
    fn of(spec: &KernelSpec) -> Sweeps {
        let mut level = vec![0usize; spec.nodes.len()];
        for (n, node) in spec.nodes.iter().enumerate() {
            level[n] = match &node.op {
                KOp::Reduce(_, x) => level[*x] + 1,
                op => operands(op).into_iter().map(|o| level[o]).max().unwrap_or(0),
            };
        }
        let reductions: Vec<usize> =
            (0..spec.nodes.len()).filter(|&n| matches!(spec.nodes[n].op, KOp::Reduce(..))).collect();
        let elem_outputs: Vec<(usize, usize)> = spec
            .outputs
            .iter()
            .enumerate()
            .filter(|(_, &n)| spec.nodes[n].space == Space::Elem)
            .map(|(o, &n)| (o, n))
            .collect();
        let mut sweeps = Sweeps { level, reductions, elem_outputs, count: 0 };
        sweeps.count = (sweeps.reductions.iter().map(|&r| sweeps.of_reduction(spec, r) + 1))
            .chain(sweeps.elem_outputs.iter().map(|&(_, n)| sweeps.level[n] + 1))
            .max()
            .unwrap_or(1);
        sweeps
    }

    /// The sweep that computes reduction `n`.
    fn of_reduction(&self, spec: &KernelSpec, n: usize) -> usize {
        match spec.nodes[n].op {
            KOp::Reduce(_, x) => self.level[x],
            _ => unreachable!(),
        }
    }

    /// The expensive `Elem` values a later sweep needs again, with the sweep that first
    /// computes them.
    fn reused_expensive(&self, spec: &KernelSpec) -> HashMap<usize, usize> {
        let mut first_use: HashMap<usize, usize> = HashMap::new();
        let mut cached: HashMap<usize, usize> = HashMap::new();
        for s in 0..self.count {
            let mut stack: Vec<usize> =
                self.elem_outputs.iter().filter(|&&(_, n)| self.level[n] == s).map(|&(_, n)| n).collect();
            for &rn in self.reductions.iter().filter(|&&rn| self.of_reduction(spec, rn) == s) {
                stack.extend(operands(&spec.nodes[rn].op));
            }
            let mut seen = std::collections::HashSet::new();
            while let Some(n) = stack.pop() {
                let node = &spec.nodes[n];
                if node.space != Space::Elem || matches!(node.op, KOp::Input(_)) || !seen.insert(n) {
                    continue;
                }
                match first_use.get(&n) {
                    Some(&home) if home < s => {
                        if node.ty == VType::Float && expensive(spec, n) {
                            cached.insert(n, home);
                            continue;
                        }
                    }
                    Some(_) => {}
                    None => {
                        first_use.insert(n, s);
                    }
                }
                if !cached.contains_key(&n) {
                    stack.extend(operands(&node.op));
                }
            }
        }
        cached
    }
}

/// Whether recomputing `Elem` node `n` costs more than reloading it: it involves a
/// transcendental or a division.
fn expensive(spec: &KernelSpec, n: usize) -> bool {
    let mut stack = vec![n];
    while let Some(k) = stack.pop() {
        let node = &spec.nodes[k];
        if node.space != Space::Elem {
            continue;
        }
        match &node.op {
            KOp::Unary(u, _)
                if !matches!(
                    u,
                    UnaryOp::Neg
                        | UnaryOp::Abs
                        | UnaryOp::Sign
                        | UnaryOp::Relu
                        | UnaryOp::Square
                        | UnaryOp::PowScalar(_)
                ) =>
            {
                return true
            }
            KOp::Binary(BinaryOp::Div, ..) | KOp::ExpScaled(..) | KOp::Random { .. } => return true,
            op => stack.extend(operands(op)),
        }
    }
    false
}

fn combine(b: &mut FunctionBuilder, k: RowReduction, acc: Value, v: Value) -> Value {
    match k {
        RowReduction::Sum => b.ins().fadd(acc, v),
        RowReduction::Max => b.ins().fmax(acc, v),
        RowReduction::Min => b.ins().fmin(acc, v),
        // `acc < v ? v : acc`: one `maxps v, acc` on x64 (which returns its second operand when
        // either is NaN), where `fmax` is an eight-instruction NaN- and sign-of-zero-exact
        // sequence on the loop-carried chain.
        RowReduction::MaxSkipNan => {
            let lt = b.ins().fcmp(FloatCC::LessThan, acc, v);
            let ty = b.func.dfg.value_type(acc);
            if ty.is_vector() {
                let mask = b.ins().bitcast(ty, MemFlagsData::new().with_endianness(Endianness::Little), lt);
                b.ins().bitselect(mask, v, acc)
            } else {
                b.ins().select(lt, v, acc)
            }
        }
    }
}

/// The top 24 bits (`word >> 8`, as an i32) of Philox4x32-10 word `i` of the draw starting at
/// block `start` under `seed` (i64 values): the counter is `[block, start + block]` with
/// `block = i / 4` (each as two 32-bit words, low first), the key the seed's two words, and
/// the word is lane `i % 4` (`tracegrad_runtime::philox`). The multiplies are 32×32→64 as
/// `imul` (low half) and `umulhi` (high half); the ten rounds are unrolled.
fn philox_bits(b: &mut FunctionBuilder, seed: Value, start: Value, i: Value) -> Value {
    const M0: i64 = 0xD251_1F53;
    const M1: i64 = 0xCD9E_8D57;
    const W0: i64 = 0x9E37_79B9;
    const W1: i64 = 0xBB67_AE85;
    let lo = |b: &mut FunctionBuilder, x: Value| b.ins().ireduce(types::I32, x);
    let hi = |b: &mut FunctionBuilder, x: Value| {
        let h = b.ins().ushr_imm_s(x, 32);
        b.ins().ireduce(types::I32, h)
    };
    let block = b.ins().ushr_imm_s(i, 2);
    let pos = b.ins().iadd(start, block);
    let mut c = [lo(b, block), hi(b, block), lo(b, pos), hi(b, pos)];
    let mut k = [lo(b, seed), hi(b, seed)];
    let (m0, m1) = (b.ins().iconst(types::I32, M0), b.ins().iconst(types::I32, M1));
    let (w0, w1) = (b.ins().iconst(types::I32, W0), b.ins().iconst(types::I32, W1));
    for r in 0..10 {
        if r > 0 {
            k = [b.ins().iadd(k[0], w0), b.ins().iadd(k[1], w1)];
        }
        let (lo0, hi0) = (b.ins().imul(c[0], m0), b.ins().umulhi(c[0], m0));
        let (lo1, hi1) = (b.ins().imul(c[2], m1), b.ins().umulhi(c[2], m1));
        let x0 = b.ins().bxor(hi1, c[1]);
        let x2 = b.ins().bxor(hi0, c[3]);
        c = [b.ins().bxor(x0, k[0]), lo1, b.ins().bxor(x2, k[1]), lo0];
    }
    let lane = b.ins().band_imm_s(i, 3);
    let mut word = c[3];
    for l in (0..3).rev() {
        let is = b.ins().icmp_imm_s(IntCC::Equal, lane, l);
        word = b.ins().select(is, c[l as usize], word);
    }
    b.ins().ushr_imm_s(word, 8)
}

/// The operands of a kernel op.
pub fn operands(op: &KOp) -> Vec<usize> {
    match *op {
        KOp::Input(_) | KOp::Const(_) | KOp::Random { .. } => vec![],
        KOp::Unary(_, x) | KOp::Clamp(_, _, x) | KOp::ToBool(x) | KOp::ToFloat(x) | KOp::Reduce(_, x) => vec![x],
        KOp::Binary(_, x, y) | KOp::Compare(_, x, y) | KOp::ExpScaled(x, y) => vec![x, y],
        KOp::Where(c, x, y) => vec![c, x, y],
    }
}
