//! Scatter kernels: `scatter` (assignment) and `scatter_reduce` (sum, prod, mean, amax, amin,
//! with or without the destination's own values), with PyTorch's out-of-range error text.
//!
//! Positions are visited in the index's row-major order, so with duplicate indices a plain
//! scatter keeps the last write (PyTorch leaves that order unspecified; its CPU kernel does
//! the same for small tensors).

use std::ops::{Add, Div, Mul};

use super::index::{scatter_offsets, sub_offsets};
use crate::buffer::{Buffer, Element};
use crate::dispatch;

/// How `scatter_reduce` combines the values that land on one position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ScatterReduction {
    /// Sum (`"sum"`; `scatter(..., reduce="add")`).
    Sum,
    /// Product (`"prod"`; `scatter(..., reduce="multiply")`).
    Prod,
    /// Mean over the values that land (and the destination's own value with `include_self`).
    Mean,
    /// Maximum; NaN wins.
    Amax,
    /// Minimum; NaN wins.
    Amin,
}

impl ScatterReduction {
    /// PyTorch's name for the reduction (`reduce=` of `scatter_reduce`).
    pub fn name(self) -> &'static str {
        match self {
            ScatterReduction::Sum => "sum",
            ScatterReduction::Prod => "prod",
            ScatterReduction::Mean => "mean",
            ScatterReduction::Amax => "amax",
            ScatterReduction::Amin => "amin",
        }
    }

    /// Parses `scatter_reduce`'s `reduce=` argument, with PyTorch's error text.
    pub fn parse(reduce: &str) -> Result<ScatterReduction, String> {
        Ok(match reduce {
            "sum" => ScatterReduction::Sum,
            "prod" => ScatterReduction::Prod,
            "mean" => ScatterReduction::Mean,
            "amax" => ScatterReduction::Amax,
            "amin" => ScatterReduction::Amin,
            other => return Err(format!("reduce argument must be either sum, prod, mean, amax or amin, got {other}")),
        })
    }
}

/// `x.scatter(dim, idx, src)`: `out[p with dim := idx[p]] = src[p]` for every position `p` of
/// `idx` (which may be smaller than `src`). Operands have one rank; `x` and `src` one dtype.
pub fn scatter(x: &Buffer, dim: usize, idx: &Buffer, src: &Buffer) -> Result<Buffer, String> {
    let offs = scatter_offsets(idx.shape(), idx.as_slice::<i64>(), x.shape(), dim)?;
    let soffs = sub_offsets(idx.shape(), src.shape());
    let mut out = x.clone();
    dispatch!(all, src.data(), |s: T| {
        let dst = T::slice_mut(out.make_mut()).expect("scatter: dtype mismatch");
        for (&o, &so) in offs.iter().zip(&soffs) {
            dst[o] = s[so];
        }
    });
    Ok(out)
}

/// Arithmetic the reductions need, on every numeric element type.
trait Num: Element + Add<Output = Self> + Mul<Output = Self> + Div<Output = Self> {
    const FLOAT: bool;
}
impl Num for f32 {
    const FLOAT: bool = true;
}
impl Num for f64 {
    const FLOAT: bool = true;
}
impl Num for i64 {
    const FLOAT: bool = false;
}
impl Num for u8 {
    const FLOAT: bool = false;
}

#[allow(clippy::eq_op)]
fn combine<T: Num>(r: ScatterReduction, a: T, b: T) -> T {
    match r {
        ScatterReduction::Sum | ScatterReduction::Mean => a + b,
        ScatterReduction::Prod => a * b,
        ScatterReduction::Amax | ScatterReduction::Amin => {
            // NaN wins; otherwise the larger (smaller) value.
            let b_wins = b != b || ((b > a) == (r == ScatterReduction::Amax) && b != a);
            if a == a && b_wins {
                b
            } else {
                a
            }
        }
    }
}

