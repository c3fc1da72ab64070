//! tracegrad-compiler: the op definitions shared by eager mode and the compiler.
//!
//! - [`ops`]: every primitive [`Op`] with its shape rule, reference kernel and derivative rule.
//! - [`emitter`]: the abstract builder those rules are written against.
//! - [`composite`]: ops defined from primitives (losses, normalisation, einsum, …).
//!
//! The graph IR, tracer, AOT autodiff, passes and Cranelift backend grow here next; they reuse
//! these definitions unchanged.

pub mod composite;
pub mod einsum;
pub mod emitter;
pub mod ops;

pub use emitter::{Build, Emitter};
pub use ops::{Op, OpError, OpResult, TensorType};
