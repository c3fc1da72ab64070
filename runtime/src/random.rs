//! Seeded random number generation. One process-wide default generator (`manual_seed`), plus
//! explicit [`Generator`]s. The stream is ChaCha8, so a seed gives the same numbers on every
//! platform and release; it is not PyTorch's Mersenne-Twister stream.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Mutex;

/// A seeded random stream.
#[derive(Clone, Debug)]
pub struct Generator(ChaCha8Rng);

impl Generator {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Generator {
        Generator(ChaCha8Rng::seed_from_u64(seed))
    }

    /// `n` samples of U[lo, hi).
    pub fn uniform(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.0.random::<f64>()).collect()
    }

    /// `n` samples of N(mean, std²).
    pub fn normal(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut self.0);
                mean + std * z
            })
            .collect()
    }

    /// `n` integers uniform in [low, high).
    pub fn randint(&mut self, n: usize, low: i64, high: i64) -> Vec<i64> {
        assert!(low < high, "random_ expects 'from' to be less than 'to', but got from={low} >= to={high}");
        (0..n).map(|_| self.0.random_range(low..high)).collect()
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn randperm(&mut self, n: usize) -> Vec<i64> {
        let mut p: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            let j = self.0.random_range(0..=i);
            p.swap(i, j);
        }
        p
    }

    /// A fresh u64, for seeding derived generators.
    pub fn next_u64(&mut self) -> u64 {
        self.0.random()
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
}
