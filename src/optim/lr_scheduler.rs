//! Learning-rate schedulers (`torch.optim.lr_scheduler`).
//!
//! A scheduler reads and writes the learning rate of any [`Optimizer`] through
//! [`Optimizer::lr`] / [`Optimizer::set_lr`]. As in PyTorch, building one counts as epoch 0
//! (the learning rate it finds becomes the base learning rate), and each [`LrScheduler::step`]
//! advances one epoch and sets the new rate. The updates use PyTorch's recursive ("chainable")
//! formulas, which start from the optimizer's *current* learning rate, so the sequence of values
//! matches PyTorch's step-by-step output bit for bit.
//!
//! ```
//! use tracegrad::optim::{CosineAnnealingLR, LrScheduler, Optimizer, Sgd};
//! use tracegrad::Tensor;
//!
//! let mut opt = Sgd::new(vec![Tensor::zeros(&[2]).requires_grad_(true)], 0.1);
//! let mut sched = CosineAnnealingLR::new(&opt, 10, 0.0);
//! for _ in 0..10 {
//!     opt.step();
//!     sched.step(&mut opt);
//! }
//! assert!(opt.lr().abs() < 1e-12);
//! ```

use std::f64::consts::PI;

use super::Optimizer;

/// A rule that changes an optimizer's learning rate once per epoch.
pub trait LrScheduler {
    /// Advances one epoch and sets the optimizer's learning rate for it.
    fn step(&mut self, opt: &mut dyn Optimizer);
    /// The learning rate this scheduler last set (`get_last_lr()`, for the single group).
    fn get_last_lr(&self) -> f64;
    /// The current epoch: 0 after construction, incremented by every [`step`](Self::step).
    fn last_epoch(&self) -> usize;
}

/// The bookkeeping every scheduler shares: the base rate, the epoch count and the rate set last.
#[derive(Clone, Debug)]
struct Epochs {
    base_lr: f64,
    last_epoch: usize,
    last_lr: f64,
}

impl Epochs {
    /// Epoch 0: the optimizer's current learning rate becomes the base rate.
    fn new(opt: &dyn Optimizer) -> Epochs {
        let lr = opt.lr();
        Epochs { base_lr: lr, last_epoch: 0, last_lr: lr }
    }

    /// Advances one epoch and sets `rule(self, current rate)` as the learning rate.
    fn advance(&mut self, opt: &mut dyn Optimizer, rule: impl FnOnce(&Epochs, f64) -> f64) {
        self.last_epoch += 1;
        let lr = rule(self, opt.lr());
        opt.set_lr(lr);
        self.last_lr = lr;
    }
}

/// Decays the learning rate by `gamma` every `step_size` epochs (`StepLR`):
/// `lr = base_lr · gamma^⌊epoch / step_size⌋`, computed as PyTorch does, by multiplying the
/// current rate by `gamma` at each multiple of `step_size`.
#[derive(Clone, Debug)]
pub struct StepLR {
    step_size: usize,
    gamma: f64,
    epochs: Epochs,
}

impl StepLR {
    /// A scheduler for `opt`, whose current learning rate becomes the base rate. Panics if
    /// `step_size` is 0.
    #[track_caller]
    pub fn new(opt: &dyn Optimizer, step_size: usize, gamma: f64) -> StepLR {
        assert!(step_size > 0, "StepLR: step_size must be positive");
        StepLR { step_size, gamma, epochs: Epochs::new(opt) }
    }

    /// Epochs between two decays.
    pub fn step_size(&self) -> usize {
        self.step_size
    }

    /// The decay factor.
    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// The learning rate at epoch 0.
    pub fn base_lr(&self) -> f64 {
        self.epochs.base_lr
    }
}

impl LrScheduler for StepLR {
    fn step(&mut self, opt: &mut dyn Optimizer) {
        let (step_size, gamma) = (self.step_size, self.gamma);
        // `lr * gamma` at each multiple of step_size, else unchanged (PyTorch's chainable form).
        self.epochs.advance(opt, |e, lr| if e.last_epoch % step_size == 0 { lr * gamma } else { lr });
    }

    fn get_last_lr(&self) -> f64 {
        self.epochs.last_lr
    }

    fn last_epoch(&self) -> usize {
        self.epochs.last_epoch
    }
}

/// Cosine annealing from the base rate to `eta_min` over `t_max` epochs, then back up, and so
/// on (`CosineAnnealingLR`). In exact arithmetic
/// `lr = eta_min + (base_lr − eta_min)·(1 + cos(π·epoch/t_max))/2`; the rate is computed with
/// PyTorch's recursive formula from the current rate, so values match PyTorch's to the bit.
#[derive(Clone, Debug)]
pub struct CosineAnnealingLR {
    t_max: usize,
    eta_min: f64,
    epochs: Epochs,
}

impl CosineAnnealingLR {
    /// A scheduler for `opt`, whose current learning rate becomes the base rate. Panics if
    /// `t_max` is 0.
    #[track_caller]
    pub fn new(opt: &dyn Optimizer, t_max: usize, eta_min: f64) -> CosineAnnealingLR {
        assert!(t_max > 0, "CosineAnnealingLR: t_max must be positive");
        CosineAnnealingLR { t_max, eta_min, epochs: Epochs::new(opt) }
    }

    /// Epochs of one half period.
    pub fn t_max(&self) -> usize {
        self.t_max
    }

    /// The minimum learning rate.
    pub fn eta_min(&self) -> f64 {
        self.eta_min
    }

    /// The learning rate at epoch 0.
    pub fn base_lr(&self) -> f64 {
        self.epochs.base_lr
    }
}

impl LrScheduler for CosineAnnealingLR {
    fn step(&mut self, opt: &mut dyn Optimizer) {
        let (t_max, eta_min) = (self.t_max, self.eta_min);
        self.epochs.advance(opt, |s, lr| {
            let (e, t) = (s.last_epoch as f64, t_max as f64);
            // `(last_epoch - 1 - T_max) % (2 * T_max) == 0` with Python's floor modulo.
            let restart = (s.last_epoch as i64 - 1 - t_max as i64).rem_euclid(2 * t_max as i64) == 0;
            if restart {
                lr + (s.base_lr - eta_min) * (1.0 - (PI / t).cos()) / 2.0
            } else {
                (1.0 + (PI * e / t).cos()) / (1.0 + (PI * (e - 1.0) / t).cos()) * (lr - eta_min) + eta_min
            }
        });
    }

    fn get_last_lr(&self) -> f64 {
        self.epochs.last_lr
    }

    fn last_epoch(&self) -> usize {
        self.epochs.last_epoch
    }
}
