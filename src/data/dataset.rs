//! Map-style data sets (`torch.utils.data.Dataset`): [`Dataset`], [`TensorDataset`], [`Subset`].

use std::sync::Arc;

use super::{DataError, Labeled};
use crate::tensor::Tensor;

/// A map-style data set: `len()` samples, fetched one at a time by index (PyTorch's
/// `__len__`/`__getitem__`).
///
/// `Send + Sync` because a [`DataLoader`](super::DataLoader) with `num_workers > 0` calls `get`
/// from several worker threads at once. `get` may panic on a bad index or bad data; the loader
/// catches that and reports it as [`DataError::GetPanicked`].
pub trait Dataset: Send + Sync {
    /// One sample.
    type Item: Send;

    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sample at `index` (`0..len()`).
    fn get(&self, index: usize) -> Self::Item;
}

impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    type Item = D::Item;

    fn len(&self) -> usize {
        (**self).len()
    }

    fn get(&self, index: usize) -> D::Item {
        (**self).get(index)
    }
}

impl<D: Dataset + ?Sized> Dataset for Box<D> {
    type Item = D::Item;

    fn len(&self) -> usize {
        (**self).len()
    }

    fn get(&self, index: usize) -> D::Item {
        (**self).get(index)
    }
}

/// A vector is a data set of its (cloned) elements.
impl<T: Clone + Send + Sync> Dataset for Vec<T> {
    type Item = T;

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    #[track_caller]
    fn get(&self, index: usize) -> T {
        let n = self.as_slice().len();
        match self.as_slice().get(index) {
            Some(v) => v.clone(),
            None => panic!("index {index} is out of range for a data set of length {n}"),
        }
    }
}

/// A [`Labeled`] set yields `[x_row, y]`: a `[d]` feature row and a 0-d label, which
/// [`DefaultCollate`](super::DefaultCollate) stacks into `[B, d]` and `[B]`.
impl Dataset for Labeled {
    type Item = Vec<Tensor>;

    fn len(&self) -> usize {
        Labeled::len(self)
    }

    #[track_caller]
    fn get(&self, index: usize) -> Vec<Tensor> {
        vec![row(&self.x, index), row(&self.y, index)]
    }
}

/// Row `index` of `t` along dim 0, with that dim removed (PyTorch's `t[index]`).
#[track_caller]
fn row(t: &Tensor, index: usize) -> Tensor {
    let n = t.shape()[0];
    if index >= n {
        panic!("index {index} is out of bounds for dimension 0 with size {n}");
    }
    t.narrow(0, index, 1).squeeze_dim(0)
}

/// Samples are the rows of one or more tensors that share their first dimension
/// (`torch.utils.data.TensorDataset`). Sample `i` is `vec![t[i] for t in tensors]`.
#[derive(Clone)]
pub struct TensorDataset {
    tensors: Vec<Tensor>,
    len: usize,
}

impl TensorDataset {
    /// Wraps `tensors`. Errors with PyTorch's "Size mismatch between tensors" when their first
    /// dimensions differ, and with an invalid-argument error when there are no tensors or one
    /// is 0-d.
    pub fn new(tensors: Vec<Tensor>) -> Result<TensorDataset, DataError> {
        if tensors.is_empty() {
            return Err(DataError::invalid("TensorDataset needs at least one tensor"));
        }
        let mut len = None;
        for t in &tensors {
            let shape = t.shape();
            let Some(&n) = shape.first() else {
                return Err(DataError::invalid("dimension specified as 0 but tensor has no dimensions"));
            };
            if *len.get_or_insert(n) != n {
                return Err(DataError::SizeMismatch);
            }
        }
        Ok(TensorDataset { tensors, len: len.unwrap_or(0) })
    }

    /// The wrapped tensors.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }
}

impl Dataset for TensorDataset {
    type Item = Vec<Tensor>;

    fn len(&self) -> usize {
        self.len
    }

    #[track_caller]
    fn get(&self, index: usize) -> Vec<Tensor> {
        self.tensors.iter().map(|t| row(t, index)).collect()
    }
}

/// The samples of `dataset` at `indices`, in that order (`torch.utils.data.Subset`).
#[derive(Clone)]
pub struct Subset<D> {
    dataset: D,
    indices: Vec<usize>,
}

impl<D: Dataset> Subset<D> {
    /// A view of `dataset` restricted to `indices` (not checked until fetched).
    pub fn new(dataset: D, indices: Vec<usize>) -> Subset<D> {
        Subset { dataset, indices }
    }

    /// The underlying data set.
    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// The selected indices.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl<D: Dataset> Dataset for Subset<D> {
    type Item = D::Item;

    fn len(&self) -> usize {
        self.indices.len()
    }

    #[track_caller]
    fn get(&self, index: usize) -> D::Item {
        let n = self.indices.len();
        match self.indices.as_slice().get(index) {
            Some(&i) => self.dataset.get(i),
            None => panic!("index {index} is out of range for a Subset of length {n}"),
        }
    }
}
