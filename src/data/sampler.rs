//! Samplers (`torch.utils.data.Sampler`): which indices an epoch visits, in which order, and
//! how they group into batches: [`SequentialSampler`], [`RandomSampler`],
//! [`SubsetRandomSampler`], [`WeightedRandomSampler`], [`DistributedSampler`] and
//! [`BatchSampler`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracegrad_runtime::random::{self, Generator};

use super::DataError;
use crate::tensor::lock_poison;

/// A source of per-epoch index sequences (PyTorch's `Sampler[T]`): `I = usize` for samplers of
/// data-set indices, `I = Vec<usize>` for batch samplers such as [`BatchSampler`].
///
/// Every call to [`iter`](Sampler::iter) starts a new epoch: random samplers advance their
/// generator, so successive epochs see new orders. Samplers are shared (`&self`, `Send + Sync`)
/// so that a [`DataLoader`](super::DataLoader) can hold one while the caller keeps a handle
/// through an `Arc` (`Arc<S>` is a sampler too) to adjust per-epoch state.
pub trait Sampler<I = usize>: Send + Sync {
    /// Number of items one epoch yields (PyTorch's `__len__`).
    fn len(&self) -> usize;

    /// Whether an epoch yields nothing.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items of a new epoch (PyTorch's `__iter__`).
    fn iter(&self) -> Box<dyn Iterator<Item = I> + Send>;
}

impl<I, S: Sampler<I> + ?Sized> Sampler<I> for Arc<S> {
    fn len(&self) -> usize {
        (**self).len()
    }

    fn iter(&self) -> Box<dyn Iterator<Item = I> + Send> {
        (**self).iter()
    }
}

impl<I, S: Sampler<I> + ?Sized> Sampler<I> for Box<S> {
    fn len(&self) -> usize {
        (**self).len()
    }

    fn iter(&self) -> Box<dyn Iterator<Item = I> + Send> {
        (**self).iter()
    }
}

/// `0, 1, …, n-1` every epoch (`torch.utils.data.SequentialSampler`).
#[derive(Clone, Debug)]
pub struct SequentialSampler {
    n: usize,
}

impl SequentialSampler {
    /// Indices of a data set of length `n`.
    pub fn new(n: usize) -> SequentialSampler {
        SequentialSampler { n }
    }
}

impl Sampler for SequentialSampler {
    fn len(&self) -> usize {
        self.n
    }

    fn iter(&self) -> Box<dyn Iterator<Item = usize> + Send> {
        Box::new(0..self.n)
    }
}

/// Where a random sampler draws from.
#[derive(Debug)]
enum Source {
    /// Its own generator, advanced by every epoch (PyTorch's `generator=`).
    Own(Box<Mutex<Generator>>),
    /// A fresh generator per epoch, seeded from the process-wide default generator (PyTorch's
    /// behaviour without `generator=`; reproducible through [`manual_seed`](crate::manual_seed)).
    Default,
}

impl Source {
    fn with<R>(&self, f: impl FnOnce(&mut Generator) -> R) -> R {
        match self {
            Source::Own(g) => {
                let mut guard = lock_poison(g.lock());
                f(&mut guard)
            }
            Source::Default => {
                let mut g = Generator::new(random::with_default(|d| d.next_u64()));
                f(&mut g)
            }
        }
    }
}

fn check_num_samples(num_samples: usize) -> Result<(), DataError> {
    if num_samples == 0 {
        return Err(DataError::invalid(format!(
            "num_samples should be a positive integer value, but got num_samples={num_samples}"
        )));
    }
    Ok(())
}

/// Random indices of a data set of length `n` (`torch.utils.data.RandomSampler`): without
/// replacement, a new permutation every epoch (`num_samples > n` chains several permutations,
/// the last one cut short); with replacement, `num_samples` independent uniform draws.
#[derive(Debug)]
pub struct RandomSampler {
    n: usize,
    replacement: bool,
    num_samples: usize,
    source: Source,
}

impl RandomSampler {
    /// A permutation of `0..n` per epoch, seeded from the default generator each epoch. Errors
    /// for `n == 0` as PyTorch does ("num_samples should be a positive integer value, but got
    /// num_samples=0").
    pub fn new(n: usize) -> Result<RandomSampler, DataError> {
        RandomSampler::build(n, false, None, Source::Default)
    }

    /// A permutation of `0..n` per epoch from a generator seeded with `seed`; the same seed
    /// replays the same sequence of epochs.
    pub fn with_seed(n: usize, seed: u64) -> Result<RandomSampler, DataError> {
        RandomSampler::with_generator(n, Generator::new(seed))
    }

