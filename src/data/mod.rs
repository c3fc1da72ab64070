//! Data loading, after `torch.utils.data`.
//!
//! * In-memory sets: the embedded UCI [`digits`], MNIST readers ([`read_csv`], [`read_idx_pair`],
//!   [`read_mnist_idx_dir`]) returning a [`Labeled`] set with a fixed split and simple batching.
//! * Map-style data sets: the [`Dataset`] trait, [`TensorDataset`] and [`Subset`].
//! * Samplers: the [`Sampler`] trait (one epoch of indices per [`Sampler::iter`] call),
//!   [`SequentialSampler`], [`RandomSampler`], [`SubsetRandomSampler`],
//!   [`WeightedRandomSampler`], [`DistributedSampler`] and [`BatchSampler`].
//! * [`DataLoader`]: batching through a [`Collate`] function ([`DefaultCollate`] stacks tensors),
//!   shuffling, and `num_workers` worker threads that deliver batches in order with bounded
//!   prefetch, a per-batch `timeout`, a `worker_init_fn` and per-worker seeds
//!   ([`get_worker_info`]).
//!
//! ```
//! use tracegrad::data::{DataLoader, TensorDataset};
//! use tracegrad::Tensor;
//!
//! let x = Tensor::randn(&[10, 3]);
//! let y = Tensor::from_vec((0..10).collect::<Vec<i64>>(), &[10]);
//! let ds = TensorDataset::new(vec![x, y]).unwrap();
//! let loader = DataLoader::builder(ds).batch_size(4).shuffle(true).seed(0).build().unwrap();
//! assert_eq!(loader.len(), 3);
//! for batch in &loader {
//!     let batch = batch.unwrap();
//!     assert_eq!(batch[0].shape()[1], 3);
//!     assert_eq!(batch[1].dim(), 1);
//! }
//! ```
//!
//! Errors in configuration are [`DataError`]s carrying PyTorch's message texts. A panic inside
//! a data set's `get` (or in the collate function) is caught and turned into an `Err` item of
//! the loader's iterator, in both the single-threaded and the worker-thread modes. Waiting for a
//! batch longer than the loader's [`timeout`](DataLoaderBuilder::timeout) is an `Err` too,
//! never a hang.

use std::fmt;

mod collate;
mod dataset;
mod loader;
mod readers;
mod sampler;

pub use collate::{Collatable, Collate, DefaultCollate};
pub use dataset::{Dataset, Subset, TensorDataset};
pub use loader::{get_worker_info, DataLoader, DataLoaderBuilder, DataLoaderIter, WorkerInfo, WorkerInitFn};
pub use readers::{digits, read_csv, read_idx_pair, read_mnist_idx_dir, Labeled};
pub use sampler::{
    BatchSampler, DistributedSampler, RandomSampler, Sampler, SequentialSampler, SubsetRandomSampler,
    WeightedRandomSampler,
};

/// An error from building a data set, sampler or loader, or from fetching a batch.
///
/// `Display` gives PyTorch's message text where PyTorch has one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataError {
    /// An invalid argument (PyTorch's `ValueError`); the payload is the full message.
    InvalidArgument(String),
    /// [`TensorDataset`] over tensors whose first dimensions differ.
    SizeMismatch,
    /// `Dataset::get(index)` panicked; `message` is the panic payload.
    GetPanicked {
        /// The index that was being fetched.
        index: usize,
        /// The panic message.
        message: String,
    },
    /// The collate function panicked while assembling a batch.
    CollatePanicked {
        /// The indices of the batch.
        indices: Vec<usize>,
        /// The panic message.
        message: String,
    },
    /// No batch arrived from the workers within the loader's
    /// [`timeout`](DataLoaderBuilder::timeout) (PyTorch's "DataLoader timed out after {timeout}
    /// seconds").
    Timeout {
        /// The configured timeout.
        after: std::time::Duration,
    },
    /// A worker thread could not be started, or stopped without delivering its batch (for
    /// instance because its `worker_init_fn` panicked).
    WorkerExited {
        /// The worker's id (`0..num_workers`).
        worker: usize,
        /// What happened.
        reason: String,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::InvalidArgument(m) => f.write_str(m),
            DataError::SizeMismatch => f.write_str("Size mismatch between tensors"),
            DataError::GetPanicked { index, message } => {
                write!(f, "DataLoader worker: dataset.get({index}) panicked: {message}")
            }
            DataError::CollatePanicked { indices, message } => {
                write!(f, "DataLoader worker: collate_fn panicked on batch {indices:?}: {message}")
            }
            DataError::Timeout { after } => {
                write!(f, "DataLoader timed out after {} seconds", after.as_secs_f64())
            }
            DataError::WorkerExited { worker, reason } => {
                write!(f, "DataLoader worker {worker} exited unexpectedly: {reason}")
            }
        }
    }
}

impl std::error::Error for DataError {}

impl DataError {
    pub(crate) fn invalid(msg: impl Into<String>) -> DataError {
        DataError::InvalidArgument(msg.into())
    }
}

/// The text of a panic payload (`&str` or `String`; anything else is described generically).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_string()
    }
}
