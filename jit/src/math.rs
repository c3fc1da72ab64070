//! Inline polynomial approximations of transcendental functions, emitted as Cranelift IR.
//!
//! Every emitter takes a value of type `F32`, `F64`, `F32X4` or `F64X2` and returns a value of
//! the same type, computed branch-free by the same instruction sequence for scalars and vectors,
//! so a kernel's vector body and its scalar tail give bit-identical results. No libm call is
//! ever emitted. The emitters panic on any other type.
//!
//! Each algorithm is written once, generic over `Arith` (the `*_g` functions): the public
//! emitters run it on `Em`, which emits Cranelift IR, and [`crate::lanes`] runs it on Rust
//! values at the machine's full vector width, with the same results bit for bit.
//!
//! # Instructions and ISA requirements
//!
//! The emitted IR uses only `fadd fsub fmul fdiv fabs fneg sqrt fcmp select bitselect bitcast
//! iadd band bor bxor ishl ushr` and constants (`f32const f64const iconst splat`), plus `fma` when
//! [`MathCtx::has_fma`] is set. Everything but `fma` lowers on x86-64 with SSE2 alone (tested
//! with SSE2-only, SSE4.2, AVX2 and AVX-512 flag sets; SSE4.1 turns the vector selects into
//! `blendv`). `fma` lowers to `vfmadd` only when the ISA has the `has_fma` flag — without it
//! x64 lowers `fma` to a libcall — so set `has_fma` only for such an ISA: use
//! [`MathCtx::from_isa`], or [`MathCtx::native`] with `cranelift_native`'s ISA. Rounding to an
//! integer and building `2^k` use the magic-number trick (`(y + 1.5·2^23) − 1.5·2^23`, exponent
//! bits built with `ishl`), never `nearest`/`floor`/`fcvt_*`. The code assumes the default
//! floating-point environment (round to nearest even), as all Rust code does.
//!
//! # Accuracy
//!
//! Errors are in ulps of the result: the spacing of the format at the exact value (at the
//! smaller in magnitude of the exact and the computed value; subnormal spacing below the normal
//! range), so 0.5 is correct rounding. Each function's documentation states a bound that
//! `jit/tests/math.rs` asserts for both precisions. The maxima measured (with FMA / without):
//!
//! | function    | f32, every input  | f64, sampled      | bound             |
//! |-------------|-------------------|-------------------|-------------------|
//! | `exp`       | 0.896 / 1.176     | 0.837 / 1.083     | 0.9 / 1.2         |
//! | `exp_scaled`| 0.896 / 1.176     | 0.863 / 1.111     | 0.9 / 1.2         |
//! | `log`       | 0.840 / 0.840     | 0.783 / 0.783     | 0.85              |
//! | `tanh`      | 1.389 / 1.389     | 1.240 / 1.240     | 1.4               |
//! | `sigmoid`   | 1.810 / 1.790     | 1.491 / 1.491     | 2.0               |
//! | `silu`      | 1.867 / 1.944     | 1.443 / 1.721     | 2.0               |
//! | `erf`       | 1.178 / 1.263     | 1.042 / 1.042     | 1.2 / 1.3         |
//! | `gelu`      | 2.041 / 2.375     | 1.795 / 1.724     | 2.1 / 2.4         |
//! | `gelu_tanh` | 2.022 / 2.108     | 1.705 / 1.612     | 2.1 / 2.2         |
//!
//! f32 was checked on all 2^32 inputs (the `exhaustive_f32` test, `--ignored`) against std's and
//! libm's f64 functions, whose own error is far below an f32 ulp; the regular tests sweep every
//! 61st bit pattern of each function's interesting range. f64 was checked on ~210 000 inputs
//! per function (log-uniform and uniform over the interesting range, sparse over all finite
//! values, every threshold's neighbourhood) against double-double references (≈ 2^−100
//! relative). The bounds hold over the whole domain, subnormal inputs and results included.
//!
//! The polynomial coefficients were fitted with mpmath by a weighted Remez exchange (weight: the
//! relative error of the approximated quantity) and rounded one coefficient at a time, each
//! rounding error being absorbed into the higher coefficients by a least-squares correction.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Type, Value};
use cranelift_codegen::isa::TargetIsa;
use cranelift_frontend::FunctionBuilder;

/// ISA facts the emitters need.
#[derive(Clone, Copy, Debug)]
pub struct MathCtx {
    /// Whether `fma` may be emitted. It must be set only if the target ISA lowers `fma` to a
    /// native instruction (x64: the `has_fma` ISA flag), never for a libcall.
    pub has_fma: bool,
}

impl MathCtx {
    /// The host's facts: `has_fma` is true on x86-64 hosts with FMA3 (as detected at run time;
    /// `cranelift_native::builder()` enables `has_fma` for the same hosts), false elsewhere.
    pub fn native() -> MathCtx {
        #[cfg(target_arch = "x86_64")]
        {
            MathCtx { has_fma: std::arch::is_x86_feature_detected!("fma") }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            MathCtx { has_fma: false }
        }
    }

    /// The facts of a given target ISA: `has_fma` is the value of its x64 `has_fma` flag (false
    /// for other architectures, where the emitters then use `fmul` + `fadd`).
    pub fn from_isa(isa: &dyn TargetIsa) -> MathCtx {
        let has_fma =
            isa.name() == "x64" && isa.isa_flags().iter().any(|f| f.name == "has_fma" && f.as_bool() == Some(true));
        MathCtx { has_fma }
    }
}

/// A constant of type `ty` (`F32`, `F64`, `F32X4` or `F64X2`): a scalar constant, or that
/// scalar splatted to every lane. `v` is rounded to `f32` for the `f32` types.
///
/// # Panics
/// If `ty` is not one of the four float types.
pub fn constant(b: &mut FunctionBuilder, ty: Type, v: f64) -> Value {
    let lane = match ty.lane_type() {
        types::F32 => b.ins().f32const(v as f32),
        types::F64 => b.ins().f64const(v),
        _ => panic!("math::constant: unsupported type {ty}"),
    };
    if ty.is_vector() {
        b.ins().splat(ty, lane)
    } else {
        lane
    }
}

/// `x·y + z`: a fused `fma` (one rounding) if `m.has_fma`, else `fmul` then `fadd` (two
/// roundings). All three values must have the same float type.
pub fn mul_add(b: &mut FunctionBuilder, m: &MathCtx, x: Value, y: Value, z: Value) -> Value {
    if m.has_fma {
        b.ins().fma(x, y, z)
    } else {
        let p = b.ins().fmul(x, y);
        b.ins().fadd(p, z)
    }
}

/// `e^x`.
///
/// Error ≤ 0.9 ulp with FMA, ≤ 1.2 ulp without, over the whole domain, subnormal results
/// included (they are rounded once, from a normal intermediate). Overflows to `+inf` for
/// x > 88.72284 (f64: 709.782712893384) and underflows to `+0` for x < −103.97208
/// (f64: −745.1332191019412), as the correctly rounded result does (up to the error bound at
/// the thresholds themselves). `exp(±0) = 1`, `exp(−inf) = +0`, `exp(+inf) = +inf`,
/// `exp(NaN) = NaN`.
pub fn exp(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    exp_g(&mut Em::new(b, m, x), x)
}

#[inline(always)]
pub(crate) fn exp_g<A: Arith>(e: &mut A, x: A::V) -> A::V {
    let ep = e.exp_parts(x, None, true, Clamp::BOTH);
    let p1 = e.mul(ep.p, ep.s1);
    e.mul(p1, ep.s2.unwrap())
}