    /// A permutation of `0..n` per epoch drawn from `generator` (PyTorch's `generator=`).
    pub fn with_generator(n: usize, generator: Generator) -> Result<RandomSampler, DataError> {
        RandomSampler::build(n, false, None, Source::Own(Box::new(Mutex::new(generator))))
    }

    /// The general form: `replacement`, `num_samples` (default `n`) and an optional generator
    /// (default: a fresh seed from the default generator per epoch).
    pub fn with_options(
        n: usize,
        replacement: bool,
        num_samples: Option<usize>,
        generator: Option<Generator>,
    ) -> Result<RandomSampler, DataError> {
        let source = generator.map_or(Source::Default, |g| Source::Own(Box::new(Mutex::new(g))));
        RandomSampler::build(n, replacement, num_samples, source)
    }

    fn build(
        n: usize,
        replacement: bool,
        num_samples: Option<usize>,
        source: Source,
    ) -> Result<RandomSampler, DataError> {
        let num_samples = num_samples.unwrap_or(n);
        check_num_samples(num_samples)?;
        if n == 0 {
            // PyTorch fails later, drawing from an empty range; say so up front.
            return Err(DataError::invalid("RandomSampler: cannot sample from an empty data set"));
        }
        Ok(RandomSampler { n, replacement, num_samples, source })
    }

    /// Whether indices are drawn with replacement.
    pub fn replacement(&self) -> bool {
        self.replacement
    }
}

impl Sampler for RandomSampler {
    fn len(&self) -> usize {
        self.num_samples
    }

    fn iter(&self) -> Box<dyn Iterator<Item = usize> + Send> {
        let (n, m) = (self.n, self.num_samples);
        let idx: Vec<usize> = self.source.with(|g| {
            if self.replacement {
                g.randint(m, 0, n as i64).into_iter().map(|i| i as usize).collect()
            } else {
                let mut out = Vec::with_capacity(m);
                for _ in 0..m / n {
                    out.extend(g.randperm(n).into_iter().map(|i| i as usize));
                }
                if m % n != 0 {
                    out.extend(g.randperm(n).into_iter().take(m % n).map(|i| i as usize));
                }
                out
            }
        });
        Box::new(idx.into_iter())
    }
}

/// A random permutation of the given indices every epoch
/// (`torch.utils.data.SubsetRandomSampler`).
#[derive(Debug)]
pub struct SubsetRandomSampler {
    indices: Vec<usize>,
    source: Source,
}

impl SubsetRandomSampler {
    /// Shuffles `indices`, seeding each epoch from the default generator.
    pub fn new(indices: Vec<usize>) -> SubsetRandomSampler {
        SubsetRandomSampler { indices, source: Source::Default }
    }

    /// Shuffles `indices` with a generator seeded with `seed`.
    pub fn with_seed(indices: Vec<usize>, seed: u64) -> SubsetRandomSampler {
        SubsetRandomSampler { indices, source: Source::Own(Box::new(Mutex::new(Generator::new(seed)))) }
    }
}

impl Sampler for SubsetRandomSampler {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn iter(&self) -> Box<dyn Iterator<Item = usize> + Send> {
        let perm = self.source.with(|g| g.randperm(self.indices.len()));
        let out: Vec<usize> = perm.into_iter().map(|p| self.indices[p as usize]).collect();
        Box::new(out.into_iter())
    }
}

/// Indices `0..weights.len()` drawn with probabilities proportional to `weights`
/// (`torch.utils.data.WeightedRandomSampler`, which calls `torch.multinomial`).
///
/// With replacement, every draw is independent (inverse CDF over the cumulative weights).
/// Without replacement, an epoch is a weighted random ordering cut to `num_samples`, drawn as
/// `multinomial` does (the Gumbel/exponential trick: the largest `wᵢ / Eᵢ` with `Eᵢ ~ Exp(1)`);
/// zero-weight indices then come last, in index order.
///
/// ```
/// use tracegrad::data::{Sampler, WeightedRandomSampler};
///
/// let s = WeightedRandomSampler::with_seed(vec![0.0, 1.0, 3.0], 8, true, 0).unwrap();
/// let epoch: Vec<usize> = s.iter().collect();
/// assert_eq!(epoch.len(), 8);
/// assert!(epoch.iter().all(|&i| i != 0), "a zero weight is never drawn");
/// ```
#[derive(Debug)]
pub struct WeightedRandomSampler {
    weights: Vec<f64>,
    num_samples: usize,
    replacement: bool,
    source: Source,
}

