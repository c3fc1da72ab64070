//! Philox4x32-10, the counter-based generator of Salmon et al. (SC'11) that PyTorch's CUDA
//! generator and JAX's `rbg` use: a bijection of a 128-bit counter under a 64-bit key, so any
//! element of a stream is computed from its position alone. That is what lets a compiled
//! kernel draw the very values eager mode draws, in any order and on any thread, and lets a
//! backward pass regenerate a dropout mask instead of saving it.
//!
//! The stream of a draw: key = the seed (low word first), counter = `[block lo, block hi,
//! offset lo, offset hi]`, where `offset` is where the draw starts (each draw advances it by
//! its block count) and element `i` is lane `i % 4` of block `i / 4`.

/// Multiplier of counter word 0.
const M0: u32 = 0xD251_1F53;
/// Multiplier of counter word 2.
const M1: u32 = 0xCD9E_8D57;
/// Key schedule increments (the golden ratio and √3 − 1, in 32-bit fixed point).
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// One Philox4x32 round.
#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let p0 = u64::from(M0) * u64::from(c[0]);
    let p1 = u64::from(M1) * u64::from(c[2]);
    let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
    let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32 with 10 rounds: four random words for `counter` under `key`.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for r in 0..10 {
        if r > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        c = round(c, k);
    }
    c
}

/// A word as a float in [0, 1) with 24 random bits (PyTorch's `uniform` for f32).
#[inline]
pub fn unit_f32(word: u32) -> f32 {
    (word >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// The state of a counter-based stream: its seed and the offset (in 4-word blocks) where the
/// next draw starts. Saving and restoring it reproduces every later draw exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhiloxState {
    /// The key.
    pub seed: u64,
    /// Blocks consumed so far.
    pub offset: u64,
}

impl PhiloxState {
    /// A fresh stream for `seed`.
    pub fn new(seed: u64) -> PhiloxState {
        PhiloxState { seed, offset: 0 }
    }

    /// Reserves the blocks for `n` elements and returns the offset the draw starts at.
    pub fn advance(&mut self, n: usize) -> u64 {
        let start = self.offset;
        self.offset = self.offset.wrapping_add((n as u64).div_ceil(4));
        start
    }

    /// The four words of block `block` of the draw starting at `offset`.
    #[inline]
    pub fn block(seed: u64, offset: u64, block: u64) -> [u32; 4] {
        let at = offset.wrapping_add(block);
        philox4x32_10(
            [block as u32, (block >> 32) as u32, at as u32, (at >> 32) as u32],
            [seed as u32, (seed >> 32) as u32],
        )
    }

    /// Element `i` of the draw starting at `offset`, as a raw word.
    #[inline]
    pub fn word(seed: u64, offset: u64, i: u64) -> u32 {
        Self::block(seed, offset, i / 4)[(i % 4) as usize]
    }

    /// Reserves `blocks` whole blocks and returns the offset the draw starts at.
    pub fn advance_blocks(&mut self, blocks: u64) -> u64 {
        let start = self.offset;
        self.offset = self.offset.wrapping_add(blocks);
        start
    }

    /// `n` uniform floats in [0, 1), advancing the stream.
    pub fn uniform_f32(&mut self, n: usize) -> Vec<f32> {
        let (seed, start) = (self.seed, self.advance(n));
        (0..n as u64).map(|i| unit_f32(Self::word(seed, start, i))).collect()
    }
}

/// Blocks a draw of `n` elements of `dist` consumes: one word per uniform element, two per
/// normal one (Box-Muller), rounded up to whole blocks.
pub fn blocks_for(n: usize, normal: bool) -> u64 {
    let words = if normal { 2 * n as u64 } else { n as u64 };
    words.div_ceil(4)
}

/// Calls `f(i, word)` for the first `n` words of the draw starting at `offset`, one Philox
/// call per block.
pub fn for_words(seed: u64, offset: u64, n: usize, mut f: impl FnMut(usize, u32)) {
    for b in 0..(n as u64).div_ceil(4) {
        let words = PhiloxState::block(seed, offset, b);
        for (lane, &w) in words.iter().enumerate() {
            let i = (b * 4) as usize + lane;
            if i < n {
                f(i, w);
            }
        }
    }
}

/// The `n` uniform values in [0, 1) of the draw starting at `offset`: element `i` is
/// [`unit_f32`] of word `i` (24 random bits; an f64 draw holds the same values exactly).
pub fn uniform(seed: u64, offset: u64, n: usize) -> Vec<f32> {
    let mut out = out_vec::<f32>(n);
    for_words(seed, offset, n, |i, w| out[i] = unit_f32(w));
    out
}

/// A zeroed output of `n` values, panicking with the size (a normal, catchable panic) where
/// the allocator refuses, instead of aborting the process.
#[track_caller]
fn out_vec<T: Clone + Default>(n: usize) -> Vec<T> {
    let mut v = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        panic!("out of memory allocating {n} random values ({} bytes)", n.saturating_mul(std::mem::size_of::<T>()));
    }
    v.resize(n, T::default());
    v
}

