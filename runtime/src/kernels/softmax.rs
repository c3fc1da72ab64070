//! Numerically stable softmax and log-softmax over one dimension, viewed as `[outer, r, inner]`.
//! The row maximum is subtracted first, so logits of ±1000 stay finite.

use crate::buffer::Element;
use crate::team;
use num_traits::Float;

use super::pointwise::PAR_THRESHOLD;

/// Softmax (or log-softmax when `log`) along the middle axis of `[outer, r, inner]`.
pub fn softmax<T: Element + Float>(x: &[T], outer: usize, r: usize, inner: usize, log: bool) -> Vec<T> {
    let mut out = crate::buffer::vec_or_panic(x.len(), T::zero());
    if x.is_empty() {
        return out;
    }
    let block = r * inner;
    debug_assert_eq!(x.len(), outer * block);
    let work = |o: usize, dst: &mut [T]| {
        let src = &x[o * block..(o + 1) * block];
        for i in 0..inner {
            let at = |k: usize| k * inner + i;
            let mut m = T::neg_infinity();
            for k in 0..r {
                let v = src[at(k)];
                if v > m || v.is_nan() {
                    m = v;
                }
            }
            // An all -inf row gives NaN, as in PyTorch; keep m finite only when it is.
            let shift = if m.is_infinite() { T::zero() } else { m };
            let mut s = T::zero();
            for k in 0..r {
                let e = (src[at(k)] - shift).exp();
                if !log {
                    dst[at(k)] = e;
                }
                s = s + e;
            }
            if log {
                let ls = s.ln();
                for k in 0..r {
                    dst[at(k)] = src[at(k)] - shift - ls;
                }
            } else {
                let inv = T::one() / s;
                for k in 0..r {
                    dst[at(k)] = dst[at(k)] * inv;
                }
            }
        }
    };
    if x.len() < PAR_THRESHOLD {
        for (o, dst) in out.chunks_mut(block).enumerate() {
            work(o, dst);
        }
    } else {
        team::for_each_item_mut(&mut out, block, &work);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_logits_stay_finite() {
        let x = [1000.0f32, -1000.0, 0.0];
        let p = softmax(&x, 1, 3, 1, false);
        assert_eq!(p, vec![1.0, 0.0, 0.0]);
        let lp = softmax(&x, 1, 3, 1, true);
        assert_eq!(lp[0], 0.0);
        assert_eq!(lp[1], -2000.0);
    }

    #[test]
    fn strided_axis() {
        // x: [1, 2, 2], softmax over the middle axis.
        let x = [0.0f64, 1.0, 0.0, 1.0];
        let p = softmax(&x, 1, 2, 2, false);
        assert!(p.iter().all(|v| (v - 0.5).abs() < 1e-12));
    }
}
