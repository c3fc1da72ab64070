//! Optimizers. Updates write parameter storage in place (copy-on-write), outside autograd.

use tracegrad_runtime::dispatch;

use crate::tensor::Tensor;

/// A parameter-update rule.
pub trait Optimizer {
    /// Applies one update from the parameters' current gradients.
    fn step(&mut self);
    /// Clears the gradients of every parameter.
    fn zero_grad(&self);
    /// The learning rate.
    fn lr(&self) -> f64;
    /// Changes the learning rate (schedulers use this).
    fn set_lr(&mut self, lr: f64);
}

/// Plain stochastic gradient descent: `p ← p − lr·∇p`.
pub struct Sgd {
    params: Vec<Tensor>,
    lr: f64,
}

impl Sgd {
    /// SGD over `params` with learning rate `lr`. Panics on a negative learning rate, with
    /// PyTorch's message.
    pub fn new(params: Vec<Tensor>, lr: f64) -> Sgd {
        assert!(lr >= 0.0, "Invalid learning rate: {lr}");
        Sgd { params, lr }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) {
        for p in &self.params {
            let Some(g) = p.grad() else { continue };
            let g = g.buffer();
            let lr = self.lr;
            p.update_buffer(|w| {
                dispatch!(float, g.data(), "sgd", |gv: T| {
                    let wv = <T as tracegrad_runtime::Element>::slice_mut(w.make_mut())
                        .expect("parameter and gradient dtypes agree");
                    let lr = lr as T;
                    for (a, &b) in wv.iter_mut().zip(gv) {
                        *a -= lr * b;
                    }
                })
            });
        }
    }

    fn zero_grad(&self) {
        for p in &self.params {
            p.zero_grad();
        }
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
}
