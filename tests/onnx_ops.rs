//! The operator table against ONNX's own reference evaluator: one-node models for the
//! operators and attributes the PyTorch reference models do not reach (strides, pads, steps,
//! negative axes, broadcasting, integer constants), run eager and compiled on the JIT and the
//! interpreter. The fixture is written by `tests/onnx_ops_reference.py` (`onnx.reference`).

use serde_json::Value;
use tracegrad::onnx::load_bytes;
use tracegrad::{DType, Tensor};

fn tensor(v: &Value, dtype: DType) -> Tensor {
    let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let data: Vec<f64> = v["data"].as_array().unwrap().iter().map(|d| d.as_f64().unwrap()).collect();
    Tensor::from_vec(data, &shape).to_dtype(dtype)
}

fn close(what: &str, got: &Tensor, want: &Value) {
    let want = tensor(want, DType::F64);
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.to_vec_f64().iter().zip(want.to_vec_f64()).enumerate() {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}[{i}]: got {g}, onnx.reference {w}");
    }
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(val).collect();
    digits
        .chunks(4)
        .flat_map(|c| {
            let n = c.iter().enumerate().fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(c.len() - 1)
        })
        .collect()
}

#[test]
fn single_operators_match_the_onnx_reference_evaluator() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/onnx_ops_reference.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 40);
    let mut checked = 0;
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let m = load_bytes(&decode_base64(c["model"].as_str().unwrap())).unwrap_or_else(|e| panic!("{name}: {e}"));
        let xs: Vec<Tensor> =
            c["inputs"].as_array().unwrap().iter().zip(m.inputs()).map(|(v, i)| tensor(v, i.dtype)).collect();
        let outs = m.run(&xs).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = c["outputs"].as_array().unwrap();
        assert_eq!(outs.len(), want.len(), "{name}: outputs");
        for (k, (o, w)) in outs.iter().zip(want).enumerate() {
            close(&format!("{name} eager output {k}"), o, w);
        }
        for backend in [tracegrad::compile::Backend::Jit, tracegrad::compile::Backend::Interpreter] {
            let y =
                tracegrad::compile(&m).with_backend(backend).call_many(&xs).unwrap_or_else(|e| panic!("{name}: {e}"));
            close(&format!("{name} {backend:?}"), &y, &want[0]);
        }
        checked += 1;
    }
    eprintln!("{checked} single-operator models checked");
    assert_eq!(checked, cases.len());
}
