//! Optimizers and learning-rate schedulers, following `torch.optim`.
//!
//! Every optimizer reproduces PyTorch's single-tensor (`foreach=False`) implementation: the
//! same per-parameter state, the same floating-point operations in the same order (scalars are
//! rounded to the parameter's dtype as ATen does), so trajectories match PyTorch's to the last
//! few ulps. Updates write parameter storage in place (copy-on-write), outside autograd.
//!
//! * [`Sgd`]: momentum, dampening, Nesterov, weight decay, maximize.
//! * [`Adam`]: L2 weight decay, AMSGrad, maximize.
//! * [`AdamW`]: Adam with decoupled weight decay.
//! * [`lr_scheduler`]: [`StepLR`] and [`CosineAnnealingLR`], driving any [`Optimizer`].
//!
//! ```
//! use tracegrad::optim::{Adam, Optimizer};
//! use tracegrad::Tensor;
//!
//! let p = Tensor::vec1(&[1.0, -2.0]).requires_grad_(true);
//! let mut opt = Adam::new(vec![p.clone()], 0.1).unwrap();
//! for _ in 0..3 {
//!     opt.zero_grad();
//!     (&p * &p).sum_all().backward();
//!     opt.step();
//! }
//! assert!(p.to_vec_f32()[0] < 1.0);
//! ```

use std::fmt;

use crate::tensor::Tensor;

mod adam;
pub mod lr_scheduler;
pub(crate) mod rules;
mod sgd;
mod state;

pub use adam::{Adam, AdamOptions, AdamState, AdamW, AdamWOptions};
pub use lr_scheduler::{CosineAnnealingLR, LrScheduler, StepLR};
pub use sgd::{Sgd, SgdOptions};
pub use state::OptimizerStateDict;

/// What an LR scheduler drives: a learning rate and the `initial_lr` a scheduler records.
/// Every [`Optimizer`] is one, and so is the compiled train step
/// ([`TrainStep`](crate::compile::TrainStep)), so `StepLR::new(&mut step, ..)` schedules a
/// compiled step exactly as it schedules an eager optimizer.
pub trait LrTarget {
    /// The learning rate.
    fn lr(&self) -> f64;
    /// Changes the learning rate (schedulers use this).
    fn set_lr(&mut self, lr: f64);
    /// The learning rate a scheduler found at its construction (PyTorch's `initial_lr`).
    fn initial_lr(&self) -> Option<f64>;
    /// Records `lr` as `initial_lr` unless one is set already (PyTorch's
    /// `group.setdefault('initial_lr', group['lr'])`).
    fn set_initial_lr(&mut self, lr: f64);
}

/// A parameter-update rule. Its learning rate is the [`LrTarget`] supertrait's (`Sgd`, `Adam`
/// and `AdamW` also have `lr()`/`set_lr()` as inherent methods, so no trait import is needed).
pub trait Optimizer: LrTarget {
    /// Applies one update from the parameters' current gradients. Parameters without a
    /// gradient are skipped.
    fn step(&mut self);
    /// Clears the gradients of every parameter (PyTorch's `zero_grad(set_to_none=True)`).
    fn zero_grad(&self);
    /// The state and hyperparameters in PyTorch's `state_dict()` layout.
    fn state_dict(&self) -> OptimizerStateDict;
    /// Restores a [`state_dict`](Optimizer::state_dict): hyperparameters and per-parameter
    /// state. A state dict of another optimizer kind, another parameter count, or with state
    /// of the wrong shape is an error, and then nothing changes.
    fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<(), String>;
}

/// Why an optimizer could not be built. `Display` gives PyTorch's `ValueError` text.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum OptimError {
    /// The parameter list is empty: "optimizer got an empty parameter list".
    EmptyParams,
    /// A parameter is neither a leaf nor retains its gradient: "can't optimize a non-leaf Tensor".
    NonLeaf,
    /// A negative (for Adam/AdamW also NaN) learning rate: "Invalid learning rate: {lr}".
    InvalidLr(f64),
    /// A negative momentum: "Invalid momentum value: {momentum}".
    InvalidMomentum(f64),
    /// A negative weight decay: "Invalid weight_decay value: {weight_decay}".
    InvalidWeightDecay(f64),
    /// Nesterov without momentum or with dampening: "Nesterov momentum requires a momentum and
    /// zero dampening".
    Nesterov,
    /// A negative epsilon: "Invalid epsilon value: {eps}".
    InvalidEps(f64),
    /// A beta outside `[0, 1)`: "Invalid beta parameter at index {index}: {value}".
    InvalidBeta {
        /// 0 for `beta1`, 1 for `beta2`.
        index: usize,
        /// The rejected value.
        value: f64,
    },
    /// A parameter of a lazy layer ([`LazyLinear`](crate::nn::LazyLinear),
    /// [`LazyConv2d`](crate::nn::LazyConv2d)) that no forward call has materialized yet (see
    /// [`is_uninitialized`](crate::nn::is_uninitialized)): "Attempted to use an uninitialized
    /// parameter in {optimizer} (parameter {index}). This error happens when you are using a
    /// `LazyModule` …" (PyTorch's `UninitializedParameter` text). Call the model once on a
    /// dummy batch before building the optimizer.
    UninitializedParameter {
        /// The optimizer being built (`"Sgd"`, `"Adam"`, `"AdamW"`).
        optimizer: &'static str,
        /// The parameter's position in the list.
        index: usize,
    },
}

