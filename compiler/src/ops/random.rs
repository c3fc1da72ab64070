//! Counter-based random draws (`Op::Random`): uniform, standard normal and dropout's scaled
//! keep mask, computed from the Philox4x32-10 stream (`tracegrad_runtime::philox`).
//!
//! The operand is the stream state `[seed, offset]` (`i64[2]`, the bits of two u64s); a draw
//! starts `at` blocks after `offset`, and element `i` reads words at fixed positions of it.
//! So a draw is a pure function of its operand: a compiled graph takes the state as an input
//! (every call draws fresh values, nothing is frozen into the plan), the partitioner
//! recomputes a dropout mask in the backward instead of saving it, and eager mode, the
//! interpreter and the JIT (which lowers uniform and dropout-mask draws into fused kernels
//! with the same integer arithmetic) agree bit for bit.

use super::{sh, Op, OpResult, Props, TensorType};
use crate::emitter::{Build, Emitter};
use tracegrad_runtime::philox;
use tracegrad_runtime::{Buffer, DType, Data};

/// What a draw yields per element.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub enum Distribution {
    /// U[0, 1) with 24 random bits: element `i` is `(word_i >> 8) / 2^24`.
    Uniform,
    /// N(0, 1) by Box-Muller in f64 from words `2i` and `2i + 1`
    /// (`tracegrad_runtime::philox::normal`).
    Normal,
    /// Dropout's scaled keep mask: `1 / (1 - p)` (rounded to the dtype) where the uniform
    /// element is `>= p`, else 0. The test is on integers: `word_i >> 8 >= ceil(p · 2^24)`,
    /// which is exactly `u >= p`.
    DropoutMask {
        /// The drop probability, in [0, 1).
        p: f64,
    },
}

impl Distribution {
    /// Philox blocks a draw of `numel` elements consumes (the offset's advance).
    pub fn blocks(self, numel: usize) -> u64 {
        philox::blocks_for(numel, matches!(self, Distribution::Normal))
    }

    /// A stable code for hashing.
    pub(super) fn code(self) -> [u64; 2] {
        match self {
            Distribution::Uniform => [0, 0],
            Distribution::Normal => [1, 0],
            Distribution::DropoutMask { p } => [2, p.to_bits()],
        }
    }
}

/// The integer threshold of a dropout mask: an element is kept when `word >> 8` is at least
/// this (`ceil(p · 2^24)`; exact, as `p · 2^24` only shifts the exponent).
pub fn keep_threshold(p: f64) -> u32 {
    (p * f64::from(1u32 << 24)).ceil() as u32
}

/// The scale of kept elements, `1 / (1 - p)`, as an f64 (rounded once more to an f32 mask).
pub fn keep_scale(p: f64) -> f64 {
    1.0 / (1.0 - p)
}

pub(super) fn infer(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let Op::Random { dist, dtype, shape, .. } = op else { unreachable!("random::infer on {}", op.name()) };
    let name = op.name();
    if t[0].dtype != DType::I64 || t[0].shape.as_slice() != [2] {
        return Err(format!(
            "{name}: expected the generator state as an i64 tensor of shape [2], got {} of shape {}",
            t[0].dtype,
            sh(&t[0].shape)
        ));
    }
    if !dtype.is_float() {
        return Err(format!("{name}: expected a floating-point dtype, got {dtype}"));
    }
    if let Distribution::DropoutMask { p } = dist {
        if !(0.0..1.0).contains(p) {
            return Err(format!("{name}: dropout probability has to be in [0, 1), but got {p}"));
        }
    }
    Ok(TensorType { dtype: *dtype, shape: shape.clone() })
}

/// The seed and the start offset (in blocks) of the draw, from the state operand.
fn start(state: &Buffer, at: u64) -> Result<(u64, u64), String> {
    match state.data() {
        Data::I64(v) if v.len() == 2 => Ok((v[0] as u64, (v[1] as u64).wrapping_add(at))),
        _ => Err("expected the generator state as an i64 tensor of shape [2]".into()),
    }
}

pub(super) fn eval(op: &Op, x: &[&Buffer], out: &TensorType) -> Result<Buffer, String> {
    let Op::Random { dist, at, .. } = op else { unreachable!("random::eval on {}", op.name()) };
    let (seed, offset) = start(x[0], *at)?;
    let n = out.numel();
    let b = match dist {
        Distribution::Uniform => Buffer::from_vec(philox::uniform(seed, offset, n), &out.shape),
        Distribution::Normal => Buffer::from_vec(philox::normal(seed, offset, n), &out.shape),
        Distribution::DropoutMask { p } => {
            let (t, scale) = (keep_threshold(*p), keep_scale(*p));
            let mut m = vec![0f64; n];
            philox::for_words(seed, offset, n, |i, w| {
                if w >> 8 >= t {
                    m[i] = scale;
                }
            });
            Buffer::from_vec(m, &out.shape)
        }
    };
    Ok(b.cast(out.dtype))
}

/// A draw takes no gradient: its operand is integer state.
pub(super) fn vjp<E: Emitter>(_op: &Op) -> OpResult<Vec<Option<E::Value>>> {
    Ok(vec![None])
}

pub(super) fn props(op: &Op) -> Props {
    match op {
        // Regenerating a uniform draw or a mask from the saved state is cheaper than saving it.
        // Element `i` is a function of `i` and the (scalar) state alone, so the draw joins
        // pointwise kernels: the JIT computes it where it is used.
        Op::Random { dist: Distribution::Uniform | Distribution::DropoutMask { .. }, .. } => {
            Props { cheap: true, elementwise: true, ..Props::NONE }
        }
        _ => Props::NONE,
    }
}

/// The JIT computes uniform and mask draws in float kernels (Philox on 32-bit integers, the
/// same arithmetic as the reference kernel). Normal draws stay on the reference kernel: the
/// JIT's inline log and cos are polynomials, not libm's, and would not agree bit for bit.
pub(super) fn jit_lowerable(op: &Op, out: DType) -> bool {
    matches!(op, Op::Random { dist: Distribution::Uniform | Distribution::DropoutMask { .. }, .. })
        && matches!(out, DType::F32 | DType::F64)
}

/// Dropout of `x` with drop probability `p` (in [0, 1)): `x` times the scaled keep mask drawn
/// `at` blocks into the stream `state`.
pub fn dropout<B: Build>(e: &mut B, x: &B::Value, state: &B::Value, at: u64, p: f64) -> OpResult<B::Value> {
    let op = Op::Random { dist: Distribution::DropoutMask { p }, dtype: e.dtype(x), shape: e.shape(x), at };
    let mask = e.emit(op, &[state])?;
    e.mul(x, &mask)
}
