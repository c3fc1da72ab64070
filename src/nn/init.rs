//! Parameter initialisation (`torch.nn.init`): fills a tensor in place, through
//! [`Tensor::set_buffer`], outside autograd (as PyTorch's `with torch.no_grad()` fills do).
//!
//! Random fills draw from the default generator (see [`manual_seed`](crate::manual_seed)); each
//! has a `*_with` twin that draws from an explicit [`Generator`]. Fan and gain follow
//! PyTorch's `_calculate_fan_in_and_fan_out` and `calculate_gain`, and bounds are computed
//! with the same formulas, so they agree with PyTorch's to the last bit.
//!
//! ```
//! use tracegrad::nn::init::{self, FanMode, Nonlinearity};
//! use tracegrad::Tensor;
//!
//! let w = Tensor::zeros(&[64, 32, 3, 3]);
//! init::kaiming_normal_(&w, FanMode::FanOut, Nonlinearity::Relu);
//! assert_eq!(init::calculate_fan_in_and_fan_out(&w), (32 * 9, 64 * 9));
//! ```

use tracegrad_runtime::random::with_default;
use tracegrad_runtime::{Buffer, Generator};

use crate::tensor::Tensor;

/// The nonlinearity that follows a layer, for [`calculate_gain`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Nonlinearity {
    /// Identity (also what convolutions without an activation use): gain 1.
    Linear,
    /// Any convolution (`conv1d`, `conv2d`, `conv3d`, transposed ones): gain 1.
    Conv,
    /// Sigmoid: gain 1.
    Sigmoid,
    /// Tanh: gain 5/3.
    Tanh,
    /// ReLU: gain √2.
    Relu,
    /// Leaky ReLU with this negative slope: gain √(2 / (1 + slope²)). PyTorch's default slope
    /// for `calculate_gain('leaky_relu')` is 0.01; kaiming's default `a` is 0.
    LeakyRelu(f64),
    /// SELU: gain 3/4.
    Selu,
}

/// Which fan scales a kaiming initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FanMode {
    /// Preserves the variance of the forward pass (the default).
    #[default]
    FanIn,
    /// Preserves the variance of the backward pass.
    FanOut,
}

/// The recommended gain for a nonlinearity (`torch.nn.init.calculate_gain`).
pub fn calculate_gain(nonlinearity: Nonlinearity) -> f64 {
    match nonlinearity {
        Nonlinearity::Linear | Nonlinearity::Conv | Nonlinearity::Sigmoid => 1.0,
        Nonlinearity::Tanh => 5.0 / 3.0,
        Nonlinearity::Relu => 2.0f64.sqrt(),
        Nonlinearity::LeakyRelu(slope) => (2.0 / (1.0 + slope * slope)).sqrt(),
        Nonlinearity::Selu => 3.0 / 4.0,
    }
}

/// `(fan_in, fan_out)` of a weight: dim 1 and dim 0 times the receptive field (the product
/// of the dims after the first two).
///
/// # Panics
/// For tensors with fewer than 2 dimensions, with PyTorch's message.
#[track_caller]
pub fn calculate_fan_in_and_fan_out(t: &Tensor) -> (usize, usize) {
    let s = t.shape();
    assert!(s.len() >= 2, "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions");
    let receptive: usize = s[2..].iter().product();
    (s[1] * receptive, s[0] * receptive)
}

#[track_caller]
fn fan(t: &Tensor, mode: FanMode) -> usize {
    let (fan_in, fan_out) = calculate_fan_in_and_fan_out(t);
    match mode {
        FanMode::FanIn => fan_in,
        FanMode::FanOut => fan_out,
    }
}

/// Overwrites `t` with `values` (f64), converted to its dtype.
fn fill(t: &Tensor, values: Vec<f64>) {
    t.set_buffer(Buffer::from_vec(values, &t.shape()).cast(t.dtype()));
}

/// Fills `t` with samples of U(a, b) from the default generator.
pub fn uniform_(t: &Tensor, a: f64, b: f64) {
    with_default(|g| uniform_with(g, t, a, b))
}

/// Fills `t` with samples of U(a, b) from `g`.
pub fn uniform_with(g: &mut Generator, t: &Tensor, a: f64, b: f64) {
    if t.numel() > 0 {
        fill(t, g.uniform(t.numel(), a, b));
    }
}

/// Fills `t` with samples of N(mean, std²) from the default generator.
#[track_caller]
pub fn normal_(t: &Tensor, mean: f64, std: f64) {
    with_default(|g| normal_with(g, t, mean, std))
}

/// Fills `t` with samples of N(mean, std²) from `g`.
#[track_caller]
pub fn normal_with(g: &mut Generator, t: &Tensor, mean: f64, std: f64) {
    assert!(std >= 0.0, "normal expects std >= 0.0, but found std {std}");
    if t.numel() > 0 {
        fill(t, g.normal(t.numel(), mean, std));
    }
}

/// Fills `t` with `value`.
pub fn constant_(t: &Tensor, value: f64) {
    t.set_buffer(Buffer::full(value, t.dtype(), &t.shape()));
}