/// The `n` standard normal values of the draw starting at `offset`, by Box-Muller in f64:
/// element `i` takes words `2i` and `2i+1` as `u1 = ((w >> 8) + 1) / 2^24` in (0, 1] and
/// `u2 = (w >> 8) / 2^24` in [0, 1), and is `sqrt(-2 ln u1) * cos(2π u2)`.
pub fn normal(seed: u64, offset: u64, n: usize) -> Vec<f64> {
    let scale = 1.0 / f64::from(1u32 << 24);
    let mut out = out_vec::<f64>(n);
    // Words arrive in order, so each odd word completes the pair begun by the even one before
    // it: no scratch array of 2n words.
    let mut first = 0u32;
    for_words(seed, offset, n.saturating_mul(2), |i, w| {
        if i % 2 == 0 {
            first = w;
        } else {
            let u1 = (f64::from(first >> 8) + 1.0) * scale;
            let u2 = f64::from(w >> 8) * scale;
            out[i / 2] = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's published known-answer vectors (its `tests/kat_vectors`).
    #[test]
    fn known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
        assert_eq!(
            philox4x32_10([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0]),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn draws_advance_and_restore() {
        let mut s = PhiloxState::new(7);
        let a = s.uniform_f32(10);
        assert_eq!(s.offset, 3);
        let saved = s;
        let b = s.uniform_f32(10);
        assert_ne!(a, b, "two draws must differ");
        let mut r = saved;
        assert_eq!(r.uniform_f32(10), b, "a restored state draws the same values");
        assert!(a.iter().chain(&b).all(|&u| (0.0..1.0).contains(&u)));
        // Any element is computable from its position alone.
        assert_eq!(unit_f32(PhiloxState::word(7, 3, 9)), b[9]);
    }

    #[test]
    fn stateless_draws_match_the_stream() {
        let mut s = PhiloxState::new(11);
        s.advance(5);
        let start = s.offset;
        assert_eq!(uniform(11, start, 9), s.uniform_f32(9));
        let z = normal(11, 0, 1 << 16);
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 4.0 / n.sqrt() && (var - 1.0).abs() < 0.03, "mean {mean} var {var}");
        assert!(z.iter().all(|x| x.is_finite()));
        assert_eq!(blocks_for(5, false), 2);
        assert_eq!(blocks_for(5, true), 3);
    }

    #[test]
    fn uniform_moments() {
        let u = PhiloxState::new(1).uniform_f32(1 << 20);
        let n = u.len() as f64;
        let mean = u.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = u.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        // 4σ bounds: σ(mean) = sqrt(1/12/n).
        assert!((mean - 0.5).abs() < 4.0 * (1.0 / 12.0 / n).sqrt(), "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 1e-3, "var {var}");
    }
}