impl WeightedRandomSampler {
    /// `num_samples` indices per epoch, seeding each epoch from the default generator (PyTorch's
    /// behaviour without `generator=`). PyTorch checks the weights only when an epoch starts;
    /// here they are checked up front, with `torch.multinomial`'s texts, in its order:
    ///
    /// * `num_samples == 0`: "num_samples should be a positive integer value, but got
    ///   num_samples=0";
    /// * without replacement and `num_samples > weights.len()`: "cannot sample n_sample >
    ///   prob_dist.size(-1) samples without replacement";
    /// * a negative, infinite or NaN weight: "probability tensor contains either `inf`, `nan` or
    ///   element < 0";
    /// * weights summing to 0 (or no weights): "invalid multinomial distribution (sum of
    ///   probabilities <= 0)".
    pub fn new(weights: Vec<f64>, num_samples: usize, replacement: bool) -> Result<WeightedRandomSampler, DataError> {
        WeightedRandomSampler::build(weights, num_samples, replacement, Source::Default)
    }

    /// As [`new`](Self::new), drawing from a generator seeded with `seed`: the same seed replays
    /// the same sequence of epochs.
    pub fn with_seed(
        weights: Vec<f64>,
        num_samples: usize,
        replacement: bool,
        seed: u64,
    ) -> Result<WeightedRandomSampler, DataError> {
        WeightedRandomSampler::with_generator(weights, num_samples, replacement, Generator::new(seed))
    }

    /// As [`new`](Self::new), drawing from `generator` (PyTorch's `generator=`).
    pub fn with_generator(
        weights: Vec<f64>,
        num_samples: usize,
        replacement: bool,
        generator: Generator,
    ) -> Result<WeightedRandomSampler, DataError> {
        WeightedRandomSampler::build(weights, num_samples, replacement, Source::Own(Box::new(Mutex::new(generator))))
    }

    fn build(
        weights: Vec<f64>,
        num_samples: usize,
        replacement: bool,
        source: Source,
    ) -> Result<WeightedRandomSampler, DataError> {
        check_num_samples(num_samples)?;
        if !replacement && num_samples > weights.len() {
            return Err(DataError::invalid("cannot sample n_sample > prob_dist.size(-1) samples without replacement"));
        }
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(DataError::invalid("probability tensor contains either `inf`, `nan` or element < 0"));
        }
        if weights.iter().sum::<f64>() <= 0.0 {
            return Err(DataError::invalid("invalid multinomial distribution (sum of probabilities <= 0)"));
        }
        Ok(WeightedRandomSampler { weights, num_samples, replacement, source })
    }

    /// The weights (not normalised).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Whether indices are drawn with replacement.
    pub fn replacement(&self) -> bool {
        self.replacement
    }
}

impl Sampler for WeightedRandomSampler {
    fn len(&self) -> usize {
        self.num_samples
    }

    fn iter(&self) -> Box<dyn Iterator<Item = usize> + Send> {
        let (w, m) = (&self.weights, self.num_samples);
        let idx: Vec<usize> = self.source.with(|g| {
            if self.replacement {
                let mut cdf = Vec::with_capacity(w.len());
                let mut acc = 0.0;
                for &wi in w {
                    acc += wi;
                    cdf.push(acc);
                }
                // Rounding can put `u·total` at `total`; the last positive weight takes it.
                let last = w.iter().rposition(|&wi| wi > 0.0).unwrap_or(0);
                g.uniform(m, 0.0, acc).into_iter().map(|x| cdf.partition_point(|&c| c <= x).min(last)).collect()
            } else {
                let e = g.uniform(w.len(), 0.0, 1.0);
                let key = |i: usize| {
                    let q = -(1.0 - e[i]).ln();
                    match (w[i] > 0.0, q > 0.0) {
                        (false, _) => 0.0,
                        (true, false) => f64::INFINITY,
                        (true, true) => w[i] / q,
                    }
                };
                let keys: Vec<f64> = (0..w.len()).map(key).collect();
                let mut order: Vec<usize> = (0..w.len()).collect();
                order.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]));
                order.truncate(m);
                order
            }
        });
        Box::new(idx.into_iter())
    }
}

