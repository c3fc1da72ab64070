//! `tracegrad dump` and `tracegrad models`: every zoo model dumps at every stage; the backward
//! text has shapes, SVG is valid, JSON round-trips through the loader.

use std::process::Command;

use tracegrad::compile::compile_dyn;
use tracegrad::compile::dump::{render, stage_graph, Format, Stage};
use tracegrad::nn::ModuleExt;
use tracegrad::zoo;
use tracegrad_compiler::graph::Graph;
use tracegrad_compiler::interpret::{interpret, NoCallbacks};
use tracegrad_runtime::{Buffer, DType};

fn graph(model: &str, stage: Stage) -> Graph {
    tracegrad::manual_seed(0);
    let z = zoo::build(model, 2).unwrap();
    z.module.eval();
    let ty = tracegrad::TensorType::new(DType::F32, &z.input_shape);
    stage_graph(&*z.module, &[(ty, false)], stage).unwrap().0
}

#[test]
fn every_model_dumps_every_stage_and_json_round_trips() {
    for (model, _) in zoo::MODELS {
        for stage in [Stage::Traced, Stage::Joint, Stage::Forward, Stage::Backward, Stage::Optimized] {
            let g = graph(model, stage);
            g.validate().unwrap();
            let json = render(&g, Format::Json).unwrap();
            let back = Graph::from_json(&json).unwrap_or_else(|e| panic!("{model} {stage:?}: {e}"));
            assert_eq!(back.to_json(), json, "{model} {stage:?}");
            assert_eq!(back.to_text(), g.to_text());
            // The reloaded graph computes the same thing.
            if stage == Stage::Optimized {
                let args: Vec<Buffer> = g
                    .inputs
                    .iter()
                    .map(|&i| {
                        let ty = g.ty(i);
                        let n: usize = ty.shape.iter().product();
                        Buffer::from_vec((0..n).map(|k| ((k % 7) as f32 - 3.0) * 0.1).collect::<Vec<f32>>(), &ty.shape)
                            .cast(ty.dtype)
                    })
                    .collect();
                assert_eq!(interpret(&g, &args, &NoCallbacks).unwrap(), interpret(&back, &args, &NoCallbacks).unwrap());
            }
        }
    }
}

/// `dump --stage optimized` is a snapshot of what `compile` runs: for every zoo model, in eval
/// and in training mode, the dumped graph is the compiled plan's forward graph, node for node.
#[test]
fn optimized_stage_is_the_graph_compile_runs() {
    for (model, _) in zoo::MODELS {
        for train in [false, true] {
            tracegrad::manual_seed(0);
            let z = zoo::build(model, 2).unwrap();
            z.module.train(train);
            let (dumped, ran) = dumped_and_compiled(&*z.module, &z.input_shape);
            assert_eq!(dumped, ran, "{model} (train: {train})");
        }
    }
}

/// The optimized stage and the compiled plan's forward graph, as JSON.
fn dumped_and_compiled(m: &dyn tracegrad::nn::Module, shape: &[usize]) -> (String, String) {
    let ty = tracegrad::TensorType::new(DType::F32, shape);
    let dumped = stage_graph(m, &[(ty, false)], Stage::Optimized).unwrap().0;
    let mut compiled = compile_dyn(m);
    compiled.call(&tracegrad::Tensor::zeros(shape)).unwrap();
    (dumped.to_json(), compiled.last_plan().unwrap().graph.to_json())
}

/// Where the dump used to take its own path: a module that writes buffers (BatchNorm's running
/// statistics are forward outputs in training mode) and a module with hooks (callback nodes
/// that the backward must differentiate).
#[test]
fn optimized_stage_is_the_graph_compile_runs_with_buffers_and_hooks() {
    use tracegrad::nn::{BatchNorm1d, Linear, ReLU, Sequential};
    tracegrad::manual_seed(0);
    let bn = Sequential::new().add(Linear::new(8, 4)).add(BatchNorm1d::new(4)).add(ReLU::new());
    bn.train(true);
    let (dumped, ran) = dumped_and_compiled(&bn, &[3, 8]);
    assert_eq!(dumped, ran, "BatchNorm in training mode");
    let hooked = Sequential::new().add(Linear::new(8, 4)).add(ReLU::new());
    hooked.get_submodule("0").unwrap().register_forward_hook(|_, _, out| Some(out * 2.0));
    let (dumped, ran) = dumped_and_compiled(&hooked, &[3, 8]);
    assert!(ran.contains("forward hook of 0"), "{ran}");
    assert_eq!(dumped, ran, "a module with a forward hook");
}

#[test]
fn backward_text_has_shapes_and_module_paths() {
    let text = render(&graph("mlp", Stage::Backward), Format::Text).unwrap();
    assert!(text.contains("(grad_out)") && text.contains("f32[256,784] = matmul"), "{text}");
    assert!(text.contains("# 0 (Linear)"), "{text}");
    let t = render(&graph("transformer", Stage::Backward), Format::Text).unwrap();
    assert!(t.contains("f32[2,4,64,64]"), "{t}");
}

#[test]
fn cli_dump_writes_svg_and_json_and_lists_models() {
    let exe = env!("CARGO_BIN_EXE_tracegrad");
    let dir = std::env::temp_dir().join(format!("tracegrad-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for model in ["mlp", "cnn", "transformer", "seed"] {
        let svg = dir.join(format!("{model}.svg"));
        let out = Command::new(exe)
            .args(["dump", "--model", model, "--stage", "backward", "--format", "svg", "--batch", "2", "-o"])
            .arg(&svg)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let s = std::fs::read_to_string(&svg).unwrap();
        assert!(s.contains("<svg") && s.trim_end().ends_with("</svg>"), "{model}: not an SVG document");
        let out = Command::new(exe)
            .args(["dump", "--model", model, "--stage", "backward", "--format", "json", "--batch", "2"])
            .output()
            .unwrap();
        assert!(out.status.success());
        Graph::from_json(&String::from_utf8(out.stdout).unwrap()).unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
    let out = Command::new(exe).arg("models").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for m in ["mlp", "cnn", "transformer", "seed"] {
        assert!(text.lines().any(|l| l.starts_with(m)), "{text}");
    }
    let out = Command::new(exe).args(["dump", "--model", "mlp", "--stage", "fused", "--batch", "2"]).output().unwrap();
    assert!(out.status.success());
    let fused = String::from_utf8(out.stdout).unwrap();
    assert!(fused.contains("(Epilogue,"), "{fused}");
    // The JIT's views: each kernel's Cranelift IR, and the executor's plan.
    let out = Command::new(exe).args(["dump", "--model", "mlp", "--stage", "clif", "--batch", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let clif = String::from_utf8(out.stdout).unwrap();
    assert!(clif.contains("function ") && clif.contains("f32x4") && clif.contains("store"), "{clif}");
    let out =
        Command::new(exe).args(["dump", "--model", "transformer", "--stage", "plan", "--batch", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan = String::from_utf8(out.stdout).unwrap();
    assert!(plan.contains("peak") && plan.contains("kernel 0 (") && plan.contains("matmul"), "{plan}");
    assert!(plan.contains("rows"), "layer norm and softmax are row kernels: {plan}");
    let out =
        Command::new(exe).args(["dump", "--model", "mlp", "--stage", "plan", "--format", "svg"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only a text form"));
    let out = Command::new(exe).args(["dump", "--model", "mlp", "--stage", "kernels"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("stages: traced, joint, forward, backward, optimized, fused, plan, clif"));
}