/// `e^x·2^shift`, for an integer-valued `shift` ≥ 0 (a value of the same type as `x`, typically
/// loop-invariant: the constants that depend on it are hoisted with it), computed with one
/// scale: the cheap exp of softmax's sum. Error ≤ 0.9 ulp with FMA, ≤ 1.2 without (it is
/// [`exp`]'s polynomial and reduction) wherever the result is normal.
///
/// Domain: x ≤ 0 for any `shift`, any x with `shift` = 0. Below x = −(86 + shift·ln 2)
/// (where one scale would stop being normal) x is clamped there: the result is about 2^−124
/// (f64: 2^−1018.5) instead of smaller, `−inf` included. Softmax's sum holds a term 2^shift
/// (its max), against which such terms vanish, and its outputs `e·(1/s)` with 1/s ≤ 2^−64
/// round them to zero; rows with no finite max get a NaN shift instead. `+inf` gives `+inf`
/// (shift 0), NaN gives NaN.
pub fn exp_scaled(b: &mut FunctionBuilder, m: &MathCtx, x: Value, shift: Value) -> Value {
    exp_scaled_g(&mut Em::new(b, m, x), x, shift)
}

#[inline(always)]
pub(crate) fn exp_scaled_g<A: Arith>(e: &mut A, x: A::V, shift: A::V) -> A::V {
    // The upper clamp keeps k ≤ 128 (1024); e^x = (2·e^r)·2^(k−1) keeps the scale finite up
    // to the overflow threshold, where the product rounds to +inf as it should. The lower
    // threshold keeps 2^(k−1) normal.
    let (lo0, hi) = if e.wide() { (-706.0, 710.0) } else { (-86.0, 89.0) };
    let xc = e.min_const(x, hi);
    let nln2 = e.c(-std::f64::consts::LN_2);
    let lo0 = e.c(lo0);
    let lo = e.fma(shift, nln2, lo0);
    // max(xc, lo) that keeps a NaN xc: one `maxps`.
    let below = e.cmp(FloatCC::LessThan, xc, lo);
    let xc = e.sel(below, lo, xc);
    let (k, r) = e.reduce_ln2(xc);
    // 2·e^r = 2 + r·2H(r), H = 1 + r·P(r): the doubled coefficients give exactly twice exp's
    // values.
    let coeffs = if e.wide() { &EXP_F64_H2[..] } else { &EXP_F32_H2[..] };
    let h = e.poly(r, coeffs);
    let two = e.c(2.0);
    let p = e.fma(h, r, two);
    // 2^(k − 1 + shift): the exponent bits of k + (magic − 1 + shift).
    let (magic, sh) = if e.wide() { (2f64.powi(52) + 1022.0, 52) } else { (2f64.powi(23) + 126.0, 23) };
    let magic = e.c(magic);
    let bias = e.add(magic, shift);
    let t = e.add(k, bias);
    let t = e.bits(t);
    let t = e.shl(t, sh);
    let s1 = e.float(t);
    e.mul(p, s1)
}

/// Natural logarithm `ln x`.
///
/// Error ≤ 0.85 ulp (with or without FMA) for all x > 0, subnormals included.
/// `log(±0) = −inf`, `log(x < 0) = NaN` (`log(−inf)` too), `log(+inf) = +inf`,
/// `log(NaN) = NaN`, `log(1) = +0`.
pub fn log(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    log_g(&mut Em::new(b, m, x), x)
}

#[inline(always)]
pub(crate) fn log_g<A: Arith>(e: &mut A, x: A::V) -> A::V {
    // (exponent shift, sqrt(1/2) bits, 1.0 bits, smallest normal, subnormal scale, its log2,
    //  mantissa mask, the float 2^m whose low mantissa bits will hold k + bias)
    let (shift, sqrt_half, one_bits, min_pos, scale, scale_log2, mant_mask, two_m) = if e.wide() {
        (
            52,
            0x3fe6_a09e_667f_3bcd_u64,
            0x3ff0_0000_0000_0000_u64,
            f64::MIN_POSITIVE,
            2f64.powi(54),
            54.0,
            (1u64 << 52) - 1,
            2f64.powi(52),
        )
    } else {
        (
            23,
            0x3f35_04f3_u64,
            0x3f80_0000_u64,
            f32::MIN_POSITIVE as f64,
            2f64.powi(25),
            25.0,
            (1u64 << 23) - 1,
            2f64.powi(23),
        )
    };
    // Scale subnormals (and, harmlessly, zero and negatives) into the normal range.
    let min_pos = e.c(min_pos);
    let tiny = e.cmp(FloatCC::LessThan, x, min_pos);
    let scale_c = e.c(scale);
    let scaled = e.mul(x, scale_c);
    let xs = e.sel(tiny, scaled, x);
    let adj = e.c(-scale_log2);
    let zero = e.c(0.0);
    let kadj = e.sel(tiny, adj, zero);
    // x = 2^k · m with m in [sqrt(1/2), sqrt(2)): shift the bits by (1 − sqrt(1/2)) so that the
    // exponent field of the sum is k + bias, then rebuild m from the mantissa bits.
    let ix = e.bits(xs);
    let off = e.ci(one_bits - sqrt_half);
    let ix = e.iadd(ix, off);
    // k + bias as the low bits of 2^m, i.e. the float 2^m + k + bias.
    let kb = e.shr(ix, shift);
    let two_m_bits = e.ci(e.float_bits(two_m));
    let kb = e.bor(kb, two_m_bits);
    let kf = e.float(kb);
    let bias = if e.wide() { 1023.0 } else { 127.0 };
    let magic = e.c(two_m + bias);
    let kf = e.sub(kf, magic);
    let kf = e.add(kf, kadj);
    let mask = e.ci(mant_mask);
    let mi = e.band(ix, mask);
    let sh = e.ci(sqrt_half);
    let mi = e.iadd(mi, sh);
    let mf = e.float(mi);
    let one = e.c(1.0);
    let f = e.sub(mf, one);
    // log(1+f) = 2s + s·R(s²), s = f/(2+f)  (fdlibm's scheme).
    let two = e.c(2.0);
    let den = e.add(two, f);
    let s = e.div(f, den);
    let z = e.mul(s, s);
    let coeffs: &[f64] = if e.wide() { &LOG_F64 } else { &LOG_F32 };
    let pz = e.poly(z, coeffs);
    let r = e.mul(z, pz);
    let half = e.c(0.5);
    let hf = e.mul(half, f);
    let hfsq = e.mul(hf, f);
    let (ln2_hi, ln2_lo) = if e.wide() { (LN2_HI_F64, LN2_LO_F64) } else { (LOG_LN2_HI_F32, LOG_LN2_LO_F32) };
    let ln2_lo = e.c(ln2_lo);
    let klo = e.mul(kf, ln2_lo);
    let hr = e.add(hfsq, r);
    let t = e.fma(s, hr, klo);
    let t = e.sub(hfsq, t);
    let t = e.sub(t, f);
    let ln2_hi = e.c(ln2_hi);
    let khi = e.mul(kf, ln2_hi);
    let res = e.sub(khi, t);
    // Special inputs: ±0 → −inf; x < 0 → NaN, +inf → +inf, NaN → NaN (all three via sqrt).
    let ninf = e.c(f64::NEG_INFINITY);
    let inf = e.c(f64::INFINITY);
    let is_zero = e.cmp(FloatCC::Equal, x, zero);
    let root = e.sqrt(x);
    let special = e.sel(is_zero, ninf, root);
    let pos = e.cmp(FloatCC::GreaterThan, x, zero);
    let fin = e.cmp(FloatCC::LessThan, x, inf);
    let ok = e.mand(pos, fin);
    e.sel(ok, res, special)
}

