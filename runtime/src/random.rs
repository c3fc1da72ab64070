//! Seeded random number generation. One process-wide default generator (`manual_seed`), plus
//! explicit [`Generator`]s. A generator holds two streams, both seeded by one seed:
//!
//! - the counter-based Philox4x32-10 stream ([`crate::philox`]), which the tensor random ops
//!   draw from (`rand`, `randn`, `normal`, `bernoulli`, dropout), in eager and compiled mode
//!   alike: a compiled graph takes the default generator's Philox state as an input and each
//!   call advances its offset, so eager, interpreted and JIT-compiled runs draw the same values;
//! - a ChaCha8 stream for everything else (parameter initialisation, samplers, shuffling,
//!   `randint`, `randperm`).
//!
//! A seed gives the same numbers on every platform and release; neither is PyTorch's
//! Mersenne-Twister stream. [`Generator::get_state`] and [`Generator::set_state`] (and
//! [`get_rng_state`]/[`set_rng_state`] for the default generator) save and restore both.

use crate::philox::PhiloxState;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Mutex;

/// A seeded random stream: a Philox stream for the tensor random ops and a ChaCha8 stream for
/// the rest (see the module docs).
#[derive(Clone, Debug)]
pub struct Generator {
    chacha: ChaCha8Rng,
    philox: PhiloxState,
}

/// Everything needed to reproduce a generator's future draws, for checkpoints: plain data,
/// serializable with serde.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    /// The seed of both streams.
    pub seed: u64,
    /// Philox blocks consumed so far (where the next tensor random op starts).
    pub offset: u64,
    /// ChaCha8 words consumed so far.
    pub chacha_words: u128,
}

impl Generator {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Generator {
        Generator { chacha: ChaCha8Rng::seed_from_u64(seed), philox: PhiloxState::new(seed) }
    }

    /// The state of both streams.
    pub fn get_state(&self) -> RngState {
        RngState { seed: self.philox.seed, offset: self.philox.offset, chacha_words: self.chacha.get_word_pos() }
    }

    /// Restores a state from [`get_state`](Self::get_state): every later draw repeats.
    pub fn set_state(&mut self, state: &RngState) {
        let mut chacha = ChaCha8Rng::seed_from_u64(state.seed);
        chacha.set_word_pos(state.chacha_words);
        *self = Generator { chacha, philox: PhiloxState { seed: state.seed, offset: state.offset } };
    }

    /// Reserves `blocks` Philox blocks; returns the seed and the offset the draw starts at.
    pub fn philox_draw(&mut self, blocks: u64) -> (u64, u64) {
        (self.philox.seed, self.philox.advance_blocks(blocks))
    }

    /// `n` samples of U[lo, hi).
    pub fn uniform(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.chacha.random::<f64>()).collect()
    }

    /// `n` samples of N(mean, std²).
    pub fn normal(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut self.chacha);
                mean + std * z
            })
            .collect()
    }

    /// `n` integers uniform in [low, high).
    pub fn randint(&mut self, n: usize, low: i64, high: i64) -> Vec<i64> {
        assert!(low < high, "random_ expects 'from' to be less than 'to', but got from={low} >= to={high}");
        (0..n).map(|_| self.chacha.random_range(low..high)).collect()
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn randperm(&mut self, n: usize) -> Vec<i64> {
        let mut p: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = self.chacha.random_range(0..=i);
            p.swap(i, j);
        }
        p
    }

    /// A fresh u64, for seeding derived generators.
    pub fn next_u64(&mut self) -> u64 {
        self.chacha.random()
    }
}

static DEFAULT: Mutex<Option<Generator>> = Mutex::new(None);

/// Reseeds the process-wide default generator (PyTorch's `torch.manual_seed`).
pub fn manual_seed(seed: u64) {
    *DEFAULT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Generator::new(seed));
}

/// Runs `f` with the default generator (seeded with 0 until `manual_seed` is called).
pub fn with_default<R>(f: impl FnOnce(&mut Generator) -> R) -> R {
    let mut g = DEFAULT.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(|| Generator::new(0)))
}

/// The default generator's state (`torch.get_rng_state`, as plain data).
pub fn get_rng_state() -> RngState {
    with_default(|g| g.get_state())
}

/// Restores the default generator's state (`torch.set_rng_state`).
pub fn set_rng_state(state: &RngState) {
    with_default(|g| g.set_state(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_streams_repeat() {
        assert_eq!(Generator::new(7).uniform(4, 0.0, 1.0), Generator::new(7).uniform(4, 0.0, 1.0));
        let mut p = Generator::new(3).randperm(10);
        p.sort();
        assert_eq!(p, (0..10).collect::<Vec<i64>>());
        let n = Generator::new(1).normal(20000, 0.0, 1.0);
        let mean = n.iter().sum::<f64>() / n.len() as f64;
        assert!(mean.abs() < 0.03);
    }

    #[test]
    fn state_round_trips_both_streams() {
        let mut g = Generator::new(5);
        g.uniform(3, 0.0, 1.0);
        g.philox_draw(7);
        let saved = g.get_state();
        let a = (g.uniform(4, 0.0, 1.0), g.philox_draw(2));
        let mut h = Generator::new(99);
        h.set_state(&saved);
        assert_eq!((h.uniform(4, 0.0, 1.0), h.philox_draw(2)), a);
        assert_eq!(a.1, (5, 7));
    }
}
