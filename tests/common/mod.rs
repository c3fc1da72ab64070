//! Helpers shared by the reference-transcript tests: reading `../shared/reference/*.json` and
//! comparing tensors with PyTorch's values.
#![allow(dead_code)]

pub mod gradcheck;

use serde_json::Value;
use tracegrad::Tensor;

/// Parses a reference transcript.
pub fn reference(name: &str) -> Value {
    let path = format!("{}/../shared/reference/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `{"shape": [...], "data": [...]}` as an f32 tensor.
pub fn tensor(v: &Value) -> Tensor {
    let shape: Vec<usize> =
        v["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let data: Vec<f32> = v["data"].as_array().expect("data").iter().map(|d| d.as_f64().unwrap() as f32).collect();
    Tensor::from_vec(data, &shape)
}

/// Asserts shape equality and elementwise closeness (relative `rtol`, absolute floor `atol`).
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Value, rtol: f64, atol: f64) {
    let want = tensor(want);
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.to_vec_f64().iter().zip(want.to_vec_f64()).enumerate() {
        assert!((g - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, PyTorch {w}");
    }
}

/// A JSON array of strings.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().expect("array").iter().map(|s| s.as_str().expect("string").to_string()).collect()
}

/// How the shared eager/compiled tests run a module: eagerly, compiled on the JIT, or compiled
/// on the reference interpreter. One set of tests, three modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Eager autograd.
    Eager,
    /// `compile` with the default (JIT) backend.
    Jit,
    /// `compile` on the reference interpreter.
    Interpreter,
}

/// Every mode.
pub const MODES: [Mode; 3] = [Mode::Eager, Mode::Jit, Mode::Interpreter];

/// The compiled modes.
pub const COMPILED: [tracegrad::compile::Backend; 2] =
    [tracegrad::compile::Backend::Jit, tracegrad::compile::Backend::Interpreter];

impl Mode {
    /// The backend of a compiled mode.
    pub fn backend(self) -> Option<tracegrad::compile::Backend> {
        match self {
            Mode::Eager => None,
            Mode::Jit => Some(tracegrad::compile::Backend::Jit),
            Mode::Interpreter => Some(tracegrad::compile::Backend::Interpreter),
        }
    }
}