/// The share of a data set that one of `num_replicas` processes visits
/// (`torch.utils.data.distributed.DistributedSampler`), with PyTorch's layout:
///
/// 1. the epoch's order: `0..n`, or with `shuffle` a permutation drawn from a generator seeded
///    with `seed + epoch` (tracegrad's ChaCha8 [`Generator`], so the order is not PyTorch's, but
///    it is the same on every rank, and [`set_epoch`](Self::set_epoch) changes it);
/// 2. without `drop_last`, indices repeated from the start until the length divides evenly;
///    with `drop_last`, the tail cut off instead;
/// 3. this rank's share: every `num_replicas`-th index starting at `rank`.
///
/// ```
/// use tracegrad::data::{DistributedSampler, Sampler};
///
/// let ranks: Vec<Vec<usize>> = (0..3)
///     .map(|r| DistributedSampler::new(10, 3, r).unwrap().shuffle(false).iter().collect())
///     .collect();
/// assert_eq!(ranks, vec![vec![0, 3, 6, 9], vec![1, 4, 7, 0], vec![2, 5, 8, 1]]);
/// let err = DistributedSampler::new(10, 2, 2).unwrap_err();
/// assert_eq!(err.to_string(), "Invalid rank 2, rank should be in the interval [0, 1]");
/// ```
#[derive(Debug)]
pub struct DistributedSampler {
    n: usize,
    num_replicas: usize,
    rank: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
    epoch: AtomicU64,
}

impl DistributedSampler {
    /// Rank `rank`'s share of a data set of length `n` split over `num_replicas` processes,
    /// with PyTorch's defaults: `shuffle = true`, `seed = 0`, no `drop_last`, epoch 0.
    ///
    /// `rank` is signed so that a negative rank is reported as PyTorch reports it: a rank
    /// outside `0..num_replicas` is "Invalid rank {rank}, rank should be in the interval [0,
    /// {num_replicas - 1}]" (so `num_replicas == 0` is an error for every rank).
    pub fn new(n: usize, num_replicas: usize, rank: i64) -> Result<DistributedSampler, DataError> {
        if rank < 0 || rank as u64 >= num_replicas as u64 {
            return Err(DataError::invalid(format!(
                "Invalid rank {rank}, rank should be in the interval [0, {}]",
                num_replicas as i128 - 1
            )));
        }
        Ok(DistributedSampler {
            n,
            num_replicas,
            rank: rank as usize,
            shuffle: true,
            seed: 0,
            drop_last: false,
            epoch: AtomicU64::new(0),
        })
    }

    /// Whether each epoch is shuffled (default `true`).
    pub fn shuffle(mut self, shuffle: bool) -> DistributedSampler {
        self.shuffle = shuffle;
        self
    }

    /// The shuffle seed, which must be the same on every rank (default 0).
    pub fn seed(mut self, seed: u64) -> DistributedSampler {
        self.seed = seed;
        self
    }

    /// Cut the tail so that every rank gets the same number of distinct indices, instead of
    /// padding with repeated ones (default `false`).
    pub fn drop_last(mut self, drop_last: bool) -> DistributedSampler {
        self.drop_last = drop_last;
        self
    }

