//! Stochastic gradient descent (`torch.optim.SGD`).

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tracegrad_runtime::{dispatch, Buffer};

use super::rules::{infallible, sgd_rule, Scalars, SgdCoeffs, WeightDecay};
use super::state::{self, OptimizerStateDict};
use super::{check_grad, check_initialized, check_params, slice_mut, LrTarget, OptimError, Optimizer, Real};
use crate::tensor::Tensor;

/// Hyperparameters of [`Sgd`]. `Default` gives PyTorch's defaults (`lr = 1e-3`, everything
/// else off).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdOptions {
    /// Learning rate (default `1e-3`).
    pub lr: f64,
    /// Momentum factor (default `0`: no momentum buffer).
    pub momentum: f64,
    /// Dampening for momentum (default `0`).
    pub dampening: f64,
    /// L2 penalty added to the gradient: `g ← g + weight_decay·p` (default `0`).
    pub weight_decay: f64,
    /// Nesterov momentum (default `false`; needs `momentum > 0` and `dampening == 0`).
    pub nesterov: bool,
    /// Maximize the objective instead of minimizing it (default `false`).
    pub maximize: bool,
}

impl Default for SgdOptions {
    fn default() -> Self {
        SgdOptions { lr: 1e-3, momentum: 0.0, dampening: 0.0, weight_decay: 0.0, nesterov: false, maximize: false }
    }
}

impl SgdOptions {
    /// PyTorch's checks, in PyTorch's order.
    fn validate(&self) -> Result<(), OptimError> {
        check_lr(self.lr)?;
        if self.momentum < 0.0 {
            return Err(OptimError::InvalidMomentum(self.momentum));
        }
        if self.weight_decay < 0.0 {
            return Err(OptimError::InvalidWeightDecay(self.weight_decay));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(OptimError::Nesterov);
        }
        Ok(())
    }
}

/// SGD's learning-rate check (`lr < 0.0`, so NaN passes, as in PyTorch).
fn check_lr(lr: f64) -> Result<(), OptimError> {
    if lr < 0.0 {
        return Err(OptimError::InvalidLr(lr));
    }
    Ok(())
}

/// Stochastic gradient descent with optional momentum, dampening, Nesterov momentum, weight
/// decay and maximization, exactly as `torch.optim.SGD` (`foreach=False`). Per parameter, with
/// `g` its gradient:
///
/// ```text
/// g ← −g                              if maximize
/// g ← g + weight_decay·p              if weight_decay ≠ 0
/// if momentum ≠ 0:
///     b ← g                           on the first step (no dampening)
///     b ← momentum·b + (1 − dampening)·g   afterwards
///     g ← g + momentum·b  if nesterov, else  g ← b
/// p ← p − lr·g
/// ```
pub struct Sgd {
    params: Vec<Tensor>,
    opts: SgdOptions,
    /// `state[p]["momentum_buffer"]`, created on a parameter's first update when momentum ≠ 0.
    momentum_buffers: Vec<Option<Buffer>>,
    initial_lr: Option<f64>,
}

impl Sgd {
    /// Plain SGD over `params` with learning rate `lr`. Panics on a negative learning rate,
    /// with PyTorch's message, and on a lazy layer's parameter that is not materialized yet
    /// ([`OptimError::UninitializedParameter`]'s text). Unlike [`Sgd::with_options`], an empty
    /// parameter list is accepted (the optimizer then does nothing).
    #[track_caller]
    pub fn new(params: Vec<Tensor>, lr: f64) -> Sgd {
        if let Err(e) = check_lr(lr).and_then(|()| check_initialized("Sgd", &params)) {
            panic!("{e}");
        }
        let n = params.len();
        Sgd {
            params,
            opts: SgdOptions { lr, ..SgdOptions::default() },
            momentum_buffers: vec![None; n],
            initial_lr: None,
        }
    }

    /// SGD over `params` with the given hyperparameters, validated as PyTorch does (same
    /// checks, same order, same texts), then the parameter list (non-empty, leaves only, no
    /// unmaterialized lazy parameters).
    pub fn with_options(params: Vec<Tensor>, opts: SgdOptions) -> Result<Sgd, OptimError> {
        opts.validate()?;
        check_params("Sgd", &params)?;
        let n = params.len();
        Ok(Sgd { params, opts, momentum_buffers: vec![None; n], initial_lr: None })
    }

    /// The optimized parameters.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The hyperparameters (`lr` follows [`LrTarget::set_lr`]).
    pub fn options(&self) -> &SgdOptions {
        &self.opts
    }

    /// The momentum buffer of parameter `i` (`state[p]["momentum_buffer"]`): `None` before its
    /// first update, or always when momentum is 0.
    pub fn momentum_buffer(&self, i: usize) -> Option<&Buffer> {
        self.momentum_buffers.get(i).and_then(Option::as_ref)
    }
}

/// The scalars of one SGD update, rounded to the parameter dtype as ATen does.
fn coeffs<T: Real>(o: &SgdOptions) -> SgdCoeffs<T> {
    SgdCoeffs {
        neg_lr: T::of(-o.lr),
        weight_decay: WeightDecay::new(o.weight_decay, false).l2().map(T::of),
        momentum: (o.momentum != 0.0).then(|| T::of(o.momentum)),
        one_minus_dampening: T::of(1.0 - o.dampening),
        nesterov: o.nesterov,
        maximize: o.maximize,
    }
}

