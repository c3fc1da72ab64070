//! Accuracy and lowering tests for `tracegrad_jit::math`.
//!
//! For every (function, precision) a tiny kernel `fn(src, dst, n)` — a vector loop over 4 (f32)
//! or 2 (f64) lanes plus a scalar tail — and a scalar-only twin are JIT-compiled for five x64
//! feature sets (native with and without FMA, AVX2 + FMA without AVX-512, SSE4.2, SSE2 only),
//! with a check that only the documented instructions are emitted and that the machine code
//! calls nothing (no libcall). They are run over dense samples of the domain and compared:
//! - against a reference: the f64 functions of std/libm for f32 (whose error is invisible at
//!   f32's scale), a double-double implementation (≈ 2^−100 relative) for f64;
//! - with each other: the vector and scalar paths, and all feature sets without FMA, must agree
//!   bit for bit; so must the feature sets with FMA.
//!
//! The asserted bounds are the ones the functions' documentation states. `exhaustive_f32`
//! (ignored by default) checks them on every f32 input.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, AbiParam, BlockArg, InstBuilder, MemFlagsData, Opcode, Type, Value};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use tracegrad_jit::lanes::{Func, LaneFloat, Width};
use tracegrad_jit::math::{self, MathCtx};

// ---------------------------------------------------------------------------------------------
// Double-double arithmetic for the f64 references.

mod dd {
    /// An unevaluated sum `hi + lo` with |lo| ≤ ulp(hi)/2.
    #[derive(Clone, Copy, Debug)]
    pub struct D {
        pub hi: f64,
        pub lo: f64,
    }

    fn two_sum(a: f64, b: f64) -> D {
        let s = a + b;
        let bb = s - a;
        D { hi: s, lo: (a - (s - bb)) + (b - bb) }
    }

    fn fast_two_sum(a: f64, b: f64) -> D {
        let s = a + b;
        D { hi: s, lo: b - (s - a) }
    }

    fn two_prod(a: f64, b: f64) -> D {
        let p = a * b;
        D { hi: p, lo: a.mul_add(b, -p) }
    }

    impl D {
        pub const fn new(x: f64) -> D {
            D { hi: x, lo: 0.0 }
        }

        pub fn add(self, o: D) -> D {
            let s = two_sum(self.hi, o.hi);
            let t = two_sum(self.lo, o.lo);
            let s = fast_two_sum(s.hi, s.lo + t.hi);
            fast_two_sum(s.hi, s.lo + t.lo)
        }

        pub fn neg(self) -> D {
            D { hi: -self.hi, lo: -self.lo }
        }

        pub fn sub(self, o: D) -> D {
            self.add(o.neg())
        }

        pub fn mul(self, o: D) -> D {
            let p = two_prod(self.hi, o.hi);
            fast_two_sum(p.hi, p.lo + (self.hi * o.lo + self.lo * o.hi))
        }

        pub fn mul_f(self, f: f64) -> D {
            self.mul(D::new(f))
        }

        pub fn div(self, o: D) -> D {
            let q1 = self.hi / o.hi;
            let r = self.sub(o.mul_f(q1));
            let q2 = r.hi / o.hi;
            let r = r.sub(o.mul_f(q2));
            let q3 = r.hi / o.hi;
            fast_two_sum(q1, q2).add(D::new(q3))
        }

        /// `self·2^k`, exact (in two steps, so that 2^k itself need not be representable).
        pub fn scale(self, k: i32) -> D {
            let h = k / 2;
            let (a, b) = (pow2(h), pow2(k - h));
            D { hi: self.hi * a * b, lo: self.lo * a * b }
        }
    }

    /// 2^k for |k| ≤ 1023.
    pub fn pow2(k: i32) -> f64 {
        assert!((-1022..=1023).contains(&k));
        f64::from_bits(((k + 1023) as u64) << 52)
    }

    pub const LN2: D = D { hi: std::f64::consts::LN_2, lo: 2.3190468138462996e-17 };
    pub const SQRT_PI: D = D { hi: 1.772453850905516, lo: -7.666586499825799e-17 };
    pub const FRAC_2_SQRT_PI: D = D { hi: std::f64::consts::FRAC_2_SQRT_PI, lo: 1.533545961316588e-17 };
    pub const FRAC_1_SQRT_2: D = D { hi: std::f64::consts::FRAC_1_SQRT_2, lo: -4.833646656726457e-17 };
    /// 2·√(2/π).
    pub const GELU_C1: D = D { hi: 1.5957691216057308, lo: -9.96930880911092e-17 };
    /// The decimal 0.044715.
    pub const GELU_K: D = D { hi: 0.044715, lo: 2.1960211427085595e-18 };

    /// `e^r − 1` for |r| ≤ 0.36 (relative accuracy ≈ 2^−100).
    fn expm1_core(r: D) -> D {
        if r.hi.abs() < 1e-300 {
            return r;
        }
        let r = r.scale(-10);
        let mut term = r;
        let mut sum = r;
        for n in 2..=13 {
            term = term.mul(r).div(D::new(n as f64));
            sum = sum.add(term);
        }
        // (1 + q)² − 1 = 2q + q², ten times.
        for _ in 0..10 {
            sum = sum.scale(1).add(sum.mul(sum));
        }
        sum
    }

    /// `e^x` as `(m, k)` with `e^x = m·2^k`, m in about [0.7, 1.5]; `None` on overflow (x > 710).
    /// Arguments below −1100 give m = 0.
    pub fn exp(x: D) -> Option<(D, i32)> {
        if x.hi > 710.0 {
            return None;
        }
        if x.hi < -1100.0 {
            return Some((D::new(0.0), 0));
        }
        let k = (x.hi / LN2.hi).round();
        let r = x.sub(LN2.mul_f(k));
        Some((D::new(1.0).add(expm1_core(r)), k as i32))
    }

    /// `e^x − 1` for |x| ≤ 0.35.
    pub fn expm1_small(x: D) -> D {
        assert!(x.hi.abs() <= 0.35);
        expm1_core(x)
    }

    /// `ln x` for finite x > 0, by one Newton step from std's `ln`.
    pub fn ln(x: f64) -> D {
        if x < 1e-200 {
            return ln(x * pow2(700)).sub(LN2.mul_f(700.0));
        }
        let y0 = x.ln();
        let (m, k) = exp(D::new(-y0)).unwrap();
        // t = x·e^{−y0} − 1
        let t = D::new(x).scale(k).mul(m).sub(D::new(1.0));
        D::new(y0).add(t).sub(t.mul(t).mul_f(0.5))
    }

