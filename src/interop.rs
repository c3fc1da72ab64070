//! Conversions between [`Tensor`] and [`ndarray`] arrays, the Rust counterpart of
//! `torch.from_numpy` and `Tensor.numpy()`.
//!
//! | direction | conversion | copies? |
//! |---|---|---|
//! | `Array<A, D>` → `Tensor` | `Tensor::from(array)` | **no** when the array is in standard (row-major, contiguous) layout and starts at the beginning of its allocation: the `Vec` is moved into the tensor. Otherwise (transposed, strided, sliced views turned owned) the elements are copied in logical order. |
//! | `&ArrayBase<S, D>` / `ArrayView` → `Tensor` | `Tensor::from(&array)` | always (the array is borrowed) |
//! | `&Tensor` / `Tensor` → `Array<A, D>` | `Array::try_from(&t)` | always: a tensor's storage is shared (`Arc`) with its clones and views, so the array gets its own copy |
//! | `&Tensor` → `ArrayD<A>`, any dtype | [`Tensor::to_ndarray`] | always, converting the dtype |
//!
//! Element types are those a tensor can hold: `f32`, `f64`, `i64`, `u8` and `bool`. Unlike
//! `from_numpy`, the tensor does not alias the array afterwards (the array was moved in), so
//! there is nothing to keep in sync.
//!
//! ```
//! use ndarray::{array, Array2, ArrayD, IxDyn};
//! use tracegrad::Tensor;
//!
//! let a: Array2<f32> = array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]];
//! let ptr = a.as_ptr();
//! let t = Tensor::from(a); // moved, not copied
//! assert_eq!(t.shape(), vec![2, 3]);
//! assert_eq!(t.buffer().as_slice::<f32>().as_ptr(), ptr);
//!
//! let back = ArrayD::<f32>::try_from(&t.mul_scalar(2.0)).unwrap();
//! assert_eq!(back[IxDyn(&[1, 2])], 12.0);
//! let fixed = Array2::<f32>::try_from(&t).unwrap();
//! assert_eq!(fixed.t()[[2, 0]], 3.0);
//! ```

use std::fmt;

use ndarray::{Array, ArrayBase, ArrayD, ArrayView, Data, Dimension, IxDyn};
use tracegrad_runtime::{DType, Element};

use crate::tensor::Tensor;

/// Why a tensor could not become an array.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InteropError {
    /// The array's element type is not the tensor's dtype (use [`Tensor::to_dtype`] or
    /// [`Tensor::to_ndarray`] to convert).
    DType {
        /// The array's element type.
        expected: DType,
        /// The tensor's dtype.
        got: DType,
    },
    /// A fixed-dimension array type (`Array2`, …) of another rank than the tensor's.
    Rank {
        /// The array type's rank.
        expected: usize,
        /// The tensor's shape.
        shape: Vec<usize>,
    },
    /// A symbolic tensor of a trace has no values.
    Symbolic,
}

impl fmt::Display for InteropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InteropError::DType { expected, got } => {
                write!(f, "cannot convert a {got} tensor to an array of {expected}")
            }
            InteropError::Rank { expected, shape } => {
                write!(f, "cannot convert a tensor of shape {shape:?} to an array of rank {expected}")
            }
            InteropError::Symbolic => f.write_str("a traced tensor has no values to convert to an array"),
        }
    }
}

impl std::error::Error for InteropError {}

/// Moves the array's storage into a tensor when it is in standard layout and starts at the
/// beginning of its allocation; copies it in logical order otherwise.
impl<A: Element, D: Dimension> From<Array<A, D>> for Tensor {
    fn from(a: Array<A, D>) -> Tensor {
        let shape = a.shape().to_vec();
        let n = a.len();
        if !a.is_standard_layout() {
            return Tensor::from_vec(a.iter().copied().collect(), &shape);
        }
        let (v, offset) = a.into_raw_vec_and_offset();
        let offset = offset.unwrap_or(0);
        let v = if offset == 0 && v.len() == n { v } else { v[offset..offset + n].to_vec() };
        Tensor::from_vec(v, &shape)
    }
}

/// Copies a borrowed array (any storage: owned, view, shared) in logical order.
impl<A: Element, S: Data<Elem = A>, D: Dimension> From<&ArrayBase<S, D>> for Tensor {
    fn from(a: &ArrayBase<S, D>) -> Tensor {
        let shape = a.shape().to_vec();
        let v = match a.as_slice() {
            Some(s) => s.to_vec(),
            None => a.iter().copied().collect(),
        };
        Tensor::from_vec(v, &shape)
    }
}

/// Copies an array view in logical order.
impl<A: Element, D: Dimension> From<ArrayView<'_, A, D>> for Tensor {
    fn from(a: ArrayView<'_, A, D>) -> Tensor {
        Tensor::from(&a)
    }
}

/// Copies the tensor's values into a new array; the element type must be the tensor's dtype
/// and a fixed dimension type must match its rank.
impl<A: Element, D: Dimension> TryFrom<&Tensor> for Array<A, D> {
    type Error = InteropError;

    fn try_from(t: &Tensor) -> Result<Array<A, D>, InteropError> {
        if t.is_symbolic() {
            return Err(InteropError::Symbolic);
        }
        let buf = t.buffer();
        if buf.dtype() != A::DTYPE {
            return Err(InteropError::DType { expected: A::DTYPE, got: buf.dtype() });
        }
        let shape = buf.shape().to_vec();
        if D::NDIM.is_some_and(|r| r != shape.len()) {
            return Err(InteropError::Rank { expected: D::NDIM.unwrap_or(0), shape });
        }
        let a = ArrayD::from_shape_vec(IxDyn(&shape), buf.as_slice::<A>().to_vec())
            .expect("a tensor's storage matches its shape");
        Ok(a.into_dimensionality::<D>().expect("rank checked above"))
    }
}

/// As for `&Tensor`: the values are copied, since the storage may be shared.
impl<A: Element, D: Dimension> TryFrom<Tensor> for Array<A, D> {
    type Error = InteropError;

    fn try_from(t: Tensor) -> Result<Array<A, D>, InteropError> {
        Array::try_from(&t)
    }
}

impl Tensor {
    /// A copy of the values as an `ndarray` array of element type `A`, converting the dtype as
    /// [`to_vec`](Tensor::to_vec) does (the counterpart of `t.numpy().astype(A)`).
    ///
    /// # Panics
    ///
    /// If the tensor is symbolic (inside a trace).
    #[track_caller]
    pub fn to_ndarray<A: Element>(&self) -> ArrayD<A> {
        ArrayD::from_shape_vec(IxDyn(&self.shape()), self.to_vec::<A>()).expect("a tensor's storage matches its shape")
    }
}
