//! Eager-mode benchmarks (criterion): the two workloads of the foundation acceptance line.
//!
//! * `eager/matmul_1024`: f32 `[1024,1024] @ [1024,1024]`. Throughput is declared as
//!   `2·1024³` elements, so criterion's `Gelem/s` reads directly as GFLOP/s.
//! * `eager/pointwise_chain_2^24`: `y = tanh(a*x+b)*sigmoid(x)+0.5*x` on three f32 vectors of
//!   2^24 standard-normal elements (fixed seed); throughput is elements of `y` per second.
//!
//! Run with `cargo bench --bench eager` (about a minute on two cores). Peers (numpy, JAX) for
//! the same workloads live in `benches/peers/`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use tracegrad::{Generator, Tensor};

const MATMUL_N: usize = 1024;
const CHAIN_LEN: usize = 1 << 24;

fn chain(a: &Tensor, x: &Tensor, b: &Tensor) -> Tensor {
    (a * x + b).tanh() * x.sigmoid() + x.mul_scalar(0.5)
}

fn bench_matmul(c: &mut Criterion) {
    let mut g = Generator::new(0);
    let a = Tensor::randn_with(&mut g, &[MATMUL_N, MATMUL_N]);
    let b = Tensor::randn_with(&mut g, &[MATMUL_N, MATMUL_N]);
    let mut group = c.benchmark_group("eager");
    group.sample_size(20).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(2 * (MATMUL_N as u64).pow(3)));
    group.bench_function("matmul_1024", |bench| bench.iter(|| black_box(black_box(&a).matmul(black_box(&b)))));
    group.finish();
}

fn bench_pointwise_chain(c: &mut Criterion) {
    let mut g = Generator::new(1);
    let x = Tensor::randn_with(&mut g, &[CHAIN_LEN]);
    let a = Tensor::randn_with(&mut g, &[CHAIN_LEN]);
    let b = Tensor::randn_with(&mut g, &[CHAIN_LEN]);
    // A cheap spot check so the benchmark cannot silently time a wrong computation.
    let y = chain(&a, &x, &b);
    let (xv, av, bv, yv) = (x.to_vec_f32(), a.to_vec_f32(), b.to_vec_f32(), y.to_vec_f32());
    for i in (0..CHAIN_LEN).step_by(CHAIN_LEN / 64) {
        let (xi, ai, bi) = (xv[i] as f64, av[i] as f64, bv[i] as f64);
        let want = (ai * xi + bi).tanh() / (1.0 + (-xi).exp()) + 0.5 * xi;
        assert!((yv[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "chain[{i}] = {} != {want}", yv[i]);
    }
    drop((xv, av, bv, yv, y));

    let mut group = c.benchmark_group("eager");
    // ~0.1–0.5 s per call: flat sampling (same iteration count per sample) keeps the run short.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(CHAIN_LEN as u64));
    group.bench_function("pointwise_chain_2^24", |bench| {
        bench.iter(|| black_box(chain(black_box(&a), black_box(&x), black_box(&b))))
    });
    group.finish();
}

criterion_group!(benches, bench_matmul, bench_pointwise_chain);
criterion_main!(benches);
