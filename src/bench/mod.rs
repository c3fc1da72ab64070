//! `tracegrad bench`: eager vs compiled timings of DESIGN.md's standard workloads, plus two
//! reference rows (memory bandwidth and sgemm throughput) that place the numbers on the machine.
//!
//! For each (workload, mode) the bench builds a fresh [`Setup`] (same seeds, so both modes see
//! the same model and inputs) and then:
//!
//! 1. makes the first call: in compiled mode it traces and compiles, and `compile_ms` is the
//!    time the compile API reports for building that plan (trace, autodiff, passes, codegen);
//! 2. warms up (at least one call, then up to 0.2 s or `iters` calls);
//! 3. runs one step under [`CountingAlloc::measure`]: `peak_bytes` is the most heap the step
//!    held at once on top of what was live before it (`null` without the counting allocator),
//!    with the runtime's storage cache ([`tracegrad_runtime::pool`]) off for that step so that
//!    reused blocks count too;
//! 4. times `iters` calls one by one and reports their median, min and max.
//!
//! With both modes, the compiled run's first result (output or loss) is checked against the
//! eager one and a mismatch is reported on stderr, so the bench never silently times a wrong
//! computation.
//!
//! The workload definitions are public ([`workload`], [`Setup::runner`]) so that the criterion
//! benches (`benches/workloads.rs`) time exactly the same code.

mod alloc;
pub mod distributed;
mod onnx;
mod reference;
mod report;
mod workloads;

use std::io::{IsTerminal, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use alloc::CountingAlloc;
pub use reference::{isa, memcpy_gbps, sgemm_gflops, ReferenceSize};
pub use report::{svg_chart, table};
pub use workloads::{
    compare, workload, workloads, LayerNormFn, Mode, PointwiseChain, Runner, Setup, SoftmaxRows, Workload, LR,
    WORKLOADS,
};

/// Which modes `--mode` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// Eager only.
    Eager,
    /// Compiled only.
    Compiled,
    /// Eager, then compiled (the default).
    Both,
}

impl ModeChoice {
    /// The modes to run, in order.
    pub fn modes(self) -> Vec<Mode> {
        match self {
            ModeChoice::Eager => vec![Mode::Eager],
            ModeChoice::Compiled => vec![Mode::Compiled],
            ModeChoice::Both => vec![Mode::Eager, Mode::Compiled],
        }
    }
}

/// The most timed iterations `--iters` accepts.
pub const MAX_ITERS: u64 = 100_000;
/// The most threads `--threads` accepts.
pub const MAX_THREADS: u64 = 1024;

/// The `tracegrad bench` command line (DESIGN.md, "Command-line contract").
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Workload to run; repeat for several (default: all of them).
    #[arg(long = "workload", value_name = "W", value_parser = clap::builder::PossibleValuesParser::new(WORKLOADS))]
    pub workloads: Vec<String>,
    /// Which execution modes to time.
    #[arg(long, value_enum, default_value = "both")]
    pub mode: ModeChoice,
    /// Timed iterations per (workload, mode) and reference row, 1 to 100000 (default: per
    /// workload, so the whole bench takes about a minute on two cores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_ITERS))]
    pub iters: Option<u64>,
    /// Run everything on a rayon pool of N threads, 1 to 1024 (default: rayon's default).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_THREADS))]
    pub threads: Option<u64>,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write an SVG bar chart of eager vs compiled medians.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Time this ONNX model's forward instead of the standard workloads (needs
    /// `--input-shape`).
    #[arg(long, value_name = "FILE.onnx", conflicts_with = "workloads", requires = "input_shape")]
    pub onnx: Option<PathBuf>,
    /// The ONNX model's input shape, e.g. `8,3,32,32`.
    #[arg(long, value_name = "D,D,…", requires = "onnx")]
    pub input_shape: Option<String>,
    /// Shrink the reference rows (memcpy of 2^20 f32, sgemm 256³) for quick tests.
    #[arg(long, hide = true)]
    pub small_reference: bool,
    /// Data-parallel scaling under `mpirun -np N`: step time alone and on N ranks (DDP) at
    /// equal per-rank batch, communication share, scaling efficiency.
    #[arg(long)]
    pub distributed: bool,
}

/// What [`run`] does.
#[derive(Clone, Debug)]
pub struct Config {
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// Modes, in order, for every workload.
    pub modes: Vec<Mode>,
    /// Timed iterations; `None`: each workload's [`Workload::default_iters`].
    pub iters: Option<usize>,
    /// Size of the reference rows.
    pub reference: ReferenceSize,
}

