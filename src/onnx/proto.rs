//! The ONNX protobuf types, generated at build time from the vendored `proto/onnx.proto`
//! by prost-build (driven by protox, see `build.rs`).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
