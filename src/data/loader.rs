//! [`DataLoader`] (`torch.utils.data.DataLoader`): batches from a [`Dataset`] in the order a
//! sampler gives, fetched in the calling thread or by worker threads.
//!
//! The calling thread runs the index sampler and hands index batches to the workers
//! round-robin, keeping at most `prefetch_factor * num_workers` batches in flight; results come
//! back on one channel and are re-ordered, so batches arrive exactly as with `num_workers = 0`.
//! Workers are started per epoch (each [`DataLoader::iter`]) and stopped and joined when the
//! iterator is dropped. Each worker first publishes its [`WorkerInfo`] (id and seed, see
//! [`get_worker_info`]) and runs the loader's `worker_init_fn`, then fetches.
//!
//! With a [`timeout`](DataLoaderBuilder::timeout), waiting longer than that for the next batch
//! yields [`DataError::Timeout`] and ends the epoch without waiting for the workers: a worker
//! stuck inside `Dataset::get` cannot be interrupted, so it is told to stop and exits on its own
//! as soon as that call returns.

use std::cell::Cell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracegrad_runtime::random::{self, Generator};

use super::collate::{Collate, DefaultCollate};
use super::dataset::Dataset;
use super::sampler::{BatchSampler, RandomSampler, Sampler, SequentialSampler, Singletons};
use super::{panic_message, DataError};
use crate::tensor::lock_poison;

/// How often a waiting iterator checks that the worker it waits on is still alive.
const LIVENESS_POLL: Duration = Duration::from_millis(100);

/// A function run once on each worker thread before it fetches anything (PyTorch's
/// `worker_init_fn`), given the worker's id; [`get_worker_info`] already works inside it.
pub type WorkerInitFn = Arc<dyn Fn(usize) + Send + Sync>;

/// What a worker thread knows about itself (`torch.utils.data.get_worker_info()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// This worker's id, `0..num_workers`.
    pub id: usize,
    /// Number of workers of the loader.
    pub num_workers: usize,
    /// A seed for this worker: the epoch's base seed plus `id` (PyTorch's `seed`). The base seed
    /// is drawn per epoch from the loader's [`seed`](DataLoaderBuilder::seed) stream, or from
    /// the default generator when none was given.
    pub seed: u64,
}

thread_local! {
    static WORKER_INFO: Cell<Option<WorkerInfo>> = const { Cell::new(None) };
}

/// Inside a [`DataLoader`] worker thread, that worker's [`WorkerInfo`]; `None` elsewhere
/// (including with `num_workers = 0`).
pub fn get_worker_info() -> Option<WorkerInfo> {
    WORKER_INFO.with(Cell::get)
}

/// Configures a [`DataLoader`]; see [`DataLoader::builder`]. Defaults follow PyTorch:
/// `batch_size = 1`, no shuffle, no `drop_last`, the default collate, `num_workers = 0`.
pub struct DataLoaderBuilder<D, C = DefaultCollate> {
    dataset: D,
    collate: C,
    batch_size: Option<usize>,
    shuffle: bool,
    generator: Option<Generator>,
    drop_last: bool,
    sampler: Option<Arc<dyn Sampler>>,
    batch_sampler: Option<Arc<dyn Sampler<Vec<usize>>>>,
    num_workers: usize,
    prefetch_factor: Option<usize>,
    timeout: Option<Duration>,
    worker_init_fn: Option<WorkerInitFn>,
}

impl<D: Dataset, C> DataLoaderBuilder<D, C> {
    /// Samples per batch (default 1); `None` turns automatic batching off, so the loader yields
    /// single converted samples ([`Collate::convert`]).
    pub fn batch_size(mut self, batch_size: impl Into<Option<usize>>) -> Self {
        self.batch_size = batch_size.into();
        self
    }

    /// Visit the samples in a new random order every epoch (a [`RandomSampler`]).
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// Seeds the shuffle order (and the workers' seeds): the same seed replays the same epochs.
    /// Without it, each epoch's order is seeded from the default generator
    /// ([`manual_seed`](crate::manual_seed)).
    pub fn seed(self, seed: u64) -> Self {
        self.generator(Generator::new(seed))
    }