/// One line of the bench's output (`--json` prints it as is).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Workload or reference name.
    pub workload: String,
    /// `eager`, `compiled` or `reference`.
    pub mode: String,
    /// Median of the timed iterations, in ms (`null` when the run failed).
    pub median_ms: Option<f64>,
    /// Fastest timed iteration, in ms.
    pub min_ms: Option<f64>,
    /// Slowest timed iteration, in ms.
    pub max_ms: Option<f64>,
    /// Most heap bytes one steady-state call held at once beyond what was live before it
    /// (`null` when the counting allocator is not registered).
    pub peak_bytes: Option<u64>,
    /// Compiled mode: how long building the plan took (trace, autodiff, passes, codegen), as
    /// the compile API measured it during the first call; else `null`.
    pub compile_ms: Option<f64>,
    /// memcpy: bandwidth counting read and write bytes, in GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// sgemm: GFLOP/s (2n³ per product).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// Reference rows: `avx512`, `avx2` or `sse` (see [`isa`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isa: Option<String>,
    /// Reference rows: rayon's thread count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Why the run failed (its numbers are then `null`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Timed iterations (shown in the table).
    #[serde(skip)]
    pub iters: usize,
}

impl Row {
    fn new(workload: &str, mode: &str, iters: usize) -> Row {
        Row {
            workload: workload.to_string(),
            mode: mode.to_string(),
            median_ms: None,
            min_ms: None,
            max_ms: None,
            peak_bytes: None,
            compile_ms: None,
            gbps: None,
            gflops: None,
            isa: None,
            threads: None,
            error: None,
            iters,
        }
    }

    fn set_times(&mut self, t: &Times) {
        self.median_ms = Some(t.median_ms);
        self.min_ms = Some(t.min_ms);
        self.max_ms = Some(t.max_ms);
    }
}

/// Median, min and max of some timings, in ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Times {
    /// The median (the mean of the middle two for an even count).
    pub median_ms: f64,
    /// The fastest.
    pub min_ms: f64,
    /// The slowest.
    pub max_ms: f64,
}

impl Times {
    /// Summarises `ms` (not empty).
    pub fn of(ms: &[f64]) -> Times {
        assert!(!ms.is_empty(), "Times::of: no timings");
        let mut v = ms.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median_ms = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Times { median_ms, min_ms: v[0], max_ms: v[n - 1] }
    }
}

/// Times `f` `iters` times, one call at a time, in ms.
pub fn time_calls<E>(iters: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<Vec<f64>, E> {
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        out.push(ms(t.elapsed()));
    }
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What [`measure`] found for one runner.
#[derive(Debug)]
pub struct Measurement {
    /// Steady-state timings.
    pub times: Times,
    /// Wall time of the first call, in ms (the compiling call in compiled mode).
    pub first_ms: f64,
    /// The plan's build time after the first call ([`Runner::compile_time`]), in ms.
    pub compile_ms: Option<f64>,
    /// See [`Row::peak_bytes`].
    pub peak_bytes: Option<u64>,
    /// The first call's result.
    pub first: crate::Tensor,
}

/// The bench's protocol for one runner (see the module docs): first call, warm-up, one
/// allocation-counted step, then `iters` timed steps.
pub fn measure(runner: &mut dyn Runner, iters: usize) -> Result<Measurement, String> {
    let iters = iters.max(1);
    let t0 = Instant::now();
    let first = runner.step()?;
    let first_ms = ms(t0.elapsed());
    let compile_ms = runner.compile_time().map(ms);
    let warm = Instant::now();
    let mut calls = 0;
    while calls == 0 || (calls < iters && warm.elapsed() < Duration::from_millis(200)) {
        runner.step()?;
        calls += 1;
    }
    // The peak is the step's own footprint: with the storage cache off and empty, every block
    // it needs is a fresh allocation, as on a first call.
    tracegrad_runtime::pool::empty_cache();
    let limit = tracegrad_runtime::pool::set_limit(0);
    let (r, peak_bytes) = CountingAlloc::measure(|| runner.step());
    tracegrad_runtime::pool::set_limit(limit);
    r?;
    let times = Times::of(&time_calls(iters, || runner.step().map(drop))?);
    Ok(Measurement { times, first_ms, compile_ms, peak_bytes, first })
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => match p.downcast::<&'static str>() {
            Ok(s) => s.to_string(),
            Err(_) => "panic with a non-text payload".into(),
        },
    }
}