impl fmt::Display for OptimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptimError::EmptyParams => f.write_str("optimizer got an empty parameter list"),
            OptimError::NonLeaf => f.write_str("can't optimize a non-leaf Tensor"),
            OptimError::InvalidLr(v) => write!(f, "Invalid learning rate: {}", py_float(*v)),
            OptimError::InvalidMomentum(v) => write!(f, "Invalid momentum value: {}", py_float(*v)),
            OptimError::InvalidWeightDecay(v) => write!(f, "Invalid weight_decay value: {}", py_float(*v)),
            OptimError::Nesterov => f.write_str("Nesterov momentum requires a momentum and zero dampening"),
            OptimError::InvalidEps(v) => write!(f, "Invalid epsilon value: {}", py_float(*v)),
            OptimError::InvalidBeta { index, value } => {
                write!(f, "Invalid beta parameter at index {index}: {}", py_float(*value))
            }
            OptimError::UninitializedParameter { optimizer, index } => {
                f.write_str(&crate::nn::uninitialized_message(&format!("{optimizer} (parameter {index})")))
            }
        }
    }
}

impl std::error::Error for OptimError {}

/// The checks `torch.optim.Optimizer.__init__` makes on the parameter list (after the
/// hyperparameter checks of the subclass, as in PyTorch), then [`check_initialized`].
pub(crate) fn check_params(optimizer: &'static str, params: &[Tensor]) -> Result<(), OptimError> {
    if params.is_empty() {
        return Err(OptimError::EmptyParams);
    }
    if params.iter().any(|p| !(p.is_leaf() || p.retains_grad())) {
        return Err(OptimError::NonLeaf);
    }
    check_initialized(optimizer, params)
}

/// Refuses a lazy layer's parameters that are not materialized yet. PyTorch would accept them
/// here; refusing is tracegrad's choice, so that an optimizer never holds a parameter whose
/// shape it has not seen (a compiled train step sizes its state from it).
pub(crate) fn check_initialized(optimizer: &'static str, params: &[Tensor]) -> Result<(), OptimError> {
    match params.iter().position(crate::nn::is_uninitialized) {
        Some(index) => Err(OptimError::UninitializedParameter { optimizer, index }),
        None => Ok(()),
    }
}

/// Formats `x` as Python's `repr(float)` does: the shortest round-tripping digits, `.0` on
/// integral values, scientific notation with a signed two-digit-minimum exponent when the
/// decimal exponent is below -4 or at least 16, and `inf`/`nan`.
pub(crate) fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, e.g. "-1.25e-7" or "0e0".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("integral exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exp) {
        let (head, tail) = digits.split_at(1);
        let frac = if tail.is_empty() { String::new() } else { format!(".{tail}") };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{head}{frac}e{esign}{:02}", exp.unsigned_abs());
    }
    let n = digits.len() as i32;
    let body = if exp < 0 {
        format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
    } else if exp + 1 >= n {
        format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
    } else {
        let (int, frac) = digits.split_at(exp as usize + 1);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// The floating element types an update loop runs over, with the scalar operations it needs.
/// Hyperparameters are converted with [`Real::of`] (Rust's `as`, round-to-nearest), as ATen
/// converts a Python float scalar to the tensor's dtype.
pub(crate) trait Real:
    tracegrad_runtime::Element
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    /// Converts a hyperparameter.
    fn of(v: f64) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Whether this is NaN.
    fn is_nan(self) -> bool;
    /// `a + b·c` with a single rounding. ATen's CPU kernels write `self + alpha * other`
    /// (`add`, `addcmul`, `lerp`) and PyTorch's builds evaluate it as a fused multiply-add
    /// (explicit `vec::fmadd` in the vectorised loops, FMA contraction in the scalar ones);
    /// the reference trajectories are reproduced bit for bit only this way.
    fn madd(a: Self, b: Self, c: Self) -> Self;
    /// `a − b·c` with a single rounding (ATen's `end - (end - self) * (1 - weight)`).
    fn msub(a: Self, b: Self, c: Self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn madd(a: Self, b: Self, c: Self) -> Self {
                b.mul_add(c, a)
            }
            #[inline(always)]
            fn msub(a: Self, b: Self, c: Self) -> Self {
                (-b).mul_add(c, a)
            }
        }
    };
}
real!(f32);
real!(f64);

/// The elements of a floating buffer as `T` (copying the storage first if it is shared).
pub(crate) fn slice_mut<T: tracegrad_runtime::Element>(b: &mut tracegrad_runtime::Buffer) -> &mut [T] {
    let dtype = b.dtype();
    T::slice_mut(b.make_mut())
        .unwrap_or_else(|| panic!("optimizer: a {dtype} parameter or state buffer met a {} gradient", T::DTYPE))
}

/// Checks that a gradient can update a parameter.
#[track_caller]
pub(crate) fn check_grad(name: &str, param: &tracegrad_runtime::Buffer, grad: &tracegrad_runtime::Buffer) {
    assert!(
        param.dtype().is_float(),
        "{name}: can only optimize floating-point parameters, got a {} parameter",
        param.dtype()
    );
    assert!(
        param.shape() == grad.shape() && param.dtype() == grad.dtype(),
        "{name}: gradient {} {:?} does not match parameter {} {:?}",
        grad.dtype(),
        grad.shape(),
        param.dtype(),
        param.shape()
    );
}

#[cfg(test)]
mod tests {
    use super::py_float;

    #[test]
    fn python_float_repr() {
        let cases = [
            (-1.0, "-1.0"),
            (0.1, "0.1"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.5, "1.5"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (-0.00012, "-0.00012"),
            (1e16, "1e+16"),
            (1.25e17, "1.25e+17"),
            (1e15, "1000000000000000.0"),
            (123.456, "123.456"),
            (100.0, "100.0"),
            (-1e-10, "-1e-10"),
            (1e-100, "1e-100"),
            (0.010000000000000002, "0.010000000000000002"),
            (f64::NAN, "nan"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ];
        for (x, want) in cases {
            assert_eq!(py_float(x), want, "{x:?}");
        }
    }
}
