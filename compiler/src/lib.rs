//! tracegrad-compiler: the op definitions shared by eager mode and the compiler, the graph IR,
//! and the graph-to-graph passes.
//!
//! - [`ops`]: every primitive [`Op`] with its shape rule, reference kernel, derivative rule and
//!   properties (elementwise, cheap to recompute, fallible, JIT-lowerable).
//! - [`emitter`]: the abstract builder those rules are written against.
//! - [`composite`] and [`einsum`]: ops defined from primitives (losses, normalisation, einsum, …).
//! - [`graph`]: the petgraph IR, which is itself an `Emitter`.
//! - [`autodiff`]: AOT autodiff over the IR, with the same derivative rules.
//! - [`partition`]: the split of a joint graph into forward and backward with saved values.
//! - [`passes`]: DCE, CSE, constant folding and algebraic simplification.
//! - [`fusion`]: the grouping of a graph's nodes into kernels.
//! - [`interpret`]: the reference interpreter, the JIT's oracle.
//!
//! The Cranelift backend that compiles the fused kernels is the `tracegrad-jit` crate, which
//! builds on these definitions.

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
