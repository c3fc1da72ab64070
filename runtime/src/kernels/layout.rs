//! Data-movement kernels: permute, expand (broadcast copy), narrow and cat.
//! Every result is a fresh contiguous buffer: tracegrad's views copy (see ARCHITECTURE.md).

use std::mem::MaybeUninit;

use crate::buffer::{Buffer, Element};
use crate::dispatch;
use crate::shape::{broadcast_strides, contiguous_strides, numel, Dims};

use super::pointwise::{offset, strided_rows};

/// Reads `src` through element `strides` laid over `out` shape, into a contiguous vector.
pub fn strided_copy<T: Element>(src: &[T], out: &[usize], strides: &[usize]) -> Vec<T> {
    if out.is_empty() {
        return vec![src[0]];
    }
    let last = strides[out.len() - 1];
    strided_rows(out, |row_start, len, dst: &mut [MaybeUninit<T>]| {
        let base = offset(row_start, out, strides);
        if last == 1 {
            for (d, &v) in dst[..len].iter_mut().zip(&src[base..base + len]) {
                d.write(v);
            }
        } else {
            for (j, d) in dst.iter_mut().enumerate().take(len) {
                d.write(src[base + j * last]);
            }
        }
    })
}

/// `x.permute(perm)`: output dim `i` is input dim `perm[i]`.
pub fn permute(x: &Buffer, perm: &[usize]) -> Buffer {
    let in_strides = contiguous_strides(x.shape());
    let out: Dims = perm.iter().map(|&p| x.shape()[p]).collect();
    let strides: Dims = perm.iter().map(|&p| in_strides[p]).collect();
    dispatch!(all, x.data(), |v: T| Buffer::from_vec(strided_copy(v, &out, &strides), &out))
}

/// `x.expand(out)` materialised.
pub fn expand(x: &Buffer, out: &[usize]) -> Buffer {
    if x.shape() == out {
        return x.clone();
    }
    let strides = broadcast_strides(x.shape(), out);
    dispatch!(all, x.data(), |v: T| Buffer::from_vec(strided_copy(v, out, &strides), out))
}

/// `x.narrow(dim, start, len)`.
pub fn narrow(x: &Buffer, dim: usize, start: usize, len: usize) -> Buffer {
    let shape = x.shape();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let mut out: Dims = shape.into();
    out[dim] = len;
    dispatch!(all, x.data(), |v: T| {
        let mut dst = Vec::with_capacity(numel(&out));
        for o in 0..outer {
            let base = (o * shape[dim] + start) * inner;
            dst.extend_from_slice(&v[base..base + len * inner]);
        }
        Buffer::from_vec(dst, &out)
    })
}

/// Concatenation along `dim`; all parts share dtype and every other dimension.
pub fn cat(parts: &[&Buffer], dim: usize) -> Buffer {
    let first = parts[0].shape();
    let outer: usize = first[..dim].iter().product();
    let inner: usize = first[dim + 1..].iter().product();
    let mut out: Dims = first.into();
    out[dim] = parts.iter().map(|p| p.shape()[dim]).sum();
    dispatch!(all, parts[0].data(), |_v: T| {
        let slices: Vec<&[T]> = parts.iter().map(|p| p.as_slice::<T>()).collect();
        let mut dst = Vec::with_capacity(numel(&out));
        for o in 0..outer {
            for (p, s) in parts.iter().zip(&slices) {
                let w = p.shape()[dim] * inner;
                dst.extend_from_slice(&s[o * w..(o + 1) * w]);
            }
        }
        Buffer::from_vec(dst, &out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_swaps_axes() {
        let x = Buffer::from_vec((0..6).map(|v| v as f32).collect(), &[2, 3]);
        let t = permute(&x, &[1, 0]);
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.as_slice::<f32>(), &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn narrow_and_cat_invert() {
        let x = Buffer::from_vec((0..12).map(|v| v as i64).collect(), &[3, 4]);
        let a = narrow(&x, 1, 0, 1);
        let b = narrow(&x, 1, 1, 3);
        assert_eq!(a.as_slice::<i64>(), &[0, 4, 8]);
        assert_eq!(cat(&[&a, &b], 1), x);
    }

    #[test]
    fn expand_repeats() {
        let x = Buffer::from_vec(vec![1.0f32, 2.0], &[2]);
        assert_eq!(expand(&x, &[3, 2]).as_slice::<f32>(), &[1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
    }
}
