//! The layers the foundation needs: `Linear`, `ReLU`, `Sequential`.

use super::{Module, VisitorDyn};
use crate::tensor::Tensor;

/// `y = x Wᵀ + b`, with PyTorch's default initialisation: W and b uniform in ±1/√in_features.
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`.
    pub bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
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
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        crate::linear(x, &self.weight, self.bias.as_ref())
    }
    fn visit(&self, v: &mut dyn VisitorDyn) {
        v.parameter("weight", &self.weight);
        if let Some(b) = &self.bias {
            v.parameter("bias", b);
        }
    }
    fn type_name(&self) -> String {
        "Linear".into()
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
pub struct ReLU;

impl Module for ReLU {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.relu()
    }
    fn visit(&self, _v: &mut dyn VisitorDyn) {}
    fn type_name(&self) -> String {
        "ReLU".into()
    }
}

/// Modules applied in order; children are named `0`, `1`, ….
#[derive(Default)]
pub struct Sequential {
    children: Vec<(String, Box<dyn Module>)>,
}

impl Sequential {
    /// An empty container.
    pub fn new() -> Sequential {
        Sequential::default()
    }

    /// Appends a module (builder style).
    #[allow(clippy::should_implement_trait)]
    pub fn add(mut self, m: impl Module + 'static) -> Sequential {
        self.push(Box::new(m));
        self
    }

    /// Appends a module.
    pub fn push(&mut self, m: Box<dyn Module>) {
        let name = self.children.len().to_string();
        self.children.push((name, m));
    }

    /// Number of children.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether there are no children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }
}

impl Module for Sequential {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.clone();
        for (_, m) in &self.children {
            h = m.forward(&h);
        }
        h
    }
    fn visit(&self, v: &mut dyn VisitorDyn) {
        for (name, m) in &self.children {
            v.child(name, m.as_ref());
        }
    }
    fn type_name(&self) -> String {
        "Sequential".into()
    }
}
