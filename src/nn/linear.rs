//! `Linear` and `Identity` (PyTorch's `torch/nn/modules/linear.py`).

use super::init;
use super::python_repr::py_bool;
use super::{Module, ModuleCore};
use crate::tensor::Tensor;

/// Returns its input unchanged; a placeholder that keeps a model's structure.
#[derive(Module, Default)]
pub struct Identity {
    core: ModuleCore,
}

impl Identity {
    /// The identity module.
    pub fn new() -> Identity {
        Identity::default()
    }
}

impl Module for Identity {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.clone()
    }
}

/// `y = x Wᵀ + b`, with PyTorch's default initialisation: W by `kaiming_uniform_(a=√5)` and b
/// uniform, both in ±1/√in_features.
#[derive(Module)]
pub struct Linear {
    /// `[out_features, in_features]`.
    #[param]
    pub weight: Tensor,
    /// `[out_features]`.
    #[param]
    pub bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    core: ModuleCore,
}

impl Linear {
    /// A layer with bias, initialised from the default generator.
    pub fn new(in_features: usize, out_features: usize) -> Linear {
        Linear::with_bias(in_features, out_features, true)
    }

    /// A layer with or without bias.
    pub fn with_bias(in_features: usize, out_features: usize, bias: bool) -> Linear {
        let weight = Tensor::zeros(&[out_features, in_features]);
        let bias = bias.then(|| Tensor::zeros(&[out_features]));
        init::reset_affine(&weight, bias.as_ref());
        Linear {
            weight: weight.requires_grad_(true),
            bias: bias.map(|b| b.requires_grad_(true)),
            in_features,
            out_features,
            core: ModuleCore::new(),
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        crate::linear(x, &self.weight, self.bias.as_ref())
    }
    fn extra_repr(&self) -> String {
        format!(
            "in_features={}, out_features={}, bias={}",
            self.in_features,
            self.out_features,
            py_bool(self.bias.is_some())
        )
    }
}
