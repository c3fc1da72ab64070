//! Reductions over one contiguous block of dimensions.
//!
//! A tensor is viewed as `[outer, r, inner]` where `r` is the product of the reduced
//! dimensions (which must be adjacent); the result is `[outer, inner]`. Reductions over
//! non-adjacent dimensions are done by the caller as a sequence of these.

use crate::buffer::Element;
use crate::team;
use num_traits::Float;

use super::pointwise::PAR_THRESHOLD;

/// Splits `shape` around the adjacent dims `lo..hi` into `(outer, r, inner)`.
pub fn split3(shape: &[usize], lo: usize, hi: usize) -> (usize, usize, usize) {
    let outer = shape[..lo].iter().product();
    let r = shape[lo..hi].iter().product();
    let inner = shape[hi..].iter().product();
    (outer, r, inner)
}

/// Generic fold: `out[o, i] = finish(fold(init, x[o, 0, i], x[o, 1, i], ...))`.
#[allow(clippy::too_many_arguments)]
pub fn fold<T: Element, A: Copy + Send + Sync, U: Element>(
    x: &[T],
    outer: usize,
    r: usize,
    inner: usize,
    init: A,
    step: impl Fn(A, T, usize) -> A + Sync + Send,
    finish: impl Fn(A) -> U + Sync + Send,
) -> Vec<U> {
    let mut out = crate::buffer::vec_or_panic(outer * inner, U::default());
    if outer * inner == 0 {
        return out;
    }
    let work = |o: usize, dst: &mut [U]| {
        let base = o * r * inner;
        if inner == 1 {
            let mut acc = init;
            for (k, &v) in x[base..base + r].iter().enumerate() {
                acc = step(acc, v, k);
            }
            dst[0] = finish(acc);
        } else {
            let mut acc = vec![init; inner];
            for k in 0..r {
                let row = &x[base + k * inner..base + (k + 1) * inner];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a = step(*a, v, k);
                }
            }
            for (d, a) in dst.iter_mut().zip(acc) {
                *d = finish(a);
            }
        }
    };
    if x.len() < PAR_THRESHOLD {
        for (o, dst) in out.chunks_mut(inner).enumerate() {
            work(o, dst);
        }
    } else {
        team::for_each_item_mut(&mut out, inner, &work);
    }
    out
}

/// Floating-point sum with eight independent accumulators per row, so long rows vectorise and
/// lose less precision than a single running sum.
pub fn sum<T: Element + Float>(x: &[T], outer: usize, r: usize, inner: usize) -> Vec<T> {
    if inner != 1 {
        return fold(x, outer, r, inner, T::zero(), |a, v, _| a + v, |a| a);
    }
    let row_sum = |row: &[T]| {
        let mut lanes = [T::zero(); 8];
        let chunks = row.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..8 {
                lanes[l] = lanes[l] + c[l];
            }
        }
        let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        for &v in tail {
            s = s + v;
        }
        s
    };
    if r == 0 {
        return vec![T::zero(); outer];
    }
    if x.len() < PAR_THRESHOLD {
        x.chunks(r).map(row_sum).collect()
    } else if outer == 1 {
        // One long row: split it, then add the partial sums.
        const PIECE: usize = 1 << 14;
        let mut partials = vec![T::zero(); x.len().div_ceil(PIECE)];
        team::for_each_item_mut(&mut partials, 1, &|i, p| {
            p[0] = row_sum(&x[i * PIECE..((i + 1) * PIECE).min(x.len())])
        });
        vec![partials.into_iter().fold(T::zero(), |a, b| a + b)]
    } else {
        let mut out = vec![T::zero(); outer];
        team::for_each_item_mut(&mut out, 1, &|o, d| d[0] = row_sum(&x[o * r..(o + 1) * r]));
        out
    }
}

/// Maximum (or minimum when `min`), propagating NaN as PyTorch does.
pub fn extremum<T: Element>(x: &[T], outer: usize, r: usize, inner: usize, min: bool) -> Vec<T> {
    // The accumulator starts empty, so no identity value is needed for integer types.
    fold(
        x,
        outer,
        r,
        inner,
        None::<T>,
        |acc, v, _| match acc {
            None => Some(v),
            #[allow(clippy::eq_op)]
            Some(a) if a != a => Some(a),
            #[allow(clippy::eq_op)]
            Some(_) if v != v => Some(v),
            Some(a) => Some(if (v > a) ^ min && v != a { v } else { a }),
        },
        |acc| acc.expect("extremum over an empty dimension"),
    )
}

/// Index of the first maximum (or minimum) along the reduced block; NaN counts as the extreme.
pub fn arg_extremum<T: Element>(x: &[T], outer: usize, r: usize, inner: usize, min: bool) -> Vec<i64> {
    fold(
        x,
        outer,
        r,
        inner,
        None::<(T, usize)>,
        |acc, v, k| match acc {
            None => Some((v, k)),
            #[allow(clippy::eq_op)]
            Some((a, i)) if a != a => Some((a, i)),
            #[allow(clippy::eq_op)]
            Some(_) if v != v => Some((v, k)),
            Some((a, i)) => Some(if (v > a) ^ min && v != a { (v, k) } else { (a, i) }),
        },
        |acc| acc.expect("argmax over an empty dimension").1 as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_rows_and_columns() {
        let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        assert_eq!(sum(&x, 2, 3, 1), vec![3.0, 12.0]);
        assert_eq!(sum(&x, 1, 2, 3), vec![3.0, 5.0, 7.0]);
    }

    #[test]
    fn long_row_sum_is_accurate() {
        let n = PAR_THRESHOLD * 4 + 3;
        let x = vec![0.1f32; n];
        let s = sum(&x, 1, n, 1)[0];
        assert!((s as f64 - 0.1f32 as f64 * n as f64).abs() < 1e-3 * n as f64 * 0.1);
    }

    #[test]
    fn argmax_takes_first_and_nan() {
        assert_eq!(arg_extremum(&[1.0f32, 3.0, 3.0, 2.0], 1, 4, 1, false), vec![1]);
        assert_eq!(arg_extremum(&[1.0f32, f32::NAN, 3.0], 1, 3, 1, false), vec![1]);
        assert_eq!(arg_extremum(&[2.0f32, 1.0, 1.0], 1, 3, 1, true), vec![1]);
        assert!(extremum(&[1.0f32, f32::NAN, 3.0], 1, 3, 1, false)[0].is_nan());
        assert_eq!(extremum(&[4.0f32, 1.0, 3.0, 0.0], 2, 2, 1, true), vec![1.0, 0.0]);
    }
}
