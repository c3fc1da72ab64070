//! Elementwise loops: unary maps and broadcasting binary/ternary zips.
//!
//! The scalar function comes from the op definition (compiler crate); these loops only own the
//! iteration order and the split across threads (the runtime's team, [`crate::team`]) above
//! [`PAR_THRESHOLD`] elements.

use std::mem::MaybeUninit;

use crate::buffer::Element;
use crate::shape::{broadcast_strides, numel};
use crate::team;

/// Below this many elements a loop runs on the calling thread: small tensors must not pay for
/// thread hand-off.
pub const PAR_THRESHOLD: usize = 1 << 15;
/// Elements per parallel task.
const MIN_CHUNK: usize = 1 << 13;

/// A fresh `n`-element output filled in parallel pieces of [`MIN_CHUNK`]: `fill(start, piece)`
/// must write every element of `piece`, which holds output positions `start..`. A cached block
/// of the size (`crate::pool`) is reused when there is one; nothing is zeroed first.
fn par_collect<U: Element>(n: usize, fill: impl Fn(usize, &mut [MaybeUninit<U>]) + Sync) -> Vec<U> {
    let mut out = crate::pool::take_vec::<U>(n);
    if out.capacity() < n {
        out = crate::buffer::vec_with_capacity_or_panic(n);
    }
    team::for_each_chunk_mut(&mut out.spare_capacity_mut()[..n], MIN_CHUNK, &|i, piece| fill(i * MIN_CHUNK, piece));
    // SAFETY: the pieces cover the first `n` elements of the spare capacity, and `fill` wrote
    // every element of each.
    unsafe { out.set_len(n) };
    out
}

/// `f` applied to every element.
pub fn map<T: Element, U: Element>(x: &[T], f: impl Fn(T) -> U + Sync + Send) -> Vec<U> {
    if x.len() < PAR_THRESHOLD {
        x.iter().map(|&v| f(v)).collect()
    } else {
        par_collect(x.len(), |s, piece| {
            for (d, &v) in piece.iter_mut().zip(&x[s..]) {
                d.write(f(v));
            }
        })
    }
}

/// `f(a, b)` over the broadcast shape `out` of `a` (shape `ash`) and `b` (shape `bsh`).
pub fn zip<A: Element, B: Element, U: Element>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    out: &[usize],
    f: impl Fn(A, B) -> U + Sync + Send,
) -> Vec<U> {
    let n = numel(out);
    if a.len() == n && b.len() == n {
        if n < PAR_THRESHOLD {
            return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
        }
        return par_collect(n, |s, piece| {
            for ((d, &x), &y) in piece.iter_mut().zip(&a[s..]).zip(&b[s..]) {
                d.write(f(x, y));
            }
        });
    }
    if b.len() == 1 && a.len() == n {
        let y = b[0];
        return map(a, |x| f(x, y));
    }
    if a.len() == 1 && b.len() == n {
        let x = a[0];
        return map(b, |y| f(x, y));
    }
    let sa = broadcast_strides(ash, out);
    let sb = broadcast_strides(bsh, out);
    strided_rows(out, |row_start, len, dst: &mut [MaybeUninit<U>]| {
        let (oa, ob) = (offset(row_start, out, &sa), offset(row_start, out, &sb));
        let dst = &mut dst[..len];
        // Rows of a bias add or a broadcast row run over slices (strides 1 or 0), which
        // vectorize; other strides index element by element.
        match (last_stride(&sa), last_stride(&sb)) {
            (1, 1) => dst.iter_mut().zip(&a[oa..oa + len]).zip(&b[ob..ob + len]).for_each(|((d, &x), &y)| {
                d.write(f(x, y));
            }),
            (1, 0) => {
                let y = b[ob];
                dst.iter_mut().zip(&a[oa..oa + len]).for_each(|(d, &x)| {
                    d.write(f(x, y));
                });
            }
            (0, 1) => {
                let x = a[oa];
                dst.iter_mut().zip(&b[ob..ob + len]).for_each(|(d, &y)| {
                    d.write(f(x, y));
                });
            }
            (ia, ib) => dst.iter_mut().enumerate().for_each(|(j, d)| {
                d.write(f(a[oa + j * ia], b[ob + j * ib]));
            }),
        }
    })
}