/// Hyperbolic tangent.
///
/// Error ≤ 1.4 ulp over the whole domain. |x| < 0.55 uses an odd polynomial `x + x³·P(x²)`
/// (relative accuracy down to the subnormals; `tanh(x) = x` for tiny x), larger |x|
/// `1 − 2/(e^{2|x|} + 1)`, which saturates to exactly ±1 (from |x| = 9.01 in f32, 19.06 in
/// f64). Odd, keeps the sign of zero: `tanh(±0) = ±0`, `tanh(±inf) = ±1`, `tanh(NaN) = NaN`.
pub fn tanh(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    tanh_g(&mut Em::new(b, m, x), x)
}

#[inline(always)]
pub(crate) fn tanh_g<A: Arith>(e: &mut A, x: A::V) -> A::V {
    let ax = e.abs(x);
    let sign = e.sign_bits(x);
    let t = e.mul(ax, ax);
    let coeffs: &[f64] = if e.wide() { &TANH_F64 } else { &TANH_F32 };
    let pt = e.poly(t, coeffs);
    let ax3 = e.mul(ax, t);
    let small = e.fma(ax3, pt, ax);
    // tanh is ±1 to the last bit beyond 9.01 (f32) / 19.06 (f64); the clamp keeps e^{2|x|} finite
    // (so exp's own clamps are not needed: 0 ≤ 2|x| ≤ 40).
    let axc = e.min_const(ax, if e.wide() { 20.0 } else { 10.0 });
    let two_ax = e.add(axc, axc);
    let ep = e.exp_parts(two_ax, None, false, Clamp::NONE);
    // e^{2|x|} + 1 = (1 + q)·s1 + 1 = q·s1 + (s1 + 1), one rounding (s1 + 1 is exact while it
    // matters).
    let one = e.c(1.0);
    let two = e.c(2.0);
    let s1p1 = e.add(ep.s1, one);
    let den = e.fma(ep.q, ep.s1, s1p1);
    let q = e.div(two, den);
    let big = e.sub(one, q);
    let lim = e.c(0.55);
    let is_small = e.cmp(FloatCC::LessThan, ax, lim);
    let r = e.sel(is_small, small, big);
    e.or_sign(r, sign)
}

/// The logistic function `1/(1 + e^{−x})`.
///
/// Error ≤ 2 ulp over the whole domain, relative also where the result is tiny: x ≪ 0 is
/// computed as `e^x·(1 − e^x)` and rounded once, down into the subnormals (the result is `+0`
/// below x = −103.97 in f32, −745.13 in f64, as the correctly rounded one).
/// `sigmoid(+inf) = 1`, `sigmoid(−inf) = +0`, `sigmoid(±0) = 0.5`, `sigmoid(NaN) = NaN`.
pub fn sigmoid(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    sigmoid_g(&mut Em::new(b, m, x), x)
}

#[inline(always)]
pub(crate) fn sigmoid_g<A: Arith>(e: &mut A, x: A::V) -> A::V {
    e.scaled_sigmoid(None, x, None)
}

/// `x·sigmoid(x)` (SiLU, swish).
///
/// Error ≤ 2 ulp over the whole domain, relative also for x ≪ 0 (rounded once, down into the
/// subnormals). `silu(±0) = ±0`, `silu(+inf) = +inf`, `silu(NaN) = NaN` and `silu(−inf) = NaN`:
/// the IEEE value of `−inf·0`, as tracegrad's reference kernel `x/(1 + e^{−x})` gives.
pub fn silu(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    silu_g(&mut Em::new(b, m, x), x)
}

#[inline(always)]
pub(crate) fn silu_g<A: Arith>(e: &mut A, x: A::V) -> A::V {
    e.scaled_sigmoid(Some(x), x, None)
}

/// The error function.
///
/// Error ≤ 1.2 ulp with FMA, ≤ 1.3 ulp without, over the whole domain (f32: absolute error
/// < 8e-8). |x| < 1 uses the odd polynomial `x + x·P(x²)` (relative accuracy down to the
/// subnormals), larger |x| `1 − e^{−x²}·(√2/|x|)·G(|x|)`. Odd, keeps the sign of zero:
/// `erf(±0) = ±0`; saturates to exactly ±1 (from |x| = 3.92 in f32, 5.93 in f64),
/// `erf(±inf) = ±1`, `erf(NaN) = NaN`.
pub fn erf(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    erf_g(&mut Em::new(b, m, x), x)
}

#[inline(always)]
pub(crate) fn erf_g<A: Arith>(e: &mut A, x: A::V) -> A::V {
    let ax = e.abs(x);
    let sign = e.sign_bits(x);
    let t = e.mul(ax, ax);
    let small = e.erf_small(ax, t);
    // Beyond the clamp erf is 1 to the last bit; clamping keeps e^{−x²} normal (single scale).
    let axc = e.min_const(ax, if e.wide() { 26.0 } else { 9.0 });
    let t2 = e.mul(axc, axc);
    let nt2 = e.neg(t2);
    // −x² ≥ −81 (f32) / −676 (f64): inside exp's range, no clamp.
    let ep = e.exp_parts(nt2, None, false, Clamp::NONE);
    let cen = e.c(if e.wide() { ERFC_CEN_F64 } else { ERFC_CEN_F32 });
    let d = e.sub(axc, cen);
    let one = e.c(1.0);
    let v = e.div(one, t2);
    let g = e.erfc_g(axc, d, v);
    // erfc(x) = e^{−x²}·(√2/x)·G(x)
    let sqrt2 = e.c(std::f64::consts::SQRT_2);
    let s = e.div(sqrt2, axc);
    let r = e.mul(s, g);
    let rp = e.mul(r, ep.p);
    let erfc = e.mul(rp, ep.s1);
    let big = e.sub(one, erfc);
    let is_small = e.cmp(FloatCC::LessThan, ax, one);
    let res = e.sel(is_small, small, big);
    e.or_sign(res, sign)
}

/// Exact GELU `0.5·x·(1 + erf(x/√2))` (PyTorch's `gelu`, `approximate='none'`).
///
/// Error ≤ 2.1 ulp with FMA, ≤ 2.4 ulp without, over the whole domain, relative also for
/// x ≪ 0: there it is computed as `0.5·x·erfc(|x|/√2) = −G(|x|/√2)·e^{−x²/2}` with `x²` split
/// exactly and rounded once, down into the subnormals. `gelu(±0) = ±0`, `gelu(+inf) = +inf`,
/// `gelu(NaN) = NaN` and `gelu(−inf) = NaN` (the IEEE value of `−inf·0`, as tracegrad's
/// reference kernel gives).
pub fn gelu(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    gelu_g(&mut Em::new(b, m, x), x)
}

