//! `Embedding`.

use super::init;
use super::{Module, ModuleCore};
use crate::tensor::Tensor;

/// A lookup table of `num_embeddings` vectors of size `embedding_dim`, initialised N(0, 1)
/// (`torch.nn.Embedding`). Its input is an integer tensor of indices.
///
/// ```
/// use tracegrad::nn::{Embedding, ModuleExt};
/// use tracegrad::Tensor;
///
/// let emb = Embedding::new(10, 3);
/// assert_eq!(emb.repr(), "Embedding(10, 3)");
/// let y = emb.call(&Tensor::from_vec(vec![1i64, 4, 1], &[3]));
/// assert_eq!(y.shape(), vec![3, 3]);
/// ```
#[derive(Module)]
pub struct Embedding {
    /// `[num_embeddings, embedding_dim]`.
    #[param]
    pub weight: Tensor,
    num_embeddings: usize,
    embedding_dim: usize,
    core: ModuleCore,
}

impl Embedding {
    /// A table initialised from the default generator.
    pub fn new(num_embeddings: usize, embedding_dim: usize) -> Embedding {
        let weight = Tensor::zeros(&[num_embeddings, embedding_dim]);
        init::normal_(&weight, 0.0, 1.0);
        Embedding { weight: weight.requires_grad_(true), num_embeddings, embedding_dim, core: ModuleCore::new() }
    }

    /// The number of rows.
    pub fn num_embeddings(&self) -> usize {
        self.num_embeddings
    }

    /// The row length.
    pub fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }
}

impl Module for Embedding {
    fn forward(&self, indices: &Tensor) -> Tensor {
        indices.embedding(&self.weight)
    }

    fn extra_repr(&self) -> String {
        format!("{}, {}", self.num_embeddings, self.embedding_dim)
    }
}