    /// Draws the shuffle order (and the workers' base seeds) from `generator` (PyTorch's
    /// `generator=`).
    pub fn generator(mut self, generator: Generator) -> Self {
        self.generator = Some(generator);
        self
    }

    /// Drop the last batch when it is short.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Draw data-set indices from `sampler` (exclusive with `shuffle`). Pass an `Arc` to keep a
    /// handle on the sampler.
    pub fn sampler(mut self, sampler: impl Sampler + 'static) -> Self {
        self.sampler = Some(Arc::new(sampler));
        self
    }

    /// Draw whole index batches from `batch_sampler` (exclusive with `batch_size`, `shuffle`,
    /// `sampler` and `drop_last`).
    pub fn batch_sampler(mut self, batch_sampler: impl Sampler<Vec<usize>> + 'static) -> Self {
        self.batch_sampler = Some(Arc::new(batch_sampler));
        self
    }

    /// Fetch batches in `num_workers` worker threads (0: in the calling thread).
    pub fn num_workers(mut self, num_workers: usize) -> Self {
        self.num_workers = num_workers;
        self
    }

    /// Batches in flight per worker (default 2 when `num_workers > 0`; an error with 0 workers).
    pub fn prefetch_factor(mut self, prefetch_factor: usize) -> Self {
        self.prefetch_factor = Some(prefetch_factor);
        self
    }

    /// Gives up on a batch that takes longer than `timeout` to arrive from the workers: the
    /// iterator then yields [`DataError::Timeout`] ("DataLoader timed out after 0.2 seconds")
    /// and ends the epoch (PyTorch's `timeout`). `Duration::ZERO` (the default) waits forever.
    /// Needs `num_workers > 0`: without workers the calling thread runs `Dataset::get` itself
    /// and cannot time out, so [`build`](Self::build) rejects the combination (PyTorch fails an
    /// assertion when iterating).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// Runs `f(worker_id)` once on each worker thread, before it fetches anything (PyTorch's
    /// `worker_init_fn`); [`get_worker_info`] gives the worker's id and seed inside it. Not
    /// called with `num_workers = 0`. A panic in `f` ends that worker: the epoch yields a
    /// [`DataError::WorkerExited`] naming the panic where that worker's first batch was due.
    pub fn worker_init_fn(mut self, f: impl Fn(usize) + Send + Sync + 'static) -> Self {
        self.worker_init_fn = Some(Arc::new(f));
        self
    }

    /// Uses `collate` to assemble batches (any [`Collate`] implementation).
    pub fn collate<C2: Collate<D::Item>>(self, collate: C2) -> DataLoaderBuilder<D, C2> {
        DataLoaderBuilder {
            dataset: self.dataset,
            collate,
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            generator: self.generator,
            drop_last: self.drop_last,
            sampler: self.sampler,
            batch_sampler: self.batch_sampler,
            num_workers: self.num_workers,
            prefetch_factor: self.prefetch_factor,
            timeout: self.timeout,
            worker_init_fn: self.worker_init_fn,
        }
    }

    /// Uses the closure `f` to assemble batches (PyTorch's `collate_fn`). Without automatic
    /// batching it is called with one-sample vectors.
    pub fn collate_fn<F, O>(self, f: F) -> DataLoaderBuilder<D, F>
    where
        F: Fn(Vec<D::Item>) -> O + Send + Sync,
        O: Send,
    {
        self.collate(f)
    }
}

