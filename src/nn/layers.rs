//! The layers the foundation needs: `Linear`, `ReLU`, `Sequential`.

use std::sync::Arc;

use super::{Module, ModuleCore, ModuleExt, ModuleRef};
use crate::tensor::Tensor;

/// `y = x Wᵀ + b`, with PyTorch's default initialisation: W and b uniform in ±1/√in_features.
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
        // kaiming_uniform_(a=√5) reduces to U(-1/√fan_in, 1/√fan_in), as does the bias init.
        let bound = if in_features > 0 { 1.0 / (in_features as f64).sqrt() } else { 0.0 };
        let u = |shape: &[usize]| Tensor::rand(shape).mul_scalar(2.0 * bound).sub_scalar(bound).requires_grad_(true);
        Linear {
            weight: u(&[out_features, in_features]),
            bias: bias.then(|| u(&[out_features])),
            in_features,
            out_features,
            core: ModuleCore::new(),
        }
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
            if self.bias.is_some() { "True" } else { "False" }
        )
    }
}

/// `max(x, 0)`.
#[derive(Module, Default)]
pub struct ReLU {
    core: ModuleCore,
}

impl ReLU {
    /// The activation.
    pub fn new() -> ReLU {
        ReLU::default()
    }
}

impl Module for ReLU {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.relu()
    }
}

/// Modules applied in order. Children are named `0`, `1`, … or given names.
#[derive(Module, Default)]
pub struct Sequential {
    core: ModuleCore,
}

impl Sequential {
    /// An empty container.
    pub fn new() -> Sequential {
        Sequential::default()
    }

    /// Appends a module (builder style).
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, m: impl Module) -> Sequential {
        self.push(Arc::new(m));
        self
    }

    /// Appends a (possibly shared) module, named by its position.
    pub fn push(&self, m: Arc<dyn Module>) {
        let name = self.len().to_string();
        self.register_module(&name, m).expect("a fresh positional name is valid");
    }

    /// Number of children.
    pub fn len(&self) -> usize {
        self.named_children().len()
    }

    /// Whether there are no children.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The child at `index` (negative counts from the end).
    pub fn get(&self, index: isize) -> Option<ModuleRef<'_>> {
        let c = self.named_children();
        let i = if index < 0 { c.len() as isize + index } else { index };
        (0..c.len() as isize).contains(&i).then(|| c[i as usize].1.clone())
    }
}

impl Module for Sequential {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.clone();
        for (_, m) in self.named_children() {
            h = m.call(&h);
        }
        h
    }
}