#[inline(always)]
pub(crate) fn gelu_g<A: Arith>(e: &mut A, x: A::V) -> A::V {
    let half = e.c(0.5);
    let hx = e.mul(half, x);
    let rs2 = e.c(std::f64::consts::FRAC_1_SQRT_2);
    let u = e.mul(x, rs2);
    // −0.5 < u < 1: 0.5·x·(1 + erf(u)), no cancellation.
    let t = e.mul(u, u);
    let erf_u = e.erf_small(u, t);
    let one = e.c(1.0);
    let opu = e.add(one, erf_u);
    let g_small = e.mul(hx, opu); // not fma(hx, erf_u, hx): that would turn −0 into +0
                                  // Otherwise erfc(|u|) = e^{−x²/2}·R(|u|), with x² split exactly into hi + lo.
    let ax = e.abs(x);
    let xmax = if e.wide() { GELU_XMAX_F64 } else { GELU_XMAX_F32 };
    let axc = e.min_const(ax, xmax);
    let (h, l) = e.two_square(axc);
    let mhalf = e.c(-0.5);
    let arg_hi = e.mul(h, mhalf);
    let arg_lo = e.mul(l, mhalf);
    // −x²/2 ≥ −106.2 (f32) / −745.4 (f64): inside exp's range, no clamp.
    let ep = e.exp_parts(arg_hi, Some(arg_lo), true, Clamp::NONE);
    let xmax_c = e.c(xmax);
    let beyond = e.cmp(FloatCC::GreaterThan, ax, xmax_c);
    let zero = e.c(0.0);
    let s2 = e.sel(beyond, zero, ep.s2.unwrap());
    let auc = e.mul(axc, rs2);
    let ncen = e.c(-(if e.wide() { ERFC_CEN_F64 } else { ERFC_CEN_F32 }));
    let d = e.fma(axc, rs2, ncen);
    let two = e.c(2.0);
    let v = e.div(two, h); // 1/u²
    let g = e.erfc_g(auc, d, v);
    // x < 0: 0.5·x·erfc(|u|) = −G(|u|)·e^{−x²/2} exactly (0.5·x·√2/|u| = −1), rounded once
    // (even when subnormal): fma(−G, q, −G) = −G·e^r, then the exact scalings.
    let mg = e.neg(g);
    let qp = e.fma(mg, ep.q, mg);
    let qp1 = e.mul(qp, ep.s1);
    let g_neg = e.mul(qp1, s2);
    // x > 0: x·(1 − erfc(u)/2), erfc(u) = (2/x)·G(u)·e^{−x²/2}.
    let inv = e.div(two, axc);
    let r = e.mul(inv, g);
    let rp = e.mul(r, ep.p);
    let rp1 = e.mul(rp, ep.s1);
    let erfc = e.mul(rp1, s2);
    let w = e.fma(erfc, mhalf, one);
    let g_pos = e.mul(x, w);
    let neg = e.cmp(FloatCC::LessThan, x, zero);
    let g_big = e.sel(neg, g_neg, g_pos);
    // gelu(−inf) = −inf·0 = NaN, as IEEE (and the reference formula) has it.
    let ninf = e.c(f64::NEG_INFINITY);
    let is_ninf = e.cmp(FloatCC::Equal, x, ninf);
    let nan = e.c(f64::NAN);
    let g_big = e.sel(is_ninf, nan, g_big);
    let lo = e.c(-0.5);
    let above = e.cmp(FloatCC::GreaterThan, u, lo);
    let below = e.cmp(FloatCC::LessThan, u, one);
    let is_small = e.mand(above, below);
    e.sel(is_small, g_small, g_big)
}

/// GELU's tanh approximation `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (PyTorch's
/// `gelu(approximate='tanh')`).
///
/// Computed as the identical `x·sigmoid(w)`, `w = 2√(2/π)·(x + 0.044715·x³)`, with w in
/// double-word arithmetic (its rounding error would otherwise be amplified |w|-fold by e^w).
/// Error ≤ 2.1 ulp with FMA, ≤ 2.2 ulp without, over the whole domain, relative also for
/// x ≪ 0 (rounded once, down into the subnormals). `gelu_tanh(±0) = ±0`,
/// `gelu_tanh(+inf) = +inf`, `gelu_tanh(NaN) = NaN` and `gelu_tanh(−inf) = NaN` (IEEE
/// `−inf·0`, as tracegrad's reference kernel gives).
pub fn gelu_tanh(b: &mut FunctionBuilder, m: &MathCtx, x: Value) -> Value {
    gelu_tanh_g(&mut Em::new(b, m, x), x)
}

#[inline(always)]
pub(crate) fn gelu_tanh_g<A: Arith>(e: &mut A, x: A::V) -> A::V {
    // Beyond ±GELU_TANH_XMAX sigmoid(w) is exactly 0 or 1; the clamp keeps the splits finite.
    let xmax = if e.wide() { 30.0 } else { 16.0 };
    let xc = e.min_const(x, xmax);
    let xc = e.max_const(xc, -xmax);
    let (c1h, c1l, c2h, c2l) = if e.wide() { GELU_TANH_C_F64 } else { GELU_TANH_C_F32 };
    // x² = h2 + l2 exactly; c2·x² = p + plo.
    let (h2, l2) = e.two_square(xc);
    let c2h = e.c(c2h);
    let c2l = e.c(c2l);
    let (p, pe) = e.two_prod(c2h, h2);
    let t1 = e.mul(c2h, l2);
    let t2 = e.mul(c2l, h2);
    let t = e.add(t1, t2);
    let plo = e.add(pe, t);
    // c1 + c2·x² = s + slo.
    let c1h = e.c(c1h);
    let c1l = e.c(c1l);
    let (s, se) = e.two_sum(c1h, p);
    let t = e.add(plo, c1l);
    let slo = e.add(se, t);
    // w = x·(s + slo) = w + wlo.
    let (w, we) = e.two_prod(xc, s);
    let t = e.mul(xc, slo);
    let wlo = e.add(we, t);
    e.scaled_sigmoid(Some(x), w, Some(wlo))
}

// ---------------------------------------------------------------------------------------------
// Constants.

/// Where [`Arith::scaled_sigmoid`] clamps its argument from above (f32): e^{−w} < 2^−125 rounds
/// 1 + e^{−w} to 1, and 2^k stays normal (k ≥ −126).
const SIGMOID_WMAX_F32: f64 = 87.0;
/// [`SIGMOID_WMAX_F32`] for f64 (k ≥ −1010).
const SIGMOID_WMAX_F64: f64 = 700.0;
/// `log2(e)`.
const LOG2E: f64 = std::f64::consts::LOG2_E;
/// exp's argument clamp (f32). Below it, e^x·|pref| rounds to 0 for every prefactor the
/// emitters use (|pref| ≤ |x| for silu, ≤ 16 for gelu_tanh's clamped w), and 2^⌊k/2⌉ (and
/// sigmoid's 2^(k + 64), f64: 2^(k + 512)) stays normal.
const EXP_MIN_F32: f64 = -110.0;
/// Same, f64.
const EXP_MIN_F64: f64 = -760.0;
/// ln 2 split for Cody–Waite reduction in f32 (exp): 9 significant bits, so `k·hi` is exact.
const EXP_LN2_HI_F32: f64 = 0.693359375;
/// `ln 2 − EXP_LN2_HI_F32`, rounded to f32.
const EXP_LN2_LO_F32: f64 = -2.121944400e-4;
/// ln 2 split for f32 log: 15 significant bits (`k·hi` exact for |k| ≤ 256).
const LOG_LN2_HI_F32: f64 = 0.693145751953125;
/// `ln 2 − LOG_LN2_HI_F32`, rounded to f32.
const LOG_LN2_LO_F32: f64 = 1.428606765330187e-6;
/// fdlibm's ln 2 split for f64: 32 significant bits (`k·hi` exact for |k| < 2^21).
#[allow(clippy::excessive_precision)] // fdlibm's split of ln 2, digits as published
const LN2_HI_F64: f64 = 6.931_471_803_691_238_164_90e-1;
/// `ln 2 − LN2_HI_F64`.
#[allow(clippy::excessive_precision)]
const LN2_LO_F64: f64 = 1.908_214_929_270_587_700_02e-10;
/// `2·√(2/π)` and `2·√(2/π)·0.044715` as double-f32 (hi, lo) pairs: (c1 hi, c1 lo, c2 hi, c2 lo).
const GELU_TANH_C_F32: (f64, f64, f64, f64) =
    (1.5957691669464111, -4.534068054340423e-08, 0.07135481387376785, 2.3988324659995897e-09);
/// The same as double-f64 pairs.
const GELU_TANH_C_F64: (f64, f64, f64, f64) =
    (1.5957691216057308, -9.96930880911092e-17, 0.07135481627260025, -6.175149918155315e-19);