fn reduce_into<T: Num>(
    dst: &mut [T],
    src: &[T],
    offs: &[usize],
    soffs: &[usize],
    r: ScatterReduction,
    include_self: bool,
) {
    // How many values have landed on each position (the destination's own counts as one).
    let mut count = vec![usize::from(include_self); dst.len()];
    for (&o, &so) in offs.iter().zip(soffs) {
        let v = src[so];
        dst[o] = if count[o] == 0 { v } else { combine(r, dst[o], v) };
        count[o] += 1;
    }
    if r == ScatterReduction::Mean {
        let mut seen = vec![false; dst.len()];
        for &o in offs {
            if !std::mem::replace(&mut seen[o], true) {
                let n = count[o] as f64;
                // Integer means floor-divide, as PyTorch's kernel does.
                dst[o] = if T::FLOAT { dst[o] / T::from_f64(n) } else { T::from_f64((dst[o].to_f64() / n).floor()) };
            }
        }
    }
}

/// `x.scatter_reduce(dim, idx, src, reduce, include_self)`: every position `p` of `idx` sends
/// `src[p]` to `out[p with dim := idx[p]]`, where the values are combined by `reduce`. With
/// `include_self` the destination's value takes part; without, positions that receive values
/// forget theirs. Positions that receive nothing keep `x`.
pub fn scatter_reduce(
    x: &Buffer,
    dim: usize,
    idx: &Buffer,
    src: &Buffer,
    reduce: ScatterReduction,
    include_self: bool,
) -> Result<Buffer, String> {
    let offs = scatter_offsets(idx.shape(), idx.as_slice::<i64>(), x.shape(), dim)?;
    let soffs = sub_offsets(idx.shape(), src.shape());
    let mut out = x.clone();
    dispatch!(numeric, src.data(), "scatter_reduce", |s: T| {
        let dst = T::slice_mut(out.make_mut()).expect("scatter_reduce: dtype mismatch");
        reduce_into::<T>(dst, s, &offs, &soffs, reduce, include_self);
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_keeps_the_last_write() {
        let x = Buffer::zeros(crate::DType::F32, &[3]);
        let idx = Buffer::from_vec(vec![1i64, 1, 0], &[3]);
        let src = Buffer::from_vec(vec![1.0f32, 2.0, 3.0], &[3]);
        assert_eq!(scatter(&x, 0, &idx, &src).unwrap().as_slice::<f32>(), &[3.0, 2.0, 0.0]);
    }

    #[test]
    fn reductions_with_and_without_self() {
        let x = Buffer::from_vec(vec![2.0f64, 2.0, 2.0], &[3]);
        let idx = Buffer::from_vec(vec![0i64, 0, 1], &[3]);
        let src = Buffer::from_vec(vec![1.0f64, 5.0, 4.0], &[3]);
        let run = |r, inc| scatter_reduce(&x, 0, &idx, &src, r, inc).unwrap().to_f64_vec();
        assert_eq!(run(ScatterReduction::Sum, true), vec![8.0, 6.0, 2.0]);
        assert_eq!(run(ScatterReduction::Sum, false), vec![6.0, 4.0, 2.0]);
        assert_eq!(run(ScatterReduction::Prod, true), vec![10.0, 8.0, 2.0]);
        assert_eq!(run(ScatterReduction::Mean, true), vec![8.0 / 3.0, 3.0, 2.0]);
        assert_eq!(run(ScatterReduction::Mean, false), vec![3.0, 4.0, 2.0]);
        assert_eq!(run(ScatterReduction::Amax, true), vec![5.0, 4.0, 2.0]);
        assert_eq!(run(ScatterReduction::Amin, true), vec![1.0, 2.0, 2.0]);
        assert_eq!(run(ScatterReduction::Amin, false), vec![1.0, 4.0, 2.0]);
    }

    #[test]
    fn integer_mean_floors() {
        let x = Buffer::from_vec(vec![0i64, 0], &[2]);
        let idx = Buffer::from_vec(vec![0i64, 0, 1], &[3]);
        let src = Buffer::from_vec(vec![1i64, 2, -3], &[3]);
        let r = scatter_reduce(&x, 0, &idx, &src, ScatterReduction::Mean, false).unwrap();
        assert_eq!(r.as_slice::<i64>(), &[1, -3]);
    }

    #[test]
    fn bad_reduction_name() {
        assert_eq!(
            ScatterReduction::parse("max").unwrap_err(),
            "reduce argument must be either sum, prod, mean, amax or amin, got max"
        );
    }
}
