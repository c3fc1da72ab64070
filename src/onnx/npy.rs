//! NumPy `.npy` files ↔ tensors, through `ndarray-npy` and the `ndarray` interop, for
//! `tracegrad run` and tests. f32, f64, i64, u8 and bool arrays are read; every dtype is written.

use std::fs::File;
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt, WriteNpyExt};
use tracegrad_runtime::DType;

use super::OnnxError;
use crate::tensor::Tensor;

fn io(path: &Path, e: impl std::fmt::Display) -> OnnxError {
    OnnxError(format!("{}: {e}", path.display()))
}

/// Reads an `.npy` file as a tensor of the file's dtype.
pub fn read_npy(path: impl AsRef<Path>) -> Result<Tensor, OnnxError> {
    let path = path.as_ref();
    fn attempt<A: ndarray_npy::ReadableElement + tracegrad_runtime::Element>(
        path: &Path,
    ) -> Result<Result<Tensor, ReadNpyError>, OnnxError> {
        let f = File::open(path).map_err(|e| io(path, e))?;
        Ok(ArrayD::<A>::read_npy(f).map(Tensor::from))
    }
    macro_rules! try_type {
        ($t:ty) => {
            match attempt::<$t>(path)? {
                Ok(t) => return Ok(t),
                Err(ReadNpyError::WrongDescriptor(_)) => {}
                Err(e) => return Err(io(path, e)),
            }
        };
    }
    try_type!(f32);
    try_type!(f64);
    try_type!(i64);
    try_type!(u8);
    try_type!(bool);
    Err(io(path, "unsupported element type (read: f32, f64, i64, u8, bool)"))
}

/// Writes a tensor as an `.npy` file in its own dtype.
pub fn write_npy(path: impl AsRef<Path>, t: &Tensor) -> Result<(), OnnxError> {
    let path = path.as_ref();
    let f = File::create(path).map_err(|e| io(path, e))?;
    let r = match t.dtype() {
        DType::F32 => t.to_ndarray::<f32>().write_npy(f),
        DType::F64 => t.to_ndarray::<f64>().write_npy(f),
        DType::I64 => t.to_ndarray::<i64>().write_npy(f),
        DType::U8 => t.to_ndarray::<u8>().write_npy(f),
        DType::Bool => t.to_ndarray::<bool>().write_npy(f),
    };
    r.map_err(|e| io(path, e))
}
