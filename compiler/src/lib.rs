//! tracegrad-compiler: the op definitions shared by eager mode and the compiler.
//!
//! - [`ops`]: every primitive [`Op`] with its shape rule, reference kernel and derivative rule.
//! - [`emitter`]: the abstract builder those rules are written against.
//! - [`composite`]: ops defined from primitives (losses, normalisation, einsum, …).
//!
//! - [`graph`]: the petgraph IR, which is itself an `Emitter`;
//! - [`autodiff`]: AOT autodiff over the IR, with the same derivative rules;
//! - [`interpret`]: the reference interpreter, the JIT's oracle.
//!
//! The passes and the Cranelift backend grow here next, on the same definitions.

#![warn(missing_docs)]

pub mod autodiff;
pub mod composite;
pub mod einsum;
pub mod emitter;
pub mod fusion;
pub mod graph;
pub mod interpret;
pub mod ops;
pub mod partition;
pub mod passes;

pub use emitter::{Build, Emitter};
pub use ops::{Op, OpError, OpResult, TensorType};
