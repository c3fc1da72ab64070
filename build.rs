//! Compiles the vendored `proto/onnx.proto` into Rust types (prost) for `src/onnx/`.
//!
//! protox is a pure-Rust protobuf compiler, so the build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["onnx.proto"], ["proto"])?;
    // The schema's comments are prose for humans, not rustdoc: left out, they cannot break
    // `cargo doc` (stray `<tags>`) or become doctests.
    prost_build::Config::new().disable_comments(["."]).compile_fds(descriptors)?;
    Ok(())
}
