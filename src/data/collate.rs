//! Turning a list of samples into a batch (`collate_fn`): the [`Collate`] trait, closures as
//! collate functions, and [`DefaultCollate`] (PyTorch's `default_collate`/`default_convert`).

use crate::tensor::Tensor;

/// Assembles samples of type `T` into the loader's output (PyTorch's `collate_fn`).
///
/// Any `Fn(Vec<T>) -> O + Send + Sync` closure is a `Collate<T>`. The function runs in the
/// loader's worker threads; a panic there is reported as
/// [`DataError::CollatePanicked`](super::DataError::CollatePanicked).
pub trait Collate<T>: Send + Sync {
    /// A batch.
    type Output: Send;

    /// Collates the samples of one batch (automatic batching on).
    fn collate(&self, samples: Vec<T>) -> Self::Output;

    /// Converts one sample when automatic batching is off (`batch_size(None)`). PyTorch calls
    /// `collate_fn(sample)` there; a Rust closure over `Vec<T>` gets `vec![sample]`, which is
    /// the default. [`DefaultCollate`] converts without adding a batch dimension
    /// (`default_convert`).
    fn convert(&self, sample: T) -> Self::Output {
        self.collate(vec![sample])
    }
}

impl<T, O: Send, F: Fn(Vec<T>) -> O + Send + Sync> Collate<T> for F {
    type Output = O;

    fn collate(&self, samples: Vec<T>) -> O {
        self(samples)
    }
}

/// A sample type that [`DefaultCollate`] knows how to batch.
///
/// Tensors stack along a new leading dimension; scalars become a 1-D tensor of their dtype
/// (`f32`, `f64`, `i64`, `u8`, `bool`); `Vec`s and tuples collate position by position.
pub trait Collatable: Sized {
    /// What a batch of these becomes.
    type Batch: Send;

    /// Batches `samples` (PyTorch's `default_collate`). Panics with PyTorch's message when the
    /// samples do not line up (tensor shapes, list lengths).
    fn collate(samples: Vec<Self>) -> Self::Batch;

    /// One sample without batching (PyTorch's `default_convert`): tensors unchanged, scalars as
    /// 0-d tensors.
    fn convert(self) -> Self::Batch;
}

impl Collatable for Tensor {
    type Batch = Tensor;

    #[track_caller]
    fn collate(samples: Vec<Tensor>) -> Tensor {
        if let Some(first) = samples.first() {
            let shape = first.shape();
            if let Some((i, t)) = samples.iter().enumerate().find(|(_, t)| t.shape() != shape) {
                panic!(
                    "stack expects each tensor to be equal size, but got {:?} at entry 0 and {:?} at entry {i}",
                    shape,
                    t.shape()
                );
            }
        }
        let refs: Vec<&Tensor> = samples.iter().collect();
        Tensor::stack(&refs, 0)
    }

    fn convert(self) -> Tensor {
        self
    }
}

macro_rules! collatable_scalar {
    ($($t:ty),*) => {$(
        impl Collatable for $t {
            type Batch = Tensor;

            fn collate(samples: Vec<$t>) -> Tensor {
                let n = samples.len();
                Tensor::from_vec(samples, &[n])
            }

            fn convert(self) -> Tensor {
                Tensor::from_vec(vec![self], &[])
            }
        }
    )*};
}
collatable_scalar!(f32, f64, i64, u8, bool);

impl<T: Collatable> Collatable for Vec<T> {
    type Batch = Vec<T::Batch>;

    #[track_caller]
    fn collate(samples: Vec<Vec<T>>) -> Vec<T::Batch> {
        let width = samples.first().map_or(0, Vec::len);
        if samples.iter().any(|s| s.len() != width) {
            panic!("each element in list of batch should be of equal size");
        }
        let mut columns: Vec<Vec<T>> = (0..width).map(|_| Vec::with_capacity(samples.len())).collect();
        for sample in samples {
            for (column, v) in columns.iter_mut().zip(sample) {
                column.push(v);
            }
        }
        columns.into_iter().map(T::collate).collect()
    }

    fn convert(self) -> Vec<T::Batch> {
        self.into_iter().map(T::convert).collect()
    }
}

macro_rules! collatable_tuple {
    ($(($($name:ident $idx:tt),+))*) => {$(
        impl<$($name: Collatable),+> Collatable for ($($name,)+) {
            type Batch = ($($name::Batch,)+);

            #[track_caller]
            fn collate(samples: Vec<Self>) -> Self::Batch {
                #[allow(non_snake_case)]
                let ($(mut $name,)+) = ($(Vec::<$name>::with_capacity(samples.len()),)+);
                for s in samples {
                    $($name.push(s.$idx);)+
                }
                ($(<$name as Collatable>::collate($name),)+)
            }

            fn convert(self) -> Self::Batch {
                ($(self.$idx.convert(),)+)
            }
        }
    )*};
}
collatable_tuple! {
    (A 0)
    (A 0, B 1)
    (A 0, B 1, C 2)
    (A 0, B 1, C 2, D 3)
}

/// PyTorch's default collate function: [`Collatable::collate`] for batches and
/// [`Collatable::convert`] without automatic batching. For the `Vec<Tensor>` samples of
/// [`TensorDataset`](super::TensorDataset), a batch is one stacked tensor per position.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultCollate;

impl<T: Collatable> Collate<T> for DefaultCollate {
    type Output = T::Batch;

    fn collate(&self, samples: Vec<T>) -> T::Batch {
        T::collate(samples)
    }

    fn convert(&self, sample: T) -> T::Batch {
        sample.convert()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_default_collate_shapes() {
        let c = DefaultCollate;
        let samples = vec![(Tensor::zeros(&[2, 3]), 1i64, 0.5f64), (Tensor::ones(&[2, 3]), 2, 1.5)];
        let (x, y, w) = Collate::collate(&c, samples);
        assert_eq!(x.shape(), vec![2, 2, 3]);
        assert_eq!((y.dtype(), y.to_vec::<i64>()), (tracegrad_runtime::DType::I64, vec![1, 2]));
        assert_eq!((w.dtype(), w.shape()), (tracegrad_runtime::DType::F64, vec![2]));
        let one: Tensor = Collate::convert(&c, 3.0f32);
        assert_eq!(one.shape(), Vec::<usize>::new());
        let rows: Vec<Tensor> = Collate::collate(&c, vec![vec![Tensor::zeros(&[4])], vec![Tensor::ones(&[4])]]);
        assert_eq!(rows[0].shape(), vec![2, 4]);
    }

    #[test]
    #[should_panic(expected = "each element in list of batch should be of equal size")]
    fn data_ragged_lists_panic() {
        let _ = <Vec<f32> as Collatable>::collate(vec![vec![1.0], vec![1.0, 2.0]]);
    }
}