impl<D, C> DataLoaderBuilder<D, C>
where
    D: Dataset + 'static,
    C: Collate<D::Item> + 'static,
{
    /// Validates the options as PyTorch does, with its error texts, and builds the loader.
    pub fn build(self) -> Result<DataLoader<D, C>, DataError> {
        let DataLoaderBuilder {
            dataset,
            collate,
            mut batch_size,
            shuffle,
            generator,
            mut drop_last,
            sampler,
            batch_sampler,
            num_workers,
            prefetch_factor,
            timeout,
            worker_init_fn,
        } = self;
        let prefetch_factor =
            match (num_workers, prefetch_factor) {
                (0, Some(_)) => return Err(DataError::invalid(
                    "prefetch_factor option could only be specified in multiprocessing.let num_workers > 0 to enable \
                     multiprocessing, otherwise set prefetch_factor to None.",
                )),
                (0, None) => None,
                (_, Some(0)) => {
                    return Err(DataError::invalid(
                        "prefetch_factor should be a positive integer value, but got prefetch_factor=0",
                    ))
                }
                (_, p) => Some(p.unwrap_or(2)),
            };
        if timeout.is_some() && num_workers == 0 {
            return Err(DataError::invalid(
                "timeout option needs num_workers > 0: without workers, batches are fetched in the calling thread, \
                 which cannot time out",
            ));
        }
        if sampler.is_some() && shuffle {
            return Err(DataError::invalid("sampler option is mutually exclusive with shuffle"));
        }
        if batch_sampler.is_some() {
            if batch_size != Some(1) || shuffle || sampler.is_some() || drop_last {
                return Err(DataError::invalid(
                    "batch_sampler option is mutually exclusive with batch_size, shuffle, sampler, and drop_last",
                ));
            }
            batch_size = None;
            drop_last = false;
        } else if batch_size.is_none() && drop_last {
            return Err(DataError::invalid(
                "batch_size=None option disables auto-batching and is mutually exclusive with drop_last",
            ));
        }
        let n = dataset.len();
        let sampler: Arc<dyn Sampler> = match sampler {
            Some(s) => s,
            None if shuffle => Arc::new(match &generator {
                Some(g) => RandomSampler::with_generator(n, g.clone())?,
                None => RandomSampler::new(n)?,
            }),
            None => Arc::new(SequentialSampler::new(n)),
        };
        let batch_sampler: Option<Arc<dyn Sampler<Vec<usize>>>> = match (batch_sampler, batch_size) {
            (Some(b), _) => Some(b),
            (None, Some(bs)) => Some(Arc::new(BatchSampler::from_arc(sampler.clone(), bs, drop_last)?)),
            (None, None) => None,
        };
        let index_sampler = batch_sampler.clone().unwrap_or_else(|| Arc::new(Singletons(sampler.clone())));
        // The workers' seeds come from their own stream, so they never perturb the shuffle.
        let seeds = generator.map(|mut g| Mutex::new(Generator::new(g.next_u64() ^ 0x9e37_79b9_7f4a_7c15)));
        Ok(DataLoader {
            fetcher: Arc::new(Fetcher { dataset, collate, auto_collation: batch_sampler.is_some() }),
            sampler,
            batch_sampler,
            index_sampler,
            batch_size,
            drop_last,
            num_workers,
            prefetch_factor,
            seeds,
            timeout,
            worker_init_fn,
        })
    }
}

/// Batches of a [`Dataset`] (`torch.utils.data.DataLoader`).
///
/// Build one with [`DataLoader::builder`]; iterate with [`iter`](DataLoader::iter) or `for b in
/// &loader`, once per epoch. Items are `Result<batch, DataError>`: an `Err` reports a panic in
/// `Dataset::get` or in the collate function (the iteration goes on with the next batch, as
/// PyTorch's does after re-raising a worker's exception), a worker that died, or a
/// [`timeout`](DataLoaderBuilder::timeout) (in those two cases the iteration then ends).
pub struct DataLoader<D, C = DefaultCollate> {
    fetcher: Arc<Fetcher<D, C>>,
    sampler: Arc<dyn Sampler>,
    batch_sampler: Option<Arc<dyn Sampler<Vec<usize>>>>,
    /// `batch_sampler` with automatic batching, else `sampler` in one-index batches.
    index_sampler: Arc<dyn Sampler<Vec<usize>>>,
    batch_size: Option<usize>,
    drop_last: bool,
    num_workers: usize,
    prefetch_factor: Option<usize>,
    seeds: Option<Mutex<Generator>>,
    timeout: Option<Duration>,
    worker_init_fn: Option<WorkerInitFn>,
}

impl<D: Dataset> DataLoader<D, DefaultCollate> {
    /// A builder over `dataset` with PyTorch's defaults (see [`DataLoaderBuilder`]).
    pub fn builder(dataset: D) -> DataLoaderBuilder<D, DefaultCollate> {
        DataLoaderBuilder {
            dataset,
            collate: DefaultCollate,
            batch_size: Some(1),
            shuffle: false,
            generator: None,
            drop_last: false,
            sampler: None,
            batch_sampler: None,
            num_workers: 0,
            prefetch_factor: None,
            timeout: None,
            worker_init_fn: None,
        }
    }
}