    /// erf(x) by its Taylor series, for |x| ≤ 3 (the largest term is < 2^13, so the sum keeps
    /// ≈ 2^−90 absolute accuracy).
    pub fn erf_taylor(x: D) -> D {
        let x2 = x.mul(x).neg();
        let mut term = x;
        let mut sum = x;
        let mut n = 1;
        loop {
            term = term.mul(x2).div(D::new(n as f64));
            let t = term.div(D::new((2 * n + 1) as f64));
            sum = sum.add(t);
            if t.hi.abs() <= 1e-36 * sum.hi.abs() && n as f64 > -x2.hi {
                break;
            }
            n += 1;
        }
        sum.mul(FRAC_2_SQRT_PI)
    }

    /// erfc(x) for x ≥ 3 by its continued fraction, as `(m, k)`: erfc = m·2^k. The depth
    /// 40 + 700/x² leaves a relative truncation error below 1e-33 (checked with mpmath, and
    /// against depth 400 in `reference_sanity`).
    pub fn erfc_cf(x: D) -> (D, i32) {
        assert!(x.hi >= 3.0);
        let mut f = x;
        let depth = 40 + (700.0 / (x.hi * x.hi)) as usize;
        for n in (1..=depth).rev() {
            f = x.add(D::new(n as f64 * 0.5).div(f));
        }
        let (m, k) = exp(x.mul(x).neg()).unwrap();
        (m.div(SQRT_PI.mul(f)), k)
    }
}

use dd::D;

// ---------------------------------------------------------------------------------------------
// References: the exact value as `m·2^k` (k = 0 unless the value may leave f64's normal range),
// or NaN.

#[derive(Clone, Copy, Debug)]
struct Ref {
    m: D,
    k: i32,
}

impl Ref {
    fn f(v: f64) -> Ref {
        Ref { m: D::new(v), k: 0 }
    }

    fn d(m: D) -> Ref {
        Ref { m, k: 0 }
    }

    fn value(&self) -> f64 {
        if self.k == 0 {
            self.m.hi
        } else {
            self.m.scale(self.k.clamp(-2000, 2000)).hi
        }
    }
}

/// f32 references: f64 arithmetic, whose error (≤ 2^−50 relative) is invisible at f32's scale.
mod ref32 {
    use super::Ref;
    pub fn exp(x: f64) -> Ref {
        Ref::f(x.exp())
    }
    pub fn log(x: f64) -> Ref {
        Ref::f(x.ln())
    }
    pub fn tanh(x: f64) -> Ref {
        Ref::f(x.tanh())
    }
    pub fn sigmoid(x: f64) -> Ref {
        Ref::f(if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) })
    }
    pub fn silu(x: f64) -> Ref {
        Ref::f(x * sigmoid(x).m.hi)
    }
    pub fn erf(x: f64) -> Ref {
        Ref::f(libm::erf(x))
    }
    pub fn gelu(x: f64) -> Ref {
        let u = x * std::f64::consts::FRAC_1_SQRT_2;
        Ref::f(if x < 0.0 { 0.5 * x * libm::erfc(-u) } else { 0.5 * x * (1.0 + libm::erf(u)) })
    }
    pub fn gelu_tanh(x: f64) -> Ref {
        let w = 2.0 * (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
        Ref::f(x * sigmoid(w).m.hi)
    }
}

/// f64 references in double-double arithmetic (≈ 2^−100 relative, far below an f64 ulp).
mod ref64 {
    use super::dd::{self, D};
    use super::Ref;

    /// The value at ±inf (`at_inf`, `at_ninf`) or NaN, for non-finite x.
    fn nonfinite(x: f64, at_inf: f64, at_ninf: f64) -> Option<Ref> {
        if x.is_nan() {
            Some(Ref::f(f64::NAN))
        } else if x == f64::INFINITY {
            Some(Ref::f(at_inf))
        } else if x == f64::NEG_INFINITY {
            Some(Ref::f(at_ninf))
        } else {
            None
        }
    }