/// Runs the bench on the current rayon pool: the reference rows, then every (workload, mode).
/// Each row goes to `on_row` as soon as it is measured; all of them are returned. Failures
/// (a compile error, a panic) become rows with `error` set. `bar` tracks progress; warnings
/// (a compiled result that differs from the eager one) go to stderr.
pub fn run(cfg: &Config, bar: &ProgressBar, on_row: &mut dyn FnMut(&Row)) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut emit = |row: Row, rows: &mut Vec<Row>| {
        bar.suspend(|| on_row(&row));
        rows.push(row);
        bar.inc(1);
    };
    let (isa, threads) = (isa().to_string(), rayon::current_num_threads());

    let memcpy_iters = cfg.iters.unwrap_or(20);
    bar.set_message(format!("reference memcpy ({memcpy_iters} iters)"));
    let mut row = Row::new("memcpy", "reference", memcpy_iters);
    let (times, gbps, peak) = memcpy_gbps(cfg.reference, memcpy_iters);
    row.set_times(&times);
    (row.gbps, row.peak_bytes, row.isa, row.threads) = (Some(gbps), peak, Some(isa.clone()), Some(threads));
    emit(row, &mut rows);

    let sgemm_iters = cfg.iters.unwrap_or(8);
    let n = cfg.reference.sgemm_n();
    bar.set_message(format!("reference sgemm_{n} ({sgemm_iters} iters)"));
    let mut row = Row::new(&format!("sgemm_{n}"), "reference", sgemm_iters);
    let (times, gflops, peak) = sgemm_gflops(cfg.reference, sgemm_iters);
    row.set_times(&times);
    (row.gflops, row.peak_bytes, row.isa, row.threads) = (Some(gflops), peak, Some(isa), Some(threads));
    emit(row, &mut rows);

    for w in &cfg.workloads {
        let iters = cfg.iters.unwrap_or_else(|| w.default_iters());
        let mut eager_first = None;
        for &mode in &cfg.modes {
            bar.set_message(format!("{} {mode} ({iters} iters)", w.name()));
            let mut row = Row::new(w.name(), mode.as_str(), iters);
            let result = catch_unwind(AssertUnwindSafe(|| {
                let setup = w.setup();
                let mut runner = setup.runner(mode);
                measure(&mut *runner, iters)
            }))
            .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(p))));
            match result {
                Ok(m) => {
                    row.set_times(&m.times);
                    row.peak_bytes = m.peak_bytes;
                    if mode == Mode::Compiled {
                        row.compile_ms = m.compile_ms;
                        if let Some(e) = &eager_first {
                            if let Some(diff) = compare(e, &m.first) {
                                bar.suspend(|| {
                                    eprintln!("warning: {}: the compiled result differs from eager: {diff}", w.name())
                                });
                            }
                        }
                    } else {
                        eager_first = Some(m.first);
                    }
                }
                Err(e) => row.error = Some(e),
            }
            emit(row, &mut rows);
        }
    }
    rows
}

/// `tracegrad bench`: parses nothing (clap did), runs, prints, plots. Fails when the
/// arguments are unusable or when any run failed (after printing everything else).
pub fn cli(args: BenchArgs) -> Result<(), String> {
    if args.distributed {
        return distributed::cli(&args);
    }
    // The chart's file is opened before anything is measured, so a bad path fails at once.
    let plot_file = match &args.plot {
        Some(path) => Some(std::fs::File::create(path).map_err(|e| format!("--plot {}: {e}", path.display()))?),
        None => None,
    };
    let onnx_shape = args.input_shape.as_deref().map(onnx::parse_shape).transpose()?;
    let mut names: Vec<&str> = args.workloads.iter().map(String::as_str).collect();
    if names.is_empty() {
        names = WORKLOADS.to_vec();
    }
    let mut list: Vec<Workload> = Vec::new();
    for name in names {
        let w = workload(name)?;
        if !list.contains(&w) {
            list.push(w);
        }
    }
    let cfg = Config {
        workloads: list,
        modes: args.mode.modes(),
        iters: args.iters.map(|n| n as usize),
        reference: if args.small_reference { ReferenceSize::Small } else { ReferenceSize::Full },
    };
    let total = match &args.onnx {
        Some(_) => cfg.modes.len(),
        None => 2 + cfg.workloads.len() * cfg.modes.len(),
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("bench [{bar:30}] {pos}/{len} {msg}")
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let json = args.json;
    let mut print_row = |row: &Row| {
        if json {
            let line = serde_json::to_string(row).expect("a bench row always serializes");
            let mut out = std::io::stdout().lock();
            // A closed pipe (`| head`) is not worth a panic.
            let _ = writeln!(out, "{line}").and_then(|()| out.flush());
        }
    };
    let started = Instant::now();
    let mut go = || match (&args.onnx, &onnx_shape) {
        (Some(path), Some(shape)) => onnx::rows(path, shape, &cfg.modes, cfg.iters, &bar, &mut print_row),
        _ => Ok(run(&cfg, &bar, &mut print_row)),
    };
    let rows = match args.threads {
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n as usize)
                .build()
                .map_err(|e| format!("--threads {n}: cannot build the thread pool: {e}"))?;
            pool.install(go)?
        }
        None => go()?,
    };
    bar.finish_and_clear();
    if !json {
        print!("{}", table(&rows));
        println!("({} rows in {:.1} s)", rows.len(), started.elapsed().as_secs_f64());
    }
    if let (Some(path), Some(mut file)) = (&args.plot, plot_file) {
        file.write_all(svg_chart(&rows).as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let failed: Vec<String> =
        rows.iter().filter_map(|r| r.error.as_ref().map(|e| format!("{} ({}): {e}", r.workload, r.mode))).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {} runs failed:\n  {}", failed.len(), rows.len(), failed.join("\n  ")))
    }
}