impl<D, C> DataLoader<D, C>
where
    D: Dataset + 'static,
    C: Collate<D::Item> + 'static,
{
    /// Number of batches per epoch (samples, without automatic batching).
    pub fn len(&self) -> usize {
        self.index_sampler.len()
    }

    /// Whether an epoch yields nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data set.
    pub fn dataset(&self) -> &D {
        &self.fetcher.dataset
    }

    /// The index sampler (the given one, or the default Sequential/Random sampler).
    pub fn sampler(&self) -> &Arc<dyn Sampler> {
        &self.sampler
    }

    /// The batch sampler; `None` when automatic batching is off.
    pub fn batch_sampler(&self) -> Option<&Arc<dyn Sampler<Vec<usize>>>> {
        self.batch_sampler.as_ref()
    }

    /// Samples per batch (`None` with a custom batch sampler or without automatic batching).
    pub fn batch_size(&self) -> Option<usize> {
        self.batch_size
    }

    /// Whether a short last batch is dropped.
    pub fn drop_last(&self) -> bool {
        self.drop_last
    }

    /// Number of worker threads (0: fetch in the calling thread).
    pub fn num_workers(&self) -> usize {
        self.num_workers
    }

    /// Batches in flight per worker (`None` with 0 workers).
    pub fn prefetch_factor(&self) -> Option<usize> {
        self.prefetch_factor
    }

    /// How long to wait for a batch before giving up (`None`: forever).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Starts an epoch: a new pass of the sampler (a new permutation when shuffling) and, with
    /// `num_workers > 0`, fresh worker threads that stop when the iterator is dropped.
    pub fn iter(&self) -> DataLoaderIter<D, C> {
        let tasks = self.index_sampler.iter();
        let mut it =
            DataLoaderIter { fetcher: self.fetcher.clone(), tasks, pool: None, pending: None, finished: false };
        if self.num_workers > 0 {
            let base_seed = match &self.seeds {
                Some(g) => lock_poison(g.lock()).next_u64(),
                None => random::with_default(|g| g.next_u64()),
            };
            let in_flight = self.num_workers * self.prefetch_factor.unwrap_or(2);
            let workers = Workers {
                num_workers: self.num_workers,
                in_flight,
                base_seed,
                timeout: self.timeout,
                init: self.worker_init_fn.clone(),
            };
            match WorkerPool::start(&self.fetcher, workers) {
                Ok(mut pool) => {
                    pool.dispatch(&mut it.tasks);
                    it.pool = Some(pool);
                }
                Err(e) => it.pending = Some(e),
            }
        }
        it
    }
}

impl<D, C> IntoIterator for &DataLoader<D, C>
where
    D: Dataset + 'static,
    C: Collate<D::Item> + 'static,
{
    type Item = Result<C::Output, DataError>;
    type IntoIter = DataLoaderIter<D, C>;

    fn into_iter(self) -> DataLoaderIter<D, C> {
        self.iter()
    }
}

/// Fetches and collates one index batch; shared by the calling thread and the workers.
struct Fetcher<D, C> {
    dataset: D,
    collate: C,
    auto_collation: bool,
}

impl<D: Dataset, C: Collate<D::Item>> Fetcher<D, C> {
    /// The batch at `indices`, with panics caught and reported; `None` if `stop` was raised
    /// before it was complete.
    fn fetch(&self, indices: Vec<usize>, stop: Option<&AtomicBool>) -> Option<Result<C::Output, DataError>> {
        let mut samples = Vec::with_capacity(indices.len());
        for &index in &indices {
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return None;
            }
            match catch_unwind(AssertUnwindSafe(|| self.dataset.get(index))) {
                Ok(s) => samples.push(s),
                Err(p) => return Some(Err(DataError::GetPanicked { index, message: panic_message(&*p) })),
            }
        }
        let out = catch_unwind(AssertUnwindSafe(|| {
            if self.auto_collation {
                Some(self.collate.collate(samples))
            } else {
                samples.pop().map(|s| self.collate.convert(s))
            }
        }));
        Some(match out {
            Ok(Some(batch)) => Ok(batch),
            Ok(None) => Err(DataError::CollatePanicked { indices, message: "empty index batch".into() }),
            Err(p) => Err(DataError::CollatePanicked { indices, message: panic_message(&*p) }),
        })
    }
}

