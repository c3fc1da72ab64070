//! Eager calls that run the JIT's own fused kernels.
//!
//! An eager composite (`layer_norm`, `softmax`, `cross_entropy`, ...) is a chain of primitive
//! ops, and the reference kernels run each primitive as its own loop over memory, with libm
//! transcendentals. On a large input the same call instead goes through the compile pipeline
//! once per (op, its parameters, input types, requires_grad, grad mode): the op's own
//! definition is traced into a small graph, differentiated ahead of time when an input needs a
//! gradient, fused and compiled by Cranelift, and cached on the calling thread. Later calls run
//! the cached kernels, and the result joins eager autograd as one node whose backward runs the
//! compiled backward. So eager and compiled mode share one implementation of the fast path
//! (the JIT's kernels and vector math), and the op is still defined once, in
//! `tracegrad-compiler`.
//!
//! Small inputs (under [`MIN_ELEMENTS`] elements) keep the reference path, where a plan's
//! fixed cost would dominate (its f32 transcendentals still run the JIT's math, through
//! `tracegrad_jit::lanes`, in the eager emitter), and so do f64 inputs, which keep libm's
//! accuracy. An f32 transcendental unary call that records no gradient never comes here: the
//! lanes compute it at full width, faster than the 128-bit kernel. A call the pipeline refuses
//! (a shape error, an op the JIT does not lower) falls back to the reference path, which
//! reports misuse exactly as before. Set
//! `TRACEGRAD_EAGER_KERNELS=reference` (or call [`set_enabled`]`(false)`) to run every eager
//! op on the reference kernels.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tracegrad_compiler::interpret::NoCallbacks;
use tracegrad_compiler::TensorType;
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, DType};

use crate::autograd::{custom_op, is_grad_enabled, CustomBackward};
use crate::compile::pipeline::{self, grad_inputs, Goal, Options};
use crate::compile::{is_tracing, trace_with};
use crate::nn::{Module, ModuleCore};
use crate::tensor::Tensor;

/// The element count (of the largest input) from which an eager call runs compiled kernels.
pub const MIN_ELEMENTS: usize = 1 << 15;

/// Cached kernels per thread; past this many, the cache starts afresh.
const CAPACITY: usize = 256;

/// 0: not yet read from the environment; 1: on; 2: off.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Whether large eager calls run compiled kernels (on unless `TRACEGRAD_EAGER_KERNELS` is
/// `reference`, `off` or `0`, or [`set_enabled`] said otherwise).
pub fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("TRACEGRAD_EAGER_KERNELS")
                .map(|v| matches!(v.as_str(), "reference" | "off" | "0"))
                .unwrap_or(false);
            MODE.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
    }
}

/// Turns compiled eager kernels on or off for the whole process (off: every eager op runs on
/// the reference kernels).
pub fn set_enabled(on: bool) {
    MODE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// How many kernels (and refusals) this thread has cached.
pub fn cached_kernels() -> usize {
    CACHE.with(|c| c.borrow().len())
}

/// The module a kernel's trace runs under: none of the user's (so no module hook fires and
/// nothing is lifted).
#[derive(Module)]
struct Bare {
    core: ModuleCore,
}

impl Module for Bare {}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    op: &'static str,
    params: String,
    /// Input types and whether each gets a gradient.
    inputs: Vec<(TensorType, bool)>,
}

/// A compiled eager op: the forward (result first, then the values its backward keeps) and,
/// when some input gets a gradient, the backward (those values and the result's gradient in,
/// one gradient per `wrt` entry out).
struct Kernel {
    forward: Executable,
    backward: Option<Arc<Executable>>,
    wrt: Vec<usize>,
}

thread_local! {
    /// `None`: the pipeline refused this key; the reference path runs it.
    static CACHE: RefCell<HashMap<Key, Option<Rc<Kernel>>>> = RefCell::new(HashMap::new());
}

