//! Runs a compiled plan's callbacks: the hooks a trace turned into callback nodes, on real
//! tensors. Forward (pre-)hooks run under eager autograd when the call records a backward, so
//! the backward can replay their tape; module backward hooks run through the same
//! [`BackwardHooks`](crate::nn::BackwardHooks) as in eager mode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracegrad_compiler::interpret::CallbackRunner;
use tracegrad_compiler::TensorType;
use tracegrad_runtime::Buffer;

use super::trace::{module_at, CallbackSpec};
use crate::autograd::GradHook;
use crate::nn::{ForwardHook, ForwardPreHook, Module, ModuleExt};
use crate::tensor::{lock, Tensor};

/// A forward hook's replay: the leaves it ran on and its results, with their eager tape.
type Replay = (Vec<Tensor>, Vec<Tensor>);

/// What one call's callbacks share between its forward and backward graphs.
#[derive(Default)]
pub(crate) struct CallState {
    /// Forward (pre-)hooks run on leaves under autograd: (leaves, results) per callback id.
    replays: Mutex<HashMap<usize, Replay>>,
    /// grad_output per module-output callback id, for that module's full backward hooks.
    grad_outputs: Mutex<HashMap<usize, Vec<Option<Tensor>>>>,
}

/// Runs a plan's callbacks. `root` is needed by forward hooks (they receive their module);
/// `state` is set when the call records for a backward.
pub(crate) struct Runner<'a> {
    pub(crate) root: Option<&'a dyn Module>,
    pub(crate) specs: &'a [CallbackSpec],
    pub(crate) state: Option<Arc<CallState>>,
}

fn zeros_like(b: &Buffer) -> Buffer {
    Buffer::zeros(b.dtype(), b.shape())
}

impl Runner<'_> {
    fn module(&self, path: &str) -> Result<crate::nn::ModuleRef<'_>, String> {
        let root = self.root.ok_or("a forward callback ran without its module")?;
        root.get_submodule(path).map_err(|e| e.to_string())
    }

    /// Runs a forward (pre-)hook. When recording, its inputs are leaves under autograd so the
    /// backward can replay the hook's own computation.
    /// Returns the hook's replacement, or `None` when it returned nothing (then the recorded
    /// results are `identity(leaves)`).
    fn forward_hook(
        &self,
        id: usize,
        args: &[Buffer],
        run: impl FnOnce(&[Tensor]) -> Option<Vec<Tensor>>,
        identity: impl FnOnce(&[Tensor]) -> Vec<Tensor>,
    ) -> Result<Option<Vec<Tensor>>, String> {
        let record = self.state.is_some();
        let leaves: Vec<Tensor> = args
            .iter()
            .map(|b| {
                let t = Tensor::from_buffer(b.clone());
                if record && b.dtype().is_float() {
                    t.requires_grad_(true)
                } else {
                    t
                }
            })
            .collect();
        let out = if record { crate::enable_grad(|| run(&leaves)) } else { crate::no_grad(|| run(&leaves)) };
        if let Some(st) = &self.state {
            let results = out.clone().unwrap_or_else(|| identity(&leaves));
            lock(&st.replays).insert(id, (leaves, results));
        }
        Ok(out)
    }
}

impl CallbackRunner for Runner<'_> {
    fn run(&self, id: usize, args: &[Buffer]) -> Result<Vec<Buffer>, String> {
        match &self.specs[id] {
            CallbackSpec::ForwardPre { path, hook } => self.forward_pre(id, path, hook, args),
            CallbackSpec::Forward { path, hook, n_args } => self.forward(id, path, hook, *n_args, args),
            CallbackSpec::ModuleInputs { .. } | CallbackSpec::ModuleOutput { .. } => Ok(args.to_vec()),
            CallbackSpec::ReplayBackward { forward } => self.replay_backward(*forward, args),
            CallbackSpec::BackwardPre { output_callback } => self.backward_pre(*output_callback, args),
            CallbackSpec::FullBackward { inputs_callback } => self.full_backward(*inputs_callback, args),
            CallbackSpec::TensorHook { hook } => tensor_hook(hook, args),
            CallbackSpec::ParamGrads { params } => super::param_hooks::run_param_hooks(params, args),
        }
    }
}

