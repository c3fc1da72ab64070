//! `tracegrad bench --onnx FILE --input-shape …`: one ONNX model's forward, eager vs
//! compiled, measured with the standard protocol ([`super::measure`]) on a standard-normal
//! input from `Generator::new(1)`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use indicatif::ProgressBar;

use super::{compare, measure, Mode, Row, Runner};
use crate::compile::{compile, CompiledModule};
use crate::nn::ModuleExt;
use crate::onnx::OnnxModule;
use crate::{Generator, Tensor};

/// Timed iterations when `--iters` is not given.
const DEFAULT_ITERS: usize = 20;

/// Parses `8,3,32,32`.
pub fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    let dims = s.split(',').map(|d| d.trim().parse::<usize>().map_err(|e| format!("--input-shape {s:?}: {d:?}: {e}")));
    let dims = dims.collect::<Result<Vec<_>, _>>()?;
    let n = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).filter(|&n| n <= crate::zoo::MAX_BATCH * 4096);
    match n {
        Some(n) if n > 0 => Ok(dims),
        _ => Err(format!("--input-shape {s:?}: the shape must be non-empty, with at most 2^32 elements")),
    }
}

struct Eager<'a> {
    module: &'a OnnxModule,
    x: &'a Tensor,
}

impl Runner for Eager<'_> {
    fn step(&mut self) -> Result<Tensor, String> {
        crate::no_grad(|| self.module.run(std::slice::from_ref(self.x)))
            .map(|mut o| o.swap_remove(0))
            .map_err(|e| e.to_string())
    }
}

struct Compiled<'a> {
    compiled: CompiledModule<'a>,
    x: &'a Tensor,
}

impl Runner for Compiled<'_> {
    fn step(&mut self) -> Result<Tensor, String> {
        crate::no_grad(|| self.compiled.call(self.x)).map_err(|e| e.to_string())
    }

    fn compile_time(&self) -> Option<std::time::Duration> {
        self.compiled.last_plan().map(|p| p.compile_time)
    }
}

/// Loads `path`, checks `shape` against its single input, and measures each of `modes`.
pub fn rows(
    path: &Path,
    shape: &[usize],
    modes: &[Mode],
    iters: Option<usize>,
    bar: &ProgressBar,
    on_row: &mut dyn FnMut(&Row),
) -> Result<Vec<Row>, String> {
    let module = crate::onnx::load(path).map_err(|e| e.to_string())?;
    module.eval();
    let [input] = module.inputs() else {
        return Err(format!("{}: bench --onnx takes models with one input", path.display()));
    };
    let x = Tensor::randn_with(&mut Generator::new(1), shape).to_dtype(input.dtype);
    module.run(std::slice::from_ref(&x)).map_err(|e| e.to_string())?;
    let name = path.file_stem().map_or("onnx".into(), |s| s.to_string_lossy().into_owned());
    let iters = iters.unwrap_or(DEFAULT_ITERS);
    let mut rows = Vec::new();
    let mut eager_first = None;
    for &mode in modes {
        bar.set_message(format!("{name} {mode} ({iters} iters)"));
        let mut row = Row::new(&name, mode.as_str(), iters);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut runner: Box<dyn Runner> = match mode {
                Mode::Eager => Box::new(Eager { module: &module, x: &x }),
                Mode::Compiled => Box::new(Compiled { compiled: compile(&module), x: &x }),
            };
            measure(&mut *runner, iters)
        }))
        .unwrap_or_else(|p| Err(format!("panicked: {}", super::panic_text(p))));
        match result {
            Ok(m) => {
                row.set_times(&m.times);
                row.peak_bytes = m.peak_bytes;
                match (mode, &eager_first) {
                    (Mode::Compiled, Some(e)) => {
                        row.compile_ms = m.compile_ms;
                        if let Some(diff) = compare(e, &m.first) {
                            bar.suspend(|| {
                                eprintln!("warning: {name}: the compiled result differs from eager: {diff}")
                            });
                        }
                    }
                    (Mode::Compiled, None) => row.compile_ms = m.compile_ms,
                    (Mode::Eager, _) => eager_first = Some(m.first),
                }
            }
            Err(e) => row.error = Some(e),
        }
        bar.suspend(|| on_row(&row));
        bar.inc(1);
        rows.push(row);
    }
    Ok(rows)
}
