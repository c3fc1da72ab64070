//! tracegrad's JIT backend: fused groups become Cranelift functions, run by an executor.
//!
//! - [`kernel`]: a fused group lowered to a kernel program over a `rows × cols` space.
//! - [`codegen`]: the program as a Cranelift function (vector loops, inline math).
//! - [`math`]: polynomial exp/log/tanh/sigmoid/erf/GELU with stated error bounds, written once
//!   over [`math`]'s `Arith` operations.
//! - [`lanes`]: the same functions on Rust slices at the full vector width (AVX-512, AVX2).
//! - [`module`]: one JIT module per artifact, equal kernels compiled once.
//! - [`exec`]: the plan, the memory planner and the parallel executor.
#![warn(missing_docs)]

pub mod codegen;
pub mod exec;
pub mod kernel;
pub mod lanes;
pub mod math;
pub mod module;

pub use exec::{Backend, Executable};
