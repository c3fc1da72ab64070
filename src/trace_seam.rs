//! The seam between eager code and the tracer.
//!
//! Eager code (the `Eager` emitter, `Tensor::assign`, `Tensor::register_hook`, module calls)
//! asks [`tracer`] whether a trace is active on this thread and, if so, hands its work to the
//! [`Tracer`]; otherwise it computes. The tracer in `src/compile/trace.rs` implements the trait
//! and installs itself for the length of one trace, so the layers below `compile` never name
//! it: the dependency points from the compiler to eager code, never back.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tracegrad_compiler::graph::NodeId;
use tracegrad_compiler::{Op, OpResult, TensorType};

use crate::autograd::GradHook;
use crate::nn::{CallBackend, Module};
use crate::tensor::Tensor;

/// The graph node a symbolic tensor stands for.
#[derive(Clone, Debug)]
pub struct Symbol {
    /// The trace that made it (a symbolic tensor is only valid inside its own trace).
    pub(crate) trace: u64,
    pub(crate) node: NodeId,
    pub(crate) ty: TensorType,
}

/// What eager code asks of an active trace.
pub(crate) trait Tracer {
    /// Records `op` over `inputs` and returns the symbolic result.
    fn emit(&self, op: &Op, inputs: &[&Tensor]) -> OpResult<Tensor>;
    /// Records the in-place write `target ← value` (a module buffer's update).
    fn assign(&self, target: &Tensor, value: &Tensor) -> Result<(), String>;
    /// Records a gradient hook on the symbolic tensor `t`; `removed` is set when its handle
    /// is removed.
    fn tensor_hook(&self, t: &Tensor, hook: GradHook, removed: Arc<AtomicBool>);
    /// The graph's generator-state input (`[seed, offset]`, `i64[2]`) and where a random draw of
    /// `blocks` Philox blocks starts past its offset: draws are laid out one after another, as
    /// eager mode would make them, and each call advances the generator by their total.
    fn rng(&self, blocks: u64) -> (Tensor, u64);
    /// The backend that records one call of `m` (its scope and its hooks as callbacks).
    fn module_call<'a>(&'a self, m: &'a dyn Module) -> Box<dyn CallBackend + 'a>;
}

thread_local! {
    static TRACER: RefCell<Option<Rc<dyn Tracer>>> = const { RefCell::new(None) };
}

/// The trace active on this thread, if any.
pub(crate) fn tracer() -> Option<Rc<dyn Tracer>> {
    TRACER.with(|t| t.borrow().clone())
}

/// Whether a trace is active on this thread.
pub fn is_tracing() -> bool {
    TRACER.with(|t| t.borrow().is_some())
}

/// Makes `tracer` the active trace of this thread (`None` ends it).
pub(crate) fn set_tracer(tracer: Option<Rc<dyn Tracer>>) {
    TRACER.with(|t| *t.borrow_mut() = tracer);
}
