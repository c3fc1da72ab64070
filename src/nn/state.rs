//! State files: a module's [`state_dict`](super::ModuleExt::state_dict) as a
//! [safetensors](https://github.com/huggingface/safetensors) file, the format PyTorch writes with
//! `safetensors.torch.save_file` and reads with `load_file`.
//!
//! Keys are PyTorch's dotted names (`features.0.weight`, `features.1.num_batches_tracked`, …).
//! Element types map one to one: `F32`, `F64`, `I64`, `BOOL` and `U8`; any other dtype in a file
//! (`BF16`, `F16`, `I32`, …) is an error naming the key and the dtype. Data is little-endian and
//! row-major; a 0-d tensor has shape `[]`. No `__metadata__` is written, as with PyTorch's
//! `save_file(state)`, so a state that came from a PyTorch file is written back byte for byte.
//!
//! Parsing and validation of the header and the data offsets is the `safetensors` crate's; this
//! module adds one guard before it (no data offset may lie beyond the end of the input, which
//! keeps the crate's offset arithmetic from overflowing on hostile headers; see `check_offsets`)
//! and checks every byte range and length again before converting. A corrupt or truncated file is an [`Err`], never a
//! panic.
//!
//! [`state_from_safetensors`] returns the tensors in the file's storage order (by data offset).
//! For files written by PyTorch or by this module that is also the header's order: descending
//! dtype alignment, then key (so `num_batches_tracked`, an `I64`, comes before the `F32`
//! tensors). [`load_state_dict`](super::ModuleExt::load_state_dict) matches by name, so the
//! order does not matter for loading.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, View};
use tracegrad_runtime::{Buffer, DType, Data};

use super::{LoadReport, ModuleError, ModuleExt};
use crate::tensor::Tensor;

/// What went wrong reading or writing a state file; see [`StateError::kind`].
#[derive(Debug)]
#[non_exhaustive]
pub enum StateErrorKind {
    /// Reading or writing the file failed.
    Io(std::io::Error),
    /// The bytes are not a valid safetensors file: a short or oversized length prefix, a header
    /// that is not UTF-8 or not valid JSON, inconsistent shapes, dtypes or data offsets, or data
    /// that does not cover the file exactly. Holds the `safetensors` crate's error where it
    /// found the fault.
    Format(Box<dyn Error + Send + Sync + 'static>),
    /// A tensor whose dtype tracegrad does not have (`BF16`, `F16`, `I32`, …).
    UnsupportedDtype {
        /// The tensor's key.
        key: String,
        /// The dtype as the file spells it.
        dtype: String,
    },
    /// A tensor whose byte range or size is inconsistent with its dtype and shape.
    InvalidTensor {
        /// The tensor's key.
        key: String,
        /// What is inconsistent.
        reason: String,
    },
    /// The same key twice in a state being written.
    DuplicateKey(String),
    /// The file was read, but [`load_state_dict`](super::ModuleExt::load_state_dict) refused it
    /// (missing or unexpected keys under `strict`, size mismatches); the module is unchanged.
    Load(ModuleError),
}

impl fmt::Display for StateErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateErrorKind::Io(e) => write!(f, "I/O error: {e}"),
            StateErrorKind::Format(e) => write!(f, "invalid safetensors data: {e}"),
            StateErrorKind::UnsupportedDtype { key, dtype } => {
                write!(
                    f,
                    "tensor \"{key}\" has dtype {dtype}, which tracegrad does not support (F32, F64, I64, BOOL, U8)"
                )
            }
            StateErrorKind::InvalidTensor { key, reason } => write!(f, "tensor \"{key}\": {reason}"),
            StateErrorKind::DuplicateKey(key) => write!(f, "duplicate key \"{key}\" in the state"),
            StateErrorKind::Load(e) => write!(f, "{e}"),
        }
    }
}

/// An error from reading, writing or loading a safetensors state; names the file when there is
/// one.
#[derive(Debug)]
pub struct StateError {
    path: Option<PathBuf>,
    kind: StateErrorKind,
}

impl StateError {
    /// An error not tied to a file.
    pub fn new(kind: StateErrorKind) -> StateError {
        StateError { path: None, kind }
    }

    /// What went wrong.
    pub fn kind(&self) -> &StateErrorKind {
        &self.kind
    }

    /// The file involved, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The same error, naming `path`.
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> StateError {
        self.path = Some(path.into());
        self
    }

