//! Element types. `F32` is the default; `F64` serves gradchecks; `I64` holds indices and labels;
//! `Bool` holds comparison results and masks; `U8` holds decoded images.

use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
pub enum DType {
    /// `bool`, the result of comparisons.
    Bool,
    /// `u8`, decoded image pixels.
    U8,
    /// `i64`, indices and labels.
    I64,
    /// `f32`, the default floating type.
    #[default]
    F32,
    /// `f64`, used by gradchecks.
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 => 1,
            DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// Whether this is a floating-point type (the only types that carry gradients).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }

    /// The short name used in graph dumps: `f32`, `f64`, `i64`, `bool`, `u8`.
    pub fn short_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "u8",
            DType::I64 => "i64",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    /// PyTorch's name, as `tensor(..., dtype=torch.float64)` prints it.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "torch.bool",
            DType::U8 => "torch.uint8",
            DType::I64 => "torch.int64",
            DType::F32 => "torch.float32",
            DType::F64 => "torch.float64",
        }
    }

    /// The type both operands of a binary op are cast to, as PyTorch's type promotion
    /// for tensors of the same category (bool < u8 < i64 < f32 < f64).
    pub fn promote(a: DType, b: DType) -> DType {
        a.max(b)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}
