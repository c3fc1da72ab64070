//! `Buffer`: a shape plus shared, contiguous, row-major storage.
//!
//! Invariant: `data.len() == numel(shape)`. Buffers are immutable values; cloning is an `Arc`
//! bump, and a reshape shares storage. Writers go through `make_mut`, which copies only when
//! the storage is shared (copy-on-write), so no reader ever sees a buffer change under it.

use crate::dtype::DType;
use crate::shape::{numel, Dims, ShapeDisplay};
use std::fmt;
use std::sync::Arc;

/// The typed storage behind a buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// Booleans.
    Bool(Vec<bool>),
    /// Bytes.
    U8(Vec<u8>),
    /// 64-bit integers.
    I64(Vec<i64>),
    /// Single-precision floats.
    F32(Vec<f32>),
    /// Double-precision floats.
    F64(Vec<f64>),
}

/// Empty, unallocated storage (f32).
impl Default for Data {
    fn default() -> Self {
        Data::F32(Vec::new())
    }
}

impl Data {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Data::Bool(_) => DType::Bool,
            Data::U8(_) => DType::U8,
            Data::I64(_) => DType::I64,
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Data::Bool(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zero-filled storage of `n` elements of `dtype` (fresh pages from the allocator are
    /// zeroed lazily, so this is cheap until written). Panics with the size when the
    /// allocation fails or exceeds [`crate::shape::max_alloc_bytes`], instead of aborting.
    #[track_caller]
    pub fn zeroed(dtype: DType, n: usize) -> Data {
        Data::try_zeroed(dtype, n).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Data::zeroed`] that returns the allocation failure as an error.
    pub fn try_zeroed(dtype: DType, n: usize) -> Result<Data, String> {
        crate::shape::checked_bytes(&[n], dtype.size())?;
        let fail =
            || format!("out of memory allocating {n} {dtype} elements ({} bytes)", n.saturating_mul(dtype.size()));
        Ok(match dtype {
            DType::Bool => Data::Bool(try_zeroed_vec(n).ok_or_else(fail)?),
            DType::U8 => Data::U8(try_zeroed_vec(n).ok_or_else(fail)?),
            DType::I64 => Data::I64(try_zeroed_vec(n).ok_or_else(fail)?),
            DType::F32 => Data::F32(try_zeroed_vec(n).ok_or_else(fail)?),
            DType::F64 => Data::F64(try_zeroed_vec(n).ok_or_else(fail)?),
        })
    }

    /// Empty storage with room for `n` elements of `dtype`, for a kernel that writes every
    /// element before [`Data::set_len`] declares them: unlike [`Data::zeroed`], no memset. A
    /// large block comes from the [`crate::pool`] cache when it holds one of that size.
    /// Panics with the size when the allocation fails, instead of aborting.
    #[track_caller]
    pub fn with_capacity(dtype: DType, n: usize) -> Data {
        crate::pool::tune_system_allocator();
        if let Some(d) = crate::pool::take(dtype, n) {
            return d;
        }
        if let Err(e) = crate::shape::checked_bytes(&[n], dtype.size()) {
            panic!("{e}");
        }
        match dtype {
            DType::Bool => Data::Bool(empty_vec_or_panic(n, dtype)),
            DType::U8 => Data::U8(empty_vec_or_panic(n, dtype)),
            DType::I64 => Data::I64(empty_vec_or_panic(n, dtype)),
            DType::F32 => Data::F32(empty_vec_or_panic(n, dtype)),
            DType::F64 => Data::F64(empty_vec_or_panic(n, dtype)),
        }
    }

    /// Capacity in elements.
    pub fn capacity(&self) -> usize {
        match self {
            Data::Bool(v) => v.capacity(),
            Data::U8(v) => v.capacity(),
            Data::I64(v) => v.capacity(),
            Data::F32(v) => v.capacity(),
            Data::F64(v) => v.capacity(),
        }
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity() * self.dtype().size()
    }

    /// Removes every element, keeping the allocation.
    pub fn clear(&mut self) {
        match self {
            Data::Bool(v) => v.clear(),
            Data::U8(v) => v.clear(),
            Data::I64(v) => v.clear(),
            Data::F32(v) => v.clear(),
            Data::F64(v) => v.clear(),
        }
    }

    /// Sets the number of elements, as `Vec::set_len`.
    ///
    /// # Safety
    /// `n` must not exceed the capacity, and the first `n` elements must have been written
    /// with valid values of the type (bools as 0 or 1).
    pub unsafe fn set_len(&mut self, n: usize) {
        // SAFETY: forwarded to the caller.
        unsafe {
            match self {
                Data::Bool(v) => v.set_len(n),
                Data::U8(v) => v.set_len(n),
                Data::I64(v) => v.set_len(n),
                Data::F32(v) => v.set_len(n),
                Data::F64(v) => v.set_len(n),
            }
        }
    }

    /// Address of the first element (for generated code; bools are one byte, 0 or 1).
    pub fn as_ptr(&self) -> *const u8 {
        match self {
            Data::Bool(v) => v.as_ptr().cast(),
            Data::U8(v) => v.as_ptr(),
            Data::I64(v) => v.as_ptr().cast(),
            Data::F32(v) => v.as_ptr().cast(),
            Data::F64(v) => v.as_ptr().cast(),
        }
    }

    /// Mutable address of the first element (for generated code, which must store only
    /// valid values: bools as 0 or 1).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            Data::Bool(v) => v.as_mut_ptr().cast(),
            Data::U8(v) => v.as_mut_ptr(),
            Data::I64(v) => v.as_mut_ptr().cast(),
            Data::F32(v) => v.as_mut_ptr().cast(),
            Data::F64(v) => v.as_mut_ptr().cast(),
        }
    }

    /// Bytes of storage.
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype().size()
    }
}

/// A Rust scalar type that can live in a [`Buffer`].
pub trait Element: Copy + Send + Sync + PartialOrd + Default + fmt::Debug + 'static {
    /// The matching dtype.
    const DTYPE: DType;
    /// Borrows the storage if it holds this type.
    fn slice(data: &Data) -> Option<&[Self]>;
    /// Mutably borrows the storage if it holds this type.
    fn slice_mut(data: &mut Data) -> Option<&mut Vec<Self>>;
    /// Wraps a vector as storage.
    fn wrap(v: Vec<Self>) -> Data;
    /// Converts to f64 (booleans are 0 or 1).
    fn to_f64(self) -> f64;
    /// Converts from f64 with Rust's `as` semantics (truncation toward zero, saturation).
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(data: &Data) -> Option<&[Self]> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(data: &mut Data) -> Option<&mut Vec<Self>> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> Data {
                Data::$variant(v)
            }
            fn to_f64(self) -> f64 {
                #[allow(clippy::redundant_closure_call)]
                ($to)(self)
            }
            fn from_f64(v: f64) -> Self {
                #[allow(clippy::redundant_closure_call)]
                ($from)(v)
            }
        }
    };
}
element!(bool, Bool, |x: bool| x as u8 as f64, |v: f64| v != 0.0);
element!(u8, U8, |x: u8| x as f64, |v: f64| v as u8);
element!(i64, I64, |x: i64| x as f64, |v: f64| v as i64);
element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, F64, |x: f64| x, |v: f64| v);

/// Runs `$body` with `$v` bound to the typed slice of `$data` and `$T` to its element type.
/// The `float` form accepts only f32/f64; the `numeric` form adds i64 and u8; `all` adds bool.
#[macro_export]
macro_rules! dispatch {
    (float, $data:expr, $op:expr, |$v:ident: $T:ident| $body:expr) => {
        match $data {
            $crate::Data::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::Data::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            other => panic!("{}: expected a floating-point tensor, got {}", $op, other.dtype()),
        }
    };
    (numeric, $data:expr, $op:expr, |$v:ident: $T:ident| $body:expr) => {
        match $data {
            $crate::Data::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::Data::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            $crate::Data::I64($v) => {
                #[allow(dead_code)]
                type $T = i64;
                $body
            }
            $crate::Data::U8($v) => {
                #[allow(dead_code)]
                type $T = u8;
                $body
            }
            other => panic!("{}: expected a numeric tensor, got {}", $op, other.dtype()),
        }
    };
    (all, $data:expr, |$v:ident: $T:ident| $body:expr) => {
        match $data {
            $crate::Data::F32($v) => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::Data::F64($v) => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            $crate::Data::I64($v) => {
                #[allow(dead_code)]
                type $T = i64;
                $body
            }
            $crate::Data::U8($v) => {
                #[allow(dead_code)]
                type $T = u8;
                $body
            }
            $crate::Data::Bool($v) => {
                #[allow(dead_code)]
                type $T = bool;
                $body
            }
        }
    };
}

/// A dense tensor value: shape plus shared contiguous storage.
#[derive(Clone, PartialEq)]
pub struct Buffer {
    data: Arc<Data>,
    shape: Dims,
}

impl Drop for Buffer {
    /// The last owner of a large block hands it to the [`crate::pool`] cache.
    fn drop(&mut self) {
        // Size first: small buffers (nearly all) skip the uniqueness check's atomics.
        if self.data.capacity_bytes() < crate::pool::MIN_BYTES {
            return;
        }
        if let Some(d) = Arc::get_mut(&mut self.data) {
            crate::pool::give(std::mem::take(d));
        }
    }
}

/// Element types whose all-zero bit pattern is a valid value (false, 0, 0.0); sealed, so
/// [`try_zeroed_vec`] can hand out zeroed memory without a fill.
trait ZeroIsValid: Copy {}
impl ZeroIsValid for bool {}
impl ZeroIsValid for u8 {}
impl ZeroIsValid for i64 {}
impl ZeroIsValid for f32 {}
impl ZeroIsValid for f64 {}

/// `vec![0; n]` that returns `None` when the allocator refuses, where `vec!` would abort.
fn try_zeroed_vec<T: ZeroIsValid>(n: usize) -> Option<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout has a non-zero size, as alloc_zeroed requires.
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if p.is_null() {
        return None;
    }
    // SAFETY: p comes from the global allocator with the layout of [T; n] (so capacity n is
    // exact), and its n elements are all-zero bytes, a valid T by ZeroIsValid.
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
}

/// `Vec::with_capacity(n)` that reports allocation failure instead of aborting.
fn try_empty_vec<T>(n: usize) -> Result<Vec<T>, std::collections::TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)?;
    Ok(v)
}

/// `Vec::with_capacity(n)` that panics with the size (a normal, catchable panic) where the
/// allocator refuses, instead of aborting the process.
#[track_caller]
fn empty_vec_or_panic<T>(n: usize, dtype: DType) -> Vec<T> {
    try_empty_vec(n).unwrap_or_else(|_| {
        panic!("out of memory allocating {n} {dtype} elements ({} bytes)", n.saturating_mul(dtype.size()))
    })
}

/// `vec![value; n]` for kernel outputs and scratch: a refused allocation is a normal,
/// catchable panic naming the size (the executors turn it into the node's error), not an abort.
#[track_caller]
pub fn vec_or_panic<T: Clone>(n: usize, value: T) -> Vec<T> {
    try_filled_vec(n, value).unwrap_or_else(|_| {
        panic!("out of memory allocating {n} elements ({} bytes)", n.saturating_mul(std::mem::size_of::<T>()))
    })
}

/// An empty vector with room for `n` elements of `T` that panics with the size (catchable)
/// where the allocator refuses, instead of aborting the process.
#[track_caller]
pub fn vec_with_capacity_or_panic<T>(n: usize) -> Vec<T> {
    try_empty_vec(n).unwrap_or_else(|_| {
        panic!("out of memory allocating {n} elements ({} bytes)", n.saturating_mul(std::mem::size_of::<T>()))
    })
}

/// `vec![value; n]` that reports allocation failure instead of aborting.
fn try_filled_vec<T: Clone>(n: usize, value: T) -> Result<Vec<T>, std::collections::TryReserveError> {
    let mut v = try_empty_vec(n)?;
    v.resize(n, value);
    Ok(v)
}

impl Buffer {
    /// Wraps storage with a shape. Panics if the element count does not match the shape.
    pub fn new(data: Data, shape: &[usize]) -> Buffer {
        assert_eq!(
            data.len(),
            numel(shape),
            "Buffer::new: {} elements cannot have shape {}",
            data.len(),
            ShapeDisplay(shape)
        );
        crate::pool::tune_system_allocator();
        Buffer { data: Arc::new(data), shape: shape.into() }
    }

    /// Builds a buffer from a typed vector.
    pub fn from_vec<T: Element>(v: Vec<T>, shape: &[usize]) -> Buffer {
        Buffer::new(T::wrap(v), shape)
    }

    /// A 0-d buffer holding one value.
    pub fn scalar(value: f64, dtype: DType) -> Buffer {
        Buffer::full(value, dtype, &[])
    }

    /// A buffer filled with `value`, converted to `dtype`. Panics with a message naming the
    /// shape when it cannot be allocated (see [`Buffer::try_full`]).
    #[track_caller]
    pub fn full(value: f64, dtype: DType, shape: &[usize]) -> Buffer {
        Buffer::try_full(value, dtype, shape).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A buffer filled with `value`, or an error naming the shape when its size overflows,
    /// exceeds `TRACEGRAD_MAX_ALLOC` or the allocator refuses it (never a process abort).
    pub fn try_full(value: f64, dtype: DType, shape: &[usize]) -> Result<Buffer, String> {
        let bytes = crate::shape::checked_bytes(shape, dtype.size())?;
        let n = numel(shape);
        let oom =
            || format!("out of memory allocating a {dtype} tensor of shape {} ({bytes} bytes)", ShapeDisplay(shape));
        let data = if value == 0.0 {
            Data::try_zeroed(dtype, n).map_err(|_| oom())?
        } else {
            match dtype {
                DType::Bool => Data::Bool(try_filled_vec(n, value != 0.0).map_err(|_| oom())?),
                DType::U8 => Data::U8(try_filled_vec(n, value as u8).map_err(|_| oom())?),
                DType::I64 => Data::I64(try_filled_vec(n, value as i64).map_err(|_| oom())?),
                DType::F32 => Data::F32(try_filled_vec(n, value as f32).map_err(|_| oom())?),
                DType::F64 => Data::F64(try_filled_vec(n, value).map_err(|_| oom())?),
            }
        };
        Ok(Buffer::new(data, shape))
    }

    /// A zero-filled buffer.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Buffer {
        Buffer::full(0.0, dtype, shape)
    }

    /// The storage.
    pub fn data(&self) -> &Data {
        &self.data
    }

    /// The storage, copied first if shared.
    pub fn make_mut(&mut self) -> &mut Data {
        Arc::make_mut(&mut self.data)
    }

    /// The storage, if this buffer is its only owner (so it can be reused or written in place).
    pub fn into_data(mut self) -> Result<Data, Buffer> {
        match Arc::get_mut(&mut self.data) {
            // The storage moves out; the Arc keeps an empty, unallocated Vec, freed with `self`.
            Some(d) => Ok(std::mem::take(d)),
            None => Err(self),
        }
    }

    /// Whether two buffers share storage.
    pub fn shares_storage(&self, other: &Buffer) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The same storage under another shape with the same element count.
    pub fn reshaped(&self, shape: &[usize]) -> Buffer {
        assert_eq!(numel(shape), self.numel(), "reshape: element count mismatch");
        Buffer { data: self.data.clone(), shape: shape.into() }
    }

    /// Borrows the elements as `T`, panicking with the dtypes if they differ.
    pub fn as_slice<T: Element>(&self) -> &[T] {
        T::slice(&self.data).unwrap_or_else(|| panic!("expected a {} buffer, got {}", T::DTYPE, self.dtype()))
    }

    /// Copies the elements out as `T` (converting through f64 if the dtype differs).
    pub fn to_vec<T: Element>(&self) -> Vec<T> {
        if let Some(s) = T::slice(&self.data) {
            return s.to_vec();
        }
        dispatch!(all, &*self.data, |v: S| v.iter().map(|x| T::from_f64(x.to_f64())).collect())
    }

    /// All elements converted to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.to_vec::<f64>()
    }

    /// The single element of a one-element buffer, as f64.
    pub fn item(&self) -> f64 {
        assert_eq!(self.numel(), 1, "a Tensor with {} elements cannot be converted to Scalar", self.numel());
        self.to_f64_vec()[0]
    }

    /// Converts to another dtype (float→int truncates toward zero, as PyTorch does).
    pub fn cast(&self, dtype: DType) -> Buffer {
        if dtype == self.dtype() {
            return self.clone();
        }
        let data = match dtype {
            DType::Bool => Data::Bool(self.to_vec()),
            DType::U8 => Data::U8(self.to_vec()),
            DType::I64 => Data::I64(self.to_vec()),
            DType::F32 => Data::F32(self.to_vec()),
            DType::F64 => Data::F64(self.to_vec()),
        };
        Buffer::new(data, &self.shape)
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buffer({}{}, ", self.dtype(), ShapeDisplay(&self.shape))?;
        dispatch!(all, &*self.data, |v: T| {
            let shown = &v[..v.len().min(8)];
            write!(f, "{shown:?}{})", if v.len() > 8 { "…" } else { "" })
        })
    }
}

/// Buffers serialise as `{"dtype": "F32", "shape": [..], "data": [..]}` with the elements as
/// JSON numbers (i64 values beyond 2^53 lose precision).
impl serde::Serialize for Buffer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Buffer", 3)?;
        st.serialize_field("dtype", &self.dtype())?;
        st.serialize_field("shape", &self.shape.to_vec())?;
        #[derive(serde::Serialize)]
        struct Data(#[serde(with = "json_f64::vec")] Vec<f64>);
        st.serialize_field("data", &Data(self.to_f64_vec()))?;
        st.end()
    }
}

impl<'de> serde::Deserialize<'de> for Buffer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Buffer, D::Error> {
        #[derive(serde::Deserialize)]
        struct Raw {
            dtype: DType,
            shape: Vec<usize>,
            #[serde(with = "json_f64::vec")]
            data: Vec<f64>,
        }
        let r = Raw::deserialize(d)?;
        let n = crate::shape::checked_numel(&r.shape).map_err(serde::de::Error::custom)?;
        if r.data.len() != n {
            return Err(serde::de::Error::custom(format!(
                "buffer of shape {} needs {n} elements, found {}",
                ShapeDisplay(&r.shape),
                r.data.len()
            )));
        }
        Ok(Buffer::from_vec(r.data, &r.shape).cast(r.dtype))
    }
}

/// Serde helpers that keep non-finite floats in JSON: finite values are numbers, the others
/// the strings `"inf"`, `"-inf"` and `"nan"` (JSON itself has no such numbers).
pub mod json_f64 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(f64),
        Text(String),
    }

    fn to_repr(v: f64) -> Repr {
        if v.is_finite() {
            Repr::Num(v)
        } else if v.is_nan() {
            Repr::Text("nan".into())
        } else if v > 0.0 {
            Repr::Text("inf".into())
        } else {
            Repr::Text("-inf".into())
        }
    }

    fn from_repr<E: serde::de::Error>(r: Repr) -> Result<f64, E> {
        match r {
            Repr::Num(v) => Ok(v),
            Repr::Text(t) => match t.as_str() {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                other => Err(E::custom(format!("expected a number, \"inf\", \"-inf\" or \"nan\", found {other:?}"))),
            },
        }
    }

    /// Serialises one float.
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        to_repr(*v).serialize(s)
    }

    /// Deserialises one float.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        from_repr(Repr::deserialize(d)?)
    }

    /// The same for `Option<f64>`.
    pub mod option {
        use super::*;

        /// Serialises an optional float.
        pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            v.map(to_repr).serialize(s)
        }

        /// Deserialises an optional float.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            Option::<Repr>::deserialize(d)?.map(from_repr).transpose()
        }
    }

    /// The same for a sequence of floats.
    pub mod vec {
        use super::*;

        /// Serialises floats.
        pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
            v.iter().map(|x| to_repr(*x)).collect::<Vec<_>>().serialize(s)
        }

        /// Deserialises floats.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
            Vec::<Repr>::deserialize(d)?.into_iter().map(from_repr).collect()
        }
    }
}