impl Runner<'_> {
    fn state(&self) -> Result<&CallState, String> {
        self.state.as_deref().ok_or_else(|| "a backward callback ran without its forward".to_string())
    }

    fn forward_pre(
        &self,
        id: usize,
        path: &str,
        hook: &ForwardPreHook,
        args: &[Buffer],
    ) -> Result<Vec<Buffer>, String> {
        let module = self.module(path)?;
        let Some(new) = self.forward_hook(id, args, |ts| hook(&*module, ts), |ts| ts.to_vec())? else {
            return Ok(args.to_vec());
        };
        if new.len() != args.len() {
            return Err(format!(
                "the forward pre-hook of {} returned {} inputs, expected {}",
                module_at(path),
                new.len(),
                args.len()
            ));
        }
        args.iter().zip(&new).map(|(a, n)| check_same(path, "forward pre-hook", a, n)).collect()
    }

    fn forward(
        &self,
        id: usize,
        path: &str,
        hook: &ForwardHook,
        n: usize,
        args: &[Buffer],
    ) -> Result<Vec<Buffer>, String> {
        let module = self.module(path)?;
        let new = self.forward_hook(
            id,
            args,
            |ts| hook(&*module, &ts[..n], &ts[n]).map(|t| vec![t]),
            |ts| vec![ts[n].clone()],
        )?;
        match new {
            None => Ok(vec![args[n].clone()]),
            Some(t) => Ok(vec![check_same(path, "forward hook", &args[n], &t[0])?]),
        }
    }

    /// The backward of forward (pre-)hook `forward`: its recorded tape, run on `grads`.
    fn replay_backward(&self, forward: usize, grads: &[Buffer]) -> Result<Vec<Buffer>, String> {
        let (leaves, outs) =
            lock(&self.state()?.replays).remove(&forward).ok_or("internal: the forward hook's replay is missing")?;
        crate::enable_grad(|| -> Result<(), String> {
            for (o, g) in outs.iter().zip(grads) {
                if o.requires_grad() {
                    o.try_backward_with(&Tensor::from_buffer(g.clone())).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })?;
        Ok(leaves.iter().map(|l| l.grad().map(|g| g.buffer()).unwrap_or_else(|| zeros_like(&l.buffer()))).collect())
    }

    fn backward_pre(&self, output_callback: usize, grads: &[Buffer]) -> Result<Vec<Buffer>, String> {
        let CallbackSpec::ModuleOutput { hooks } = &self.specs[output_callback] else {
            return Err("internal: BackwardPre without its ModuleOutput".into());
        };
        let g: Vec<Option<Tensor>> = grads.iter().map(|b| Some(Tensor::from_buffer(b.clone()))).collect();
        let g = hooks.on_grad_output(&g)?;
        lock(&self.state()?.grad_outputs).insert(output_callback, g.clone());
        Ok(to_buffers(&g, grads))
    }

    fn full_backward(&self, inputs_callback: usize, grads: &[Buffer]) -> Result<Vec<Buffer>, String> {
        let CallbackSpec::ModuleInputs { hooks, requires, output_callback } = &self.specs[inputs_callback] else {
            return Err("internal: FullBackward without its ModuleInputs".into());
        };
        let go = lock(&self.state()?.grad_outputs).get(output_callback).cloned().unwrap_or_default();
        let gi: Vec<Option<Tensor>> =
            grads.iter().zip(requires).map(|(b, &r)| r.then(|| Tensor::from_buffer(b.clone()))).collect();
        Ok(to_buffers(&hooks.on_grad_input(gi, &go)?, grads))
    }
}

fn tensor_hook(hook: &GradHook, grad: &[Buffer]) -> Result<Vec<Buffer>, String> {
    let g = Tensor::from_buffer(grad[0].clone());
    match hook(&g) {
        None => Ok(grad.to_vec()),
        Some(new) => {
            crate::autograd::check_replacement("a tensor hook", &g, &new)?;
            Ok(vec![new.buffer()])
        }
    }
}

/// Hook results as buffers, with zeros (of `like`'s types) where a hook left no gradient.
fn to_buffers(grads: &[Option<Tensor>], like: &[Buffer]) -> Vec<Buffer> {
    grads.iter().zip(like).map(|(t, a)| t.as_ref().map(|t| t.buffer()).unwrap_or_else(|| zeros_like(a))).collect()
}

fn check_same(path: &str, what: &str, old: &Buffer, new: &Tensor) -> Result<Buffer, String> {
    let nb = new.buffer();
    if TensorType::of(&nb) != TensorType::of(old) {
        return Err(format!(
            "the {what} of {} returned {} where {} was expected (a compiled module's hooks must keep shape and dtype)",
            module_at(path),
            TensorType::of(&nb),
            TensorType::of(old)
        ));
    }
    Ok(nb)
}
