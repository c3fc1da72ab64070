//! # tracegrad
//!
//! PyTorch-style tensors, autograd and modules in Rust, run eagerly or compiled:
//! [`compile::compile`] traces a module into a static graph (petgraph IR), differentiates it
//! ahead of time, optimizes and fuses it, and runs it on a Cranelift JIT.
//!
//! ```
//! use tracegrad::{nn, nn::{Module, ModuleExt}, optim::{Optimizer, Sgd}, Tensor};
//!
//! tracegrad::manual_seed(0);
//! let model = nn::Sequential::new()
//!     .add(nn::Linear::new(4, 8))
//!     .add(nn::ReLU::new())
//!     .add(nn::Linear::new(8, 3));
//! let mut opt = Sgd::new(model.parameters(), 0.1);
//! let x = Tensor::randn(&[16, 4]);
//! let y = Tensor::from_vec((0..16).map(|i| i % 3).collect::<Vec<i64>>(), &[16]);
//! let loss = model.forward(&x).cross_entropy(&y);
//! opt.zero_grad();
//! loss.backward();
//! opt.step();
//! assert!(model.parameters()[0].grad().is_some());
//! ```

#![warn(missing_docs)]

// Lets `#[derive(Module)]`'s `::tracegrad::…` paths resolve inside this crate too.
extern crate self as tracegrad;

pub mod autograd;
pub mod bench;
pub mod checkpoint;
pub mod compile;
pub mod data;
mod display;
pub mod distributed;
pub mod eager_kernels;
pub mod hooks;
pub mod interop;
pub mod linalg;
pub mod nn;
pub mod onnx;
mod ops;
pub mod optim;
pub mod tensor;
mod trace_seam;
pub mod train;
pub mod vision;
pub mod zoo;

pub use autograd::{enable_grad, is_grad_enabled, no_grad, Eager};
pub use compile::{compile, CompileError, CompiledModule};
pub use ops::linear;
pub use tensor::{get_rng_state, manual_seed, set_rng_state, Tensor};
pub use tracegrad_compiler::composite::LossReduction;
pub use tracegrad_compiler::{Op, OpError, TensorType};
pub use tracegrad_runtime::{pool, Buffer, DType, Generator, RngState};

/// The README's Rust blocks run as doctests, so its API example stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
