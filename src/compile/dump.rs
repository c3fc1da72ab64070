//! Graph dumps for `tracegrad dump`: every stage of the pipeline, as text, DOT, SVG or JSON.

use std::process::{Command, Stdio};

use tracegrad_compiler::autodiff::append_backward_plain;
use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::partition::partition;
use tracegrad_compiler::passes::PassManager;
use tracegrad_compiler::TensorType;

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
    /// The forward half after the optimization passes.
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

fn op_error(e: tracegrad_compiler::OpError) -> CompileError {
    CompileError { op: e.op, module_path: String::new(), message: e.message }
}

/// The graph of `stage` for `module` called on inputs of these types. Gradients are taken
/// w.r.t. every parameter that requires grad and every input marked `true`.
pub fn stage_graph(
    module: &dyn Module,
    inputs: &[(TensorType, bool)],
    stage: Stage,
) -> Result<(Graph, String), CompileError> {
    let traced = crate::enable_grad(|| trace_module(module, inputs))?;
    let mut g = traced.graph;
    if stage == Stage::Traced {
        return Ok((g, String::new()));
    }
    let n_data = inputs.len();
    let wrt: Vec<_> = (0..g.inputs.len())
        .filter(|&i| if i < n_data { inputs[i].1 } else { traced.lifted_inputs[i - n_data].requires_grad() })
        .map(|i| g.inputs[i])
        .collect();
    let y = g.outputs[0].1;
    let seed = g.add_input("grad_out", InputRole::Grad, g.g[y].ty.clone());
    let grads = append_backward_plain(&mut g, &[(y, seed)], &wrt).map_err(op_error)?;
    let grads: Vec<_> = grads.into_iter().flatten().collect();
    if stage == Stage::Joint {
        for (k, gr) in grads.iter().enumerate() {
            g.add_output(&format!("grad{k}"), *gr);
        }
        return Ok((g, String::new()));
    }
    let p = partition(&g, &[y], &[seed], &grads, true).map_err(op_error)?;
    match stage {
        Stage::Forward => Ok((p.forward, String::new())),
        Stage::Backward => Ok((p.backward, String::new())),
        _ => {
            let mut f = p.forward;
            let mut pm = PassManager::standard();
            pm.validate = true;
            pm.run(&mut f).map_err(op_error)?;
            Ok((f, pm.report()))
        }
    }
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
    let mut parser = layout::gv::DotParser::new(dot);
    let ast = parser.process().map_err(|e| format!("DOT parse: {e}"))?;
    let mut builder = layout::gv::GraphBuilder::new();
    builder.visit_graph(&ast);
    let mut vg = builder.get();
    let mut svg = layout::backends::svg::SVGWriter::new();
    vg.do_it(false, false, false, &mut svg);
    Ok(svg.finalize())
}