/// Runs `f` (the op's definition, over its inputs in order) on compiled kernels when the call
/// qualifies: no trace active, compiled eager kernels enabled, an input of at least
/// [`MIN_ELEMENTS`] elements, no float input but f32, and a definition the pipeline accepts. `op` and `params` name
/// the definition: two calls with equal `op`, `params` and input types must compute the same
/// function. `None` means: run the reference path.
pub(crate) fn run(
    op: &'static str,
    params: impl FnOnce() -> String,
    inputs: &[&Tensor],
    f: &dyn Fn(&[Tensor]) -> Tensor,
) -> Option<Tensor> {
    let large = inputs.iter().map(|t| t.numel()).max().unwrap_or(0) >= MIN_ELEMENTS;
    // f32 only: the JIT's transcendentals are f32 polynomials (see jit/src/math.rs for their
    // bounds); f64 keeps the reference kernels' libm accuracy.
    let f32_only = inputs.iter().all(|t| t.dtype() == DType::F32 || !t.dtype().is_float());
    if is_tracing() || !large || !f32_only || !enabled() {
        return None;
    }
    let grad = is_grad_enabled();
    let key = Key {
        op,
        params: params(),
        inputs: inputs.iter().map(|t| (t.tensor_type(), grad && t.requires_grad())).collect(),
    };
    let kernel = CACHE.with(|c| {
        if let Some(k) = c.borrow().get(&key) {
            return k.clone();
        }
        let built = build(&key, f).map(Rc::new);
        let mut c = c.borrow_mut();
        if c.len() >= CAPACITY {
            c.clear();
        }
        c.insert(key, built.clone());
        built
    })?;
    call(&kernel, op, inputs).ok()
}

/// Traces `f` on symbolic inputs of the key's types and compiles it; `None` when the pipeline
/// refuses it, or the definition reaches outside its inputs (a captured tensor, a hook, a
/// random draw, a buffer write).
fn build(key: &Key, f: &dyn Fn(&[Tensor]) -> Tensor) -> Option<Kernel> {
    let bare = Bare { core: ModuleCore::new() };
    let traced = trace_with(&bare, &key.inputs, f).ok()?;
    let pure = traced.lifted_inputs.is_empty()
        && traced.callbacks.is_empty()
        && traced.updates.is_empty()
        && traced.tensor_hooks.is_empty()
        && traced.rng.is_none();
    if !pure {
        return None;
    }
    let wrt = grad_inputs(&key.inputs, &[], true);
    let opts = Options { goal: Goal::Call, wrt, donate: false, backend: Backend::Jit, dump: false };
    let mut built = pipeline::run(traced, &opts).ok()?;
    let forward = built.take_exec().ok()?;
    Some(Kernel { forward, backward: built.backward_exec.map(Arc::new), wrt: built.wrt })
}

/// Runs a compiled op on `inputs`; with a backward, the result records one autograd node.
fn call(k: &Kernel, op: &'static str, inputs: &[&Tensor]) -> Result<Tensor, String> {
    let args: Vec<Buffer> = inputs.iter().map(|t| t.buffer()).collect();
    let mut out = k.forward.run(&args, &NoCallbacks).map_err(|e| e.to_string())?;
    let y = out.remove(0);
    let Some(backward) = k.backward.clone() else {
        return Ok(Tensor::from_buffer(y));
    };
    let saved = out;
    let wrt: Vec<Tensor> = k.wrt.iter().map(|&i| inputs[i].clone()).collect();
    let n = wrt.len();
    let f: CustomBackward = Arc::new(move |grads: &[Option<Tensor>]| {
        let Some(g) = &grads[0] else { return Ok(vec![None; n]) };
        let mut bargs = saved.clone();
        bargs.push(g.buffer());
        let gs = backward.run(&bargs, &NoCallbacks).map_err(|e| e.to_string())?;
        Ok(gs.into_iter().map(|b| Some(Tensor::from_buffer(b))).collect())
    });
    Ok(custom_op(op, &wrt, vec![y], f).remove(0))
}
