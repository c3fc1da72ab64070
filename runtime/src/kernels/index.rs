//! Index kernels: index_select / index_add and gather / scatter_add, with PyTorch's
//! out-of-range error text. Duplicate indices accumulate in the add forms.

use crate::buffer::{Buffer, Element};
use crate::dispatch;
use crate::shape::{contiguous_strides, numel, Dims};

fn check(i: i64, size: usize, dim: usize) -> Result<usize, String> {
    let j = if i < 0 { i + size as i64 } else { i };
    if j < 0 || j >= size as i64 {
        return Err(format!("index {i} is out of bounds for dimension {dim} with size {size}"));
    }
    Ok(j as usize)
}

/// `x.index_select(dim, idx)` for a 1-D `idx`.
pub fn index_select(x: &Buffer, dim: usize, idx: &[i64]) -> Result<Buffer, String> {
    let shape = x.shape();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let rows: Vec<usize> = idx.iter().map(|&i| check(i, shape[dim], dim)).collect::<Result<_, _>>()?;
    let mut out: Dims = shape.into();
    out[dim] = idx.len();
    Ok(dispatch!(all, x.data(), |v: T| {
        let mut dst = Vec::with_capacity(numel(&out));
        for o in 0..outer {
            for &r in &rows {
                let base = (o * shape[dim] + r) * inner;
                dst.extend_from_slice(&v[base..base + inner]);
            }
        }
        Buffer::from_vec(dst, &out)
    }))
}

/// `x.index_add(dim, idx, src)`: `out[.., idx[j], ..] += src[.., j, ..]`.
pub fn index_add(x: &Buffer, dim: usize, idx: &[i64], src: &Buffer) -> Result<Buffer, String> {
    let shape = x.shape();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let rows: Vec<usize> = idx.iter().map(|&i| check(i, shape[dim], dim)).collect::<Result<_, _>>()?;
    let mut out = x.clone();
    dispatch!(numeric, src.data(), "index_add", |s: T| {
        let dst = T::slice_mut(out.make_mut()).expect("index_add: dtype mismatch");
        for o in 0..outer {
            for (j, &r) in rows.iter().enumerate() {
                let d = (o * shape[dim] + r) * inner;
                let sbase = (o * idx.len() + j) * inner;
                for k in 0..inner {
                    dst[d + k] += s[sbase + k];
                }
            }
        }
    });
    Ok(out)
}

/// For each position of `idx` (shape `ishape`), the offset into a tensor of `target` shape
/// with dimension `dim` replaced by the index value.
pub(crate) fn scatter_offsets(
    ishape: &[usize],
    idx: &[i64],
    target: &[usize],
    dim: usize,
) -> Result<Vec<usize>, String> {
    let tstrides = contiguous_strides(target);
    let mut coords = vec![0usize; ishape.len()];
    let mut offs = Vec::with_capacity(idx.len());
    for &i in idx {
        let j = check(i, target[dim], dim)?;
        let mut off = 0;
        for d in 0..ishape.len() {
            off += if d == dim { j } else { coords[d] } * tstrides[d];
        }
        offs.push(off);
        for d in (0..ishape.len()).rev() {
            coords[d] += 1;
            if coords[d] < ishape[d] {
                break;
            }
            coords[d] = 0;
        }
    }
    Ok(offs)
}

/// Offsets of each position of `ishape` inside a tensor of shape `full` (same rank, each
/// dimension at least as large).
pub(crate) fn sub_offsets(ishape: &[usize], full: &[usize]) -> Vec<usize> {
    let fstrides = contiguous_strides(full);
    let n = numel(ishape);
    let mut coords = vec![0usize; ishape.len()];
    let mut offs = Vec::with_capacity(n);
    for _ in 0..n {
        offs.push(coords.iter().zip(&fstrides).map(|(c, s)| c * s).sum());
        for d in (0..ishape.len()).rev() {
            coords[d] += 1;
            if coords[d] < ishape[d] {
                break;
            }
            coords[d] = 0;
        }
    }
    offs
}

/// `x.gather(dim, idx)`: `out[p] = x[p with dim := idx[p]]`; output has `idx`'s shape.
pub fn gather(x: &Buffer, dim: usize, idx: &Buffer) -> Result<Buffer, String> {
    let offs = scatter_offsets(idx.shape(), idx.as_slice::<i64>(), x.shape(), dim)?;
    Ok(dispatch!(all, x.data(), |v: T| {
        Buffer::from_vec(offs.iter().map(|&o| v[o]).collect::<Vec<T>>(), idx.shape())
    }))
}

/// `x.scatter_add(dim, idx, src)`: `out[p with dim := idx[p]] += src[p]` for every position
/// `p` of `idx` (which may be smaller than `src`).
pub fn scatter_add(x: &Buffer, dim: usize, idx: &Buffer, src: &Buffer) -> Result<Buffer, String> {
    let offs = scatter_offsets(idx.shape(), idx.as_slice::<i64>(), x.shape(), dim)?;
    let soffs = sub_offsets(idx.shape(), src.shape());
    let mut out = x.clone();
    dispatch!(numeric, src.data(), "scatter_add", |s: T| {
        let dst = T::slice_mut(out.make_mut()).expect("scatter_add: dtype mismatch");
        for (&o, &so) in offs.iter().zip(&soffs) {
            dst[o] += s[so];
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_then_scatter_add_accumulates_duplicates() {
        let x = Buffer::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let idx = Buffer::from_vec(vec![0i64, 0, 1, 0], &[2, 2]);
        let g = gather(&x, 1, &idx).unwrap();
        assert_eq!(g.as_slice::<f32>(), &[1.0, 1.0, 4.0, 3.0]);
        let z = Buffer::zeros(crate::DType::F32, &[2, 2]);
        let s = scatter_add(&z, 1, &idx, &g).unwrap();
        assert_eq!(s.as_slice::<f32>(), &[2.0, 0.0, 3.0, 4.0]);
    }

    #[test]
    fn out_of_range_index_errors() {
        let x = Buffer::from_vec(vec![1.0f32, 2.0, 3.0], &[3]);
        let e = index_select(&x, 0, &[5]).unwrap_err();
        assert_eq!(e, "index 5 is out of bounds for dimension 0 with size 3");
    }
}
