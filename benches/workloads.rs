//! Criterion benches of DESIGN.md's standard workloads, eager and compiled: the same
//! definitions as `tracegrad bench` (`tracegrad::bench::workload`), so the two agree.
//!
//! Benchmarks are named `<workload>/<mode>`, e.g. `mlp_train_step/compiled`. Before timing a
//! workload, the compiled runner's first result (which also compiles) is checked against the
//! eager one; a compile error or a mismatch is reported and makes the run exit non-zero after
//! the remaining benches ran.
//!
//! ```text
//! cargo bench --bench workloads                       # everything, about 1.5 minutes on two cores
//! cargo bench --bench workloads -- mlp_train_step/    # one workload, both modes
//! cargo bench --bench workloads -- --test             # run each once, as a smoke test
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use tracegrad::bench::{compare, workloads, Mode, Runner, Workload};

/// Runs one untimed step and returns its result and its wall time.
fn first_step(runner: &mut dyn Runner) -> Result<(tracegrad::Tensor, Duration), String> {
    let t = Instant::now();
    let out = runner.step()?;
    Ok((out, t.elapsed()))
}

/// Benches `w` in both modes; returns the problems found.
fn bench_workload(c: &mut Criterion, w: Workload) -> Vec<String> {
    let mut problems = Vec::new();
    let mut group = c.benchmark_group(w.name());
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let mut eager_first = None;
    for mode in [Mode::Eager, Mode::Compiled] {
        let setup = w.setup();
        let mut runner = setup.runner(mode);
        let first = match first_step(&mut *runner) {
            Ok((out, _)) => out,
            Err(e) => {
                problems.push(format!("{}/{mode}: {e}", w.name()));
                continue;
            }
        };
        match (mode, &eager_first) {
            (Mode::Eager, _) => eager_first = Some(first),
            (Mode::Compiled, Some(e)) => {
                if let Some(diff) = compare(e, &first) {
                    problems.push(format!("{}: the compiled result differs from eager: {diff}", w.name()));
                }
            }
            (Mode::Compiled, None) => {}
        }
        // A steady-state step decides the sampling: slow steps get the same iteration count
        // per sample and a measurement time that fits ten of them.
        let steady = match first_step(&mut *runner) {
            Ok((_, t)) => t,
            Err(e) => {
                problems.push(format!("{}/{mode}: {e}", w.name()));
                continue;
            }
        };
        let slow = steady > Duration::from_millis(5);
        group.sampling_mode(if slow { SamplingMode::Flat } else { SamplingMode::Auto });
        // Ten flat samples of one call each must fit (pointwise_chain takes about a second).
        group.measurement_time(Duration::from_secs(3).max(steady * 12));
        group.bench_function(mode.as_str(), |b| {
            b.iter(|| black_box(runner.step().unwrap_or_else(|e| panic!("{}/{mode}: {e}", w.name()))))
        });
    }
    group.finish();
    problems
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut problems = Vec::new();
    for w in workloads() {
        problems.extend(bench_workload(&mut c, w));
    }
    c.final_summary();
    if !problems.is_empty() {
        eprintln!("workloads bench: {} problem(s):", problems.len());
        for p in &problems {
            eprintln!("  {p}");
        }
        std::process::exit(1);
    }
}
