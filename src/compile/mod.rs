//! Compiled mode: trace `forward` into the static graph IR, optimize it, and run it. Plans are
//! cached per input signature; hooks become callback nodes that fire at run time.

mod compiled;
pub mod dump;
mod pipeline;
mod trace;
mod train_step;

pub use compiled::{compile, compile_dyn, CompiledModule, Plan};
pub use trace::{is_tracing, CompileError, Symbol};
pub(crate) use trace::{trace_assign, trace_emit, trace_tensor_hook, traced_call};
pub use tracegrad_jit::{Backend, Executable};
pub use train_step::{compile_train_step, StepOptimizer, TrainStep};
