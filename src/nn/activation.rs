//! Activation modules: `ReLU`, `GELU`, `Tanh`, `Sigmoid`, `SiLU`, `Softmax`, `LogSoftmax`.

use super::{Module, ModuleCore};
use crate::tensor::Tensor;

/// Declares a parameterless pointwise activation.
macro_rules! pointwise_activation {
    ($($(#[$doc:meta])* $name:ident => $method:ident;)*) => {
        $(
            $(#[$doc])*
            #[derive(Module, Default)]
            pub struct $name {
                core: ModuleCore,
            }

            impl $name {
                /// The activation.
                pub fn new() -> $name {
                    $name::default()
                }
            }

            impl Module for $name {
                fn forward(&self, x: &Tensor) -> Tensor {
                    x.$method()
                }
            }
        )*
    };
}

pointwise_activation! {
    /// `max(x, 0)`.
    ReLU => relu;
    /// `tanh(x)`.
    Tanh => tanh;
    /// `1 / (1 + e^-x)`.
    Sigmoid => sigmoid;
    /// `x · sigmoid(x)` (swish).
    SiLU => silu;
}

/// Which GELU formula to use (PyTorch's `approximate=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GeluApproximate {
    /// The exact `x · Φ(x)`, with erf (`'none'`).
    #[default]
    None,
    /// The tanh approximation (`'tanh'`).
    Tanh,
}

/// The Gaussian error linear unit (`torch.nn.GELU`).
///
/// ```
/// use tracegrad::nn::{GeluApproximate, ModuleExt, GELU};
///
/// assert_eq!(GELU::new().repr(), "GELU(approximate='none')");
/// assert_eq!(GELU::with_approximate(GeluApproximate::Tanh).repr(), "GELU(approximate='tanh')");
/// ```
#[derive(Module, Default)]
pub struct GELU {
    approximate: GeluApproximate,
    core: ModuleCore,
}

impl GELU {
    /// The exact GELU.
    pub fn new() -> GELU {
        GELU::default()
    }

    /// GELU with the given formula.
    pub fn with_approximate(approximate: GeluApproximate) -> GELU {
        GELU { approximate, core: ModuleCore::new() }
    }
}

impl Module for GELU {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self.approximate {
            GeluApproximate::None => x.gelu(),
            GeluApproximate::Tanh => x.gelu_tanh(),
        }
    }

    fn extra_repr(&self) -> String {
        let a = match self.approximate {
            GeluApproximate::None => "none",
            GeluApproximate::Tanh => "tanh",
        };
        format!("approximate='{a}'")
    }
}

/// `softmax` along `dim` (`torch.nn.Softmax`).
#[derive(Module)]
pub struct Softmax {
    dim: isize,
    core: ModuleCore,
}

impl Softmax {
    /// Softmax along `dim` (negative counts from the end).
    pub fn new(dim: isize) -> Softmax {
        Softmax { dim, core: ModuleCore::new() }
    }
}

impl Module for Softmax {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.softmax(self.dim)
    }

    fn extra_repr(&self) -> String {
        format!("dim={}", self.dim)
    }
}

/// `log_softmax` along `dim` (`torch.nn.LogSoftmax`).
#[derive(Module)]
pub struct LogSoftmax {
    dim: isize,
    core: ModuleCore,
}

impl LogSoftmax {
    /// Log-softmax along `dim` (negative counts from the end).
    pub fn new(dim: isize) -> LogSoftmax {
        LogSoftmax { dim, core: ModuleCore::new() }
    }
}

impl Module for LogSoftmax {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.log_softmax(self.dim)
    }

    fn extra_repr(&self) -> String {
        format!("dim={}", self.dim)
    }
}
