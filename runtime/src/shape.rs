//! Shapes, strides, dimension normalisation and NumPy/PyTorch broadcasting.

use smallvec::SmallVec;
use std::fmt;

/// A tensor shape: the size of each dimension, outermost first.
pub type Dims = SmallVec<[usize; 6]>;

/// Wrapper that prints a shape as PyTorch does in error messages: `[2, 3]`.
pub struct ShapeDisplay<'a>(pub &'a [usize]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// Number of elements of a shape (1 for a scalar), or an error naming the shape when the
/// product overflows `usize`. The one place element counts are computed: everything else
/// ([`numel`], [`checked_bytes`], `TensorType::numel`) goes through here, so a wrapped product
/// can never pass a size check.
pub fn checked_numel(shape: &[usize]) -> Result<usize, String> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
        format!("shape {} has more elements than fit in a usize (the product overflows)", ShapeDisplay(shape))
    })
}

/// Storage bytes of a tensor of `shape` with `elem_size`-byte elements, checked against
/// overflow, against `isize::MAX` (Rust's limit for one allocation) and against
/// [`max_alloc_bytes`]; the error names the shape.
pub fn checked_bytes(shape: &[usize], elem_size: usize) -> Result<usize, String> {
    let n = checked_numel(shape)?;
    let limit = max_alloc_bytes();
    match n.checked_mul(elem_size) {
        Some(b) if b <= limit => Ok(b),
        Some(b) => Err(format!(
            "a tensor of shape {} needs {b} bytes, more than the {limit}-byte limit on one allocation (TRACEGRAD_MAX_ALLOC)",
            ShapeDisplay(shape)
        )),
        None => Err(format!(
            "a tensor of shape {} needs more than {} bytes: too large to allocate",
            ShapeDisplay(shape),
            usize::MAX
        )),
    }
}

/// The most bytes one tensor's storage may take: `TRACEGRAD_MAX_ALLOC` (bytes) when set to a
/// number, else `isize::MAX`. Read on each call, so a test or program can lower it at run time.
pub fn max_alloc_bytes() -> usize {
    std::env::var("TRACEGRAD_MAX_ALLOC")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(isize::MAX as usize, |v| v.min(isize::MAX as usize))
}

/// Number of elements of a shape (1 for a scalar). Panics, naming the shape, when the product
/// overflows; use [`checked_numel`] where the caller can return an error.
#[track_caller]
pub fn numel(shape: &[usize]) -> usize {
    checked_numel(shape).unwrap_or_else(|e| panic!("{e}"))
}

/// Row-major contiguous strides, in elements.
pub fn contiguous_strides(shape: &[usize]) -> Dims {
    let mut strides: Dims = SmallVec::from_elem(0, shape.len());
    // Saturating: a stride past an overflowing product is never used, because such a shape
    // has no storage (checked_numel refuses it before anything is allocated).
    let mut acc: usize = 1;
    for i in (0..shape.len()).rev() {
        strides[i] = acc;
        acc = acc.saturating_mul(shape[i]);
    }
    strides
}

/// Normalises a possibly negative dimension index against `rank`, with PyTorch's error text.
pub fn normalize_dim(dim: isize, rank: usize) -> Result<usize, String> {
    // PyTorch treats a scalar as having one wrappable dimension.
    let r = rank.max(1) as isize;
    if dim < -r || dim >= r {
        return Err(format!(
            "Dimension out of range (expected to be in range of [{}, {}], but got {})",
            -r,
            r - 1,
            dim
        ));
    }
    Ok(if dim < 0 { (dim + r) as usize } else { dim as usize })
}

/// Broadcasts two shapes; the error names the op and both shapes.
pub fn broadcast_shapes(op: &str, a: &[usize], b: &[usize]) -> Result<Dims, String> {
    let rank = a.len().max(b.len());
    let mut out: Dims = SmallVec::from_elem(0, rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(format!(
                "{op}: the size of tensor a ({da}) must match the size of tensor b ({db}) at non-singleton dimension {i} (shapes {} and {})",
                ShapeDisplay(a),
                ShapeDisplay(b)
            ));
        };
    }
    Ok(out)
}

/// Strides (in elements) for reading a contiguous tensor of shape `src` as if it had the
/// broadcast shape `dst`: broadcast dimensions get stride 0. `src` must broadcast to `dst`.
pub fn broadcast_strides(src: &[usize], dst: &[usize]) -> Dims {
    let fail = || -> ! { panic!("shape {} does not broadcast to {}", ShapeDisplay(src), ShapeDisplay(dst)) };
    // Leading 1s beyond dst's rank are dropped.
    let lead = src.len().saturating_sub(dst.len());
    if src[..lead].iter().any(|&d| d != 1) {
        fail();
    }
    let src = &src[lead..];
    // The eager kernels' layout: a dimension of size 1 in both keeps its contiguous stride,
    // which their contiguous-row fast paths recognise.
    let strides = contiguous_strides(src);
    let off = dst.len() - src.len();
    let mut out: Dims = SmallVec::from_elem(0, dst.len());
    for i in 0..src.len() {
        let d = dst[i + off];
        out[i + off] = match src[i] {
            1 if d != 1 => 0,
            n if n == d => strides[i],
            _ => fail(),
        };
    }
    out
}

/// [`broadcast_strides`], or `None` if `src` does not broadcast to `dst` (shapes align on the
/// right; leading 1s of `src` are ignored). Every dimension of size 1 in `dst`, which is never
/// stepped, gets stride 0 too.
pub fn try_broadcast_strides(src: &[usize], dst: &[usize]) -> Option<Dims> {
    let lead = src.iter().take_while(|&&d| d == 1).count();
    let src = &src[lead..];
    let pad = dst.len().checked_sub(src.len())?;
    let mut strides: Dims = SmallVec::from_elem(0, dst.len());
    let mut acc = 1;
    for d in (0..src.len()).rev() {
        let t = dst[pad + d];
        if src[d] == t && t != 1 {
            strides[pad + d] = acc;
        } else if src[d] != 1 {
            return None;
        }
        acc *= src[d];
    }
    Some(strides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shapes("add", &[3, 1], &[4]).unwrap().as_slice(), &[3, 4]);
        assert_eq!(broadcast_shapes("add", &[], &[2, 2]).unwrap().as_slice(), &[2, 2]);
        let e = broadcast_shapes("add", &[2, 3], &[2, 4]).unwrap_err();
        assert!(
            e.starts_with(
                "add: the size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1"
            ),
            "{e}"
        );
    }

    #[test]
    fn broadcast_strides_step_only_real_dimensions() {
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]).as_slice(), &[0, 1, 0]);
        assert_eq!(broadcast_strides(&[1, 1, 4], &[4]).as_slice(), &[1]);
        assert_eq!(try_broadcast_strides(&[2, 1, 3], &[2, 1, 3]).unwrap().as_slice(), &[3, 0, 1]);
        assert_eq!(broadcast_strides(&[2, 1, 3], &[2, 1, 3]).as_slice(), &[3, 3, 1]);
        assert!(try_broadcast_strides(&[2, 3], &[3, 3]).is_none());
        assert!(try_broadcast_strides(&[2, 3], &[3]).is_none());
    }

    #[test]
    fn negative_dims_wrap() {
        assert_eq!(normalize_dim(-1, 3).unwrap(), 2);
        assert!(normalize_dim(3, 3).is_err());
        assert_eq!(normalize_dim(0, 0).unwrap(), 0);
    }
}