    pub fn exp(x: f64) -> Ref {
        if let Some(r) = nonfinite(x, f64::INFINITY, 0.0) {
            return r;
        }
        match dd::exp(D::new(x)) {
            Some((m, k)) => Ref { m, k },
            None => Ref::f(f64::INFINITY),
        }
    }
    pub fn log(x: f64) -> Ref {
        if let Some(r) = nonfinite(x, f64::INFINITY, f64::NAN) {
            return r;
        }
        if x == 0.0 {
            return Ref::f(f64::NEG_INFINITY);
        }
        if x < 0.0 {
            return Ref::f(f64::NAN);
        }
        Ref::d(dd::ln(x))
    }
    pub fn tanh(x: f64) -> Ref {
        if let Some(r) = nonfinite(x, 1.0, -1.0) {
            return r;
        }
        let a = x.abs();
        let t = if a < 0.175 {
            let q = dd::expm1_small(D::new(2.0 * a));
            q.div(q.add(D::new(2.0)))
        } else if a > 40.0 {
            D::new(1.0)
        } else {
            let (m, k) = dd::exp(D::new(-2.0 * a)).unwrap();
            let e = m.scale(k);
            D::new(1.0).sub(e).div(D::new(1.0).add(e))
        };
        Ref::d(if x < 0.0 { t.neg() } else { t })
    }
    /// `pref·sigmoid(w)`.
    fn scaled_sigmoid(pref: D, w: D) -> Ref {
        if w.hi >= 0.0 {
            let (m, k) = dd::exp(w.neg()).unwrap();
            Ref::d(pref.div(D::new(1.0).add(m.scale(k.max(-1500)))))
        } else {
            let (m, k) = dd::exp(w).unwrap();
            Ref { m: pref.mul(m).div(D::new(1.0).add(m.scale(k.max(-1500)))), k }
        }
    }
    pub fn sigmoid(x: f64) -> Ref {
        if let Some(r) = nonfinite(x, 1.0, 0.0) {
            return r;
        }
        scaled_sigmoid(D::new(1.0), D::new(x))
    }
    pub fn silu(x: f64) -> Ref {
        if let Some(r) = nonfinite(x, f64::INFINITY, f64::NAN) {
            return r;
        }
        scaled_sigmoid(D::new(x), D::new(x))
    }
    pub fn gelu_tanh(x: f64) -> Ref {
        if let Some(r) = nonfinite(x, f64::INFINITY, f64::NAN) {
            return r;
        }
        if x.abs() > 1e30 {
            return Ref::f(if x > 0.0 { x } else { -0.0 });
        }
        let xd = D::new(x);
        let w = dd::GELU_C1.mul(xd.add(dd::GELU_K.mul(xd).mul(xd).mul(xd)));
        scaled_sigmoid(xd, w)
    }
    /// erfc(u) for u ≥ 0, as (m, k).
    fn erfc(u: D) -> (D, i32) {
        if u.hi < 3.0 {
            (D::new(1.0).sub(dd::erf_taylor(u)), 0)
        } else if u.hi > 40.0 {
            (D::new(0.0), 0)
        } else {
            dd::erfc_cf(u)
        }
    }
    pub fn erf(x: f64) -> Ref {
        if let Some(r) = nonfinite(x, 1.0, -1.0) {
            return r;
        }
        let a = x.abs();
        let r = if a < 3.0 {
            dd::erf_taylor(D::new(a))
        } else {
            // erfc < 2.3e-5 here, so libm's erfc (≤ 1 ulp) is plenty: 1 − erfc is exact to 1e-21.
            D::new(1.0).sub(D::new(libm::erfc(a)))
        };
        Ref::d(if x < 0.0 { r.neg() } else { r })
    }
    pub fn gelu(x: f64) -> Ref {
        if let Some(r) = nonfinite(x, f64::INFINITY, f64::NAN) {
            return r;
        }
        let xd = D::new(x);
        let u = xd.mul(dd::FRAC_1_SQRT_2);
        let hx = xd.mul_f(0.5);
        if u.hi.abs() < 3.0 {
            return Ref::d(hx.mul(D::new(1.0).add(dd::erf_taylor(u))));
        }
        let (m, k) = erfc(if u.hi < 0.0 { u.neg() } else { u });
        if x < 0.0 {
            Ref { m: hx.mul(m), k }
        } else {
            Ref::d(xd.sub(hx.mul(m.scale(k))))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The float types under test.

trait Flt: Copy + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    const LANE: Type;
    const LANES: u32;
    /// Mantissa bits (without the hidden one).
    const MANT: i32;
    /// Smallest normal exponent.
    const EMIN: i32;
    /// Largest finite exponent.
    const EMAX: i32;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn bits(self) -> u64;
}

impl Flt for f32 {
    const LANE: Type = types::F32;
    const LANES: u32 = 4;
    const MANT: i32 = 23;
    const EMIN: i32 = -126;
    const EMAX: i32 = 127;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

impl Flt for f64 {
    const LANE: Type = types::F64;
    const LANES: u32 = 2;
    const MANT: i32 = 52;
    const EMIN: i32 = -1022;
    const EMAX: i32 = 1023;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
}

/// 2^e exactly, for e in [−1074, 1023] (`powi` is not exact far below 2^−1022).
fn exp2i(e: i32) -> f64 {
    assert!((-1074..=1023).contains(&e), "2^{e}");
    if e >= -1022 {
        f64::from_bits(((e + 1023) as u64) << 52)
    } else {
        f64::from_bits(1u64 << (e + 1074))
    }
}

/// floor(log2 |v|) for finite nonzero v (subnormals included).
fn ilog2(v: f64) -> i32 {
    let e = ((v.to_bits() >> 52) & 0x7ff) as i32;
    if e == 0 {
        ilog2(v * 18446744073709551616.0) - 64
    } else {
        e - 1023
    }
}

/// The error of `ours` against `r` in ulps of T at the smaller of the two magnitudes (infinite
/// for a NaN/non-NaN mismatch or a wrong infinity).
fn err_ulps<T: Flt>(ours: T, r: &Ref) -> f64 {
    let o = ours.to_f64();
    if r.m.hi.is_nan() || o.is_nan() {
        return if r.m.hi.is_nan() && o.is_nan() { 0.0 } else { f64::INFINITY };
    }
    if r.m.hi.is_infinite() {
        return if o == r.m.hi { 0.0 } else { f64::INFINITY };
    }
    let min_sub = exp2i(T::EMIN - T::MANT);
    if r.m.hi == 0.0 {
        return o.abs() / min_sub;
    }
    let e_ref = ilog2(r.m.hi) + r.k;
    if e_ref > T::EMAX {
        // Beyond the largest finite value by more than rounding: must be the infinity.
        return if o.is_infinite() && o.signum() == r.m.hi.signum() { 0.0 } else { f64::INFINITY };
    }
    // An infinity for a finite reference counts as ±2^(EMAX+1), IEEE's overflow threshold.
    let o = if o.is_infinite() { o.signum() * 2.0 * exp2i(T::EMAX) } else { o };
    let os = D::new(o).scale(-r.k);
    let d = os.sub(r.m).hi.abs();
    let e = if o == 0.0 { e_ref } else { e_ref.min(ilog2(o)) };
    let ulp_exp = e.max(T::EMIN) - T::MANT;
    d / exp2i(ulp_exp - r.k)
}

// ---------------------------------------------------------------------------------------------
// JIT kernels.

type Emit = fn(&mut FunctionBuilder, &MathCtx, Value) -> Value;
type Kernel<T> = unsafe extern "C" fn(*const T, *mut T, i64);

/// The x64 feature sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cfg {
    /// The host's features, FMA used if present.
    Native,
    /// The host's features, FMA not used.
    NativeNoFma,
    /// AVX2 + FMA without AVX-512 (x86-64-v3).
    Avx2,
    /// SSE4.2, no AVX, no FMA.
    Sse42,
    /// Baseline x86-64: SSE2 only.
    Sse2,
}

const CFGS: [Cfg; 5] = [Cfg::Native, Cfg::NativeNoFma, Cfg::Avx2, Cfg::Sse42, Cfg::Sse2];

fn isa(cfg: Cfg) -> OwnedTargetIsa {
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").unwrap();
    flags.set("use_colocated_libcalls", "false").unwrap();
    flags.set("is_pic", "false").unwrap();
    let mut ib = cranelift_native::builder().unwrap();
    let off: &[&str] = match cfg {
        Cfg::Native | Cfg::NativeNoFma => &[],
        Cfg::Avx2 => &AVX512,
        Cfg::Sse42 => &["has_avx", "has_avx2", "has_fma", "has_bmi1", "has_bmi2", "has_lzcnt", "has_avx_vnni"],
        Cfg::Sse2 => &[
            "has_sse3",
            "has_ssse3",
            "has_sse41",
            "has_sse42",
            "has_avx",
            "has_avx2",
            "has_fma",
            "has_popcnt",
            "has_bmi1",
            "has_bmi2",
            "has_lzcnt",
            "has_avx_vnni",
        ],
    };
    if cfg == Cfg::Sse42 || cfg == Cfg::Sse2 {
        for f in AVX512 {
            ib.set(f, "false").unwrap();
        }
    }
    for f in off {
        ib.set(f, "false").unwrap();
    }
    ib.finish(settings::Flags::new(flags)).unwrap()
}

const AVX512: [&str; 6] =
    ["has_avx512bitalg", "has_avx512dq", "has_avx512vl", "has_avx512vbmi", "has_avx512f", "has_avx512vnni"];

fn math_ctx(cfg: Cfg, isa: &OwnedTargetIsa) -> MathCtx {
    match cfg {
        Cfg::Native | Cfg::Avx2 => MathCtx::from_isa(&**isa),
        _ => MathCtx { has_fma: false },
    }
}

/// Opcodes the emitters may use (plus `fma` when allowed); the kernel loop's own are added.
const ALLOWED: &[Opcode] = &[
    Opcode::Fadd,
    Opcode::Fsub,
    Opcode::Fmul,
    Opcode::Fdiv,
    Opcode::Fabs,
    Opcode::Fneg,
    Opcode::Sqrt,
    Opcode::Fcmp,
    Opcode::Select,
    Opcode::Bitselect,
    Opcode::Bitcast,
    Opcode::Iadd,
    Opcode::Band,
    Opcode::Bor,
    Opcode::Bxor,
    Opcode::Ishl,
    Opcode::Ushr,
    Opcode::F32const,
    Opcode::F64const,
    Opcode::Iconst,
    Opcode::Splat,
    // the loop
    Opcode::Load,
    Opcode::Store,
    Opcode::Icmp,
    Opcode::Brif,
    Opcode::Jump,
    Opcode::Return,
    Opcode::Imul,
];

struct Compiled<T> {
    _module: JITModule,
    vector: Kernel<T>,
    scalar: Kernel<T>,
}

/// Defines `name(src, dst, n)`: `lanes`-wide vector loop then a scalar tail.
fn define<T: Flt>(module: &mut JITModule, name: &str, lanes: u32, emit: Emit, m: &MathCtx) -> cranelift_module::FuncId {
    let ptr = types::I64;
    let mut sig = module.make_signature();
    sig.params.extend([AbiParam::new(ptr), AbiParam::new(ptr), AbiParam::new(ptr)]);
    let id = module.declare_function(name, Linkage::Local, &sig).unwrap();
    let mut ctx = module.make_context();
    ctx.func.signature = sig;
    let mut fctx = FunctionBuilderContext::new();
    let flags = MemFlagsData::new().with_notrap();
    let size = T::LANE.bytes() as i64;
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let entry = b.create_block();
        let vhead = b.create_block();
        let vbody = b.create_block();
        let thead = b.create_block();
        let tbody = b.create_block();
        let exit = b.create_block();
        b.append_block_params_for_function_params(entry);
        let i = b.append_block_param(vhead, ptr);
        let j = b.append_block_param(thead, ptr);
        b.switch_to_block(entry);
        let (src, dst, n) = (b.block_params(entry)[0], b.block_params(entry)[1], b.block_params(entry)[2]);
        let nv = b.ins().band_imm_s(n, -(lanes as i64));
        let zero = b.ins().iconst(ptr, 0);
        b.ins().jump(vhead, &[BlockArg::Value(zero)]);

        b.switch_to_block(vhead);
        let more = b.ins().icmp(IntCC::SignedLessThan, i, nv);
        b.ins().brif(more, vbody, &[], thead, &[BlockArg::Value(i)]);

        b.switch_to_block(vbody);
        let off = b.ins().imul_imm_s(i, size);
        let pa = b.ins().iadd(src, off);
        let pd = b.ins().iadd(dst, off);
        let vty = T::LANE.by(lanes).unwrap();
        let x = b.ins().load(vty, flags, pa, 0);
        let y = emit(&mut b, m, x);
        assert_eq!(b.func.dfg.value_type(y), vty);
        b.ins().store(flags, y, pd, 0);
        let i2 = b.ins().iadd_imm_s(i, lanes as i64);
        b.ins().jump(vhead, &[BlockArg::Value(i2)]);

        b.switch_to_block(thead);
        let more = b.ins().icmp(IntCC::SignedLessThan, j, n);
        b.ins().brif(more, tbody, &[], exit, &[]);

        b.switch_to_block(tbody);
        let off = b.ins().imul_imm_s(j, size);
        let pa = b.ins().iadd(src, off);
        let pd = b.ins().iadd(dst, off);
        let x = b.ins().load(T::LANE, flags, pa, 0);
        let y = emit(&mut b, m, x);
        assert_eq!(b.func.dfg.value_type(y), T::LANE);
        b.ins().store(flags, y, pd, 0);
        let j2 = b.ins().iadd_imm_s(j, 1);
        b.ins().jump(thead, &[BlockArg::Value(j2)]);

        b.switch_to_block(exit);
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    for block in ctx.func.layout.blocks() {
        for inst in ctx.func.layout.block_insts(block) {
            let op = ctx.func.dfg.insts[inst].opcode();
            let ok = ALLOWED.contains(&op) || (op == Opcode::Fma && m.has_fma);
            assert!(ok, "{name}: emitted a disallowed instruction {op} (has_fma = {})", m.has_fma);
        }
    }
    module.define_function(id, &mut ctx).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    let relocs = ctx.compiled_code().unwrap().buffer.relocs();
    assert!(relocs.is_empty(), "{name}: the code calls out (a libcall?): {relocs:?}");
    id
}

fn compile<T: Flt>(cfg: Cfg, emit: Emit) -> Compiled<T> {
    let isa = isa(cfg);
    let m = math_ctx(cfg, &isa);
    let mut module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
    let v = define::<T>(&mut module, "vector", T::LANES, emit, &m);
    let s = define::<T>(&mut module, "scalar", 1, emit, &m);
    module.finalize_definitions().unwrap();
    // SAFETY: both functions were defined with the signature (i64, i64, i64) -> () of the
    // host's default calling convention, which is `extern "C"`.
    let (vector, scalar) = unsafe {
        (
            std::mem::transmute::<*const u8, Kernel<T>>(module.get_finalized_function(v)),
            std::mem::transmute::<*const u8, Kernel<T>>(module.get_finalized_function(s)),
        )
    };
    Compiled { _module: module, vector, scalar }
}

fn run<T: Flt>(k: Kernel<T>, xs: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); xs.len()];
    // SAFETY: the kernel reads xs.len() elements from src and writes as many to dst.
    unsafe { k(xs.as_ptr(), out.as_mut_ptr(), xs.len() as i64) };
    out
}