type Outcome<O> = (usize, Result<O, DataError>);

/// How one epoch's workers are set up.
struct Workers {
    num_workers: usize,
    /// Upper bound on batches handed out but not yet yielded.
    in_flight: usize,
    /// Worker `id` gets seed `base_seed + id`.
    base_seed: u64,
    timeout: Option<Duration>,
    init: Option<WorkerInitFn>,
}

/// The worker threads of one epoch and the bookkeeping that keeps their results in order.
struct WorkerPool<O> {
    /// One index queue per worker; closing them tells the workers to finish.
    index_txs: Vec<mpsc::Sender<(usize, Vec<usize>)>>,
    results: mpsc::Receiver<Outcome<O>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// Batches handed out so far (the next batch's sequence number).
    send_idx: usize,
    /// The sequence number of the next batch to yield.
    rcvd_idx: usize,
    /// Results that arrived ahead of their turn.
    reorder: HashMap<usize, Result<O, DataError>>,
    /// Upper bound on `send_idx - rcvd_idx`.
    in_flight: usize,
    exhausted: bool,
    timeout: Option<Duration>,
    /// Per worker: the panic message of its `worker_init_fn`, if it panicked.
    init_panics: Arc<Mutex<Vec<Option<String>>>>,
}

impl<O: Send + 'static> WorkerPool<O> {
    fn start<D, C>(fetcher: &Arc<Fetcher<D, C>>, w: Workers) -> Result<WorkerPool<O>, DataError>
    where
        D: Dataset + 'static,
        C: Collate<D::Item, Output = O> + 'static,
    {
        let Workers { num_workers, in_flight, base_seed, timeout, init } = w;
        let (result_tx, results) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let init_panics = Arc::new(Mutex::new(vec![None; num_workers]));
        let mut pool = WorkerPool {
            index_txs: Vec::with_capacity(num_workers),
            results,
            handles: Vec::with_capacity(num_workers),
            stop: stop.clone(),
            send_idx: 0,
            rcvd_idx: 0,
            reorder: HashMap::new(),
            in_flight,
            exhausted: false,
            timeout,
            init_panics: init_panics.clone(),
        };
        for id in 0..num_workers {
            let (index_tx, index_rx) = mpsc::channel::<(usize, Vec<usize>)>();
            let info = WorkerInfo { id, num_workers, seed: base_seed.wrapping_add(id as u64) };
            let (fetcher, result_tx, stop) = (fetcher.clone(), result_tx.clone(), stop.clone());
            let (init, init_panics) = (init.clone(), init_panics.clone());
            let spawned = thread::Builder::new().name(format!("tracegrad-dataloader-{id}")).spawn(move || {
                WORKER_INFO.with(|w| w.set(Some(info)));
                if let Some(f) = init {
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(id))) {
                        lock_poison(init_panics.lock())[id] = Some(panic_message(&*p));
                        return;
                    }
                }
                while let Ok((seq, indices)) = index_rx.recv() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Some(outcome) = fetcher.fetch(indices, Some(&stop)) else { break };
                    if result_tx.send((seq, outcome)).is_err() {
                        break;
                    }
                }
            });
            match spawned {
                Ok(h) => {
                    pool.handles.push(h);
                    pool.index_txs.push(index_tx);
                }
                // Dropping `pool` stops and joins the workers already started.
                Err(e) => return Err(DataError::WorkerExited { worker: id, reason: format!("could not start: {e}") }),
            }
        }
        Ok(pool)
    }

    /// Hands out index batches round-robin until `in_flight` are outstanding.
    fn dispatch(&mut self, tasks: &mut dyn Iterator<Item = Vec<usize>>) {
        while !self.exhausted && self.send_idx - self.rcvd_idx < self.in_flight {
            match tasks.next() {
                Some(indices) => {
                    let worker = self.send_idx % self.index_txs.len();
                    // A failed send means the worker is gone; `next` notices and reports it.
                    let _ = self.index_txs[worker].send((self.send_idx, indices));
                    self.send_idx += 1;
                }
                None => self.exhausted = true,
            }
        }
    }

    /// The next batch in order; `None` at the end of the epoch.
    fn next(&mut self, tasks: &mut dyn Iterator<Item = Vec<usize>>) -> Option<Result<O, DataError>> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = self.reorder.remove(&self.rcvd_idx) {
                self.rcvd_idx += 1;
                self.dispatch(tasks);
                return Some(r);
            }
            if self.rcvd_idx == self.send_idx {
                return None;
            }
            let worker = self.rcvd_idx % self.handles.len();
            let wait =
                deadline.map_or(LIVENESS_POLL, |d| d.saturating_duration_since(Instant::now()).min(LIVENESS_POLL));
            match self.results.recv_timeout(wait) {
                Ok((seq, r)) => {
                    self.reorder.insert(seq, r);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.handles[worker].is_finished() {
                        return Some(Err(self.exited(worker)));
                    }
                    if let (Some(d), Some(after)) = (deadline, self.timeout) {
                        if Instant::now() >= d {
                            return Some(Err(DataError::Timeout { after }));
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Some(Err(self.exited(worker))),
            }
        }
    }

    fn exited(&self, worker: usize) -> DataError {
        let reason = match &lock_poison(self.init_panics.lock())[worker] {
            Some(m) => format!("worker_init_fn panicked: {m}"),
            None => format!("batch {} was never delivered", self.rcvd_idx),
        };
        DataError::WorkerExited { worker, reason }
    }
}

