//! Hostile and broken ONNX files: each is a clear error, never a panic. The edits go through
//! the same prost types the loader uses (generated into this package's `OUT_DIR`).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use prost::Message;
use tracegrad::onnx::{load, load_bytes};
use tracegrad::Tensor;

#[allow(clippy::all, missing_docs, dead_code)]
mod onnx_proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
use onnx_proto::ModelProto;

fn path(name: &str) -> String {
    format!("{}/../shared/reference/onnx/{name}.onnx", env!("CARGO_MANIFEST_DIR"))
}

fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(path(name)).unwrap()
}

fn edited(name: &str, f: impl FnOnce(&mut ModelProto)) -> Vec<u8> {
    let mut m = ModelProto::decode(bytes(name).as_slice()).unwrap();
    f(&mut m);
    m.encode_to_vec()
}

fn error_of(b: &[u8]) -> String {
    match load_bytes(b) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_operator_names_op_node_and_opset() {
    let b = edited("mlp", |m| m.graph.as_mut().unwrap().node[1].op_type = Some("Frobnicate".into()));
    let e = error_of(&b);
    assert!(e.contains("\"Frobnicate\"") && e.contains("\"/1/Relu\"") && e.contains("opset 17"), "{e}");
    let b = edited("mlp", |m| m.graph.as_mut().unwrap().node[1].domain = Some("com.example".into()));
    assert!(error_of(&b).contains("domain com.example"), "{}", error_of(&b));
}

#[test]
fn truncated_file_is_an_error() {
    let b = bytes("cnn");
    for cut in [0, 1, 10, b.len() / 2, b.len() - 1] {
        let e = error_of(&b[..cut]);
        assert!(
            e.contains("not a valid ONNX model") || e.contains("no graph") || e.contains("opset"),
            "cut {cut}: {e}"
        );
    }
    let e = load("/nonexistent/model.onnx").err().unwrap().to_string();
    assert!(e.contains("/nonexistent/model.onnx"), "{e}");
}

#[test]
fn initializer_whose_data_does_not_match_its_dims() {
    let b = edited("mlp", |m| {
        let init = &mut m.graph.as_mut().unwrap().initializer[0];
        init.raw_data.as_mut().unwrap().truncate(100);
    });
    let e = error_of(&b);
    assert!(e.contains("\"0.weight\"") && e.contains("raw_data has 100 bytes") && e.contains("1536"), "{e}");
    let b = edited("mlp", |m| m.graph.as_mut().unwrap().initializer[1].dims = vec![33]);
    assert!(error_of(&b).contains("\"0.bias\""), "{}", error_of(&b));
    let b = edited("mlp", |m| m.graph.as_mut().unwrap().initializer[1].dims = vec![-32]);
    assert!(error_of(&b).contains("negative dimension"), "{}", error_of(&b));
}

#[test]
fn dangling_input_name_is_an_error() {
    let b = edited("mlp", |m| m.graph.as_mut().unwrap().node[2].input[0] = "nowhere".into());
    let e = error_of(&b);
    assert!(e.contains("\"/2/Gemm\"") && e.contains("\"nowhere\""), "{e}");
    let b = edited("mlp", |m| m.graph.as_mut().unwrap().output[0].name = Some("ghost".into()));
    assert!(error_of(&b).contains("\"ghost\" is never produced"), "{}", error_of(&b));
}

#[test]
fn unsupported_opset_and_bad_inputs_at_run_time() {
    let b = edited("mlp", |m| m.opset_import[0].version = Some(9));
    assert!(error_of(&b).contains("opset 9 is not supported"), "{}", error_of(&b));
    let m = load(path("mlp")).unwrap();
    let e = m.run(&[Tensor::zeros(&[2, 13])]).unwrap_err().to_string();
    assert!(e.contains("\"input\"") && e.contains("[2, 13]"), "{e}");
    let e = m.run(&[]).unwrap_err().to_string();
    assert!(e.contains("takes 1 inputs, got 0"), "{e}");
    // A shape the graph's declared dims allow but an op rejects: the node's error, no panic.
    let b = edited("mlp", |m| {
        let g = m.graph.as_mut().unwrap();
        let dims = &mut g.input[0].r#type.as_mut().unwrap().value;
        if let Some(onnx_proto::type_proto::Value::TensorType(t)) = dims {
            t.shape.as_mut().unwrap().dim[1].value = None;
        }
    });
    let m = load_bytes(&b).unwrap();
    let e = quiet(|| m.run(&[Tensor::zeros(&[2, 13])])).unwrap_err().to_string();
    assert!(e.contains("\"/0/Gemm\""), "{e}");
}

/// Runs `f` with the panic hook silenced (a node's caught panic would print otherwise).
fn quiet<R>(f: impl FnOnce() -> R) -> R {
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    let old = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = f();
    std::panic::set_hook(old);
    r
}

/// 12 000 mutated files (a few random bytes overwritten, a fifth also cut): loading never
/// panics, and a model that still loads runs on its reference input without panicking.
#[test]
fn fuzzed_files_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        state >> 33
    };
    let mut panics = Vec::new();
    let (mut loaded, mut ran) = (0, 0);
    for name in ["mlp", "cnn", "transformer_block"] {
        let base = bytes(name);
        let x = common::tensor(&common::reference(&format!("onnx/{name}.json"))["input"]);
        for case in 0..4000 {
            let mut b = base.clone();
            for _ in 0..1 + next() % 6 {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            if case % 5 == 0 {
                let cut = (next() as usize) % (b.len() + 1);
                b.truncate(cut);
            }
            let r = quiet(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    let Ok(m) = load_bytes(&b) else { return (false, false) };
                    (true, m.run(std::slice::from_ref(&x)).is_ok())
                }))
            });
            match r {
                Ok((l, r)) => {
                    loaded += l as usize;
                    ran += r as usize;
                }
                Err(_) => panics.push(format!("{name} case {case}")),
            }
        }
    }
    assert!(panics.is_empty(), "{} panics: {:?}", panics.len(), &panics[..panics.len().min(10)]);
    // The mutations must exercise the runner too, not only the decoder.
    assert!(loaded > 1000 && ran > 500, "loaded {loaded}, ran {ran}");
}
