//! `Dropout`.

use super::python_repr::py_float;
use super::{Module, ModuleCore, ModuleExt};
use crate::tensor::Tensor;

/// Zeroes each element with probability `p` in training mode and scales the rest by
/// `1 / (1 - p)`; the identity in eval mode (`torch.nn.Dropout`). Masks come from the default
/// generator's Philox stream, in compiled mode too: a compiled call draws the mask eager mode
/// would, and the backward regenerates it.
///
/// ```
/// use tracegrad::nn::{Dropout, ModuleExt};
///
/// let d = Dropout::new(0.5);
/// assert_eq!(d.repr(), "Dropout(p=0.5, inplace=False)");
/// d.eval();
/// let x = tracegrad::Tensor::ones(&[4]);
/// assert_eq!(d.call(&x).to_vec_f32(), vec![1.0; 4]);
/// ```
#[derive(Module)]
pub struct Dropout {
    p: f64,
    core: ModuleCore,
}

impl Dropout {
    /// Dropout with probability `p`.
    ///
    /// # Panics
    /// If `p` is outside `[0, 1]`, with PyTorch's message.
    #[track_caller]
    pub fn new(p: f64) -> Dropout {
        assert!((0.0..=1.0).contains(&p), "ValueError: dropout probability has to be between 0 and 1, but got {p}");
        Dropout { p, core: ModuleCore::new() }
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }
}

impl Default for Dropout {
    /// `p = 0.5`, PyTorch's default.
    fn default() -> Dropout {
        Dropout::new(0.5)
    }
}

impl Module for Dropout {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.dropout(self.p, self.training())
    }

    fn extra_repr(&self) -> String {
        format!("p={}, inplace=False", py_float(self.p))
    }
}
