//! [`crate::math`]'s functions on slices of Rust `f32`/`f64`, at the machine's full vector
//! width.
//!
//! The algorithms are written once, over `math::Arith`: the JIT emits them as Cranelift IR
//! (128-bit vectors, the widest Cranelift's x64 backend lowers), and here the same generic code
//! runs on Rust scalars inside loops that rustc compiles three times, for AVX-512 (16 f32
//! lanes), AVX2 (8 lanes) and plain x86-64, picked at run time ([`Width::native`]). Each operation is an
//! exactly rounded IEEE operation or bit manipulation, and the fused multiply-add is used
//! exactly when the JIT uses it ([`crate::math::MathCtx::native`]), so every width gives the
//! JIT's results bit for bit, with the same documented error bounds (`jit/tests/math.rs`
//! checks both).
//!
//! Eager mode evaluates the transcendental unary ops here ([`eval_unary`]), and on machines
//! wider than 128 bits the JIT's kernels call [`kernel_entry`] for theirs (pointwise kernels a
//! tile at a time, row kernels a row at a time, where the call also subtracts a row constant
//! from the operand and returns the row's sum in the kernel's own order), so eager and
//! compiled mode share one math library at the machine's full width. A row kernel's last
//! sweep of the form `((x − c) ∘ p)·w + b` (layer_norm's normalize, softmax's scaling) runs
//! here too, through [`affine_entry`]: plain IEEE steps in the kernel's order, so the same bits.

use cranelift_codegen::ir::condcodes::FloatCC;
use std::mem::MaybeUninit;
use tracegrad_compiler::ops::{Op, UnaryOp};
use tracegrad_runtime::{Buffer, DType, Data};

use crate::math::{self, Arith};

/// A function of [`crate::math`] that the lanes evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Func {
    /// `e^x`.
    Exp,
    /// `ln x`.
    Log,
    /// `tanh x`.
    Tanh,
    /// `1/(1 + e^{−x})`.
    Sigmoid,
    /// `x·sigmoid(x)`.
    Silu,
    /// `erf x`.
    Erf,
    /// Exact GELU.
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    /// `e^x · 2^p`, with `p` the call's parameter (an integer, the same for every element):
    /// [`crate::math::exp_scaled`], the exponential of softmax's row kernels.
    ExpScaled,
}

impl Func {
    /// Every function.
    pub const ALL: [Func; 9] = [
        Func::Exp,
        Func::Log,
        Func::Tanh,
        Func::Sigmoid,
        Func::Silu,
        Func::Erf,
        Func::Gelu,
        Func::GeluTanh,
        Func::ExpScaled,
    ];

    /// The function computing `op`, if it is one of them ([`Func::ExpScaled`] is no unary op).
    pub fn of(op: UnaryOp) -> Option<Func> {
        Some(match op {
            UnaryOp::Exp => Func::Exp,
            UnaryOp::Log => Func::Log,
            UnaryOp::Tanh => Func::Tanh,
            UnaryOp::Sigmoid => Func::Sigmoid,
            UnaryOp::Silu => Func::Silu,
            UnaryOp::Erf => Func::Erf,
            UnaryOp::Gelu => Func::Gelu,
            UnaryOp::GeluTanh => Func::GeluTanh,
            _ => return None,
        })
    }
}

/// A compiled path.
/// Ordered narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Width {
    /// Plain x86-64 (SSE2) without FMA: what the JIT computes without FMA.
    Plain,
    /// 128-bit with FMA (the JIT's own width and rounding).
    Fma128,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512F with FMA: 16 f32 lanes.
    Avx512,
}

impl Width {
    /// Every path, narrowest first.
    pub const ALL: [Width; 4] = [Width::Plain, Width::Fma128, Width::Avx2, Width::Avx512];