/// Fills `t` with zeros.
pub fn zeros_(t: &Tensor) {
    constant_(t, 0.0)
}

/// Fills `t` with ones.
pub fn ones_(t: &Tensor) {
    constant_(t, 1.0)
}

/// The bound of [`xavier_uniform_`]: `gain · √(6 / (fan_in + fan_out))`, computed as PyTorch
/// does (`√3 · gain · √(2 / (fan_in + fan_out))`).
#[track_caller]
pub fn xavier_uniform_bound(t: &Tensor, gain: f64) -> f64 {
    3.0f64.sqrt() * xavier_std(t, gain)
}

/// The standard deviation of [`xavier_normal_`]: `gain · √(2 / (fan_in + fan_out))`.
#[track_caller]
pub fn xavier_std(t: &Tensor, gain: f64) -> f64 {
    let (fan_in, fan_out) = calculate_fan_in_and_fan_out(t);
    gain * (2.0 / (fan_in + fan_out) as f64).sqrt()
}

/// Glorot uniform: U(-bound, bound) with [`xavier_uniform_bound`], from the default generator.
#[track_caller]
pub fn xavier_uniform_(t: &Tensor, gain: f64) {
    with_default(|g| xavier_uniform_with(g, t, gain))
}

/// Glorot uniform from `g`.
#[track_caller]
pub fn xavier_uniform_with(g: &mut Generator, t: &Tensor, gain: f64) {
    let a = xavier_uniform_bound(t, gain);
    uniform_with(g, t, -a, a)
}

/// Glorot normal: N(0, std²) with [`xavier_std`], from the default generator.
#[track_caller]
pub fn xavier_normal_(t: &Tensor, gain: f64) {
    with_default(|g| xavier_normal_with(g, t, gain))
}

/// Glorot normal from `g`.
#[track_caller]
pub fn xavier_normal_with(g: &mut Generator, t: &Tensor, gain: f64) {
    let std = xavier_std(t, gain);
    normal_with(g, t, 0.0, std)
}

/// The standard deviation of [`kaiming_normal_`]: `gain / √fan`.
#[track_caller]
pub fn kaiming_std(t: &Tensor, mode: FanMode, nonlinearity: Nonlinearity) -> f64 {
    calculate_gain(nonlinearity) / (fan(t, mode) as f64).sqrt()
}

/// The bound of [`kaiming_uniform_`]: `√3 · gain / √fan`.
#[track_caller]
pub fn kaiming_uniform_bound(t: &Tensor, mode: FanMode, nonlinearity: Nonlinearity) -> f64 {
    3.0f64.sqrt() * kaiming_std(t, mode, nonlinearity)
}

/// He uniform: U(-bound, bound) with [`kaiming_uniform_bound`], from the default generator.
/// PyTorch's `kaiming_uniform_(w, a=√5)` (the default of Linear and Conv2d) is
/// `kaiming_uniform_(&w, FanMode::FanIn, Nonlinearity::LeakyRelu(5f64.sqrt()))`.
#[track_caller]
pub fn kaiming_uniform_(t: &Tensor, mode: FanMode, nonlinearity: Nonlinearity) {
    with_default(|g| kaiming_uniform_with(g, t, mode, nonlinearity))
}

/// He uniform from `g`.
#[track_caller]
pub fn kaiming_uniform_with(g: &mut Generator, t: &Tensor, mode: FanMode, nonlinearity: Nonlinearity) {
    if t.numel() == 0 {
        return;
    }
    let bound = kaiming_uniform_bound(t, mode, nonlinearity);
    uniform_with(g, t, -bound, bound)
}

/// He normal: N(0, std²) with [`kaiming_std`], from the default generator.
#[track_caller]
pub fn kaiming_normal_(t: &Tensor, mode: FanMode, nonlinearity: Nonlinearity) {
    with_default(|g| kaiming_normal_with(g, t, mode, nonlinearity))
}

/// He normal from `g`.
#[track_caller]
pub fn kaiming_normal_with(g: &mut Generator, t: &Tensor, mode: FanMode, nonlinearity: Nonlinearity) {
    if t.numel() == 0 {
        return;
    }
    let std = kaiming_std(t, mode, nonlinearity);
    normal_with(g, t, 0.0, std)
}

/// The default init of Linear and Conv2d: weight by `kaiming_uniform_(a=√5)`, which is
/// U(±1/√fan_in), and bias by U(±1/√fan_in) (0 when fan_in is 0).
pub(crate) fn reset_affine(weight: &Tensor, bias: Option<&Tensor>) {
    kaiming_uniform_(weight, FanMode::FanIn, Nonlinearity::LeakyRelu(5f64.sqrt()));
    if let Some(b) = bias {
        let (fan_in, _) = calculate_fan_in_and_fan_out(weight);
        let bound = if fan_in > 0 { 1.0 / (fan_in as f64).sqrt() } else { 0.0 };
        uniform_(b, -bound, bound);
    }
}