    fn format(e: impl Into<Box<dyn Error + Send + Sync + 'static>>) -> StateError {
        StateError::new(StateErrorKind::Format(e.into()))
    }

    fn invalid(key: &str, reason: String) -> StateError {
        StateError::new(StateErrorKind::InvalidTensor { key: key.to_string(), reason })
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl Error for StateError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.kind {
            StateErrorKind::Io(e) => Some(e),
            StateErrorKind::Format(e) => Some(&**e),
            StateErrorKind::Load(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StateErrorKind> for StateError {
    fn from(kind: StateErrorKind) -> StateError {
        StateError::new(kind)
    }
}

/// One tensor's bytes, as the `safetensors` writer wants them.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn le_bytes<T, const N: usize>(v: &[T], f: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for x in v {
        out.extend_from_slice(&f(x));
    }
    out
}

fn to_raw(t: &Tensor) -> Raw {
    let b = t.buffer();
    let (dtype, bytes) = match b.data() {
        Data::F32(v) => (Dtype::F32, le_bytes(v, |x| x.to_le_bytes())),
        Data::F64(v) => (Dtype::F64, le_bytes(v, |x| x.to_le_bytes())),
        Data::I64(v) => (Dtype::I64, le_bytes(v, |x| x.to_le_bytes())),
        Data::Bool(v) => (Dtype::BOOL, v.iter().map(|&x| u8::from(x)).collect()),
        Data::U8(v) => (Dtype::U8, v.clone()),
    };
    Raw { dtype, shape: b.shape().to_vec(), bytes }
}

fn from_le<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

/// The bytes of a safetensors file holding `state`, which PyTorch's
/// `safetensors.torch.load_file` reads.
///
/// Keys are written as given (a module's [`state_dict`](ModuleExt::state_dict) gives PyTorch's
/// dotted names); dtypes map to `F32`, `F64`, `I64`, `BOOL` and `U8`, little-endian and
/// row-major. Tensors are stored by descending dtype alignment, then key, as the format's
/// writers do, and no `__metadata__` is written (as with PyTorch's `save_file(state)`), so a
/// state read from a PyTorch file is written back byte for byte. Duplicate keys are an error.
pub fn state_to_safetensors(state: &[(String, Tensor)]) -> Result<Vec<u8>, StateError> {
    state_to_safetensors_with(state, None)
}

/// [`state_to_safetensors`] with a `__metadata__` map (checkpoints keep their JSON there).
pub(crate) fn state_to_safetensors_with(
    state: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, StateError> {
    let mut seen = HashSet::new();
    for (k, _) in state {
        if !seen.insert(k.as_str()) {
            return Err(StateErrorKind::DuplicateKey(k.clone()).into());
        }
    }
    let raws: Vec<(&str, Raw)> = state.iter().map(|(k, t)| (k.as_str(), to_raw(t))).collect();
    safetensors::serialize(raws.iter().map(|(k, r)| (*k, r)), metadata).map_err(StateError::format)
}

/// Checks, before the `safetensors` crate sees the header, that no declared data offset lies
/// beyond the end of `bytes`. safetensors 0.6 adds the last offset to the header length
/// unchecked, which overflows (a panic in debug builds) when a hostile header declares offsets
/// near `usize::MAX`. Whatever this cannot read it leaves to the crate to report.
fn check_offsets(bytes: &[u8]) -> Result<(), StateError> {
    let Some(prefix) = bytes.get(..8) else { return Ok(()) };
    let mut n = [0u8; 8];
    n.copy_from_slice(prefix);
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 {
        return Ok(()); // the crate's limit: it reports the header as too large
    }
    let n = n as usize;
    let Some(header) = n.checked_add(8).and_then(|end| bytes.get(8..end)) else { return Ok(()) };
    let Ok(entries) = serde_json::from_slice::<HashMap<String, serde_json::Value>>(header) else { return Ok(()) };
    for (key, entry) in &entries {
        if key == "__metadata__" {
            continue;
        }
        let Some(offsets) = entry.get("data_offsets").and_then(|o| o.as_array()) else { continue };
        for o in offsets {
            if o.as_u64().is_some_and(|o| o > bytes.len() as u64) {
                return Err(StateError::invalid(
                    key,
                    format!("data offset {o} lies beyond the end of the {}-byte input", bytes.len()),
                ));
            }
        }
    }
    Ok(())
}

fn tensor_from(key: &str, info: &TensorInfo, data: &[u8]) -> Result<Tensor, StateError> {
    let dtype = match info.dtype {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::BOOL => DType::Bool,
        Dtype::U8 => DType::U8,
        other => return Err(StateErrorKind::UnsupportedDtype { key: key.to_string(), dtype: other.to_string() }.into()),
    };
    let (start, end) = info.data_offsets;
    let bytes = data.get(start..end).ok_or_else(|| {
        StateError::invalid(key, format!("data offsets [{start}, {end}) outside the {}-byte data section", data.len()))
    })?;
    let numel = info
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| StateError::invalid(key, format!("shape {:?} overflows", info.shape)))?;
    if numel.checked_mul(dtype.size()) != Some(bytes.len()) {
        return Err(StateError::invalid(
            key,
            format!("{} bytes cannot hold {numel} {} elements of shape {:?}", bytes.len(), info.dtype, info.shape),
        ));
    }
    let data = match dtype {
        DType::F32 => Data::F32(from_le(bytes, f32::from_le_bytes)),
        DType::F64 => Data::F64(from_le(bytes, f64::from_le_bytes)),
        DType::I64 => Data::I64(from_le(bytes, i64::from_le_bytes)),
        DType::Bool => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
        DType::U8 => Data::U8(bytes.to_vec()),
    };
    Ok(Tensor::from_buffer(Buffer::new(data, &info.shape)))
}

/// Reads the tensors of a safetensors file held in memory (PyTorch's
/// `safetensors.torch.save_file` output, say) as fresh leaf tensors.
///
/// Dtypes `F32`, `F64`, `I64`, `BOOL` and `U8` map to tracegrad's; any other
/// ([`StateErrorKind::UnsupportedDtype`]) is an error naming the key and the dtype. A 0-d tensor
/// has shape `[]`.
///
/// **Order**: the file's storage order (by data offset). For files written by PyTorch or by
/// [`state_to_safetensors`] that is also the header's order: descending dtype alignment, then
/// key, so an `I64` `num_batches_tracked` comes before the `F32` tensors. It is not the
/// module's `state_dict` order; [`load_state_dict`](ModuleExt::load_state_dict) matches by name,
/// so this does not matter for loading.
///
/// Any fault in the bytes (truncation, a bad length prefix, a header that is not UTF-8 JSON,
/// inconsistent shapes, dtypes or offsets, trailing bytes) is an [`Err`], never a panic.
pub fn state_from_safetensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, StateError> {
    check_offsets(bytes)?;
    let (n, metadata): (usize, Metadata) = SafeTensors::read_metadata(bytes).map_err(StateError::format)?;
    let data = n
        .checked_add(8)
        .and_then(|start| bytes.get(start..))
        .ok_or_else(|| StateError::format(format!("header length {n} exceeds the {}-byte input", bytes.len())))?;
    let mut out = Vec::new();
    for key in metadata.offset_keys() {
        let info =
            metadata.info(&key).ok_or_else(|| StateError::invalid(&key, "listed but not described".to_string()))?;
        let t = tensor_from(&key, info, data)?;
        out.push((key, t));
    }
    Ok(out)
}

/// Writes `module`'s [`state_dict`](ModuleExt::state_dict) to a safetensors file at `path`
/// (which PyTorch's `safetensors.torch.load_file` reads).
pub fn save_safetensors<M: ModuleExt + ?Sized>(module: &M, path: impl AsRef<Path>) -> Result<(), StateError> {
    let path = path.as_ref();
    let bytes = state_to_safetensors(&module.state_dict()).map_err(|e| e.with_path(path))?;
    std::fs::write(path, bytes).map_err(|e| StateError::new(StateErrorKind::Io(e)).with_path(path))
}

/// Reads a safetensors file (PyTorch's `safetensors.torch.save_file` output, say) and loads it
/// into `module` with [`load_state_dict`](ModuleExt::load_state_dict). The whole file is read
/// and checked, and the state validated against the module, before anything is copied: on any
/// error the module is unchanged. Values are cast to the module's dtypes as `load_state_dict`
/// does.
pub fn load_safetensors<M: ModuleExt + ?Sized>(
    module: &M,
    path: impl AsRef<Path>,
    strict: bool,
) -> Result<LoadReport, StateError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| StateError::new(StateErrorKind::Io(e)).with_path(path))?;
    let state = state_from_safetensors(&bytes).map_err(|e| e.with_path(path))?;
    module.load_state_dict(&state, strict).map_err(|e| StateError::new(StateErrorKind::Load(e)).with_path(path))
}