impl<O> WorkerPool<O> {
    /// Stops the workers (each finishes at most the sample it is fetching) and joins them.
    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.index_txs.clear();
        for h in self.handles.drain(..) {
            // Fetch panics are caught inside the worker, so a join error is not expected, and
            // there is nothing more to do with one here.
            let _ = h.join();
        }
    }

    /// Tells the workers to stop without waiting for them: after a timeout, a worker may be
    /// stuck in `Dataset::get` for as long as that call takes. Each exits when its current
    /// sample returns (the stop flag is checked between samples).
    fn abandon(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.index_txs.clear();
        // Dropping a `JoinHandle` detaches its thread; `Drop` then has nothing left to join.
        self.handles.clear();
    }
}

impl<O> Drop for WorkerPool<O> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One epoch of a [`DataLoader`]: yields `Result<batch, DataError>` in sampler order.
///
/// Dropping it mid-epoch stops its worker threads and waits for them (each finishes at most
/// the sample it is fetching), so no thread outlives it. The one exception is a
/// [`DataError::Timeout`]: the epoch then ends without waiting for a worker stuck in
/// `Dataset::get`, which exits when that call returns.
pub struct DataLoaderIter<D, C: Collate<D::Item>>
where
    D: Dataset,
{
    fetcher: Arc<Fetcher<D, C>>,
    tasks: Box<dyn Iterator<Item = Vec<usize>> + Send>,
    pool: Option<WorkerPool<C::Output>>,
    /// An error to yield before anything else (a worker that could not start).
    pending: Option<DataError>,
    finished: bool,
}

impl<D, C> Iterator for DataLoaderIter<D, C>
where
    D: Dataset + 'static,
    C: Collate<D::Item> + 'static,
{
    type Item = Result<C::Output, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        if let Some(e) = self.pending.take() {
            self.finished = true;
            return Some(Err(e));
        }
        let out = match &mut self.pool {
            None => self.tasks.next().and_then(|indices| self.fetcher.fetch(indices, None)),
            Some(pool) => pool.next(&mut self.tasks),
        };
        match &out {
            None => self.finish(),
            Some(Err(DataError::WorkerExited { .. })) => self.finish(),
            Some(Err(DataError::Timeout { .. })) => {
                self.finished = true;
                if let Some(pool) = self.pool.take() {
                    pool.abandon();
                }
            }
            Some(_) => {}
        }
        out
    }
}

impl<D: Dataset, C: Collate<D::Item>> DataLoaderIter<D, C> {
    /// Ends the epoch: no more items, workers stopped and joined.
    fn finish(&mut self) {
        self.finished = true;
        // Dropping the pool stops and joins its workers.
        self.pool = None;
    }
}