/// Beyond this |x| gelu's exact result is ±0 (f32): 0.5·|x|·erfc(|x|/√2) < 2^−150.
const GELU_XMAX_F32: f64 = 14.57;
/// Same for f64 (< 2^−1075).
const GELU_XMAX_F64: f64 = 38.61;
/// erfc(u) = e^{−u²}·(√2/u)·G(u) with G(u) = u·e^{u²}·erfc(u)/√2 (→ 1/√(2π) as u → ∞); G
/// switches from a polynomial in u − ERFC_CEN to one in 1/u² at ERFC_U1 (f32).
const ERFC_U1_F32: f64 = 2.0;
/// Same, f64.
const ERFC_U1_F64: f64 = 2.5;
/// The expansion point of the near polynomial (f32), chosen so that its constant term rounds
/// well.
const ERFC_CEN_F32: f64 = 1.3154296875;
/// Same, f64.
const ERFC_CEN_F64: f64 = 1.5029296875;

// Polynomial coefficients, lowest order first. Each set was fitted with mpmath (50–60 digits)
// by a weighted Remez exchange minimising the relative error of the approximated quantity on
// the stated interval, then rounded to f32/f64 one coefficient at a time, the higher
// coefficients being refitted (Remez, or a weighted least-squares correction) to absorb each
// rounding error. The quoted bound is the relative error of the rounded polynomial evaluated
// exactly; the evaluation's own rounding comes on top (see the functions' measured bounds).

/// `(e^r − 1 − r)/r²` on |r| ≤ 0.35: `1 + r + r²·P(r)` is within 3.4e-9 of e^r.
const EXP_F32: [f64; 5] =
    [0.4999999403953552, 0.16666515171527863, 0.041668232530355453, 0.008369382470846176, 0.0013825100613757968];
/// The same for f64: within 8.7e-18.
const EXP_F64: [f64; 10] = [
    0.5000000000000011,
    0.16666666666666674,
    0.041666666666511414,
    0.008333333333322231,
    0.0013888888951113431,
    0.0001984126988716785,
    2.4801483581166293e-05,
    2.7557241280638553e-06,
    2.763406699169935e-07,
    2.511054336677029e-08,
];
/// `2·(1, EXP_F32…)`: the coefficients of `2H(r)`, `H = 1 + r·P(r)` (exact doublings).
const EXP_F32_H2: [f64; 6] = doubled_h(&EXP_F32);
/// The same for f64.
const EXP_F64_H2: [f64; 11] = doubled_h(&EXP_F64);

/// `2·(1, c₀, c₁, …)`.
const fn doubled_h<const N: usize>(c: &[f64]) -> [f64; N] {
    let mut out = [2.0; N];
    let mut i = 0;
    while i < c.len() {
        out[i + 1] = 2.0 * c[i];
        i += 1;
    }
    out
}
/// `P(z)` with `log(1+f) = 2s + s·z·P(z)`, s = f/(2+f), z = s² ≤ 0.0297 (f in
/// [√½ − 1, √2 − 1]): within 5.0e-11.
const LOG_F32: [f64; 4] = [0.6666666269302368, 0.4000096917152405, 0.28499168157577515, 0.24268320202827454];
/// The same for f64: within 2.7e-18.
const LOG_F64: [f64; 7] = [
    0.666666666666674,
    0.3999999999937659,
    0.2857142875163661,
    0.22222197550812,
    0.18183620995168914,
    0.1531251600981295,
    0.14812102203885727,
];
/// `(tanh x − x)/x³` as a polynomial in t = x², |x| ≤ 0.5501: `x + x³·P(t)` within 1.2e-9.
const TANH_F32: [f64; 5] =
    [-0.33333316445350647, 0.13332544267177582, -0.0538475476205349, 0.02105071395635605, -0.00624284939840436];
/// The same for f64: within 5.9e-19.
const TANH_F64: [f64; 11] = [
    -0.333333333333333,
    0.1333333333332658,
    -0.05396825396373662,
    0.021869488385139992,
    -0.008863232589095852,
    0.0035920918989709293,
    -0.001455541954961271,
    0.0005884406409755172,
    -0.00023337133305392131,
    8.330115617291396e-05,
    -1.948487243017218e-05,
];
/// `erf(x)/x − 1` as a polynomial in t = x², |x| ≤ 1: `x + x·P(t)` within 1.5e-9.
const ERF_F32: [f64; 7] = [
    0.12837916612625122,
    -0.3761262595653534,
    0.1128358319401741,
    -0.026853691786527634,
    0.005188074428588152,
    -0.0008007889264263213,
    7.846172957215458e-05,
];
/// The same for f64: within 1.1e-17.
const ERF_F64: [f64; 13] = [
    0.1283791670955126,
    -0.37612638903183876,
    0.11283791670958743,
    -0.02686617064561956,
    0.0052239776290960846,
    -0.0008548327189642622,
    0.00012055337779473741,
    -1.492573855103336e-05,
    1.6463087935322122e-06,
    -1.6370647964288362e-07,
    1.4786617604222963e-08,
    -1.1830870634737223e-09,
    6.685321888472459e-11,
];
/// `G(u) = u·e^{u²}·erfc(u)/√2` as a polynomial in d = u − 1.3154296875, u in [0.49, 2]:
/// within 8.3e-10.
const ERFC_NEAR_F32: [f64; 12] = [
    0.329833984375,
    0.06892818212509155,
    -0.047546420246362686,
    0.027232248336076736,
    -0.013786508701741695,
    0.0063611483201384544,
    -0.002725770231336355,
    0.001101382076740265,
    -0.00041459573549218476,
    0.00014013184409122914,
    -6.037471757736057e-05,
    2.8722770366584882e-05,
];
/// `G(u)` as a polynomial in v = 1/u², u in [2, 10.3]: within 4.8e-9.
const ERFC_FAR_F32: [f64; 9] = [
    0.3989422619342804,
    -0.19946685433387756,
    0.29885807633399963,
    -0.7343044281005859,
    2.3093979358673096,
    -7.313536643981934,
    18.491361618041992,
    -30.003883361816406,
    22.360782623291016,
];
/// The same for f64, d = u − 1.5029296875, u in [0.49, 2.5]: within 1.9e-17.
const ERFC_NEAR_F64: [f64; 22] = [
    0.3412502983783519,
    0.05364274371916136,
    -0.03476269199167917,
    0.01881215584468032,
    -0.009038454242058335,
    0.0039724134386737876,
    -0.0016252956670026672,
    0.0006262220660498674,
    -0.00022907826108922304,
    8.00469652347377e-05,
    -2.684526896109122e-05,
    8.673625307278215e-06,
    -2.708373090951373e-06,
    8.194462423677077e-07,
    -2.4062751245049165e-07,
    6.873574356818374e-08,
    -1.9299375344017703e-08,
    5.285509007305009e-09,
    -1.2914563214498319e-09,
    3.1859306451714654e-10,
    -1.2878897090909413e-10,
    3.544572427699444e-11,
];
/// The same for f64, u in [2.5, 27.3]: within 4.4e-18.
const ERFC_FAR_F64: [f64; 22] = [
    0.39894228040143265,
    -0.19947114020067355,
    0.2992067102784654,
    -0.7480167694871063,
    2.6180576553390433,
    -11.781144407826863,
    64.78733022177687,
    -420.60620923516876,
    3132.542636245562,
    -25897.183761166387,
    227097.28696776004,
    -1995888.2520605472,
    16591312.945129327,
    -124083869.67952739,
    802147080.8070801,
    -4337262631.09475,
    19028431021.374516,
    -65523290302.990685,
    169647130887.46265,
    -309507722619.5088,
    353928150972.1623,
    -190501102675.9846,
];

// ---------------------------------------------------------------------------------------------
// The emitter.

/// Per-call state: the builder, the ISA facts and the value type with its integer twin.
struct Em<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    m: MathCtx,
    /// `F32`, `F64`, `F32X4` or `F64X2`.
    ty: Type,
    /// The integer type with the same lane layout.
    ity: Type,
    /// f64 lanes.
    wide: bool,
}

