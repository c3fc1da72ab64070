//! Learning-rate schedulers (`torch.optim.lr_scheduler`).
//!
//! A scheduler reads and writes the learning rate of an [`LrTarget`]: any optimizer, or a
//! compiled train step. As in PyTorch, building one counts as epoch 0
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
//! let mut sched = CosineAnnealingLR::new(&mut opt, 10, 0.0);
//! for _ in 0..10 {
//!     opt.step();
//!     sched.step(&mut opt);
//! }
//! assert!(opt.lr().abs() < 1e-12);
//! ```

use std::f64::consts::PI;

use serde_json::{json, Map, Value};

use super::LrTarget;

/// A rule that changes an optimizer's learning rate once per epoch.
pub trait LrScheduler {
    /// Advances one epoch and sets the optimizer's learning rate for it.
    fn step(&mut self, opt: &mut dyn LrTarget);
    /// The learning rate this scheduler last set (`get_last_lr()`, for the single group).
    fn get_last_lr(&self) -> f64;
    /// The current epoch: 0 after construction, incremented by every [`step`](Self::step).
    fn last_epoch(&self) -> usize;
    /// The scheduler's fields in PyTorch's `state_dict()` layout (`base_lrs`, `last_epoch`,
    /// `_step_count`, `_last_lr`, and the rule's own parameters).
    fn state_dict(&self) -> Map<String, Value>;
    /// Restores a [`state_dict`](LrScheduler::state_dict). A state dict of another scheduler
    /// kind is an error, and then nothing changes.
    fn load_state_dict(&mut self, sd: &Map<String, Value>) -> Result<(), String>;
}

/// The bookkeeping every scheduler shares: the base rate, the epoch count and the rate set last.
#[derive(Clone, Debug)]
pub struct Epochs {
    /// The learning rate at epoch 0 (PyTorch's `base_lrs[0]`).
    pub base_lr: f64,
    /// The current epoch.
    pub last_epoch: usize,
    /// The rate set last.
    pub last_lr: f64,
}

impl Epochs {
    /// Epoch 0: the optimizer's `initial_lr` (set to its current rate unless a scheduler set
    /// it before, as PyTorch's `setdefault`) becomes the base rate.
    fn new(opt: &mut dyn LrTarget) -> Epochs {
        let lr = opt.lr();
        opt.set_initial_lr(lr);
        Epochs { base_lr: opt.initial_lr().unwrap_or(lr), last_epoch: 0, last_lr: lr }
    }

    /// The shared fields of a state dict, then the rule's own `fields`.
    fn state_dict(&self, fields: Vec<(&str, Value)>) -> Map<String, Value> {
        let mut m: Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        m.insert("base_lrs".into(), json!([self.base_lr]));
        m.insert("last_epoch".into(), json!(self.last_epoch));
        m.insert("_step_count".into(), json!(self.last_epoch + 1));
        m.insert("_is_initial".into(), json!(false));
        m.insert("_get_lr_called_within_step".into(), json!(false));
        m.insert("_last_lr".into(), json!([self.last_lr]));
        m
    }

    /// The shared fields read back from `sd`, after checking that it has the rule's `keys`.
    fn load(sd: &Map<String, Value>, kind: &str, keys: &[&str]) -> Result<Epochs, String> {
        if let Some(k) = keys.iter().find(|k| !sd.contains_key(**k)) {
            return Err(format!("loaded state dict is not a {kind} state dict: it has no {k:?}"));
        }
        let one = |key: &str| {
            sd.get(key)
                .and_then(Value::as_array)
                .filter(|a| a.len() == 1)
                .and_then(|a| a[0].as_f64())
                .ok_or_else(|| format!("loaded state dict: {key:?} is not a one-group list of numbers"))
        };
        let last_epoch = sd
            .get("last_epoch")
            .and_then(Value::as_u64)
            .ok_or_else(|| "loaded state dict: \"last_epoch\" is not a count".to_string())?;
        Ok(Epochs { base_lr: one("base_lrs")?, last_epoch: last_epoch as usize, last_lr: one("_last_lr")? })
    }

    /// Advances one epoch and sets `rule(self, current rate)` as the learning rate.
    fn advance(&mut self, opt: &mut dyn LrTarget, rule: impl FnOnce(&Epochs, f64) -> f64) {
        self.last_epoch += 1;
        let lr = rule(self, opt.lr());
        opt.set_lr(lr);
        self.last_lr = lr;
    }
}

