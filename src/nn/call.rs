//! The hook pipeline of `module(args)`, PyTorch's `__call__`, written once.
//!
//! [`call_module`] fixes the order: forward pre-hooks (global, then the module's own), the
//! backward-hook identity on the inputs, `forward`, forward hooks, the backward pre-hook
//! identity on the output. What each step does is a [`CallBackend`]'s business: eagerly
//! ([`EagerCall`]) a hook runs at once and an identity is an autograd node; while tracing (the
//! tracer's backend in `src/compile/trace.rs`) each becomes a callback node that the compiled
//! plan runs. Either way the backward hooks run through [`BackwardHooks`], whose replacement
//! gradients [`check_grads`] checks, so eager and compiled mode accept and reject the same.

use std::sync::{Arc, Mutex};

use tracegrad_runtime::ShapeDisplay;

use super::module::{merged_hooks, BackwardHook, BackwardPreHook, ForwardHook, ForwardPreHook, Module};
use crate::autograd::{check_replacement, custom_identity, is_grad_enabled, CustomBackward};
use crate::tensor::{lock, Tensor};

/// The hooks one call runs: the global ones, then the module's own, each in registration order.
pub(crate) struct CallHooks {
    pub(crate) forward_pre: Vec<ForwardPreHook>,
    pub(crate) forward: Vec<ForwardHook>,
    pub(crate) backward_pre: Vec<BackwardPreHook>,
    pub(crate) backward: Vec<BackwardHook>,
}

/// One call's backward hooks, as both identities (and, compiled, their callbacks) run them.
pub(crate) struct BackwardHooks {
    /// The module's type name, which errors name.
    module: String,
    pre: Vec<BackwardPreHook>,
    full: Vec<BackwardHook>,
    n_inputs: usize,
    /// Whether some input takes a gradient. If none does, no identity sees `grad_input`, and
    /// the full backward hooks fire with the backward pre-hooks, on `grad_input` all `None`.
    inputs_wired: bool,
}

