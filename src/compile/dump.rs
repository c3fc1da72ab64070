//! Graph dumps for `tracegrad dump`: every stage of the pipeline (src/compile/pipeline.rs, the
//! one `compile` runs), as text, DOT, SVG or JSON.

use std::process::{Command, Stdio};

use tracegrad_compiler::graph::Graph;
use tracegrad_compiler::TensorType;
use tracegrad_jit::Backend;

use super::pipeline::{self, grad_inputs, Goal, Options};
use super::trace::{trace_module, CompileError};
use crate::nn::Module;

/// A pipeline stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The graph as traced.
    Traced,
    /// Forward plus the appended backward (w.r.t. parameters and grad-requiring inputs).
    Joint,
    /// The forward half of the partition (result, then saved values).
    Forward,
    /// The backward half (saved values and the output gradient in).
    Backward,
    /// The forward half after the optimization passes: the forward graph `compile` runs.
    Optimized,
    /// The optimized forward partitioned into the JIT's fused kernels (text only).
    Fused,
    /// The JIT executor's plan for the optimized forward: steps, buffer assignments, in-place
    /// reuse and peak bytes (text only).
    Plan,
    /// The Cranelift IR of each JIT kernel of the optimized forward (text only).
    Clif,
}

impl Stage {
    /// Parses `traced|joint|forward|backward|optimized|fused|plan|clif`.
    pub fn parse(s: &str) -> Result<Stage, String> {
        Ok(match s {
            "traced" => Stage::Traced,
            "joint" => Stage::Joint,
            "forward" => Stage::Forward,
            "backward" => Stage::Backward,
            "optimized" => Stage::Optimized,
            "fused" => Stage::Fused,
            "plan" => Stage::Plan,
            "clif" => Stage::Clif,
            other => {
                return Err(format!(
                    "unknown stage {other:?}; stages: traced, joint, forward, backward, optimized, fused, plan, clif"
                ))
            }
        })
    }
}

impl Stage {
    /// Whether the stage is a text-only view of the JIT backend rather than a graph.
    pub fn text_only(self) -> bool {
        matches!(self, Stage::Fused | Stage::Plan | Stage::Clif)
    }
}

/// The text of a text-only stage (see [`Stage::text_only`]) for the optimized forward `g`.
pub fn stage_text(g: &Graph, stage: Stage) -> Result<String, String> {
    match stage {
        Stage::Fused => Ok(tracegrad_compiler::fusion::fused_text_with(g, &tracegrad_jit::kernel::supported)),
        Stage::Plan => Ok(tracegrad_jit::Executable::new(g, tracegrad_jit::Backend::Jit)?.plan_text()),
        Stage::Clif => Ok(tracegrad_jit::Executable::new(g, tracegrad_jit::Backend::Jit)?.clif_text()),
        other => Err(format!("stage {other:?} is a graph; render it")),
    }
}

/// The graph of `stage` for `module` called on inputs of these types (the `bool`: whether
/// the input requires grad), with grad mode on: a snapshot of the pipeline run that `compile`
/// makes for that call, so `Stage::Optimized` is exactly the forward graph `compile` runs. The
/// string is the optimization passes' report for `Stage::Optimized`.
pub fn stage_graph(
    module: &dyn Module,
    inputs: &[(TensorType, bool)],
    stage: Stage,
) -> Result<(Graph, String), CompileError> {
    let traced = crate::enable_grad(|| trace_module(module, inputs))?;
    if stage == Stage::Traced {
        return Ok((traced.graph, String::new()));
    }
    let wrt = grad_inputs(inputs, &traced.lifted_inputs, true);
    let opts = Options { goal: Goal::Call, wrt, donate: false, backend: Backend::Jit, dump: true };
    let built = pipeline::run(traced, &opts)?;
    let snapshot = match stage {
        Stage::Joint => built.snapshots.joint,
        Stage::Forward => built.snapshots.forward,
        Stage::Backward => built.snapshots.backward,
        _ => return Ok((built.forward, built.report)),
    };
    snapshot.map(|g| (g, String::new())).ok_or_else(|| CompileError {
        op: String::new(),
        module_path: String::new(),
        message: format!("stage {stage:?}: nothing in this call takes a gradient"),
    })
}

/// An output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Typed SSA text.
    Text,
    /// Graphviz DOT.
    Dot,
    /// SVG: Graphviz `dot` when installed, else the pure-Rust layout-rs renderer.
    Svg,
    /// The JSON schema of `Graph::to_json`.
    Json,
}

/// Renders a graph in `format`.
pub fn render(g: &Graph, format: Format) -> Result<String, String> {
    Ok(match format {
        Format::Text => g.to_text(),
        Format::Dot => g.to_dot(),
        Format::Json => g.to_json(),
        Format::Svg => dot_to_svg(&g.to_dot())?,
    })
}

/// DOT → SVG through Graphviz if present, otherwise through layout-rs.
pub fn dot_to_svg(dot: &str) -> Result<String, String> {
    if let Ok(mut child) =
        Command::new("dot").arg("-Tsvg").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()
    {
        use std::io::Write;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(dot.as_bytes());
        }
        if let Ok(out) = child.wait_with_output() {
            if out.status.success() {
                return String::from_utf8(out.stdout).map_err(|e| e.to_string());
            }
        }
    }
    dot_to_svg_builtin(dot)
}

/// DOT → SVG through the pure-Rust layout-rs renderer (what [`dot_to_svg`] falls back to).
pub fn dot_to_svg_builtin(dot: &str) -> Result<String, String> {
    let mut parser = layout::gv::DotParser::new(dot);
    let ast = parser.process().map_err(|e| format!("DOT parse: {e}"))?;
    let mut builder = layout::gv::GraphBuilder::new();
    builder.visit_graph(&ast);
    let mut vg = builder.get();
    let mut svg = layout::backends::svg::SVGWriter::new();
    vg.do_it(false, false, false, &mut svg);
    Ok(svg.finalize())
}