    /// Whether this machine can run the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let fma = std::arch::is_x86_feature_detected!("fma");
            match self {
                Width::Plain => true,
                Width::Fma128 => fma,
                Width::Avx2 => fma && std::arch::is_x86_feature_detected!("avx2"),
                Width::Avx512 => fma && std::arch::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Width::Plain
        }
    }

    /// Whether the path fuses multiply-adds (all but [`Width::Plain`]).
    pub fn has_fma(self) -> bool {
        self != Width::Plain
    }

    /// The widest path this machine runs, up to [`Width::cap`]; its rounding is the JIT's
    /// (FMA exactly when the JIT's [`crate::math::MathCtx::native`] has it).
    pub fn native() -> Width {
        static NATIVE: std::sync::OnceLock<Width> = std::sync::OnceLock::new();
        *NATIVE.get_or_init(|| {
            let cap = Width::cap();
            Width::ALL.into_iter().rev().find(|&w| w <= cap && w.supported()).unwrap_or(Width::Plain)
        })
    }

    /// The widest path this process may use: [`Width::Avx2`] when `TRACEGRAD_ISA=avx2` is in
    /// the environment (an AVX-512 machine then runs its kernels as an AVX2 machine would:
    /// the lanes at 256 bits and Cranelift without AVX-512 encodings), [`Width::Avx512`] when
    /// it is unset or `avx512`.
    ///
    /// # Panics
    /// On any other value of `TRACEGRAD_ISA` (programs check [`Width::env_cap`] first).
    pub fn cap() -> Width {
        static CAP: std::sync::OnceLock<Width> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| Width::env_cap().unwrap_or_else(|e| panic!("{e}")))
    }

    /// [`Width::cap`] as `TRACEGRAD_ISA` gives it, or why the value is not one.
    pub fn env_cap() -> Result<Width, String> {
        match std::env::var("TRACEGRAD_ISA") {
            Err(std::env::VarError::NotPresent) => Ok(Width::Avx512),
            Err(e) => Err(format!("TRACEGRAD_ISA: {e}")),
            Ok(v) => match v.to_ascii_lowercase().as_str() {
                "avx512" => Ok(Width::Avx512),
                "avx2" => Ok(Width::Avx2),
                _ => Err(format!("TRACEGRAD_ISA={v:?}: expected avx2 or avx512, or leave it unset")),
            },
        }
    }
}

/// The [`Arith`] backend on Rust values: `f32` (or `f64`) lanes, their bits as `u32`
/// (`u64`), masks as `bool`. `FMA` selects fused multiply-adds.
#[derive(Clone, Copy, Default)]
struct Lane<T, const FMA: bool>(std::marker::PhantomData<T>);

macro_rules! lane_arith {
    ($t:ty, $i:ty, $wide:expr) => {
        impl<const FMA: bool> Arith for Lane<$t, FMA> {
            type V = $t;
            type I = $i;
            type M = bool;

            #[inline(always)]
            fn wide(&self) -> bool {
                $wide
            }
            #[inline(always)]
            fn has_fma(&self) -> bool {
                FMA
            }
            #[inline(always)]
            fn c(&mut self, v: f64) -> $t {
                v as $t
            }
            #[inline(always)]
            fn ci(&mut self, v: u64) -> $i {
                v as $i
            }
            #[inline(always)]
            fn add(&mut self, a: $t, b: $t) -> $t {
                a + b
            }
            #[inline(always)]
            fn sub(&mut self, a: $t, b: $t) -> $t {
                a - b
            }
            #[inline(always)]
            fn mul(&mut self, a: $t, b: $t) -> $t {
                a * b
            }
            #[inline(always)]
            fn div(&mut self, a: $t, b: $t) -> $t {
                a / b
            }
            #[inline(always)]
            fn fma_native(&mut self, a: $t, b: $t, c: $t) -> $t {
                a.mul_add(b, c)
            }
            #[inline(always)]
            fn neg(&mut self, a: $t) -> $t {
                -a
            }
            #[inline(always)]
            fn abs(&mut self, a: $t) -> $t {
                a.abs()
            }
            #[inline(always)]
            fn sqrt(&mut self, a: $t) -> $t {
                a.sqrt()
            }
            #[inline(always)]
            fn bits(&mut self, v: $t) -> $i {
                v.to_bits()
            }
            #[inline(always)]
            fn float(&mut self, i: $i) -> $t {
                <$t>::from_bits(i)
            }
            #[inline(always)]
            fn iadd(&mut self, a: $i, b: $i) -> $i {
                a.wrapping_add(b)
            }
            #[inline(always)]
            fn band(&mut self, a: $i, b: $i) -> $i {
                a & b
            }
            #[inline(always)]
            fn bor(&mut self, a: $i, b: $i) -> $i {
                a | b
            }
            #[inline(always)]
            fn bxor(&mut self, a: $i, b: $i) -> $i {
                a ^ b
            }
            #[inline(always)]
            fn shl(&mut self, a: $i, n: u32) -> $i {
                a << n
            }
            #[inline(always)]
            fn shr(&mut self, a: $i, n: u32) -> $i {
                a >> n
            }
            #[inline(always)]
            fn cmp(&mut self, cc: FloatCC, a: $t, b: $t) -> bool {
                match cc {
                    FloatCC::LessThan => a < b,
                    FloatCC::GreaterThan => a > b,
                    FloatCC::Equal => a == b,
                    _ => unreachable!("math uses <, > and == only"),
                }
            }
            #[inline(always)]
            fn mand(&mut self, a: bool, b: bool) -> bool {
                a & b
            }
            #[inline(always)]
            fn sel(&mut self, mask: bool, a: $t, b: $t) -> $t {
                if mask {
                    a
                } else {
                    b
                }
            }
        }
    };
}

lane_arith!(f32, u32, false);
lane_arith!(f64, u64, true);