impl BackwardHooks {
    /// Runs the backward pre-hooks on `grad_output` (each may replace it), then, when no input
    /// is wired, the full backward hooks. Returns the final `grad_output`.
    pub(crate) fn on_grad_output(&self, grad_output: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>, String> {
        let mut g = grad_output.to_vec();
        for h in &self.pre {
            if let Some(new) = h(&g) {
                check_grads(&format!("a full backward pre-hook of {}", self.module), &g, &new)?;
                g = new;
            }
        }
        if !self.inputs_wired {
            self.on_grad_input(vec![None; self.n_inputs], &g)?;
        }
        Ok(g)
    }

    /// Runs the full backward hooks on `grad_input` (`None` where an input takes no gradient);
    /// each may replace it. Returns the final `grad_input`.
    pub(crate) fn on_grad_input(
        &self,
        mut grad_input: Vec<Option<Tensor>>,
        grad_output: &[Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>, String> {
        for h in &self.full {
            if let Some(new) = h(&grad_input, grad_output) {
                check_grads(&format!("a full backward hook of {}", self.module), &grad_input, &new)?;
                grad_input = new;
            }
        }
        Ok(grad_input)
    }
}

/// Checks the gradients a hook returned against the ones it replaces: the count, then each
/// one's shape and dtype, and that none appears where there was none.
pub(crate) fn check_grads(what: &str, old: &[Option<Tensor>], new: &[Option<Tensor>]) -> Result<(), String> {
    if old.len() != new.len() {
        return Err(format!("{what} returned {} gradients, expected {}", new.len(), old.len()));
    }
    for (o, n) in old.iter().zip(new) {
        match (o, n) {
            (Some(o), Some(n)) => check_replacement(what, o, n)?,
            (None, Some(n)) => {
                return Err(format!(
                    "{what} returned a gradient of shape {} where there is none",
                    ShapeDisplay(&n.shape())
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// What differs between running a module call and tracing it: each step of the pipeline.
pub(crate) trait CallBackend {
    /// A forward pre-hook over the (current) inputs; returns the inputs `forward` sees next.
    fn forward_pre_hook(&mut self, m: &dyn Module, hook: &ForwardPreHook, args: Vec<Tensor>) -> Vec<Tensor>;
    /// The identity on the inputs whose backward runs the full backward hooks on `grad_input`.
    fn wire_inputs(&mut self, args: Vec<Tensor>, hooks: &Arc<BackwardHooks>) -> Vec<Tensor>;
    /// A forward hook over the inputs and the (current) output; returns the output.
    fn forward_hook(&mut self, m: &dyn Module, hook: &ForwardHook, args: &[Tensor], out: Tensor) -> Tensor;
    /// The identity on the output whose backward runs the backward pre-hooks on `grad_output`.
    fn wire_output(&mut self, out: Tensor, hooks: &Arc<BackwardHooks>) -> Tensor;
    /// The call has returned. Not run when `forward` panics: a failed trace names the module
    /// it failed in.
    fn finish(&mut self) {}
}

/// `module(args)`: the pipeline on the active trace's backend, or eagerly.
pub(crate) fn call_module(m: &dyn Module, args: &[Tensor]) -> Tensor {
    let hooks = merged_hooks(m);
    match crate::trace_seam::tracer() {
        Some(tracer) => run_call(m, args, &hooks, &mut *tracer.module_call(m)),
        None => run_call(m, args, &hooks, &mut EagerCall::default()),
    }
}

fn run_call(m: &dyn Module, args: &[Tensor], hooks: &CallHooks, backend: &mut dyn CallBackend) -> Tensor {
    let mut args = args.to_vec();
    for h in &hooks.forward_pre {
        args = backend.forward_pre_hook(m, h, args);
    }
    let wire = is_grad_enabled() && (!hooks.backward.is_empty() || !hooks.backward_pre.is_empty());
    // Built only when backward hooks exist: a call without them allocates nothing here.
    let backward = wire.then(|| {
        Arc::new(BackwardHooks {
            module: m.type_name(),
            pre: hooks.backward_pre.clone(),
            full: hooks.backward.clone(),
            n_inputs: args.len(),
            inputs_wired: args.iter().any(Tensor::requires_grad),
        })
    });
    if let Some(b) = backward.as_ref().filter(|b| b.inputs_wired) {
        args = backend.wire_inputs(args, b);
    }
    let mut out = m.forward_many(&args);
    for h in &hooks.forward {
        out = backend.forward_hook(m, h, &args, out);
    }
    if let Some(b) = backward.as_ref().filter(|_| out.requires_grad()) {
        out = backend.wire_output(out, b);
    }
    backend.finish();
    out
}

/// Runs hooks at once; the identities are autograd nodes named as PyTorch's.
#[derive(Default)]
struct EagerCall {
    /// The output identity's backward leaves `grad_output` here for the full backward hooks
    /// (made on first use: most calls have no backward hooks).
    grad_output: Option<Arc<Mutex<Vec<Option<Tensor>>>>>,
}

impl EagerCall {
    fn grad_output(&mut self) -> Arc<Mutex<Vec<Option<Tensor>>>> {
        self.grad_output.get_or_insert_with(Default::default).clone()
    }
}

impl CallBackend for EagerCall {
    fn forward_pre_hook(&mut self, m: &dyn Module, hook: &ForwardPreHook, args: Vec<Tensor>) -> Vec<Tensor> {
        hook(m, &args).unwrap_or(args)
    }

    fn wire_inputs(&mut self, args: Vec<Tensor>, hooks: &Arc<BackwardHooks>) -> Vec<Tensor> {
        let (grad_output, hooks) = (self.grad_output(), hooks.clone());
        let f: CustomBackward = Arc::new(move |grad_input: &[Option<Tensor>]| {
            let go = lock(&grad_output).clone();
            hooks.on_grad_input(grad_input.to_vec(), &go)
        });
        custom_identity("BackwardHookFunction", &args, f)
    }

    fn forward_hook(&mut self, m: &dyn Module, hook: &ForwardHook, args: &[Tensor], out: Tensor) -> Tensor {
        hook(m, args, &out).unwrap_or(out)
    }

    fn wire_output(&mut self, out: Tensor, hooks: &Arc<BackwardHooks>) -> Tensor {
        let (grad_output, hooks) = (self.grad_output(), hooks.clone());
        let f: CustomBackward = Arc::new(move |grads: &[Option<Tensor>]| {
            let g = hooks.on_grad_output(grads)?;
            *lock(&grad_output) = g.clone();
            Ok(g)
        });
        custom_identity("BackwardHookFunction", &[out], f).remove(0)
    }
}