/// [`update`] compiled for the CPU's FMA instructions when it has them, so that
/// [`Real::madd`] is one instruction instead of a call into libm (same results either way).
/// `update` is `#[inline(always)]`, so it is compiled inside the `target_feature` function
/// (a closure handed to such a function is not reliably inlined into it: the SGD loop once
/// ran libm `fmaf` per element that way).
fn update_fast<T: Real>(p: &mut [T], g: &[T], buf: Option<(&mut [T], bool)>, c: &SgdCoeffs<T>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "fma")]
        unsafe fn fma<T: Real>(p: &mut [T], g: &[T], buf: Option<(&mut [T], bool)>, c: &SgdCoeffs<T>) {
            update::<T>(p, g, buf, c)
        }
        // SAFETY: the CPU supports FMA, checked just above.
        return unsafe { fma::<T>(p, g, buf, c) };
    }
    update::<T>(p, g, buf, c)
}

/// One parameter's update, element by element through [`sgd_rule`]. `buf` is the momentum
/// buffer (when momentum ≠ 0) and whether it is new.
#[inline(always)]
fn update<T: Real>(p: &mut [T], g: &[T], mut buf: Option<(&mut [T], bool)>, c: &SgdCoeffs<T>) {
    // A local copy: the compiler then knows no store to `p` or `buf` changes the coefficients,
    // so their branches leave the loop and the loop vectorizes (10x on a 784x256 weight).
    let c = &{ *c };
    let mut a = Scalars::<T>::new();
    for (i, (pi, &gi)) in p.iter_mut().zip(g).enumerate() {
        let b = buf.as_ref().map(|(b, fresh)| (b[i], *fresh));
        let (np, nb) = infallible(sgd_rule(&mut a, *pi, gi, b, c));
        *pi = np;
        if let (Some(nb), Some((b, _))) = (nb, buf.as_mut()) {
            b[i] = nb;
        }
    }
}

impl Sgd {
    /// The learning rate (also [`LrTarget::lr`], here so that no trait import is needed).
    pub fn lr(&self) -> f64 {
        self.opts.lr
    }

    /// Changes the learning rate (also [`LrTarget::set_lr`]).
    pub fn set_lr(&mut self, lr: f64) {
        self.opts.lr = lr;
    }
}

impl LrTarget for Sgd {
    fn lr(&self) -> f64 {
        Sgd::lr(self)
    }

    fn set_lr(&mut self, lr: f64) {
        Sgd::set_lr(self, lr);
    }

    fn initial_lr(&self) -> Option<f64> {
        self.initial_lr
    }

    fn set_initial_lr(&mut self, lr: f64) {
        self.initial_lr.get_or_insert(lr);
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) {
        let opts = &self.opts;
        for (p, state) in self.params.iter().zip(&mut self.momentum_buffers) {
            let Some(g) = p.grad() else { continue };
            let g = g.buffer();
            p.update_buffer(|w| {
                check_grad("SGD", w, &g);
                let fresh = opts.momentum != 0.0 && state.is_none();
                if fresh {
                    *state = Some(Buffer::zeros(w.dtype(), w.shape()));
                }
                let state = if opts.momentum != 0.0 { state.as_mut() } else { None };
                dispatch!(float, g.data(), "SGD", |gv: T| {
                    let buf = state.map(|b| (slice_mut::<T>(b), fresh));
                    let (pv, c) = (slice_mut::<T>(w), coeffs::<T>(opts));
                    update_fast::<T>(pv, gv, buf, &c)
                })
            });
        }
    }

    fn zero_grad(&self) {
        for p in &self.params {
            p.zero_grad();
        }
    }

    fn state_dict(&self) -> OptimizerStateDict {
        let o = &self.opts;
        let fields = vec![
            ("lr", json!(o.lr)),
            ("momentum", json!(o.momentum)),
            ("dampening", json!(o.dampening)),
            ("weight_decay", json!(o.weight_decay)),
            ("nesterov", json!(o.nesterov)),
            ("maximize", json!(o.maximize)),
            ("foreach", Value::Null),
            ("differentiable", json!(false)),
            ("fused", Value::Null),
        ];
        let state = self
            .momentum_buffers
            .iter()
            .enumerate()
            .filter_map(|(i, b)| Some((i, BTreeMap::from([("momentum_buffer".to_string(), b.clone()?)]))))
            .collect();
        OptimizerStateDict { state, param_groups: vec![state::group(fields, self.initial_lr, self.params.len())] }
    }

    fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<(), String> {
        let g = state::checked_group(sd, "SGD", &self.params, &["lr", "momentum", "nesterov"], None)?;
        let opts = SgdOptions {
            lr: state::float(g, "lr")?,
            momentum: state::float(g, "momentum")?,
            dampening: state::float(g, "dampening")?,
            weight_decay: state::float(g, "weight_decay")?,
            nesterov: state::flag(g, "nesterov")?,
            maximize: state::flag(g, "maximize")?,
        };
        opts.validate().map_err(|e| e.to_string())?;
        let mut buffers = vec![None; self.params.len()];
        for (&i, st) in &sd.state {
            let p = &self.params[i];
            buffers[i] = Some(state::tensor(st, i, "momentum_buffer", p.dtype(), &p.shape())?);
        }
        (self.opts, self.momentum_buffers, self.initial_lr) = (opts, buffers, state::initial_lr(g));
        Ok(())
    }
}