/// `y[i] = f(x[i] − c)` (with parameter `p`) through backend `A`, written so that the loop
/// vectorizes at the width of the function it is inlined into. Every element of `y` is written.
/// `c` is `None` for a plain call, whose loop then has no subtraction (`x[i] − (+0)` is `x[i]`
/// exactly, −0 included; the one instruction is worth 5–9 % of a transcendental's loop).
#[inline(always)]
fn map<A: Arith + Default>(f: Func, x: &[A::V], c: Option<A::V>, p: A::V, y: &mut [MaybeUninit<A::V>])
where
    A::V: std::ops::Sub<Output = A::V>,
{
    macro_rules! each {
        ($g:expr) => {
            match c {
                None => {
                    for (a, b) in x.iter().zip(y.iter_mut()) {
                        b.write($g(&mut A::default(), *a));
                    }
                }
                Some(c) => {
                    for (a, b) in x.iter().zip(y.iter_mut()) {
                        b.write($g(&mut A::default(), *a - c));
                    }
                }
            }
        };
    }
    match f {
        Func::Exp => each!(math::exp_g),
        Func::Log => each!(math::log_g),
        Func::Tanh => each!(math::tanh_g),
        Func::Sigmoid => each!(math::sigmoid_g),
        Func::Silu => each!(math::silu_g),
        Func::Erf => each!(math::erf_g),
        Func::Gelu => each!(math::gelu_g),
        Func::GeluTanh => each!(math::gelu_tanh_g),
        Func::ExpScaled => each!(|e: &mut A, v| math::exp_scaled_g(e, v, p)),
    }
}

/// The sum of `y` in exactly the order a row kernel's sweep adds it up, so that a kernel can
/// take a lane call's sum instead of running its own loop, bit for bit: `unroll` vector
/// accumulators of `lanes` lanes (128 bits) take element `j` into partial `j mod
/// (lanes·unroll)` while whole unrolled steps fit; single vector steps then add into the
/// first accumulator, and a scalar accumulator takes the rest. At the end the vector
/// accumulators are added in order, and their lanes, in order, into the scalar one.
#[inline(always)]
fn kernel_sum<T, const LANES: usize, const N: usize>(y: &[T], whole: impl FnOnce(&[T]) -> [T; N]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T>,
{
    let split = y.len() / N * N;
    let mut part = whole(&y[..split]);
    let mut vectors = y[split..].chunks_exact(LANES);
    for chunk in &mut vectors {
        for l in 0..LANES {
            part[l] = part[l] + chunk[l];
        }
    }
    let mut s = T::default();
    for &v in vectors.remainder() {
        s = s + v;
    }
    for l in 0..LANES {
        let mut v = part[l];
        for u in 1..N / LANES {
            v = v + part[u * LANES + l];
        }
        s = s + v;
    }
    s
}

/// The `N` partial sums of [`kernel_sum`] over `y` (whole chunks of `N`), lane by lane.
#[inline(always)]
fn partials<T, const N: usize>(y: &[T]) -> [T; N]
where
    T: Copy + Default + std::ops::Add<Output = T>,
{
    let mut part = [T::default(); N];
    for chunk in y.chunks_exact(N) {
        for (p, &v) in part.iter_mut().zip(chunk) {
            *p = *p + v;
        }
    }
    part
}

/// [`partials`] in `REGS` registers of `W` lanes through intrinsics: rustc keeps the
/// portable loop's partials in memory, or splits them in 64-bit pieces.
macro_rules! wide_partials {
    ($name:ident, $t:ty, $feature:literal, $vt:ty, $regs:expr, $w:expr, $load:ident, $store:ident, $zero:ident, $add:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        fn $name(y: &[$t]) -> [$t; $regs * $w] {
            use std::arch::x86_64::{$add, $load, $store, $zero};
            let mut acc: [$vt; $regs] = [$zero(); $regs];
            for chunk in y.chunks_exact($regs * $w) {
                for (k, a) in acc.iter_mut().enumerate() {
                    // SAFETY: the chunk holds `REGS·W` elements; the load is unaligned.
                    *a = $add(*a, unsafe { $load(chunk.as_ptr().add(k * $w)) });
                }
            }
            let mut out = [0.0; $regs * $w];
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: `out` has room for `REGS·W` elements; the store is unaligned.
                unsafe { $store(out.as_mut_ptr().add(k * $w), *a) };
            }
            out
        }
    };
}

wide_partials!(
    partials_avx512_f32,
    f32,
    "avx512f",
    std::arch::x86_64::__m512,
    4 * ROW_UNROLL / 16,
    16,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_setzero_ps,
    _mm512_add_ps
);
wide_partials!(
    partials_avx512_f64,
    f64,
    "avx512f",
    std::arch::x86_64::__m512d,
    2 * ROW_UNROLL / 8,
    8,
    _mm512_loadu_pd,
    _mm512_storeu_pd,
    _mm512_setzero_pd,
    _mm512_add_pd
);
wide_partials!(
    partials_avx2_f32,
    f32,
    "avx",
    std::arch::x86_64::__m256,
    4 * ROW_UNROLL / 8,
    8,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_setzero_ps,
    _mm256_add_ps
);
wide_partials!(
    partials_avx2_f64,
    f64,
    "avx",
    std::arch::x86_64::__m256d,
    2 * ROW_UNROLL / 4,
    4,
    _mm256_loadu_pd,
    _mm256_storeu_pd,
    _mm256_setzero_pd,
    _mm256_add_pd
);

