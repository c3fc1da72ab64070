//! Compiled mode: trace `forward` into the static graph IR, optimize it, and run it. Plans are
//! cached per input signature; hooks become callback nodes that fire at run time.

mod callbacks;
mod compiled;
pub mod dump;
mod param_hooks;
pub(crate) mod pipeline;
mod trace;
mod train_step;

pub use crate::trace_seam::{is_tracing, Symbol};
pub use compiled::{compile, compile_dyn, CompiledModule, Plan};
pub(crate) use trace::trace_with;
pub use trace::CompileError;
pub use tracegrad_jit::{Backend, Executable};
pub use train_step::{compile_train_step, StepOptimizer, TrainStep};