/// One scheduling rule, over two parameters: a positive count and a number (StepLR's
/// `step_size` and `gamma`, CosineAnnealingLR's `T_max` and `eta_min`).
pub trait Rule {
    /// PyTorch's class name and its names of the two parameters, as in its `state_dict()`.
    const NAMES: [&'static str; 3];
    /// The learning rate for the epoch `e` has just advanced to, from the current rate `lr`.
    fn next_lr(count: usize, number: f64, e: &Epochs, lr: f64) -> f64;
}

/// A scheduler: a [`Rule`], its two parameters, and the bookkeeping every scheduler shares.
/// [`StepLR`] and [`CosineAnnealingLR`] are this shell over their rules.
#[derive(Clone, Debug)]
pub struct Scheduler<R> {
    count: usize,
    number: f64,
    epochs: Epochs,
    rule: std::marker::PhantomData<R>,
}

impl<R: Rule> Scheduler<R> {
    /// A scheduler for `opt` with the rule's two parameters (`StepLR::new(opt, step_size,
    /// gamma)`, `CosineAnnealingLR::new(opt, t_max, eta_min)`); `opt`'s current learning rate
    /// becomes the base rate. Panics if the count is 0.
    #[track_caller]
    pub fn new(opt: &mut dyn LrTarget, count: usize, number: f64) -> Scheduler<R> {
        let [name, count_name, _] = R::NAMES;
        assert!(count > 0, "{name}: {} must be positive", count_name.to_lowercase());
        Scheduler { count, number, epochs: Epochs::new(opt), rule: std::marker::PhantomData }
    }

    /// The learning rate at epoch 0.
    pub fn base_lr(&self) -> f64 {
        self.epochs.base_lr
    }
}

impl<R: Rule> LrScheduler for Scheduler<R> {
    fn step(&mut self, opt: &mut dyn LrTarget) {
        let (count, number) = (self.count, self.number);
        self.epochs.advance(opt, |e, lr| R::next_lr(count, number, e, lr));
    }

    fn get_last_lr(&self) -> f64 {
        self.epochs.last_lr
    }

    fn last_epoch(&self) -> usize {
        self.epochs.last_epoch
    }

    fn state_dict(&self) -> Map<String, Value> {
        let [_, count, number] = R::NAMES;
        self.epochs.state_dict(vec![(count, json!(self.count)), (number, json!(self.number))])
    }

    fn load_state_dict(&mut self, sd: &Map<String, Value>) -> Result<(), String> {
        let [name, count, number] = R::NAMES;
        let epochs = Epochs::load(sd, name, &[count, number])?;
        let c = sd.get(count).and_then(Value::as_u64).filter(|&c| c > 0);
        let (Some(c), Some(x)) = (c, sd.get(number).and_then(Value::as_f64)) else {
            return Err(format!("loaded state dict: {name} needs a positive {count} and a numeric {number}"));
        };
        (self.count, self.number, self.epochs) = (c as usize, x, epochs);
        Ok(())
    }
}

/// StepLR's rule: `lr * gamma` at each multiple of step_size, else unchanged (PyTorch's
/// chainable form).
#[derive(Clone, Debug)]
pub enum StepRule {}

impl Rule for StepRule {
    const NAMES: [&'static str; 3] = ["StepLR", "step_size", "gamma"];
    fn next_lr(step_size: usize, gamma: f64, e: &Epochs, lr: f64) -> f64 {
        if e.last_epoch.is_multiple_of(step_size) {
            lr * gamma
        } else {
            lr
        }
    }
}

/// Decays the learning rate by `gamma` every `step_size` epochs (`StepLR`):
/// `lr = base_lr · gamma^⌊epoch / step_size⌋`, computed as PyTorch does, by multiplying the
/// current rate by `gamma` at each multiple of `step_size`.
pub type StepLR = Scheduler<StepRule>;

impl StepLR {
    /// Epochs between two decays.
    pub fn step_size(&self) -> usize {
        self.count
    }

    /// The decay factor.
    pub fn gamma(&self) -> f64 {
        self.number
    }
}

/// CosineAnnealingLR's rule: PyTorch's recursive cosine formula from the current rate.
#[derive(Clone, Debug)]
pub enum CosineRule {}

impl Rule for CosineRule {
    const NAMES: [&'static str; 3] = ["CosineAnnealingLR", "T_max", "eta_min"];
    fn next_lr(t_max: usize, eta_min: f64, s: &Epochs, lr: f64) -> f64 {
        let (e, t) = (s.last_epoch as f64, t_max as f64);
        // `(last_epoch - 1 - T_max) % (2 * T_max) == 0` with Python's floor modulo.
        let restart = (s.last_epoch as i64 - 1 - t_max as i64).rem_euclid(2 * t_max as i64) == 0;
        if restart {
            lr + (s.base_lr - eta_min) * (1.0 - (PI / t).cos()) / 2.0
        } else {
            (1.0 + (PI * e / t).cos()) / (1.0 + (PI * (e - 1.0) / t).cos()) * (lr - eta_min) + eta_min
        }
    }
}

/// Cosine annealing from the base rate to `eta_min` over `t_max` epochs, then back up, and so
/// on (`CosineAnnealingLR`). In exact arithmetic
/// `lr = eta_min + (base_lr − eta_min)·(1 + cos(π·epoch/t_max))/2`; the rate is computed with
/// PyTorch's recursive formula from the current rate, so values match PyTorch's to the bit.
pub type CosineAnnealingLR = Scheduler<CosineRule>;

impl CosineAnnealingLR {
    /// Epochs of one half period.
    pub fn t_max(&self) -> usize {
        self.count
    }

    /// The minimum learning rate.
    pub fn eta_min(&self) -> f64 {
        self.number
    }
}