fn same<T: Flt>(a: T, b: T) -> bool {
    a.bits() == b.bits() || (a.to_f64().is_nan() && b.to_f64().is_nan())
}

// ---------------------------------------------------------------------------------------------
// Samples.

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Release builds sweep densely; debug builds (`cargo test` without `--release`) more sparsely.
const DENSE: bool = !cfg!(debug_assertions);

/// f32 samples: every 61st bit pattern with |x| in `core`, every 1009th with |x| in `wide` (both
/// signs when `neg`), every 10007th of all finite values, the special values and the 81
/// neighbours of each `extra` threshold. Debug builds sample 16 times more sparsely.
fn samples32(core: (f32, f32), wide: (f32, f32), neg: bool, extra: &[f32]) -> Vec<f32> {
    let thin = if DENSE { 1 } else { 16 };
    let mut v = Vec::new();
    for ((lo, hi), stride) in [(core, 61), (wide, 1009), ((0.0, f32::MAX), 10007)] {
        let mut b = lo.to_bits();
        while b <= hi.to_bits() {
            v.push(f32::from_bits(b));
            if neg {
                v.push(-f32::from_bits(b));
            }
            b += stride * thin;
        }
    }
    v.extend_from_slice(&SPECIAL32);
    v.extend(SPECIAL32.iter().map(|x| -x));
    for &x in extra {
        for d in -40..=40i32 {
            v.push(f32::from_bits((x.to_bits() as i64 + d as i64) as u32));
        }
    }
    v
}

