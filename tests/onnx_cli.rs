//! `tracegrad run`, `dump --onnx` and `bench --onnx` on the PyTorch reference models.

mod common;

use std::path::PathBuf;
use std::process::Command;

use tracegrad::onnx::npy::{read_npy, write_npy};

const MODELS: [&str; 3] = ["mlp", "cnn", "transformer_block"];

fn model(name: &str) -> String {
    format!("{}/../shared/reference/onnx/{name}.onnx", env!("CARGO_MANIFEST_DIR"))
}

fn scratch(file: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracegrad-onnx-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(file)
}

fn tracegrad(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tracegrad")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn run_reproduces_pytorch_outputs_in_both_modes() {
    for name in MODELS {
        let r = common::reference(&format!("onnx/{name}.json"));
        for (input, output) in [("input", "output"), ("input_batch2x", "output_batch2x")] {
            let x = scratch(&format!("{name}_{input}.npy"));
            write_npy(&x, &common::tensor(&r[input])).unwrap();
            for mode in ["eager", "compiled"] {
                let y = scratch(&format!("{name}_{output}_{mode}.npy"));
                let args =
                    [model(name), "--input".into(), x.display().to_string(), "-o".into(), y.display().to_string()];
                let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
                args.splice(0..0, ["run"]);
                args.extend(["--mode", mode]);
                let (ok, _, err) = tracegrad(&args);
                assert!(ok, "{name} {mode}: {err}");
                common::assert_close(
                    &format!("{name} {mode} {output}"),
                    &read_npy(&y).unwrap(),
                    &r[output],
                    1e-5,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn run_rejects_a_wrong_input_clearly() {
    let x = scratch("wrong.npy");
    write_npy(&x, &tracegrad::Tensor::zeros(&[2, 5])).unwrap();
    let y = scratch("never.npy");
    for mode in ["eager", "compiled"] {
        let (ok, _, err) = tracegrad(&[
            "run",
            &model("mlp"),
            "--input",
            x.to_str().unwrap(),
            "-o",
            y.to_str().unwrap(),
            "--mode",
            mode,
        ]);
        assert!(!ok && err.contains("input \"input\" expects F32[?, 12], got F32[2, 5]"), "{mode}: {err}");
    }
    let (ok, _, err) = tracegrad(&["run", &model("mlp"), "--input", "/nonexistent.npy", "-o", y.to_str().unwrap()]);
    assert!(!ok && err.contains("/nonexistent.npy"), "{err}");
}

#[test]
fn dump_onnx_prints_every_model() {
    for name in MODELS {
        let (ok, out, err) = tracegrad(&["dump", "--onnx", &model(name), "--stage", "optimized", "--batch", "3"]);
        assert!(ok, "{name}: {err}");
        assert!(out.starts_with("graph(%0: f32[3,"), "{name}: {out}");
        let (ok, out, err) = tracegrad(&["dump", "--onnx", &model(name), "--stage", "backward", "--format", "json"]);
        assert!(ok && out.trim_start().starts_with('{'), "{name}: {err}");
    }
    let (ok, out, _) = tracegrad(&["dump", "--onnx", &model("cnn"), "--stage", "fused", "--batch", "2"]);
    assert!(ok && out.contains("conv2d"), "{out}");
}

#[test]
fn bench_onnx_times_eager_and_compiled() {
    for (name, shape) in [("mlp", "8,12"), ("cnn", "8,1,14,14"), ("transformer_block", "8,6,16")] {
        let (ok, out, err) =
            tracegrad(&["bench", "--onnx", &model(name), "--input-shape", shape, "--iters", "2", "--json"]);
        assert!(ok, "{name}: {err}");
        let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 2, "{out}");
        for (row, mode) in rows.iter().zip(["eager", "compiled"]) {
            assert_eq!((row["workload"].as_str(), row["mode"].as_str()), (Some(name), Some(mode)));
            assert!(row["median_ms"].as_f64().is_some_and(|t| t > 0.0), "{row}");
        }
        assert!(rows[1]["compile_ms"].as_f64().is_some(), "{out}");
    }
    let (ok, _, err) = tracegrad(&["bench", "--onnx", &model("cnn"), "--input-shape", "8,3,14,14"]);
    assert!(!ok && err.contains("expects F32[?, 1, 14, 14]"), "{err}");
    let (ok, _, err) = tracegrad(&["bench", "--onnx", &model("cnn"), "--input-shape", "8,x"]);
    assert!(!ok && err.contains("--input-shape"), "{err}");
}
