//! Adam and AdamW (`torch.optim.Adam`, `torch.optim.AdamW`).

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tracegrad_runtime::{dispatch, Buffer, DType};

use super::rules::{
    adam_rule, adam_scalars, infallible, AdamCoeffs, AdamMoments, AdamScalars, Exact, Scalars, WeightDecay,
};
use super::state::{self, OptimizerStateDict};
use super::{check_grad, check_params, slice_mut, LrTarget, OptimError, Optimizer, Real};
use crate::tensor::Tensor;

/// Declares the hyperparameters of an Adam variant: the two differ only in what weight decay
/// means and in its default.
macro_rules! adam_options {
    ($(#[$doc:meta])* $name:ident, $(#[$wd_doc:meta])* weight_decay: $wd:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq)]
        pub struct $name {
            /// Learning rate (default `1e-3`).
            pub lr: f64,
            /// Decay rates of the first and second moment averages (default `(0.9, 0.999)`).
            pub betas: (f64, f64),
            /// Term added to the denominator (default `1e-8`).
            pub eps: f64,
            $(#[$wd_doc])*
            pub weight_decay: f64,
            /// Use the AMSGrad variant (default `false`).
            pub amsgrad: bool,
            /// Maximize the objective instead of minimizing it (default `false`).
            pub maximize: bool,
        }

        impl Default for $name {
            fn default() -> Self {
                $name { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: $wd, amsgrad: false, maximize: false }
            }
        }
    };
}

adam_options!(
    /// Hyperparameters of [`Adam`]. `Default` gives PyTorch's defaults.
    AdamOptions,
    /// L2 penalty added to the gradient: `g ← g + weight_decay·p` (default `0`).
    weight_decay: 0.0
);

adam_options!(
    /// Hyperparameters of [`AdamW`]. `Default` gives PyTorch's defaults, which differ from
    /// Adam's only in `weight_decay = 0.01`.
    AdamWOptions,
    /// Decoupled weight decay: `p ← p·(1 − lr·weight_decay)` before the update (default `0.01`).
    weight_decay: 1e-2
);

/// The hyperparameters shared by Adam and AdamW, plus which weight decay applies.
#[derive(Clone, Debug)]
struct Hyper {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
}

impl Hyper {
    fn decay(&self) -> WeightDecay {
        WeightDecay::new(self.weight_decay, self.decoupled)
    }

    /// The step-dependent scalars at `step` (counting this update), in f64 as PyTorch's
    /// Python floats.
    fn scalars(&self, step: f64) -> AdamScalars<f64> {
        let (lr, t) = (Buffer::scalar(self.lr, DType::F64), Buffer::scalar(step, DType::F64));
        let sc = adam_scalars(&mut Exact, self.betas, self.decay(), &lr, &t)
            .expect("the reference kernels evaluate f64 scalar arithmetic");
        AdamScalars {
            step_size: sc.step_size.item(),
            bias_correction2_sqrt: sc.bias_correction2_sqrt.item(),
            decay: sc.decay.map(|d| d.item()),
        }
    }

    /// PyTorch's checks for Adam and AdamW, in PyTorch's order (`not 0.0 <= x` rejects NaN).
    fn validate(&self) -> Result<(), OptimError> {
        let at_least_zero = |x: f64| 0.0 <= x;
        let unit = |x: f64| (0.0..1.0).contains(&x);
        if !at_least_zero(self.lr) {
            return Err(OptimError::InvalidLr(self.lr));
        }
        if !at_least_zero(self.eps) {
            return Err(OptimError::InvalidEps(self.eps));
        }
        if !unit(self.betas.0) {
            return Err(OptimError::InvalidBeta { index: 0, value: self.betas.0 });
        }
        if !unit(self.betas.1) {
            return Err(OptimError::InvalidBeta { index: 1, value: self.betas.1 });
        }
        if !at_least_zero(self.weight_decay) {
            return Err(OptimError::InvalidWeightDecay(self.weight_decay));
        }
        Ok(())
    }
}

/// One parameter's Adam state (`optimizer.state[p]`), created on its first update.
#[derive(Clone, Debug)]
pub struct AdamState {
    /// The step count: a 0-d f32 buffer, as PyTorch keeps it.
    pub step: Buffer,
    /// Exponential moving average of the gradient.
    pub exp_avg: Buffer,
    /// Exponential moving average of the squared gradient.
    pub exp_avg_sq: Buffer,
    /// Running maximum of `exp_avg_sq` (AMSGrad only).
    pub max_exp_avg_sq: Option<Buffer>,
}

impl AdamState {
    fn new(p: &Buffer, amsgrad: bool) -> AdamState {
        let zeros = || Buffer::zeros(p.dtype(), p.shape());
        AdamState {
            step: Buffer::scalar(0.0, DType::F32),
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            max_exp_avg_sq: amsgrad.then(zeros),
        }
    }

    /// The number of updates applied so far.
    pub fn steps(&self) -> f64 {
        self.step.item()
    }
}

/// The shared implementation: parameters, hyperparameters and per-parameter state.
struct Core {
    params: Vec<Tensor>,
    h: Hyper,
    state: Vec<Option<AdamState>>,
    initial_lr: Option<f64>,
}

impl Core {
    fn new(params: Vec<Tensor>, h: Hyper) -> Result<Core, OptimError> {
        h.validate()?;
        check_params(if h.decoupled { "AdamW" } else { "Adam" }, &params)?;
        let n = params.len();
        Ok(Core { params, h, state: vec![None; n], initial_lr: None })
    }

    fn zero_grad(&self) {
        for p in &self.params {
            p.zero_grad();
        }
    }

    fn state_dict(&self) -> OptimizerStateDict {
        let h = &self.h;
        let fields = vec![
            ("lr", json!(h.lr)),
            ("betas", json!([h.betas.0, h.betas.1])),
            ("eps", json!(h.eps)),
            ("weight_decay", json!(h.weight_decay)),
            ("amsgrad", json!(h.amsgrad)),
            ("maximize", json!(h.maximize)),
            ("foreach", Value::Null),
            ("capturable", json!(false)),
            ("differentiable", json!(false)),
            ("fused", Value::Null),
            ("decoupled_weight_decay", json!(h.decoupled)),
        ];
        let state = self
            .state
            .iter()
            .enumerate()
            .filter_map(|(i, st)| {
                let st = st.as_ref()?;
                let mut m = BTreeMap::from([
                    ("step".to_string(), st.step.clone()),
                    ("exp_avg".to_string(), st.exp_avg.clone()),
                    ("exp_avg_sq".to_string(), st.exp_avg_sq.clone()),
                ]);
                if let Some(v) = &st.max_exp_avg_sq {
                    m.insert("max_exp_avg_sq".into(), v.clone());
                }
                Some((i, m))
            })
            .collect();
        OptimizerStateDict { state, param_groups: vec![state::group(fields, self.initial_lr, self.params.len())] }
    }

    fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<(), String> {
        let kind = if self.h.decoupled { "AdamW" } else { "Adam" };
        let g = state::checked_group(
            sd,
            kind,
            &self.params,
            &["lr", "betas", "eps"],
            Some(("decoupled_weight_decay", self.h.decoupled)),
        )?;
        let betas = match g.get("betas").and_then(Value::as_array).map(|b| b.iter().map(Value::as_f64).collect()) {
            Some(Some::<Vec<f64>>(b)) if b.len() == 2 => (b[0], b[1]),
            _ => return Err("loaded state dict: \"betas\" is not a pair of numbers".into()),
        };
        let h = Hyper {
            lr: state::float(g, "lr")?,
            betas,
            eps: state::float(g, "eps")?,
            weight_decay: state::float(g, "weight_decay")?,
            amsgrad: state::flag(g, "amsgrad")?,
            maximize: state::flag(g, "maximize")?,
            decoupled: self.h.decoupled,
        };
        h.validate().map_err(|e| e.to_string())?;
        let mut states = vec![None; self.params.len()];
        for (&i, st) in &sd.state {
            let (p, dt) = (&self.params[i], self.params[i].dtype());
            let shape = p.shape();
            states[i] = Some(AdamState {
                step: state::tensor(st, i, "step", DType::F32, &[])?,
                exp_avg: state::tensor(st, i, "exp_avg", dt, &shape)?,
                exp_avg_sq: state::tensor(st, i, "exp_avg_sq", dt, &shape)?,
                max_exp_avg_sq: if h.amsgrad {
                    Some(state::tensor(st, i, "max_exp_avg_sq", dt, &shape)?)
                } else {
                    None
                },
            });
        }
        (self.h, self.state, self.initial_lr) = (h, states, state::initial_lr(g));
        Ok(())
    }

    fn step(&mut self, name: &str) {
        let h = &self.h;
        for (p, state) in self.params.iter().zip(&mut self.state) {
            let Some(g) = p.grad() else { continue };
            let g = g.buffer();
            p.update_buffer(|w| {
                check_grad(name, w, &g);
                let st = state.get_or_insert_with(|| AdamState::new(w, h.amsgrad));
                // step_t += 1 (an f32 tensor), then step = step_t.item()
                let step = {
                    let s = slice_mut::<f32>(&mut st.step);
                    s[0] += 1.0;
                    f64::from(s[0])
                };
                let sc = h.scalars(step);
                dispatch!(float, g.data(), name, |gv: T| {
                    let (beta1, beta2) = h.betas;
                    let lerp_weight = T::of(1.0 - beta1);
                    let c = AdamCoeffs::<T> {
                        weight_decay: h.decay().l2().map(T::of),
                        decay: sc.decay.map(T::of),
                        lerp_weight,
                        lerp_weight_complement: T::of(1.0) - lerp_weight,
                        lerp_from_start: lerp_weight.abs() < T::of(0.5),
                        beta2: T::of(beta2),
                        one_minus_beta2: T::of(1.0 - beta2),
                        bias_correction2_sqrt: T::of(sc.bias_correction2_sqrt),
                        eps: T::of(h.eps),
                        neg_step_size: T::of(-sc.step_size),
                        maximize: h.maximize,
                    };
                    let pv = slice_mut::<T>(w);
                    let m = slice_mut::<T>(&mut st.exp_avg);
                    let v = slice_mut::<T>(&mut st.exp_avg_sq);
                    let vmax = st.max_exp_avg_sq.as_mut().map(slice_mut::<T>);
                    update_fast::<T>(pv, gv, m, v, vmax, &c)
                })
            });
        }
    }
}

/// [`update`] compiled for the CPU's FMA instructions when it has them, so that
/// [`Real::madd`] is one instruction instead of a call into libm (same results either way).
/// `update` is `#[inline(always)]`, so it is compiled inside the `target_feature` function
/// (a closure handed to such a function is not reliably inlined into it: the SGD loop once
/// ran libm `fmaf` per element that way).
fn update_fast<T: Real>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], vmax: Option<&mut [T]>, c: &AdamCoeffs<T>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "fma")]
        unsafe fn fma<T: Real>(
            p: &mut [T],
            g: &[T],
            m: &mut [T],
            v: &mut [T],
            vmax: Option<&mut [T]>,
            c: &AdamCoeffs<T>,
        ) {
            update::<T>(p, g, m, v, vmax, c)
        }
        // SAFETY: the CPU supports FMA, checked just above.
        return unsafe { fma::<T>(p, g, m, v, vmax, c) };
    }
    update::<T>(p, g, m, v, vmax, c)
}