/// The pieces of `e^x = p·s1·s2` (or `p·s1` when built with a single scale).
pub(crate) struct ExpParts<V> {
    /// `e^r` for the reduced argument, in about [0.7, 1.42].
    p: V,
    /// `e^r − 1` (more accurate than `p − 1`: `x·e^r` is best computed as `fma(x, q, x)`).
    q: V,
    /// A power of two (normal).
    s1: V,
    /// The second power of two, when requested.
    s2: Option<V>,
}

/// Which of exp's argument clamps [`Em::exp_parts`] applies.
#[derive(Clone, Copy)]
pub(crate) struct Clamp {
    lo: bool,
    hi: bool,
}

impl Clamp {
    const BOTH: Clamp = Clamp { lo: true, hi: true };
    const LO: Clamp = Clamp { lo: true, hi: false };
    const NONE: Clamp = Clamp { lo: false, hi: false };
}

impl<'a, 'b> Em<'a, 'b> {
    fn new(b: &'a mut FunctionBuilder<'b>, m: &MathCtx, x: Value) -> Self {
        let ty = b.func.dfg.value_type(x);
        let wide = match ty {
            types::F32 | types::F32X4 => false,
            types::F64 | types::F64X2 => true,
            _ => panic!("math: unsupported type {ty} (need F32, F64, F32X4 or F64X2)"),
        };
        Em { b, m: *m, ty, ity: ty.as_int(), wide }
    }
}

impl Arith for Em<'_, '_> {
    type V = Value;
    type I = Value;
    type M = Value;

    fn wide(&self) -> bool {
        self.wide
    }

    fn has_fma(&self) -> bool {
        self.m.has_fma
    }

    fn c(&mut self, v: f64) -> Value {
        constant(self.b, self.ty, v)
    }

    fn ci(&mut self, v: u64) -> Value {
        let lane = self.ity.lane_type();
        let v = if lane == types::I32 { v & 0xffff_ffff } else { v };
        let s = self.b.ins().iconst(lane, v as i64);
        if self.ty.is_vector() {
            self.b.ins().splat(self.ity, s)
        } else {
            s
        }
    }

    fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }

    fn sub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }

    fn mul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }

    fn div(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }

    fn fma_native(&mut self, a: Value, b: Value, c: Value) -> Value {
        self.b.ins().fma(a, b, c)
    }

    fn neg(&mut self, a: Value) -> Value {
        self.b.ins().fneg(a)
    }

    fn abs(&mut self, a: Value) -> Value {
        self.b.ins().fabs(a)
    }

    fn sqrt(&mut self, a: Value) -> Value {
        self.b.ins().sqrt(a)
    }

    fn bits(&mut self, v: Value) -> Value {
        self.b.ins().bitcast(self.ity, MemFlagsData::new(), v)
    }

    fn float(&mut self, v: Value) -> Value {
        self.b.ins().bitcast(self.ty, MemFlagsData::new(), v)
    }

    fn iadd(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().iadd(a, b)
    }

    fn band(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().band(a, b)
    }

    fn bor(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().bor(a, b)
    }

    fn bxor(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().bxor(a, b)
    }

    fn shl(&mut self, a: Value, n: u32) -> Value {
        self.b.ins().ishl_imm_u(a, i64::from(n))
    }

    fn shr(&mut self, a: Value, n: u32) -> Value {
        self.b.ins().ushr_imm_u(a, i64::from(n))
    }

    /// A comparison mask: `I8` for scalars, all-ones/zero lanes of the integer twin for vectors.
    fn cmp(&mut self, cc: FloatCC, a: Value, b: Value) -> Value {
        self.b.ins().fcmp(cc, a, b)
    }

    fn mand(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().band(a, b)
    }

    /// `mask ? a : b`, lane-wise.
    fn sel(&mut self, mask: Value, a: Value, b: Value) -> Value {
        if self.ty.is_vector() {
            let vt = self.b.func.dfg.value_type(a);
            let mask = if self.b.func.dfg.value_type(mask) == vt {
                mask
            } else {
                self.b.ins().bitcast(vt, MemFlagsData::new(), mask)
            };
            self.b.ins().bitselect(mask, a, b)
        } else {
            self.b.ins().select(mask, a, b)
        }
    }
}

/// The operations the algorithms above are written in, over a float value type `V`, its
/// integer twin `I` (same lanes, same width) and a lane mask `M`. Two backends implement them:
/// [`Em`] emits Cranelift IR (scalars, F32X4, F64X2), and [`crate::lanes`] evaluates them on
/// Rust `f32`/`f64` values inside loops that rustc compiles for AVX2 and AVX-512. Every
/// operation is exact IEEE arithmetic or bit manipulation, so the backends agree bit for bit
/// when they agree on [`Arith::has_fma`].
pub(crate) trait Arith {
    /// A float value (or vector).
    type V: Copy;
    /// The integer twin of `V`.
    type I: Copy;
    /// A comparison result.
    type M: Copy;