    /// Sets the epoch, which seeds the next shuffle with `seed + epoch` (PyTorch's `set_epoch`;
    /// call it before each epoch, or every epoch sees the same order). Through `&self`, so that
    /// it works on a sampler shared with a [`DataLoader`](super::DataLoader) via an `Arc`.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Number of processes.
    pub fn num_replicas(&self) -> usize {
        self.num_replicas
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Indices per rank and epoch (PyTorch's `num_samples`): `⌈n / num_replicas⌉`, or
    /// `⌊n / num_replicas⌋` with `drop_last`.
    pub fn num_samples(&self) -> usize {
        if self.drop_last {
            self.n / self.num_replicas
        } else {
            self.n.div_ceil(self.num_replicas)
        }
    }

    /// Indices over all ranks per epoch (PyTorch's `total_size`).
    pub fn total_size(&self) -> usize {
        self.num_samples() * self.num_replicas
    }
}

impl Sampler for DistributedSampler {
    fn len(&self) -> usize {
        self.num_samples()
    }

    fn iter(&self) -> Box<dyn Iterator<Item = usize> + Send> {
        let mut indices: Vec<usize> = if self.shuffle {
            let mut g = Generator::new(self.seed.wrapping_add(self.epoch()));
            g.randperm(self.n).into_iter().map(|i| i as usize).collect()
        } else {
            (0..self.n).collect()
        };
        let total = self.total_size();
        if total > indices.len() {
            // Only reached with n > 0 (n == 0 gives total == 0).
            let base = indices.clone();
            indices.extend(base.iter().copied().cycle().take(total - base.len()));
        } else {
            indices.truncate(total);
        }
        let mine: Vec<usize> = indices.into_iter().skip(self.rank).step_by(self.num_replicas).collect();
        Box::new(mine.into_iter())
    }
}

/// Groups another sampler's indices into batches of `batch_size`
/// (`torch.utils.data.BatchSampler`); the last, short batch is kept unless `drop_last`.
#[derive(Clone)]
pub struct BatchSampler {
    sampler: Arc<dyn Sampler>,
    batch_size: usize,
    drop_last: bool,
}

impl BatchSampler {
    /// Batches of `sampler`'s indices. Errors for `batch_size == 0` with PyTorch's text
    /// "batch_size should be a positive integer value, but got batch_size=0".
    pub fn new(sampler: impl Sampler + 'static, batch_size: usize, drop_last: bool) -> Result<BatchSampler, DataError> {
        BatchSampler::from_arc(Arc::new(sampler), batch_size, drop_last)
    }

    /// As [`new`](Self::new), sharing an already shared sampler.
    pub fn from_arc(sampler: Arc<dyn Sampler>, batch_size: usize, drop_last: bool) -> Result<BatchSampler, DataError> {
        if batch_size == 0 {
            return Err(DataError::invalid(format!(
                "batch_size should be a positive integer value, but got batch_size={batch_size}"
            )));
        }
        Ok(BatchSampler { sampler, batch_size, drop_last })
    }

    /// The underlying index sampler.
    pub fn sampler(&self) -> &Arc<dyn Sampler> {
        &self.sampler
    }

    /// Indices per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Whether the last, short batch is dropped.
    pub fn drop_last(&self) -> bool {
        self.drop_last
    }
}

impl Sampler<Vec<usize>> for BatchSampler {
    fn len(&self) -> usize {
        let n = self.sampler.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = Vec<usize>> + Send> {
        Box::new(Batches { inner: self.sampler.iter(), batch_size: self.batch_size, drop_last: self.drop_last })
    }
}

/// The lazy iterator behind [`BatchSampler::iter`].
struct Batches {
    inner: Box<dyn Iterator<Item = usize> + Send>,
    batch_size: usize,
    drop_last: bool,
}

impl Iterator for Batches {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        let batch: Vec<usize> = self.inner.by_ref().take(self.batch_size).collect();
        if batch.is_empty() || (self.drop_last && batch.len() < self.batch_size) {
            None
        } else {
            Some(batch)
        }
    }
}

/// Wraps each index of a sampler as a one-element "batch": the loader's index stream when
/// automatic batching is off.
pub(crate) struct Singletons(pub(crate) Arc<dyn Sampler>);

impl Sampler<Vec<usize>> for Singletons {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> Box<dyn Iterator<Item = Vec<usize>> + Send> {
        Box::new(self.0.iter().map(|i| vec![i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Endless indices: a batch sampler must pull only what it needs.
    struct Endless;

    impl Sampler for Endless {
        fn len(&self) -> usize {
            usize::MAX
        }

        fn iter(&self) -> Box<dyn Iterator<Item = usize> + Send> {
            Box::new(0..)
        }
    }

    #[test]
    fn data_batch_sampler_is_lazy_and_counts() {
        let b = BatchSampler::new(Endless, 4, false).unwrap();
        assert_eq!(b.iter().take(2).collect::<Vec<_>>(), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        let b = BatchSampler::new(SequentialSampler::new(10), 4, true).unwrap();
        assert_eq!((b.len(), b.iter().count()), (2, 2));
        let b = BatchSampler::new(SequentialSampler::new(0), 4, false).unwrap();
        assert!(b.is_empty() && b.iter().next().is_none());
    }

    #[test]
    fn data_random_sampler_epochs() {
        let s = RandomSampler::with_options(5, false, Some(12), Some(Generator::new(3))).unwrap();
        let idx: Vec<usize> = s.iter().collect();
        assert_eq!(idx.len(), 12);
        for chunk in idx.chunks(5).take(2) {
            let mut c = chunk.to_vec();
            c.sort();
            assert_eq!(c, vec![0, 1, 2, 3, 4]);
        }
        assert_ne!(s.iter().collect::<Vec<_>>(), idx);
        assert_eq!(
            RandomSampler::new(0).unwrap_err().to_string(),
            "num_samples should be a positive integer value, but got num_samples=0"
        );
    }
}