const SPECIAL32: [f32; 12] =
    [0.0, f32::INFINITY, f32::NAN, f32::MIN_POSITIVE, 1.0e-45, 1.1754942e-38, f32::MAX, 1.0, 0.5, 2.0, 1e-20, 1e20];

/// f64 samples: `n` log-uniform (uniform bit patterns) with |x| in [lo, hi], `n` uniform in
/// [−hi, hi] (or [0, hi]), special values and the neighbourhoods of `extra`.
fn samples64(lo: f64, hi: f64, neg: bool, extra: &[f64]) -> Vec<f64> {
    let n = if DENSE { 100_000 } else { 10_000 };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut v = Vec::new();
    let (bl, bh) = (lo.to_bits(), hi.to_bits());
    for _ in 0..n {
        let x = f64::from_bits(bl + rng.next() % (bh - bl + 1));
        v.push(if neg && rng.next() & 1 == 1 { -x } else { x });
        let u = rng.unit() * hi;
        v.push(if neg && rng.next() & 1 == 1 { -u } else { u });
    }
    for _ in 0..n / 20 {
        // all finite values, sparsely
        v.push(f64::from_bits(rng.next() % 0x7ff0_0000_0000_0000));
        v.push(-f64::from_bits(rng.next() % 0x7ff0_0000_0000_0000));
    }
    v.extend_from_slice(&SPECIAL64);
    v.extend(SPECIAL64.iter().map(|x| -x));
    for &x in extra {
        for d in -40..=40i64 {
            v.push(f64::from_bits((x.to_bits() as i64 + d) as u64));
        }
    }
    v
}

const SPECIAL64: [f64; 12] = [
    0.0,
    f64::INFINITY,
    f64::NAN,
    f64::MIN_POSITIVE,
    5e-324,
    2.225073858507201e-308,
    f64::MAX,
    1.0,
    0.5,
    2.0,
    1e-200,
    1e200,
];

// ---------------------------------------------------------------------------------------------
// The check.

/// The error bounds (ulp) a function's documentation states, with and without FMA.
#[derive(Clone, Copy)]
struct Bound {
    fma: f64,
    no_fma: f64,
}

const fn bound(b: f64) -> Bound {
    Bound { fma: b, no_fma: b }
}

const EXP: Bound = Bound { fma: 0.9, no_fma: 1.2 };
const LOG: Bound = bound(0.85);
const TANH: Bound = bound(1.4);
const SIGMOID: Bound = bound(2.0);
const SILU: Bound = bound(2.0);
const ERF: Bound = Bound { fma: 1.2, no_fma: 1.3 };
const GELU: Bound = Bound { fma: 2.1, no_fma: 2.4 };
const GELU_TANH: Bound = Bound { fma: 2.1, no_fma: 2.2 };

/// Runs `emit` over `xs` for every feature set; checks vector = scalar, feature sets that should
/// agree do agree, and the error against `reference` is within the bound (printed with
/// `--nocapture`).
///
/// With `func`, the same function of [`tracegrad_jit::lanes`] runs at every width this machine
/// has, each bit for bit equal to the JIT kernels of the same rounding (FMA or not).
fn check<T: Flt + LaneFloat>(
    name: &str,
    emit: Emit,
    func: Option<Func>,
    xs: &[T],
    reference: fn(f64) -> Ref,
    bound: Bound,
) {
    check_with(name, emit, func.map(|f| (f, 0.0)), xs, reference, bound)
}

/// [`check`], with the lanes function's parameter.
fn check_with<T: Flt + LaneFloat>(
    name: &str,
    emit: Emit,
    func: Option<(Func, f64)>,
    xs: &[T],
    reference: fn(f64) -> Ref,
    bound: Bound,
) {
    let refs: Vec<Ref> = xs.iter().map(|x| reference(x.to_f64())).collect();
    let mut outs: Vec<(Cfg, bool, Vec<T>)> = Vec::new();
    for cfg in CFGS {
        let isa_ = isa(cfg);
        let has_fma = math_ctx(cfg, &isa_).has_fma;
        drop(isa_);
        let c = compile::<T>(cfg, emit);
        let yv = run(c.vector, xs);
        let ys = run(c.scalar, xs);
        for (i, x) in xs.iter().enumerate() {
            assert!(
                same(yv[i], ys[i]),
                "{name} {cfg:?}: vector and scalar differ at x = {x:?}: {:?} vs {:?}",
                yv[i],
                ys[i]
            );
        }
        if let Some((c0, _, y0)) = outs.iter().find(|(_, f, _)| *f == has_fma) {
            for (i, x) in xs.iter().enumerate() {
                assert!(
                    same(yv[i], y0[i]),
                    "{name}: {cfg:?} and {c0:?} differ at x = {x:?}: {:?} vs {:?}",
                    yv[i],
                    y0[i]
                );
            }
        } else {
            outs.push((cfg, has_fma, yv));
        }
    }
    for w in Width::ALL.into_iter().filter(|w| func.is_some() && w.supported()) {
        let mut ys = vec![T::from_f64(0.0); xs.len()];
        let (f, p) = func.unwrap();
        T::apply_with_at(f, w, xs, p, &mut ys);
        let (cfg, _, y0) = outs.iter().find(|(_, f, _)| *f == w.has_fma()).expect("a JIT kernel of this rounding");
        for (i, x) in xs.iter().enumerate() {
            assert!(
                same(ys[i], y0[i]),
                "{name}: lanes {w:?} and JIT {cfg:?} differ at x = {x:?}: {:?} vs {:?}",
                ys[i],
                y0[i]
            );
        }
    }
    for (cfg, has_fma, ys) in &outs {
        let limit = if *has_fma { bound.fma } else { bound.no_fma };
        let mut worst = (0.0f64, 0.0f64);
        let mut fails = Vec::new();
        for ((x, y), r) in xs.iter().zip(ys).zip(&refs) {
            let e = err_ulps(*y, r);
            let xf = x.to_f64();
            if e.is_nan() || e > limit {
                fails.push(format!("x = {x:?}: got {y:?}, want {:.17e} ({e:.3} ulp)", r.value()));
            }
            if e > worst.0 {
                worst = (e, xf);
            }
        }
        assert!(
            fails.is_empty(),
            "{name} {cfg:?}: {} samples beyond the bound, e.g.\n{}",
            fails.len(),
            fails[..fails.len().min(10)].join("\n")
        );
        println!(
            "{name:>14} {:>6}: max error {:.3} ulp (bound {limit}) at x = {:e} over {} samples",
            if *has_fma { "fma" } else { "no fma" },
            worst.0,
            worst.1,
            xs.len()
        );
    }
}

