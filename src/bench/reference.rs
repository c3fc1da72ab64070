//! The bench's two reference rows: what the machine can do at all, measured in the same run.
//!
//! * `memcpy`: a copy of 2^25 f32 (128 MiB) into a second buffer, split across rayon's threads;
//!   bandwidth counts the bytes read plus the bytes written.
//! * `sgemm_2048`: one 2048×2048 by 2048×2048 f32 product through the `gemm` crate, via the
//!   runtime's own wrapper (`gemm_strided`, with the threading the runtime would pick).

use rayon::prelude::*;
use tracegrad_runtime::kernels::matmul::{gemm_parallelism, gemm_strided};
use tracegrad_runtime::Generator;

use super::{time_calls, CountingAlloc, Times};

/// How big the reference rows are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceSize {
    /// DESIGN.md's sizes: memcpy of 2^25 f32, sgemm 2048³.
    Full,
    /// Quick sizes for tests: memcpy of 2^20 f32, sgemm 256³ (the row is then `sgemm_256`).
    Small,
}

impl ReferenceSize {
    /// Elements the memcpy row copies.
    pub fn memcpy_len(self) -> usize {
        match self {
            ReferenceSize::Full => 1 << 25,
            ReferenceSize::Small => 1 << 20,
        }
    }

    /// The sgemm row's matrix size.
    pub fn sgemm_n(self) -> usize {
        match self {
            ReferenceSize::Full => 2048,
            ReferenceSize::Small => 256,
        }
    }
}

/// The widest x86 vector extension the kernels use: the CPU's widest (`avx512` for AVX-512F,
/// `avx2` or `sse`), or `avx2` on an AVX-512 CPU capped by `TRACEGRAD_ISA=avx2` in a build
/// without the `gemm-avx512` feature. Where gemm's width differs from the kernels' on an
/// AVX-512 CPU, both are named: `avx2+gemm-avx512` (capped, feature on) or
/// `avx512+gemm-avx2` (not capped, feature off). On other architectures, the architecture's
/// name.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            let capped = tracegrad_jit::lanes::Width::cap() < tracegrad_jit::lanes::Width::Avx512;
            match (capped, cfg!(feature = "gemm-avx512")) {
                (false, true) => "avx512",
                (false, false) => "avx512+gemm-avx2",
                (true, true) => "avx2+gemm-avx512",
                (true, false) => "avx2",
            }
        } else if std::arch::is_x86_feature_detected!("avx2") {
            "avx2"
        } else {
            "sse"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
}

/// Elements per rayon task in the copy (1 MiB of f32).
const COPY_CHUNK: usize = 1 << 18;

/// Times `iters` copies (after two untimed ones that also fault the pages in); returns the
/// timings, GB/s at the median (read + write bytes) and the peak heap bytes of one copy.
pub fn memcpy_gbps(size: ReferenceSize, iters: usize) -> (Times, f64, Option<u64>) {
    let n = size.memcpy_len();
    // The values do not matter to a copy; a ramp is cheap to make and never all zeros.
    let src: Vec<f32> = (0..n).map(|i| (i % 4096) as f32).collect();
    let mut dst = vec![0f32; n];
    let mut copy = || {
        dst.par_chunks_mut(COPY_CHUNK).zip(src.par_chunks(COPY_CHUNK)).for_each(|(d, s)| d.copy_from_slice(s));
    };
    copy();
    copy();
    let ((), peak) = CountingAlloc::measure(&mut copy);
    let times = Times::of(
        &time_calls(iters.max(1), || -> Result<(), ()> {
            copy();
            Ok(())
        })
        .expect("copying cannot fail"),
    );
    std::hint::black_box(&dst);
    let bytes = 2.0 * (n * std::mem::size_of::<f32>()) as f64;
    (times, bytes / (times.median_ms * 1e-3) / 1e9, peak)
}

/// Times `iters` n×n×n f32 products (after one untimed); returns the timings, GFLOP/s at the
/// median (2n³ per product) and the peak heap bytes of one product.
pub fn sgemm_gflops(size: ReferenceSize, iters: usize) -> (Times, f64, Option<u64>) {
    let n = size.sgemm_n();
    let mut g = Generator::new(3);
    let mut randn = || -> Vec<f32> { g.normal(n * n, 0.0, 1.0).into_iter().map(|v| v as f32).collect() };
    let (a, b) = (randn(), randn());
    let mut c = vec![0f32; n * n];
    let par = gemm_parallelism(n, n, n);
    let ni = n as isize;
    let mut product = || gemm_strided(n, n, n, &mut c, false, &a, ni, 1, &b, ni, 1, par);
    product();
    let ((), peak) = CountingAlloc::measure(&mut product);
    let times = Times::of(
        &time_calls(iters.max(1), || -> Result<(), ()> {
            product();
            Ok(())
        })
        .expect("a product cannot fail"),
    );
    std::hint::black_box(&c);
    let flop = 2.0 * (n as f64).powi(3);
    (times, flop / (times.median_ms * 1e-3) / 1e9, peak)
}
