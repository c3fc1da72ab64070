//! tracegrad-runtime: what executes. Storage and dtypes, the eager reference kernels (gemm
//! matmul, pointwise loops, reductions, conv, gather/scatter) and the seeded generator.
//!
//! This crate knows nothing of ops' meaning: op definitions in `tracegrad-compiler` pick a
//! kernel and pass it the scalar function. That keeps each op defined once.

#![warn(missing_docs)]

pub mod buffer;
pub mod dtype;
pub mod kernels;
pub mod panic;
pub mod philox;
pub mod pool;
pub mod random;
pub mod shape;
pub mod team;

pub use buffer::{Buffer, Data, Element};
pub use dtype::DType;
pub use panic::panic_message;
pub use random::{Generator, RngState};
pub use shape::{Dims, ShapeDisplay};