/// One parameter's update, element by element through [`adam_rule`].
#[inline(always)]
fn update<T: Real>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], mut vmax: Option<&mut [T]>, c: &AdamCoeffs<T>) {
    // A local copy, so no store in the loop can be assumed to change the coefficients.
    let c = &{ *c };
    let mut a = Scalars::<T>::new();
    for i in 0..p.len() {
        let s = AdamMoments { exp_avg: m[i], exp_avg_sq: v[i], max_exp_avg_sq: vmax.as_ref().map(|x| x[i]) };
        let (np, s) = infallible(adam_rule(&mut a, p[i], g[i], s, c));
        (p[i], m[i], v[i]) = (np, s.exp_avg, s.exp_avg_sq);
        if let (Some(x), Some(hi)) = (vmax.as_mut(), s.max_exp_avg_sq) {
            x[i] = hi;
        }
    }
}

/// Writes the public shell of an Adam variant once: its constructors, accessors and
/// [`Optimizer`] impl over the shared [`Core`].
macro_rules! adam_variant {
    ($(#[$doc:meta])* $name:ident, $options:ident, decoupled: $decoupled:expr, $label:literal) => {
        $(#[$doc])*
        pub struct $name {
            core: Core,
        }

        impl $name {
            #[doc = concat!($label, " over `params` with learning rate `lr` and PyTorch's other defaults (see [`", stringify!($options), "`]).")]
            pub fn new(params: Vec<Tensor>, lr: f64) -> Result<$name, OptimError> {
                $name::with_options(params, $options { lr, ..$options::default() })
            }

            #[doc = concat!($label, " over `params` with the given hyperparameters, validated as PyTorch does (same")]
            /// checks, same order, same texts), then the parameter list (non-empty, leaves only, no
            /// unmaterialized lazy parameters).
            pub fn with_options(params: Vec<Tensor>, o: $options) -> Result<$name, OptimError> {
                let h = Hyper {
                    lr: o.lr,
                    betas: o.betas,
                    eps: o.eps,
                    weight_decay: o.weight_decay,
                    amsgrad: o.amsgrad,
                    maximize: o.maximize,
                    decoupled: $decoupled,
                };
                Ok($name { core: Core::new(params, h)? })
            }

            /// The optimized parameters.
            pub fn params(&self) -> &[Tensor] {
                &self.core.params
            }

            /// The hyperparameters (`lr` follows [`LrTarget::set_lr`]).
            pub fn options(&self) -> $options {
                let h = &self.core.h;
                $options {
                    lr: h.lr,
                    betas: h.betas,
                    eps: h.eps,
                    weight_decay: h.weight_decay,
                    amsgrad: h.amsgrad,
                    maximize: h.maximize,
                }
            }

            /// The state of parameter `i`: `None` before its first update.
            pub fn state(&self, i: usize) -> Option<&AdamState> {
                self.core.state.get(i).and_then(Option::as_ref)
            }
        }

        impl $name {
            /// The learning rate (also [`LrTarget::lr`], here so that no trait import is needed).
            pub fn lr(&self) -> f64 {
                self.core.h.lr
            }

            /// Changes the learning rate (also [`LrTarget::set_lr`]).
            pub fn set_lr(&mut self, lr: f64) {
                self.core.h.lr = lr;
            }
        }

        impl LrTarget for $name {
            fn lr(&self) -> f64 {
                $name::lr(self)
            }

            fn set_lr(&mut self, lr: f64) {
                $name::set_lr(self, lr);
            }

            fn initial_lr(&self) -> Option<f64> {
                self.core.initial_lr
            }

            fn set_initial_lr(&mut self, lr: f64) {
                self.core.initial_lr.get_or_insert(lr);
            }
        }

        impl Optimizer for $name {
            fn step(&mut self) {
                self.core.step($label);
            }

            fn zero_grad(&self) {
                self.core.zero_grad();
            }

            fn state_dict(&self) -> OptimizerStateDict {
                self.core.state_dict()
            }

            fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<(), String> {
                self.core.load_state_dict(sd)
            }
        }
    };
}

adam_variant!(
    /// Adam with optional L2 weight decay, AMSGrad and maximization, exactly as `torch.optim.Adam`
    /// (`foreach=False`). Per parameter, at step `t`:
    ///
    /// ```text
    /// g ← −g                       if maximize
    /// g ← g + weight_decay·p       if weight_decay ≠ 0
    /// m ← lerp(m, g, 1 − β1)
    /// v ← β2·v + (1 − β2)·g²
    /// v̂ ← max(v̂, v) if amsgrad, else v
    /// p ← p − lr/(1 − β1ᵗ) · m / (√v̂ / √(1 − β2ᵗ) + eps)
    /// ```
    Adam,
    AdamOptions,
    decoupled: false,
    "Adam"
);

adam_variant!(
    /// Adam with decoupled weight decay, exactly as `torch.optim.AdamW` (`foreach=False`): each
    /// update first shrinks the parameter, `p ← p·(1 − lr·weight_decay)`, then applies Adam's
    /// update (without the L2 term) to the shrunk parameter. PyTorch's default weight decay
    /// here is `0.01`.
    AdamW,
    AdamWOptions,
    decoupled: true,
    "AdamW"
);