macro_rules! paths {
    ($t:ty, $lanes:expr, $plain:ident, $fma128:ident, $avx2:ident, $avx512:ident, $p_avx2:ident, $p_avx512:ident) => {
        /// `y = f(x − c)` (`y = f(x)` without `c`), and with `sum` the kernel-order sum of `y`
        /// ([`kernel_sum`]).
        fn $plain(f: Func, x: &[$t], c: Option<$t>, p: $t, y: &mut [MaybeUninit<$t>], sum: bool) -> $t {
            map::<Lane<$t, false>>(f, x, c, p, y);
            if sum {
                kernel_sum::<$t, $lanes, { $lanes * ROW_UNROLL }>(written(y), partials)
            } else {
                0.0
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "fma")]
        fn $fma128(f: Func, x: &[$t], c: Option<$t>, p: $t, y: &mut [MaybeUninit<$t>], sum: bool) -> $t {
            map::<Lane<$t, true>>(f, x, c, p, y);
            if sum {
                kernel_sum::<$t, $lanes, { $lanes * ROW_UNROLL }>(written(y), partials)
            } else {
                0.0
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2(f: Func, x: &[$t], c: Option<$t>, p: $t, y: &mut [MaybeUninit<$t>], sum: bool) -> $t {
            map::<Lane<$t, true>>(f, x, c, p, y);
            if sum {
                kernel_sum::<$t, $lanes, { $lanes * ROW_UNROLL }>(written(y), |y| $p_avx2(y))
            } else {
                0.0
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,fma")]
        fn $avx512(f: Func, x: &[$t], c: Option<$t>, p: $t, y: &mut [MaybeUninit<$t>], sum: bool) -> $t {
            map::<Lane<$t, true>>(f, x, c, p, y);
            if sum {
                kernel_sum::<$t, $lanes, { $lanes * ROW_UNROLL }>(written(y), |y| $p_avx512(y))
            } else {
                0.0
            }
        }
    };
}

/// A row kernel's unrolled vector accumulators ([`crate::codegen`]'s `ROW_UNROLL`).
const ROW_UNROLL: usize = crate::codegen::ROW_UNROLL as usize;

/// `y` once [`map`] has written every element.
#[inline(always)]
fn written<T>(y: &[MaybeUninit<T>]) -> &[T] {
    // SAFETY: called only after `map`, which writes every element of `y`; `MaybeUninit<T>`
    // has `T`'s layout.
    unsafe { &*(y as *const [MaybeUninit<T>] as *const [T]) }
}

paths!(f32, 4, plain_f32, fma128_f32, avx2_f32, avx512_f32, partials_avx2_f32, partials_avx512_f32);
paths!(f64, 2, plain_f64, fma128_f64, avx2_f64, avx512_f64, partials_avx2_f64, partials_avx512_f64);

/// A float type the lanes handle.
pub trait LaneFloat: Copy {
    /// `y = f(x)` elementwise on path `w`, with parameter `p` (read by [`Func::ExpScaled`]
    /// only), writing every element of `y` (which need not be initialised).
    ///
    /// # Panics
    /// If `x` and `y` differ in length, or this machine cannot run `w`.
    fn apply_with_uninit_at(f: Func, w: Width, x: &[Self], p: f64, y: &mut [MaybeUninit<Self>]) {
        Self::shifted_at(f, w, x, 0.0, p, y, false);
    }

    /// `y = f(x − c)` elementwise on path `w`, with parameter `p`, writing every element of
    /// `y`; with `sum`, returns the sum of `y` added up in the order of a row kernel's sweep
    /// (`ROW_UNROLL` accumulators of 128 bits), else 0.
    ///
    /// # Panics
    /// As [`LaneFloat::apply_with_uninit_at`].
    fn shifted_at(f: Func, w: Width, x: &[Self], c: f64, p: f64, y: &mut [MaybeUninit<Self>], sum: bool) -> f64;

    /// `y = f(x)` elementwise on path `w` (parameter 0), writing every element of `y` (which
    /// need not be initialised).
    ///
    /// # Panics
    /// As [`LaneFloat::apply_with_uninit_at`].
    fn apply_uninit_at(f: Func, w: Width, x: &[Self], y: &mut [MaybeUninit<Self>]) {
        Self::apply_with_uninit_at(f, w, x, 0.0, y)
    }

    /// `y = f(x)` elementwise on path `w`, with parameter `p`.
    ///
    /// # Panics
    /// As [`LaneFloat::apply_with_uninit_at`].
    fn apply_with_at(f: Func, w: Width, x: &[Self], p: f64, y: &mut [Self]) {
        // SAFETY: `MaybeUninit<T>` has `T`'s layout, and the callee only writes initialised
        // values of `T` through the view.
        let y = unsafe { &mut *(y as *mut [Self] as *mut [MaybeUninit<Self>]) };
        Self::apply_with_uninit_at(f, w, x, p, y)
    }

    /// `y = f(x)` elementwise on path `w`.
    ///
    /// # Panics
    /// As [`LaneFloat::apply_uninit_at`].
    fn apply_at(f: Func, w: Width, x: &[Self], y: &mut [Self]) {
        Self::apply_with_at(f, w, x, 0.0, y)
    }
}

macro_rules! lane_float {
    ($t:ty, $plain:ident, $fma128:ident, $avx2:ident, $avx512:ident) => {
        impl LaneFloat for $t {
            fn shifted_at(f: Func, w: Width, x: &[$t], c: f64, p: f64, y: &mut [MaybeUninit<$t>], sum: bool) -> f64 {
                assert_eq!(x.len(), y.len(), "lanes: input and output lengths differ");
                assert!(w.supported(), "lanes: this machine cannot run the {w:?} path");
                let (c, p) = (c as $t, p as $t);
                // A plain call (c = +0) runs the loop without the subtraction (see `map`).
                let c = (c.to_bits() != 0).then_some(c);
                let s = match w {
                    Width::Plain => $plain(f, x, c, p, y, sum),
                    // SAFETY: `w.supported()` checked that the CPU has every feature the path
                    // was compiled for.
                    #[cfg(target_arch = "x86_64")]
                    Width::Fma128 => unsafe { $fma128(f, x, c, p, y, sum) },
                    // SAFETY: as above.
                    #[cfg(target_arch = "x86_64")]
                    Width::Avx2 => unsafe { $avx2(f, x, c, p, y, sum) },
                    // SAFETY: as above.
                    #[cfg(target_arch = "x86_64")]
                    Width::Avx512 => unsafe { $avx512(f, x, c, p, y, sum) },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => unreachable!("only the plain path is supported here"),
                };
                f64::from(s)
            }
        }
    };
}

lane_float!(f32, plain_f32, fma128_f32, avx2_f32, avx512_f32);
lane_float!(f64, plain_f64, fma128_f64, avx2_f64, avx512_f64);

/// `y = f(x)` elementwise at this machine's full width ([`Width::native`]).
///
/// # Panics
/// If `x` and `y` differ in length.
pub fn apply<T: LaneFloat>(f: Func, x: &[T], y: &mut [T]) {
    T::apply_at(f, Width::native(), x, y)
}

/// Elements per parallel chunk of [`eval_unary`] (and the size from which it splits).
const CHUNK: usize = 1 << 14;

/// Evaluates `op` on `inputs` here if it is a unary function of [`Func`] on f32 or f64, at the
/// native width (split over the runtime's team from `2·CHUNK` elements); `None` for anything else (the
/// caller runs the op's reference kernel).
pub fn eval_unary(op: &Op, inputs: &[&Buffer]) -> Option<Buffer> {
    let Op::Unary(u) = op else { return None };
    let f = Func::of(*u)?;
    let [x] = inputs else { return None };
    /// `f` of `v` into `out`'s spare capacity (fresh or pooled storage, no memset).
    fn run<T: LaneFloat + Send + Sync>(f: Func, v: &[T], out: &mut Vec<T>) {
        let w = Width::native();
        let spare = &mut out.spare_capacity_mut()[..v.len()];
        if v.len() >= 2 * CHUNK {
            tracegrad_runtime::team::for_each_chunk_mut(spare, CHUNK, &|i, o| {
                T::apply_uninit_at(f, w, &v[i * CHUNK..i * CHUNK + o.len()], o)
            });
        } else {
            T::apply_uninit_at(f, w, v, spare);
        }
        // SAFETY: `apply_uninit_at` wrote all `v.len()` elements of the spare capacity.
        unsafe { out.set_len(v.len()) };
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        return None;
    }
    let mut data = Data::with_capacity(x.dtype(), x.numel());
    match (x.data(), &mut data) {
        (Data::F32(v), Data::F32(out)) => run(f, v, out),
        (Data::F64(v), Data::F64(out)) => run(f, v, out),
        _ => return None,
    }
    Some(Buffer::new(data, x.shape()))
}

static KERNEL_CALLS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether kernels compiled from now on hand their transcendentals to the lanes (on machines
/// wider than 128 bits): on unless `TRACEGRAD_JIT_LANES=0`, or switched by
/// [`set_kernel_calls`].
pub fn kernel_calls() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| std::env::var("TRACEGRAD_JIT_LANES").map_or(true, |v| v != "0"))
        && KERNEL_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Switches [`kernel_calls`] for kernels compiled later (tests compare both ways).
pub fn set_kernel_calls(on: bool) {
    KERNEL_CALLS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// [`kernel_code`]'s flag: the call returns the kernel-order sum of what it writes.
pub const CODE_SUM: i64 = 1 << 8;

/// The `code` argument of [`kernel_entry`] for `f` in f32 or f64 (add [`CODE_SUM`] for the
/// sum).
pub fn kernel_code(f: Func, f64: bool) -> i64 {
    let i = Func::ALL.iter().position(|&g| g == f).expect("every Func is in ALL") as i64;
    i + if f64 { Func::ALL.len() as i64 } else { 0 }
}

/// The function a JIT kernel calls (through an address constant) for a tile or a row: `dst[i] =
/// f(src[i] − c)` for `i < n`, with parameter `p` (`c` and `p` exactly representable in the
/// precision), `f` and the precision given by `code` ([`kernel_code`]), at the native width.
/// With [`CODE_SUM`] in `code` it returns the sum of `dst` in the order a row kernel's sweep
/// adds it up (`ROW_UNROLL` accumulators of 128 bits), else 0.
///
/// First it asks the cache for the `n` elements' bytes at each of the `ahead_count` addresses
/// at `ahead` (a pointwise kernel's outputs a few tiles on: see [`crate::codegen`]'s
/// `PREFETCH_TILES`); the addresses are hints, read by no access, so any value will do.
///
/// # Safety
/// `src` must point to `n` initialised elements of the precision and `dst` to room for `n`
/// elements, not overlapping `src`; `ahead` must point to `ahead_count` readable `usize`s
/// (any pointer when it is 0); `code` must come from [`kernel_code`].
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kernel_entry(
    code: i64,
    src: *const u8,
    dst: *mut u8,
    n: i64,
    ahead: *const usize,
    ahead_count: i64,
    c: f64,
    p: f64,
) -> f64 {
    let k = Func::ALL.len();
    let sum = code & CODE_SUM != 0;
    let code = (code & !CODE_SUM) as usize;
    let (i, f64) = (code % k, code >= k);
    let (f, w, n) = (Func::ALL[i], Width::native(), n as usize);
    if ahead_count > 0 {
        // SAFETY: the caller's contract: `ahead_count` addresses at `ahead`.
        let at = unsafe { std::slice::from_raw_parts(ahead, ahead_count as usize) };
        let bytes = n * if f64 { 8 } else { 4 };
        for &a in at {
            prefetch(a, bytes);
        }
    }
    if f64 {
        // SAFETY: the caller's contract: `n` f64 elements at `src`, room for `n` at `dst`,
        // disjoint.
        let (x, y) = unsafe {
            (std::slice::from_raw_parts(src.cast::<f64>(), n), std::slice::from_raw_parts_mut(dst.cast(), n))
        };
        f64::shifted_at(f, w, x, c, p, y, sum)
    } else {
        // SAFETY: as above, for f32.
        let (x, y) = unsafe {
            (std::slice::from_raw_parts(src.cast::<f32>(), n), std::slice::from_raw_parts_mut(dst.cast(), n))
        };
        f32::shifted_at(f, w, x, c, p, y, sum)
    }
}

/// [`affine_entry`]'s code: `t = x − c` first.
pub const AFFINE_SUB_C: i64 = 1;
/// [`affine_entry`]'s code: then `t = t · p`.
pub const AFFINE_MUL_P: i64 = 2;
/// [`affine_entry`]'s code: then `t = t / p`.
pub const AFFINE_DIV_P: i64 = 4;
/// [`affine_entry`]'s code: then `t = t − p`.
pub const AFFINE_SUB_P: i64 = 8;
/// [`affine_entry`]'s code: then `t = t · w[i]`.
pub const AFFINE_W: i64 = 16;
/// [`affine_entry`]'s code: then `t = t + b[i]`.
pub const AFFINE_B: i64 = 32;
/// [`affine_entry`]'s code: the elements are f64 (else f32).
pub const AFFINE_F64: i64 = 64;

/// Elements [`affine_rows`] computes between two prefetches of the row ahead.
const AFFINE_CHUNK: usize = 64;

/// Asks the cache for the `bytes` bytes at address `at`: a hint, never an access (a prefetch
/// reads nothing the program sees and cannot fault, so any address will do).
#[inline(always)]
fn prefetch(at: usize, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let mut o = 0;
        while o < bytes {
            let line = std::ptr::without_provenance::<i8>(at.wrapping_add(o));
            // SAFETY: PREFETCHT0 is a hint: it loads no value and raises no fault, whatever
            // the address (Intel SDM, "PREFETCHh"); SSE is part of x86-64.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line) };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, bytes);
}

/// The steps of [`affine_entry`] over slices, each an IEEE operation in the order the code
/// gives (rustc contracts nothing into a fused multiply-add), so any width writes the bits a
/// row kernel's own sweep would. `w` and `b` are read only when asked for. With `ahead`
/// nonzero, each chunk of [`AFFINE_CHUNK`] elements first prefetches the same chunk of the
/// row at `ahead` (the row the kernel reads next), so that row streams in from the outer
/// caches while this one computes: a row of 4 KiB is one page, which the hardware prefetcher
/// does not cross.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn affine_rows<T, const SUB_C: bool, const OP: u8, const W: bool, const B: bool>(
    x: &[T],
    w: &[T],
    b: &[T],
    c: T,
    p: T,
    y: &mut [MaybeUninit<T>],
    ahead: usize,
) where
    T: Copy
        + std::ops::Add<Output = T>
        + std::ops::Sub<Output = T>
        + std::ops::Mul<Output = T>
        + std::ops::Div<Output = T>,
{
    let (w, b) = (if W { w } else { x }, if B { b } else { x });
    let step = |v: T, wv: T, bv: T| {
        let mut t = v;
        if SUB_C {
            t = t - c;
        }
        match OP {
            1 => t = t * p,
            2 => t = t / p,
            3 => t = t - p,
            _ => {}
        }
        if W {
            t = t * wv;
        }
        if B {
            t = t + bv;
        }
        t
    };
    let n = x.len();
    let (xc, xt) = x.as_chunks::<AFFINE_CHUNK>();
    let (wc, wt) = w[..n].as_chunks::<AFFINE_CHUNK>();
    let (bc, bt) = b[..n].as_chunks::<AFFINE_CHUNK>();
    let (yc, yt) = y[..n].as_chunks_mut::<AFFINE_CHUNK>();
    let bytes = AFFINE_CHUNK * std::mem::size_of::<T>();
    for (k, (((d, x), w), b)) in yc.iter_mut().zip(xc).zip(wc).zip(bc).enumerate() {
        if ahead != 0 {
            prefetch(ahead.wrapping_add(k * bytes), bytes);
        }
        for i in 0..AFFINE_CHUNK {
            d[i].write(step(x[i], w[i], b[i]));
        }
    }
    if ahead != 0 {
        prefetch(ahead.wrapping_add(xc.len() * bytes), std::mem::size_of_val(xt));
    }
    for (((d, &v), &wv), &bv) in yt.iter_mut().zip(xt).zip(wt).zip(bt) {
        d.write(step(v, wv, bv));
    }
}

/// [`affine_rows`] for the steps in `code`, each combination its own loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn affine_code<T>(code: i64, x: &[T], w: &[T], b: &[T], c: T, p: T, y: &mut [MaybeUninit<T>], ahead: usize)
where
    T: Copy
        + std::ops::Add<Output = T>
        + std::ops::Sub<Output = T>
        + std::ops::Mul<Output = T>
        + std::ops::Div<Output = T>,
{
    macro_rules! op {
        ($s:literal, $w:literal, $b:literal) => {
            if code & AFFINE_MUL_P != 0 {
                affine_rows::<T, $s, 1, $w, $b>(x, w, b, c, p, y, ahead)
            } else if code & AFFINE_DIV_P != 0 {
                affine_rows::<T, $s, 2, $w, $b>(x, w, b, c, p, y, ahead)
            } else if code & AFFINE_SUB_P != 0 {
                affine_rows::<T, $s, 3, $w, $b>(x, w, b, c, p, y, ahead)
            } else {
                affine_rows::<T, $s, 0, $w, $b>(x, w, b, c, p, y, ahead)
            }
        };
    }
    match (code & AFFINE_SUB_C != 0, code & AFFINE_W != 0, code & AFFINE_B != 0) {
        (false, false, false) => op!(false, false, false),
        (false, false, true) => op!(false, false, true),
        (false, true, false) => op!(false, true, false),
        (false, true, true) => op!(false, true, true),
        (true, false, false) => op!(true, false, false),
        (true, false, true) => op!(true, false, true),
        (true, true, false) => op!(true, true, false),
        (true, true, true) => op!(true, true, true),
    }
}

macro_rules! affine_paths {
    ($t:ty, $plain:ident, $avx2:ident, $avx512:ident) => {
        #[allow(clippy::too_many_arguments)]
        fn $plain(code: i64, x: &[$t], w: &[$t], b: &[$t], c: $t, p: $t, y: &mut [MaybeUninit<$t>], ahead: usize) {
            affine_code(code, x, w, b, c, p, y, ahead)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        fn $avx2(code: i64, x: &[$t], w: &[$t], b: &[$t], c: $t, p: $t, y: &mut [MaybeUninit<$t>], ahead: usize) {
            affine_code(code, x, w, b, c, p, y, ahead)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        fn $avx512(code: i64, x: &[$t], w: &[$t], b: &[$t], c: $t, p: $t, y: &mut [MaybeUninit<$t>], ahead: usize) {
            affine_code(code, x, w, b, c, p, y, ahead)
        }
    };
}

affine_paths!(f32, affine_plain_f32, affine_avx2_f32, affine_avx512_f32);
affine_paths!(f64, affine_plain_f64, affine_avx2_f64, affine_avx512_f64);

/// `y[i] = ((x[i] − c) ∘ p) · w[i] + b[i]` on path `wd`, each step present as `code` asks
/// ([`AFFINE_SUB_C`] … [`AFFINE_B`]; `∘` one of `·`, `/`, `−`), for `T` f32 or f64 as
/// `AFFINE_F64` says. `w` and `b` may be empty when not asked for. `ahead`, when not 0,
/// is the address of a row of `x.len()` elements to prefetch meanwhile (the row a kernel
/// reads next): only a hint to the cache, so it may be any address.
///
/// # Panics
/// If a slice asked for differs in length from `x`, `y` does, or this machine cannot run `wd`.
#[allow(clippy::too_many_arguments)]
pub fn affine_at<T: AffineFloat>(
    code: i64,
    wd: Width,
    x: &[T],
    w: &[T],
    b: &[T],
    c: f64,
    p: f64,
    y: &mut [MaybeUninit<T>],
    ahead: usize,
) {
    let n = x.len();
    assert_eq!(y.len(), n, "lanes: input and output lengths differ");
    assert!(code & AFFINE_W == 0 || w.len() == n, "lanes: the weight row's length differs");
    assert!(code & AFFINE_B == 0 || b.len() == n, "lanes: the bias row's length differs");
    assert!(wd.supported(), "lanes: this machine cannot run the {wd:?} path");
    T::affine(code, wd, x, w, b, c, p, y, ahead)
}

/// The float types of [`affine_at`].
pub trait AffineFloat: Sized {
    /// [`affine_at`] once its arguments are checked.
    #[allow(clippy::too_many_arguments)]
    fn affine(
        code: i64,
        wd: Width,
        x: &[Self],
        w: &[Self],
        b: &[Self],
        c: f64,
        p: f64,
        y: &mut [MaybeUninit<Self>],
        ahead: usize,
    );
}

macro_rules! affine_float {
    ($t:ty, $plain:ident, $avx2:ident, $avx512:ident) => {
        impl AffineFloat for $t {
            fn affine(
                code: i64,
                wd: Width,
                x: &[$t],
                w: &[$t],
                b: &[$t],
                c: f64,
                p: f64,
                y: &mut [MaybeUninit<$t>],
                ahead: usize,
            ) {
                let (c, p) = (c as $t, p as $t);
                match wd {
                    // SAFETY: `affine_at` checked that the CPU has every feature the path was
                    // compiled for.
                    #[cfg(target_arch = "x86_64")]
                    Width::Avx512 => unsafe { $avx512(code, x, w, b, c, p, y, ahead) },
                    // SAFETY: as above.
                    #[cfg(target_arch = "x86_64")]
                    Width::Avx2 => unsafe { $avx2(code, x, w, b, c, p, y, ahead) },
                    _ => $plain(code, x, w, b, c, p, y, ahead),
                }
            }
        }
    };
}

affine_float!(f32, affine_plain_f32, affine_avx2_f32, affine_avx512_f32);
affine_float!(f64, affine_plain_f64, affine_avx2_f64, affine_avx512_f64);

/// The function a row kernel calls (through an address constant) for its last sweep when
/// that sweep is one output of the form [`affine_at`] computes (layer_norm's
/// `((x − mean)·rstd)·w + b`, softmax's `e·(1/s)`, log_softmax's `(x − max) − log s`): a row
/// at this machine's full width, the same bits as the kernel's own sweep. `ahead` is the
/// kernel's next row of its row-major input, prefetched meanwhile, or null.
///
/// # Safety
/// `x` (and `w`, `b` where `code` asks for them) must point to `n` initialised elements of
/// the precision and `y` to room for `n`, not overlapping any of them (row kernels never
/// write an output over an input: see `exec::memory`). `ahead` is never read, only
/// prefetched, and may be any address (null for none).
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn affine_entry(
    code: i64,
    x: *const u8,
    w: *const u8,
    b: *const u8,
    y: *mut u8,
    n: i64,
    c: f64,
    p: f64,
    ahead: *const u8,
) {
    let n = n as usize;
    macro_rules! run {
        ($t:ty) => {{
            // SAFETY: the caller's contract: `n` elements at `x` (and at `w`, `b` when asked
            // for; otherwise no slice is formed from them), room for `n` at `y`, disjoint.
            let (x, w, b, y) = unsafe {
                (
                    std::slice::from_raw_parts(x.cast::<$t>(), n),
                    if code & AFFINE_W != 0 { std::slice::from_raw_parts(w.cast::<$t>(), n) } else { &[] },
                    if code & AFFINE_B != 0 { std::slice::from_raw_parts(b.cast::<$t>(), n) } else { &[] },
                    std::slice::from_raw_parts_mut(y.cast::<MaybeUninit<$t>>(), n),
                )
            };
            affine_at::<$t>(code, Width::native(), x, w, b, c, p, y, ahead as usize)
        }};
    }
    if code & AFFINE_F64 != 0 {
        run!(f64)
    } else {
        run!(f32)
    }
}