/// Runs one kernel on a few inputs (native features) and returns the outputs.
fn eval<T: Flt>(emit: Emit, xs: &[T]) -> Vec<T> {
    let c = compile::<T>(Cfg::Native, emit);
    let ys = run(c.vector, xs);
    let y1 = run(c.scalar, xs);
    for (a, b) in ys.iter().zip(&y1) {
        assert!(same(*a, *b));
    }
    ys
}

/// Asserts `f(x) == want` bit for bit (NaN: any NaN) for both precisions.
fn specials(emit: Emit, cases: &[(f64, f64)]) {
    let xs32: Vec<f32> = cases.iter().map(|c| c.0 as f32).collect();
    let xs64: Vec<f64> = cases.iter().map(|c| c.0).collect();
    let ys32 = eval(emit, &xs32);
    let ys64 = eval(emit, &xs64);
    for (i, &(x, want)) in cases.iter().enumerate() {
        assert!(same(ys32[i], want as f32), "f32: f({x:e}) = {:e}, want {want:e}", ys32[i]);
        assert!(same(ys64[i], want), "f64: f({x:e}) = {:e}, want {want:e}", ys64[i]);
    }
}

const INF: f64 = f64::INFINITY;
const NAN: f64 = f64::NAN;

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn math_ctx_native_matches_the_native_isa() {
    let isa = isa(Cfg::Native);
    assert_eq!(MathCtx::native().has_fma, MathCtx::from_isa(&*isa).has_fma);
    assert!(!MathCtx::from_isa(&*self::isa(Cfg::Sse42)).has_fma);
}

#[test]
fn constant_and_mul_add() {
    fn f(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
        let ty = b.func.dfg.value_type(x);
        let c = math::constant(b, ty, 3.0);
        let d = math::constant(b, ty, 0.25);
        math::mul_add(b, m, x, c, d)
    }
    specials(f, &[(1.0, 3.25), (-2.0, -5.75), (INF, INF), (NAN, NAN)]);
}

#[test]
fn reference_sanity() {
    // The double-double references agree with libm to within libm's own error.
    let mut rng = Rng(7);
    for _ in 0..2000 {
        let x = (rng.unit() - 0.5) * 1400.0;
        let e = ref64::exp(x);
        assert!(err_ulps(x.exp(), &e) < 1.0, "exp {x}");
        let y = rng.unit() * 1e6;
        assert!(err_ulps(y.ln(), &ref64::log(y)) < 1.0, "ln {y}");
        let z = (rng.unit() - 0.5) * 12.0;
        assert!(err_ulps(z.tanh(), &ref64::tanh(z)) < 3.0, "tanh {z}");
        assert!(err_ulps(libm::erf(z), &ref64::erf(z)) < 1.0, "erf {z}");
        let u = z * std::f64::consts::FRAC_1_SQRT_2;
        let g = if z < 0.0 { 0.5 * z * libm::erfc(-u) } else { 0.5 * z * (1.0 + libm::erf(u)) };
        // libm's erfc at the rounded u: off by up to 4u² ulp
        assert!(err_ulps(g, &ref64::gelu(z)) < 4.0 + 4.0 * u * u, "gelu {z}");
    }
    // The continued fraction has converged.
    let (a, _) = dd::erfc_cf(D::new(3.0));
    let mut f = D::new(3.0);
    for n in (1..=400).rev() {
        f = D::new(3.0).add(D::new(n as f64 * 0.5).div(f));
    }
    let (m, _) = dd::exp(D::new(-9.0)).unwrap();
    let b = m.div(dd::SQRT_PI.mul(f));
    assert!((a.sub(b).hi / a.hi).abs() < 1e-30);
    // A rounded-away reference is detected.
    assert!(err_ulps(1.0f32 + f32::EPSILON, &Ref::f(1.0)) >= 1.0);
    assert!(err_ulps(f32::MAX, &Ref::f(1e39)).is_infinite());
}

const ERF_EXTRA32: [f32; 3] = [0.5, 3.919_206, 9.0];

#[test]
fn exp_f32() {
    let xs = samples32((0.25, 110.0), (1e-10, 110.0), true, &[88.72284, -103.97208, -87.33655, -88.72284, 0.346_573_6]);
    check("exp f32", math::exp, Some(Func::Exp), &xs, ref32::exp, EXP);
}

#[test]
fn exp_f64() {
    let xs = samples64(1e-20, 750.0, true, &[709.782712893384, -745.1332191019412, -708.3964185322641]);
    check("exp f64", math::exp, Some(Func::Exp), &xs, ref64::exp, EXP);
}

/// `exp_scaled` with a constant shift (0 or 64).
fn exp_scaled_by<const SHIFT: i32>(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    let ty = b.func.dfg.value_type(x);
    let s = math::constant(b, ty, f64::from(SHIFT));
    math::exp_scaled(b, m, x, s)
}

/// `exp_scaled`'s lower threshold: below it the argument is clamped to it.
fn exp_scaled_lo(wide: bool, shift: i32) -> f64 {
    (if wide { -706.0 } else { -86.0 }) - f64::from(shift) * std::f64::consts::LN_2
}

/// Below the threshold `lo` (−inf included) the result is the value at `lo` (rounded to the
/// precision), about 2^−124 (2^−1018.5 in f64) whatever the shift.
fn clamped_below<T: Flt>(emit: Emit, below: &[T], lo: T) {
    let mut xs = below.to_vec();
    xs.push(T::from_f64(f64::NEG_INFINITY));
    let at = eval(emit, &[lo])[0];
    let tiny = if T::MANT == 23 { 2f64.powi(-123) } else { 2f64.powi(-1018) };
    assert!(at.to_f64() > 0.0 && at.to_f64() < tiny, "value at the threshold: {at:?}");
    for (x, y) in xs.iter().zip(eval(emit, &xs)) {
        assert!(same(y, at), "f({x:?}) = {y:?}, want the value at the threshold {at:?}");
    }
}

