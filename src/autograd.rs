//! Eager autograd: grad mode, the eager [`Emitter`], and the backward engine.
//!
//! Backward walks the recorded graph in reverse topological order and calls each op's
//! derivative rule (`Op::vjp`) through the same eager emitter, so eager backward uses exactly
//! the rules the AOT autodiff pass will use. Gradients of a tensor used several times are
//! summed before its own rule runs; leaves accumulate into `.grad`.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};

use tracegrad_compiler::{Build, Emitter, Op, OpResult, TensorType};
use tracegrad_runtime::Buffer;

use crate::tensor::{eager_ok, lock_poison, Tensor};

/// The op that produced a non-leaf tensor, and its operands.
pub(crate) struct GradFn {
    pub(crate) op: Op,
    pub(crate) inputs: Vec<Tensor>,
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops record autograd history on this thread.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Restores the previous grad mode when dropped.
pub struct GradModeGuard(bool);

impl GradModeGuard {
    /// Sets grad mode to `enabled` until the guard drops.
    pub fn new(enabled: bool) -> GradModeGuard {
        GradModeGuard(GRAD_ENABLED.with(|g| g.replace(enabled)))
    }
}

impl Drop for GradModeGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.0));
    }
}

/// Runs `f` with autograd recording off (`with torch.no_grad():`).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _g = GradModeGuard::new(false);
    f()
}

/// Runs `f` with autograd recording on (`with torch.enable_grad():`).
pub fn enable_grad<R>(f: impl FnOnce() -> R) -> R {
    let _g = GradModeGuard::new(true);
    f()
}

/// The eager emitter: computes each op at once with the reference kernels and records a
/// [`GradFn`] when grad mode is on and some operand requires grad.
pub struct Eager;

impl Emitter for Eager {
    type Value = Tensor;

    fn emit(&mut self, op: Op, inputs: &[&Tensor]) -> OpResult<Tensor> {
        let bufs: Vec<Buffer> = inputs.iter().map(|t| t.buffer()).collect();
        let types: Vec<TensorType> = bufs.iter().map(TensorType::of).collect();
        let out_type = op.infer(&types)?;
        let refs: Vec<&Buffer> = bufs.iter().collect();
        let out = op.eval(&refs, &out_type)?;
        let record = out_type.dtype.is_float() && is_grad_enabled() && inputs.iter().any(|t| t.requires_grad());
        Ok(if record {
            let inputs = inputs.iter().map(|&t| t.clone()).collect();
            Tensor::with_grad_fn(out, Some(GradFn { op, inputs }))
        } else {
            Tensor::from_buffer(out)
        })
    }

    fn value_type(&self, v: &Tensor) -> TensorType {
        v.tensor_type()
    }
}

/// Tensors reachable from `root` through grad_fns, inputs before the ops that use them.
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative DFS: (tensor, children pushed yet?) keeps deep graphs off the call stack.
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(gf) = &t.0.grad_fn {
            for i in gf.inputs.iter().rev() {
                if i.requires_grad() && !seen.contains(&i.id()) {
                    stack.push((i.clone(), false));
                }
            }
        }
    }
    order
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) {
    *slot = Some(match slot.take() {
        None => g,
        Some(prev) => eager_ok(Eager.add(&prev, &g)),
    });
}

impl Tensor {
    /// Backpropagates from a scalar (`loss.backward()`).
    #[track_caller]
    pub fn backward(&self) {
        if self.numel() != 1 {
            panic!("grad can be implicitly created only for scalar outputs");
        }
        let ones = Tensor::full_dtype(&self.shape(), 1.0, self.dtype());
        self.backward_with(&ones);
    }

    /// Backpropagates `grad` as the gradient of this tensor (`t.backward(grad)`).
    #[track_caller]
    pub fn backward_with(&self, grad: &Tensor) {
        if !self.requires_grad() {
            panic!("element 0 of tensors does not require grad and does not have a grad_fn");
        }
        if grad.shape() != self.shape() {
            panic!(
                "Mismatch in shape: grad_output[0] has a shape of torch.Size({:?}) and output[0] has a shape of torch.Size({:?}).",
                grad.shape(),
                self.shape()
            );
        }
        let grad = if grad.dtype() == self.dtype() {
            grad.detach()
        } else {
            eager_ok(Eager.cast(&grad.detach(), self.dtype()))
        };
        let order = topo_order(self);
        let _mode = GradModeGuard::new(false);
        let mut pending: HashMap<usize, Option<Tensor>> = HashMap::new();
        pending.insert(self.id(), Some(grad));
        for t in order.iter().rev() {
            let Some(Some(g)) = pending.remove(&t.id()) else { continue };
            match &t.0.grad_fn {
                None => {
                    if t.0.requires_grad.load(std::sync::atomic::Ordering::Relaxed) {
                        accumulate(&mut *lock_poison(t.0.grad.lock()), g);
                    }
                }
                Some(gf) => {
                    if t.retains_grad() {
                        accumulate(&mut *lock_poison(t.0.grad.lock()), g.clone());
                    }
                    let inputs: Vec<&Tensor> = gf.inputs.iter().collect();
                    let grads = eager_ok(gf.op.vjp(&mut Eager, &inputs, t, &g));
                    for (input, gi) in gf.inputs.iter().zip(grads) {
                        if let Some(gi) = gi {
                            if input.requires_grad() {
                                debug_assert_eq!(
                                    gi.shape(),
                                    input.shape(),
                                    "gradient shape of {} operand",
                                    gf.op.name()
                                );
                                accumulate(pending.entry(input.id()).or_insert(None), gi);
                            }
                        }
                    }
                }
            }
        }
    }
}