    /// f64 lanes (else f32).
    fn wide(&self) -> bool;
    /// Whether [`Arith::fma`] fuses.
    fn has_fma(&self) -> bool;
    /// A constant, rounded to the precision.
    fn c(&mut self, v: f64) -> Self::V;
    /// An integer constant of the twin type (bits given unsigned, truncated to the lane).
    fn ci(&mut self, v: u64) -> Self::I;
    /// `a + b`.
    fn add(&mut self, a: Self::V, b: Self::V) -> Self::V;
    /// `a − b`.
    fn sub(&mut self, a: Self::V, b: Self::V) -> Self::V;
    /// `a·b`.
    fn mul(&mut self, a: Self::V, b: Self::V) -> Self::V;
    /// `a / b`.
    fn div(&mut self, a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c` rounded once (only called when [`Arith::has_fma`]).
    fn fma_native(&mut self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `−a`.
    fn neg(&mut self, a: Self::V) -> Self::V;
    /// `|a|`.
    fn abs(&mut self, a: Self::V) -> Self::V;
    /// `√a` (NaN below zero).
    fn sqrt(&mut self, a: Self::V) -> Self::V;
    /// The bits of `v`.
    fn bits(&mut self, v: Self::V) -> Self::I;
    /// The float with bits `i`.
    fn float(&mut self, i: Self::I) -> Self::V;
    /// Wrapping integer `a + b`.
    fn iadd(&mut self, a: Self::I, b: Self::I) -> Self::I;
    /// `a & b`.
    fn band(&mut self, a: Self::I, b: Self::I) -> Self::I;
    /// `a | b`.
    fn bor(&mut self, a: Self::I, b: Self::I) -> Self::I;
    /// `a ^ b`.
    fn bxor(&mut self, a: Self::I, b: Self::I) -> Self::I;
    /// `a << n`.
    fn shl(&mut self, a: Self::I, n: u32) -> Self::I;
    /// `a >> n`, logical.
    fn shr(&mut self, a: Self::I, n: u32) -> Self::I;
    /// `a cc b` (`LessThan`, `GreaterThan` or `Equal`; false when either is NaN).
    fn cmp(&mut self, cc: FloatCC, a: Self::V, b: Self::V) -> Self::M;
    /// Both masks.
    fn mand(&mut self, a: Self::M, b: Self::M) -> Self::M;
    /// `mask ? a : b`.
    fn sel(&mut self, mask: Self::M, a: Self::V, b: Self::V) -> Self::V;

    /// The bit pattern of `v` in this precision.
    #[inline(always)]
    fn float_bits(&self, v: f64) -> u64 {
        if self.wide() {
            v.to_bits()
        } else {
            u64::from((v as f32).to_bits())
        }
    }

    /// `x·y + z`: a fused multiply-add if [`Arith::has_fma`], else `mul` then `add` (two
    /// roundings).
    #[inline(always)]
    fn fma(&mut self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        if self.has_fma() {
            self.fma_native(a, b, c)
        } else {
            let p = self.mul(a, b);
            self.add(p, c)
        }
    }

    /// `min(x, c)` that returns `x` when it is NaN (lowers to `minps c, x` on x64).
    #[inline(always)]
    fn min_const(&mut self, x: Self::V, c: f64) -> Self::V {
        let c = self.c(c);
        let lt = self.cmp(FloatCC::LessThan, c, x);
        self.sel(lt, c, x)
    }

    /// `max(x, c)` that returns `x` when it is NaN (lowers to `maxps c, x` on x64).
    #[inline(always)]
    fn max_const(&mut self, x: Self::V, c: f64) -> Self::V {
        let c = self.c(c);
        let lt = self.cmp(FloatCC::LessThan, x, c);
        self.sel(lt, c, x)
    }

    /// Horner's scheme, `coeffs` lowest order first.
    #[inline(always)]
    fn poly(&mut self, x: Self::V, coeffs: &[f64]) -> Self::V {
        let (&last, rest) = coeffs.split_last().expect("empty polynomial");
        let mut acc = self.c(last);
        // Plain index loops: with the coefficients a constant array, rustc unrolls them fully,
        // which lets the lanes backend's element loops vectorize.
        let mut i = rest.len();
        while i > 0 {
            i -= 1;
            let k = self.c(rest[i]);
            acc = self.fma(acc, x, k);
        }
        acc
    }

    /// [`Arith::poly`] of the coefficients `lead, rest…`, each multiplied by `scale` (exactly,
    /// in f64, before rounding to the precision), without building the list.
    #[inline(always)]
    fn poly_lead(&mut self, x: Self::V, lead: f64, rest: &[f64], scale: f64) -> Self::V {
        let Some(&last) = rest.last() else { return self.c(scale * lead) };
        let mut acc = self.c(scale * last);
        let mut i = rest.len() - 1;
        while i > 0 {
            i -= 1;
            let k = self.c(scale * rest[i]);
            acc = self.fma(acc, x, k);
        }
        let k = self.c(scale * lead);
        self.fma(acc, x, k)
    }

    /// `y` rounded to an integer (ties to even), for |y| < 2^22 (f32) / 2^51 (f64).
    #[inline(always)]
    fn round_int(&mut self, y: Self::V) -> Self::V {
        let magic = self.c(if self.wide() { 1.5 * 2f64.powi(52) } else { 1.5 * 2f64.powi(23) });
        let t = self.add(y, magic);
        self.sub(t, magic)
    }

    /// `2^n` for an integer-valued `n` in the normal exponent range.
    #[inline(always)]
    fn pow2(&mut self, n: Self::V) -> Self::V {
        let (magic, shift) = if self.wide() { (2f64.powi(52) + 1023.0, 52) } else { (2f64.powi(23) + 127.0, 23) };
        let magic = self.c(magic);
        let t = self.add(n, magic);
        let t = self.bits(t);
        let t = self.shl(t, shift);
        self.float(t)
    }

    /// The sign bit of `x`, as the integer twin.
    #[inline(always)]
    fn sign_bits(&mut self, x: Self::V) -> Self::I {
        let xb = self.bits(x);
        let m = self.ci(if self.wide() { 1 << 63 } else { 1 << 31 });
        self.band(xb, m)
    }

    /// `v` with `sign` (from [`Self::sign_bits`]) or-ed into its sign bit.
    #[inline(always)]
    fn or_sign(&mut self, v: Self::V, sign: Self::I) -> Self::V {
        let vb = self.bits(v);
        let r = self.bor(vb, sign);
        self.float(r)
    }

    /// `x·x` exactly, as `hi + lo` (FMA, or Dekker's product with Veltkamp's split). `x` must be
    /// small enough for the split not to overflow (|x| < 2^100 is plenty).
    #[inline(always)]
    fn two_square(&mut self, x: Self::V) -> (Self::V, Self::V) {
        let h = self.mul(x, x);
        if self.has_fma() {
            let nh = self.neg(h);
            let l = self.fma_native(x, x, nh);
            (h, l)
        } else {
            let (xh, xl) = self.split(x);
            let hh = self.mul(xh, xh);
            let e1 = self.sub(hh, h);
            let hl = self.mul(xh, xl);
            let hl2 = self.add(hl, hl);
            let e2 = self.add(e1, hl2);
            let ll = self.mul(xl, xl);
            (h, self.add(e2, ll))
        }
    }

    /// exp's argument reduction: `k = round(x/ln 2)` and `r = x − k·ln 2` (Cody–Waite, two
    /// FMAs), |r| ≤ ln 2 / 2. With FMA, `x·log2(e) + 1.5·2^23` is one rounding, straight to the
    /// integer (one instruction fewer than multiplying, then rounding with the magic number).
    #[inline(always)]
    fn reduce_ln2(&mut self, x: Self::V) -> (Self::V, Self::V) {
        let log2e = self.c(LOG2E);
        let magic = self.c(if self.wide() { 1.5 * 2f64.powi(52) } else { 1.5 * 2f64.powi(23) });
        let t = self.fma(x, log2e, magic);
        let k = self.sub(t, magic);
        let (hi_c, lo_c) = if self.wide() { (LN2_HI_F64, LN2_LO_F64) } else { (EXP_LN2_HI_F32, EXP_LN2_LO_F32) };
        let nhi = self.c(-hi_c);
        let nlo = self.c(-lo_c);
        let r = self.fma(k, nhi, x);
        (k, self.fma(k, nlo, r))
    }

    /// `e^(x + lo)` as `p·s1·s2` (`two_scales`) or `p·s1`.
    ///
    /// x is clamped to [−110, 89] (f32) / [−760, 710] (f64), where the product already
    /// over/underflows (callers that multiply e^x by a large factor zero `s2` below the clamp);
    /// NaN passes through into `p`. A caller whose argument is known to lie on one side of a
    /// bound (every caller but `exp` itself) turns that clamp off with `clamp`. With two scales `2^k` is split as
    /// `2^⌊k/2⌉·2^(k−⌊k/2⌉)`, so that `p·s1` is normal and the final product rounds once, even
    /// into the subnormals. With one scale the caller guarantees x ≥ −87 (f32) / −708 (f64).
    #[inline(always)]
    fn exp_parts(&mut self, x: Self::V, lo: Option<Self::V>, two_scales: bool, clamp: Clamp) -> ExpParts<Self::V> {
        let (k, p, q) = self.exp_core(x, lo, clamp);
        if two_scales {
            let half = self.c(0.5);
            let h = self.mul(k, half);
            let k1 = self.round_int(h);
            let k2 = self.sub(k, k1);
            let s1 = self.pow2(k1);
            let s2 = self.pow2(k2);
            ExpParts { p, q, s1, s2: Some(s2) }
        } else {
            let s1 = self.pow2(k);
            ExpParts { p, q, s1, s2: None }
        }
    }

    /// [`Arith::exp_parts`] before its scales: `(k, p, q)` with `e^(x + lo) = p·2^k` and
    /// `q = p − 1` (more accurate), x clamped as `clamp` says.
    #[inline(always)]
    fn exp_core(&mut self, x: Self::V, lo: Option<Self::V>, clamp: Clamp) -> (Self::V, Self::V, Self::V) {
        let (xlo, xhi) = if self.wide() { (EXP_MIN_F64, 710.0) } else { (EXP_MIN_F32, 89.0) };
        let xc = if clamp.hi { self.min_const(x, xhi) } else { x };
        let xc = if clamp.lo { self.max_const(xc, xlo) } else { xc };
        let (k, mut r) = self.reduce_ln2(xc);
        if let Some(l) = lo {
            r = self.add(r, l);
        }
        let c = if self.wide() { &EXP_F64[..] } else { &EXP_F32[..] };
        // e^r = 1 + r·H(r), H = 1 + r·P(r)
        let h = self.poly_lead(r, 1.0, c, 1.0);
        let q = self.mul(h, r);
        let one = self.c(1.0);
        let p = self.fma(h, r, one);
        (k, p, q)
    }

    /// `pref·sigmoid(w + w_lo)` (`pref` = 1 when `None`), relative-accurate for all w.
    ///
    /// With T = 15.9 (f32) / 36 (f64), the largest |w| for which 1 + 2^k is exact, and
    /// E = e^{arg} = (1 + q)·2^k, where arg = −w for w ≥ −T and arg = w below:
    /// - w ≥ −T: `pref/(1 + E)`;
    /// - w < −T: `pref·E/(1 + E)`.
    ///
    /// The denominator `q·E₀ + (1 + E₀)`, E₀ = 2^k, is rounded once (1 + E₀ is exact while it
    /// matters). Below −T, where the result may be subnormal, the numerator `pref·E` is
    /// `fma(pref·S, q, pref·S)` with S = 2^(k + OFF), OFF = 64 (f32) / 512 (f64), rounded once
    /// in the normal range, and the quotient's final scaling by 2^−OFF rounds once into the
    /// subnormals. Above −T, w is clamped at [`SIGMOID_WMAX_F32`] (f64: [`SIGMOID_WMAX_F64`]),
    /// which keeps 2^k normal; from there on 1 + E rounds to 1 anyway. Using E = e^{−|w|} for
    /// all w < 0 would be cheaper but costs an ulp where E and the result lie in different
    /// binades.
    #[inline(always)]
    fn scaled_sigmoid(&mut self, pref: Option<Self::V>, w: Self::V, w_lo: Option<Self::V>) -> Self::V {
        let wide = self.wide();
        let nt = self.c(if wide { -36.0 } else { -15.9 });
        let lower = self.cmp(FloatCC::LessThan, w, nt);
        let wc = self.min_const(w, if wide { SIGMOID_WMAX_F64 } else { SIGMOID_WMAX_F32 });
        // arg = −wc above −T, wc below: a sign flip, as `neg` would do it (NaN included).
        let zero = self.c(0.0);
        let nzero = self.c(-0.0);
        let flip = self.sel(lower, zero, nzero);
        let flip = self.bits(flip);
        let flip_by = |e: &mut Self, v: Self::V| {
            let b = e.bits(v);
            let b = e.bxor(b, flip);
            e.float(b)
        };
        let arg = flip_by(self, wc);
        let arg_lo = w_lo.map(|l| flip_by(self, l));
        // arg ≤ T: only the lower clamp matters.
        let (k, _, q) = self.exp_core(arg, arg_lo, Clamp::LO);
        // Below −T: S = 2^(k + OFF), and f2 = 2^−OFF (the exponent bits of 1 lowered by OFF,
        // an integer add of −OFF·2^mantissa_bits, whose bit pattern is the float −2^65 (f32) /
        // −2^513 (f64)); above, S = 2^k and f2 = 1.
        let (off, off_pattern) = if wide { (512.0, -(2f64.powi(513))) } else { (64.0, -(2f64.powi(65))) };
        let off = self.c(off);
        let off = self.sel(lower, off, zero);
        let kk = self.add(k, off);
        let s = self.pow2(kk);
        let one = self.c(1.0);
        let off_pattern = self.c(off_pattern);
        let down = self.sel(lower, off_pattern, zero);
        let one_bits = self.bits(one);
        let down = self.bits(down);
        let f2 = self.iadd(one_bits, down);
        let f2 = self.float(f2);
        // E₀ = 2^k, rounded once (to a subnormal or zero far below −T).
        let e0 = self.mul(s, f2);
        let ep1 = self.add(e0, one);
        let den = self.fma(q, e0, ep1);
        let ps = match pref {
            None => s,
            Some(x) => self.mul(x, s),
        };
        let pe = self.fma(ps, q, ps);
        let num = self.sel(lower, pe, pref.unwrap_or(one));
        // Below exp's clamp e^{w} must be exactly 0, even when multiplied by a huge |pref| (with
        // no prefactor the clamped product already rounds to 0).
        let f2 = match pref {
            None => f2,
            Some(_) => {
                let xlo = self.c(if wide { EXP_MIN_F64 } else { EXP_MIN_F32 });
                let under = self.cmp(FloatCC::LessThan, w, xlo);
                self.sel(under, zero, f2)
            }
        };
        let r = self.div(num, den);
        self.mul(r, f2)
    }

    /// `erf(u)` for |u| ≤ 1, given `t = u²`: `u + u·P(t)`.
    #[inline(always)]
    fn erf_small(&mut self, u: Self::V, t: Self::V) -> Self::V {
        let coeffs: &[f64] = if self.wide() { &ERF_F64 } else { &ERF_F32 };
        let p = self.poly(t, coeffs);
        self.fma(u, p, u)
    }

    /// `G(u) = u·e^{u²}·erfc(u)/√2` for 0.49 ≤ u ≤ 10.3 (f32) / 27.3 (f64), given
    /// `d = u − ERFC_CEN` and `v = 1/u²`: a polynomial in d below ERFC_U1, in v above.
    #[inline(always)]
    fn erfc_g(&mut self, u: Self::V, d: Self::V, v: Self::V) -> Self::V {
        let (u1, near, far): (f64, &[f64], &[f64]) = if self.wide() {
            (ERFC_U1_F64, &ERFC_NEAR_F64, &ERFC_FAR_F64)
        } else {
            (ERFC_U1_F32, &ERFC_NEAR_F32, &ERFC_FAR_F32)
        };
        let g_near = self.poly(d, near);
        let g_far = self.poly(v, far);
        let u1 = self.c(u1);
        let is_near = self.cmp(FloatCC::LessThan, u, u1);
        self.sel(is_near, g_near, g_far)
    }

    /// `a·b` exactly, as `hi + lo` (FMA, or Dekker's product with Veltkamp's splits). The
    /// operands must be small enough for the splits not to overflow.
    #[inline(always)]
    fn two_prod(&mut self, a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        let h = self.mul(a, b);
        if self.has_fma() {
            let nh = self.neg(h);
            let l = self.fma_native(a, b, nh);
            (h, l)
        } else {
            let (ah, al) = self.split(a);
            let (bh, bl) = self.split(b);
            let hh = self.mul(ah, bh);
            let e1 = self.sub(hh, h);
            let hl = self.mul(ah, bl);
            let e2 = self.add(e1, hl);
            let lh = self.mul(al, bh);
            let e3 = self.add(e2, lh);
            let ll = self.mul(al, bl);
            (h, self.add(e3, ll))
        }
    }

    /// `a + b` exactly, as `hi + lo` (Knuth's TwoSum).
    #[inline(always)]
    fn two_sum(&mut self, a: Self::V, b: Self::V) -> (Self::V, Self::V) {
        let s = self.add(a, b);
        let bb = self.sub(s, a);
        let ab = self.sub(s, bb);
        let da = self.sub(a, ab);
        let db = self.sub(b, bb);
        (s, self.add(da, db))
    }

    /// Veltkamp's split of `a` into two halves of at most 12 (f32) / 26 (f64) bits.
    #[inline(always)]
    fn split(&mut self, a: Self::V) -> (Self::V, Self::V) {
        let k = self.c(if self.wide() { 134217729.0 } else { 4097.0 });
        let c = self.mul(k, a);
        let d = self.sub(c, a);
        let ah = self.sub(c, d);
        let al = self.sub(a, ah);
        (ah, al)
    }
}