#[test]
fn exp_scaled_f32() {
    let xs = samples32((0.25, 131.0), (1e-10, 131.0), true, &[88.72284, 88.37, -86.0, -130.36]);
    // Shift 0: any x (above the threshold: exp's accuracy; overflow at the same point).
    let lo = exp_scaled_lo(false, 0);
    let (inside, below): (Vec<f32>, Vec<f32>) = xs.iter().partition(|&&x| f64::from(x) >= lo || x.is_nan());
    check("exp_scaled(·, 0) f32", exp_scaled_by::<0>, Some(Func::ExpScaled), &inside, ref32::exp, EXP);
    clamped_below(exp_scaled_by::<0>, &below, lo as f32);
    // Shift 64: x ≤ 0.
    let lo = exp_scaled_lo(false, 64);
    let (inside, below): (Vec<f32>, Vec<f32>) = xs.iter().filter(|&&x| x <= 0.0).partition(|&&x| f64::from(x) >= lo);
    let shifted = |x: f64| Ref::f(x.exp() * 2f64.powi(64));
    check_with("exp_scaled(·, 64) f32", exp_scaled_by::<64>, Some((Func::ExpScaled, 64.0)), &inside, shifted, EXP);
    clamped_below(exp_scaled_by::<64>, &below, lo as f32);
}

#[test]
fn exp_scaled_f64() {
    let xs = samples64(1e-20, 760.0, true, &[709.782712893384, 709.5, -706.0, -750.36]);
    let lo = exp_scaled_lo(true, 0);
    let (inside, below): (Vec<f64>, Vec<f64>) = xs.iter().partition(|&&x| x >= lo || x.is_nan());
    check("exp_scaled(·, 0) f64", exp_scaled_by::<0>, Some(Func::ExpScaled), &inside, ref64::exp, EXP);
    clamped_below(exp_scaled_by::<0>, &below, lo);
    let lo = exp_scaled_lo(true, 64);
    let (inside, below): (Vec<f64>, Vec<f64>) = xs.iter().filter(|&&x| x <= 0.0).partition(|&&x| x >= lo);
    let shifted = |x: f64| {
        let r = ref64::exp(x);
        Ref { m: r.m, k: r.k + 64 }
    };
    check_with("exp_scaled(·, 64) f64", exp_scaled_by::<64>, Some((Func::ExpScaled, 64.0)), &inside, shifted, EXP);
    clamped_below(exp_scaled_by::<64>, &below, lo);
}

#[test]
fn log_f32() {
    let xs = samples32(
        (0.25, 4.0),
        (0.0, f32::MAX),
        false,
        &[1.0, std::f32::consts::FRAC_1_SQRT_2, std::f32::consts::SQRT_2],
    );
    check("log f32", math::log, Some(Func::Log), &xs, ref32::log, LOG);
}

#[test]
fn log_f64() {
    let mut xs = samples64(5e-324, f64::MAX, false, &[1.0, std::f64::consts::FRAC_1_SQRT_2, std::f64::consts::SQRT_2]);
    let mut rng = Rng(3);
    xs.extend((0..20_000).map(|_| 0.9 + 0.2 * rng.unit()));
    check("log f64", math::log, Some(Func::Log), &xs, ref64::log, LOG);
}

#[test]
fn tanh_f32() {
    let xs = samples32((0.125, 12.0), (0.0, 12.0), true, &[0.55, 9.01]);
    check("tanh f32", math::tanh, Some(Func::Tanh), &xs, ref32::tanh, TANH);
}

#[test]
fn tanh_f64() {
    let xs = samples64(1e-300, 25.0, true, &[0.55, 19.06]);
    check("tanh f64", math::tanh, Some(Func::Tanh), &xs, ref64::tanh, TANH);
}

/// sigmoid's and silu's thresholds: where exp's two-scale result turns subnormal, the lower
/// branch (−15.9 / −36), its offset scale's ends (exp's clamp) and the upper clamp (87 / 700).
const SIGMOID_EXTRA_F32: [f32; 11] =
    [-87.33655, -103.2789, 16.635532, -15.9, -15.900001, -110.0, -110.00001, 86.99999, 87.0, 87.00001, 88.72284];
const SIGMOID_EXTRA_F64: [f64; 9] = [
    -708.3964185322641,
    36.7368005696771,
    -36.0,
    -36.00000000000001,
    -760.0,
    699.9999999999999,
    700.0,
    700.0000000000001,
    709.782712893384,
];

#[test]
fn sigmoid_f32() {
    let xs = samples32((0.25, 110.0), (0.0, 110.0), true, &SIGMOID_EXTRA_F32);
    check("sigmoid f32", math::sigmoid, Some(Func::Sigmoid), &xs, ref32::sigmoid, SIGMOID);
}

#[test]
fn sigmoid_f64() {
    let xs = samples64(1e-20, 750.0, true, &[&SIGMOID_EXTRA_F64[..], &[-744.440_071_921_381_2]].concat());
    check("sigmoid f64", math::sigmoid, Some(Func::Sigmoid), &xs, ref64::sigmoid, SIGMOID);
}

#[test]
fn silu_f32() {
    let xs = samples32((0.25, 120.0), (0.0, 1e6), true, &SIGMOID_EXTRA_F32);
    check("silu f32", math::silu, Some(Func::Silu), &xs, ref32::silu, SILU);
}

#[test]
fn silu_f64() {
    let xs = samples64(1e-20, 800.0, true, &[&SIGMOID_EXTRA_F64[..], &[-740.0]].concat());
    check("silu f64", math::silu, Some(Func::Silu), &xs, ref64::silu, SILU);
}

#[test]
fn erf_f32() {
    let xs = samples32((0.125, 4.5), (0.0, 10.0), true, &ERF_EXTRA32);
    check("erf f32", math::erf, Some(Func::Erf), &xs, ref32::erf, ERF);
}

#[test]
fn erf_f64() {
    let xs = samples64(1e-300, 7.0, true, &[0.5, 5.9215871957945, 26.0]);
    check("erf f64", math::erf, Some(Func::Erf), &xs, ref64::erf, ERF);
}

#[test]
fn gelu_f32() {
    let xs = samples32((0.125, 16.0), (0.0, 1e6), true, &[0.70710677, -14.57, -14.2]);
    check("gelu f32", math::gelu, Some(Func::Gelu), &xs, ref32::gelu, GELU);
}

#[test]
fn gelu_f64() {
    let xs = samples64(1e-300, 40.0, true, &[std::f64::consts::FRAC_1_SQRT_2, -38.61, -37.7]);
    check("gelu f64", math::gelu, Some(Func::Gelu), &xs, ref64::gelu, GELU);
}

#[test]
fn gelu_tanh_f32() {
    let xs = samples32((0.125, 14.0), (0.0, 1e6), true, &[-3.0, -10.0]);
    check("gelu_tanh f32", math::gelu_tanh, Some(Func::GeluTanh), &xs, ref32::gelu_tanh, GELU_TANH);
}

#[test]
fn gelu_tanh_f64() {
    let xs = samples64(1e-300, 40.0, true, &[-3.0, -20.0]);
    check("gelu_tanh f64", math::gelu_tanh, Some(Func::GeluTanh), &xs, ref64::gelu_tanh, GELU_TANH);
}