/// `f(c, a, b)` over the broadcast shape `out` of three operands (used by `where`).
#[allow(clippy::too_many_arguments)]
pub fn zip3<C: Element, A: Element, B: Element, U: Element>(
    c: &[C],
    csh: &[usize],
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    out: &[usize],
    f: impl Fn(C, A, B) -> U + Sync + Send,
) -> Vec<U> {
    // Contiguous fast paths (`where(mask, g, 0)` in a ReLU's backward, a masked fill): with one
    // operand a scalar the loop is a two-operand zip, which vectorizes.
    let n = numel(out);
    if c.len() == n && a.len() == n && b.len() == 1 {
        let y = b[0];
        return zip(c, csh, a, ash, out, |cv, av| f(cv, av, y));
    }
    if c.len() == n && a.len() == 1 && b.len() == n {
        let x = a[0];
        return zip(c, csh, b, bsh, out, |cv, bv| f(cv, x, bv));
    }
    if c.len() == n && a.len() == n && b.len() == n {
        if n < PAR_THRESHOLD {
            return c.iter().zip(a).zip(b).map(|((&cv, &av), &bv)| f(cv, av, bv)).collect();
        }
        return par_collect(n, |s, piece| {
            for (((d, &cv), &av), &bv) in piece.iter_mut().zip(&c[s..]).zip(&a[s..]).zip(&b[s..]) {
                d.write(f(cv, av, bv));
            }
        });
    }
    let sc = broadcast_strides(csh, out);
    let sa = broadcast_strides(ash, out);
    let sb = broadcast_strides(bsh, out);
    strided_rows(out, |row_start, len, dst: &mut [MaybeUninit<U>]| {
        let (oc, oa, ob) = (offset(row_start, out, &sc), offset(row_start, out, &sa), offset(row_start, out, &sb));
        let dst = &mut dst[..len];
        let cs = &c[oc..];
        // As in `zip`: slices where the strides are 1 or 0 (a masked fill's rows).
        match (last_stride(&sc), last_stride(&sa), last_stride(&sb)) {
            (1, 1, 1) => dst.iter_mut().zip(&cs[..len]).zip(&a[oa..oa + len]).zip(&b[ob..ob + len]).for_each(
                |(((d, &cv), &x), &y)| {
                    d.write(f(cv, x, y));
                },
            ),
            (1, 1, 0) => {
                let y = b[ob];
                dst.iter_mut().zip(&cs[..len]).zip(&a[oa..oa + len]).for_each(|((d, &cv), &x)| {
                    d.write(f(cv, x, y));
                });
            }
            (1, 0, 1) => {
                let x = a[oa];
                dst.iter_mut().zip(&cs[..len]).zip(&b[ob..ob + len]).for_each(|((d, &cv), &y)| {
                    d.write(f(cv, x, y));
                });
            }
            (ic, ia, ib) => dst.iter_mut().enumerate().for_each(|(j, d)| {
                d.write(f(c[oc + j * ic], a[oa + j * ia], b[ob + j * ib]));
            }),
        }
    })
}

/// The stride of the innermost dimension; 0 for a rank-0 output (one row of one element).
fn last_stride(strides: &[usize]) -> usize {
    strides.last().copied().unwrap_or(0)
}

/// Element offset, under `strides`, of the output position with linear index `linear`.
pub fn offset(mut linear: usize, shape: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for d in (0..shape.len()).rev() {
        let i = linear % shape[d];
        linear /= shape[d];
        off += i * strides[d];
    }
    off
}

/// Runs `fill(row_start, row_len, row)` over the rows (last dimension) of a fresh output of
/// shape `out`, in parallel when the output is large; `fill` must write every element of its
/// row. A rank-0 output is one row of length 1. As with [`map`], a cached block of the size
/// (`crate::pool`) is reused when there is one, and nothing is zeroed first.
pub fn strided_rows<U: Element>(
    out: &[usize],
    fill: impl Fn(usize, usize, &mut [MaybeUninit<U>]) + Sync + Send,
) -> Vec<U> {
    let n = numel(out);
    let row = if out.is_empty() { 1 } else { out[out.len() - 1].max(1) };
    let mut dst = crate::pool::take_vec::<U>(n);
    if dst.capacity() < n {
        dst = crate::buffer::vec_with_capacity_or_panic(n);
    }
    let spare = &mut dst.spare_capacity_mut()[..n];
    if n == 0 {
        // Nothing to write.
    } else if out.is_empty() {
        // A scalar: pretend it is shape [1] with stride-0 offsets.
        fill(0, 1, spare);
    } else if n < PAR_THRESHOLD {
        for (r, chunk) in spare.chunks_mut(row).enumerate() {
            fill(r * row, row, chunk);
        }
    } else {
        let rows_per_task = (MIN_CHUNK / row).max(1);
        team::for_each_chunk_mut(spare, row * rows_per_task, &|t, block| {
            for (r, chunk) in block.chunks_mut(row).enumerate() {
                fill((t * rows_per_task + r) * row, row, chunk);
            }
        });
    }
    // SAFETY: the rows cover the first `n` elements of the spare capacity, and `fill` wrote
    // every element of each.
    unsafe { dst.set_len(n) };
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zip_broadcasts_rows_and_columns() {
        let a = [1.0f32, 2.0, 3.0];
        let b = [10.0f32, 20.0];
        let out = zip(&a, &[3, 1], &b, &[2], &[3, 2], |x, y| x + y);
        assert_eq!(out, vec![11.0, 21.0, 12.0, 22.0, 13.0, 23.0]);
    }

    #[test]
    fn zip3_of_scalars() {
        // A rank-0 output is one row of one element.
        let out = zip3(&[true], &[], &[1.0f64], &[], &[2.0f64], &[], &[], |c, a, b| if c { a } else { b });
        assert_eq!(out, vec![1.0]);
        let out = zip3(&[false], &[], &[1.0f64], &[], &[2.0f64], &[], &[], |c, a, b| if c { a } else { b });
        assert_eq!(out, vec![2.0]);
    }

    #[test]
    fn zip_large_matches_small_path() {
        let n = 7 * (PAR_THRESHOLD / 2 + 3);
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..7).map(|i| i as f32).collect();
        let out = zip(&a, &[n / 7, 7], &b, &[7], &[n / 7, 7], |x, y| x * y);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, a[i] * b[i % 7]);
        }
    }
}
