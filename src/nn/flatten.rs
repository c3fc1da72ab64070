//! `Flatten`.

use super::{Module, ModuleCore};
use crate::tensor::Tensor;

/// Flattens dims `start_dim..=end_dim` into one (`torch.nn.Flatten`; by default everything but
/// the batch dim).
///
/// ```
/// use tracegrad::nn::{Flatten, ModuleExt};
///
/// let f = Flatten::new();
/// assert_eq!(f.repr(), "Flatten(start_dim=1, end_dim=-1)");
/// assert_eq!(f.call(&tracegrad::Tensor::zeros(&[2, 3, 4])).shape(), vec![2, 12]);
/// ```
#[derive(Module)]
pub struct Flatten {
    start_dim: isize,
    end_dim: isize,
    core: ModuleCore,
}

impl Flatten {
    /// `start_dim = 1`, `end_dim = -1`.
    pub fn new() -> Flatten {
        Flatten::with_dims(1, -1)
    }

    /// Flattens `start_dim..=end_dim` (negative counts from the end).
    pub fn with_dims(start_dim: isize, end_dim: isize) -> Flatten {
        Flatten { start_dim, end_dim, core: ModuleCore::new() }
    }
}

impl Default for Flatten {
    fn default() -> Flatten {
        Flatten::new()
    }
}

impl Module for Flatten {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.flatten(self.start_dim, self.end_dim)
    }

    fn extra_repr(&self) -> String {
        format!("start_dim={}, end_dim={}", self.start_dim, self.end_dim)
    }
}