#[test]
fn special_values() {
    let min32 = f32::MIN_POSITIVE as f64;
    specials(math::exp, &[(NAN, NAN), (-INF, 0.0), (INF, INF), (0.0, 1.0), (-0.0, 1.0), (3e38, INF), (-3e38, 0.0)]);
    // (−inf: see `clamped_below`.)
    specials(exp_scaled_by::<0>, &[(NAN, NAN), (INF, INF), (0.0, 1.0), (-0.0, 1.0), (3e38, INF)]);
    specials(exp_scaled_by::<64>, &[(NAN, NAN), (0.0, 2f64.powi(64)), (-0.0, 2f64.powi(64))]);
    specials(
        math::log,
        &[(0.0, -INF), (-0.0, -INF), (-1.0, NAN), (-INF, NAN), (INF, INF), (NAN, NAN), (1.0, 0.0), (-min32, NAN)],
    );
    specials(math::tanh, &[(0.0, 0.0), (-0.0, -0.0), (INF, 1.0), (-INF, -1.0), (NAN, NAN), (3e38, 1.0), (-30.0, -1.0)]);
    specials(math::sigmoid, &[(INF, 1.0), (-INF, 0.0), (NAN, NAN), (0.0, 0.5), (-0.0, 0.5), (-3e38, 0.0), (3e38, 1.0)]);
    specials(math::silu, &[(INF, INF), (-INF, NAN), (NAN, NAN), (0.0, 0.0), (-0.0, -0.0), (-3e38, -0.0), (1e30, 1e30)]);
    specials(math::erf, &[(0.0, 0.0), (-0.0, -0.0), (INF, 1.0), (-INF, -1.0), (NAN, NAN), (10.0, 1.0), (-3e38, -1.0)]);
    specials(math::gelu, &[(INF, INF), (-INF, NAN), (NAN, NAN), (0.0, 0.0), (-0.0, -0.0), (-3e38, -0.0), (1e30, 1e30)]);
    specials(
        math::gelu_tanh,
        &[(INF, INF), (-INF, NAN), (NAN, NAN), (0.0, 0.0), (-0.0, -0.0), (-1e30, -0.0), (1e30, 1e30)],
    );
}

#[test]
#[should_panic(expected = "unsupported type")]
fn rejects_integer_types() {
    fn f(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
        let i = b.ins().bitcast(types::I32, MemFlagsData::new(), x);
        math::exp(b, m, i)
    }
    let _ = eval::<f32>(f, &[1.0]);
}

/// Every f32 input, for both the FMA and the non-FMA code (about 28 minutes on two cores):
/// `cargo test --release -p tracegrad-jit --test math -- --ignored --nocapture`. The documented
/// f32 bounds are these exhaustive maxima, rounded up.
#[test]
#[ignore]
fn exhaustive_f32() {
    type Case = (&'static str, Emit, Option<Func>, fn(f64) -> Ref, Bound);
    // exp_scaled with shift 0 (shift 64 is the same code with another bias, over x ≤ 0: the
    // dense samples of `exp_scaled_f32` cover it): e^x above −86, e^−86 below (clamped).
    fn exp_scaled0(x: f64) -> Ref {
        if x.is_nan() {
            Ref::f(f64::NAN)
        } else {
            ref32::exp(x.max(exp_scaled_lo(false, 0)))
        }
    }
    let fns: [Case; 9] = [
        ("exp", math::exp, Some(Func::Exp), ref32::exp, EXP),
        ("exp_scaled", exp_scaled_by::<0>, Some(Func::ExpScaled), exp_scaled0, EXP),
        ("log", math::log, Some(Func::Log), ref32::log, LOG),
        ("tanh", math::tanh, Some(Func::Tanh), ref32::tanh, TANH),
        ("sigmoid", math::sigmoid, Some(Func::Sigmoid), ref32::sigmoid, SIGMOID),
        ("silu", math::silu, Some(Func::Silu), ref32::silu, SILU),
        ("erf", math::erf, Some(Func::Erf), ref32::erf, ERF),
        ("gelu", math::gelu, Some(Func::Gelu), ref32::gelu, GELU),
        ("gelu_tanh", math::gelu_tanh, Some(Func::GeluTanh), ref32::gelu_tanh, GELU_TANH),
    ];
    let only = std::env::var("MATH_EXHAUSTIVE").ok();
    let mut fails = Vec::new();
    for (name, emit, func, reference, bound) in fns {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|n| n == name)) {
            continue;
        }
        for cfg in [Cfg::Native, Cfg::NativeNoFma] {
            let c = compile::<f32>(cfg, emit);
            let kernel = c.vector;
            // The lanes paths of this rounding, compared bit for bit with the kernel.
            let has_fma = cfg == Cfg::Native && MathCtx::native().has_fma;
            let widths: Vec<Width> =
                Width::ALL.into_iter().filter(|w| func.is_some() && w.supported() && w.has_fma() == has_fma).collect();
            let widths = &widths;
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
            let per = (1u64 << 32) / threads;
            let worst = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        s.spawn(move || {
                            let mut worst = (0.0f64, 0.0f32);
                            let mut xs = vec![0.0f32; 1 << 16];
                            let mut b = t * per;
                            while b < (t + 1) * per {
                                for (i, x) in xs.iter_mut().enumerate() {
                                    *x = f32::from_bits((b + i as u64) as u32);
                                }
                                let ys = run(kernel, &xs);
                                for &w in widths {
                                    let mut yl = vec![0.0f32; xs.len()];
                                    f32::apply_at(func.unwrap(), w, &xs, &mut yl);
                                    if let Some(i) = (0..xs.len()).find(|&i| !same(yl[i], ys[i])) {
                                        panic!("{name}: lanes {w:?} differ from the {cfg:?} kernel at x = {:e}: {:e} vs {:e}", xs[i], yl[i], ys[i]);
                                    }
                                }
                                for (x, y) in xs.iter().zip(&ys) {
                                    let e = err_ulps(*y, &reference(*x as f64));
                                    if e.is_nan() || e > worst.0 {
                                        worst = (e, *x);
                                    }
                                }
                                b += xs.len() as u64;
                            }
                            worst
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).fold((0.0f64, 0.0f32), |a, b| if b.0 > a.0 { b } else { a })
            });
            let limit = if cfg == Cfg::Native && MathCtx::native().has_fma { bound.fma } else { bound.no_fma };
            println!(
                "{name:>10} f32 {cfg:?}: max error {:.3} ulp at x = {:e} (bound {limit}); lanes {widths:?} bit-identical",
                worst.0, worst.1
            );
            if worst.0.is_nan() || worst.0 > limit {
                fails.push(format!("{name} {cfg:?}: {:.3} ulp at x = {:e}", worst.0, worst.1));
            }
        }
    }
    assert!(fails.is_empty(), "beyond the bounds:\n{}", fails.join("\n"));
}
