//! DataLoader additions: `timeout` (an error, never a hang), `worker_init_fn`, per-worker seeds,
//! and the panic path with no thread left behind.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracegrad::data::{get_worker_info, DataError, DataLoader, Dataset, WorkerInfo};

/// Sleeps `delay` in `get` for indices at or past `slow_from`; panics at `bad`.
struct Slow {
    n: usize,
    slow_from: usize,
    delay: Duration,
    bad: Option<usize>,
}

impl Dataset for Slow {
    type Item = i64;

    fn len(&self) -> usize {
        self.n
    }

    fn get(&self, index: usize) -> i64 {
        if index >= self.slow_from {
            thread::sleep(self.delay);
        }
        if Some(index) == self.bad {
            panic!("bad sample {index}");
        }
        index as i64
    }
}

/// Counts live worker threads: set up on a worker by `worker_init_fn`, it decrements its counter
/// when the thread exits (thread-local destructors run before `join` returns).
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

thread_local! {
    static GUARD: RefCell<Option<LiveGuard>> = const { RefCell::new(None) };
}

fn track_live(live: &Arc<AtomicUsize>) -> impl Fn(usize) + Send + Sync + 'static {
    let live = live.clone();
    move |_| {
        live.fetch_add(1, Ordering::SeqCst);
        GUARD.with(|g| *g.borrow_mut() = Some(LiveGuard(live.clone())));
    }
}

#[test]
fn a_slow_batch_times_out_with_an_error_not_a_hang() {
    let timeout = Duration::from_millis(200);
    // Batch 0 is quick; from index 4 on every sample takes 3 s.
    let ds = Slow { n: 16, slow_from: 4, delay: Duration::from_secs(3), bad: None };
    let loader = DataLoader::builder(ds).batch_size(4).num_workers(2).timeout(timeout).build().unwrap();
    assert_eq!(loader.timeout(), Some(timeout));
    let mut it = loader.iter();
    assert_eq!(it.next().unwrap().unwrap().to_vec::<i64>(), vec![0, 1, 2, 3]);
    let t = Instant::now();
    let err = it.next().unwrap().unwrap_err();
    let waited = t.elapsed();
    assert_eq!(err, DataError::Timeout { after: timeout });
    assert_eq!(err.to_string(), "DataLoader timed out after 0.2 seconds");
    assert!(waited >= timeout, "gave up after {waited:?}, before the timeout");
    assert!(waited < 2 * timeout, "gave up after {waited:?}, more than twice the timeout");
    // The epoch is over, and ending it does not wait for the stuck worker.
    assert!(it.next().is_none());
    let t = Instant::now();
    drop(it);
    drop(loader);
    assert!(t.elapsed() < timeout, "dropping after a timeout took {:?}", t.elapsed());

    // Whole seconds print as Python prints an int timeout.
    assert_eq!(
        DataError::Timeout { after: Duration::from_secs(5) }.to_string(),
        "DataLoader timed out after 5 seconds"
    );
}

#[test]
fn a_timeout_that_is_not_hit_changes_nothing() {
    let ds = Slow { n: 10, slow_from: 0, delay: Duration::from_millis(5), bad: None };
    let loader = DataLoader::builder(ds).batch_size(3).num_workers(3).timeout(Duration::from_secs(5)).build().unwrap();
    let got: Vec<Vec<i64>> = loader.iter().map(|b| b.unwrap().to_vec::<i64>()).collect();
    assert_eq!(got, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]);
}

#[test]
fn timeout_needs_workers() {
    let ds = Slow { n: 4, slow_from: 4, delay: Duration::ZERO, bad: None };
    let err = DataLoader::builder(ds).timeout(Duration::from_millis(10)).build().err().unwrap();
    assert!(matches!(err, DataError::InvalidArgument(_)));
    assert!(err.to_string().starts_with("timeout option needs num_workers > 0"), "{err}");
    // Zero means no timeout, as in PyTorch, and is fine without workers.
    let ds = Slow { n: 4, slow_from: 4, delay: Duration::ZERO, bad: None };
    let loader = DataLoader::builder(ds).timeout(Duration::ZERO).build().unwrap();
    assert_eq!(loader.timeout(), None);
}

/// What `worker_init_fn` saw: its argument, `get_worker_info()` and its thread's name.
type InitCall = (usize, Option<WorkerInfo>, String);

#[test]
fn worker_init_fn_runs_once_per_worker_on_its_thread() {
    for workers in [1usize, 3, 5] {
        let calls: Arc<Mutex<Vec<InitCall>>> = Arc::default();
        let seen = calls.clone();
        let loader = DataLoader::builder((0..40i64).collect::<Vec<_>>())
            .batch_size(4)
            .num_workers(workers)
            .seed(9)
            .worker_init_fn(move |id| {
                let name = thread::current().name().unwrap_or("").to_string();
                seen.lock().unwrap().push((id, get_worker_info(), name));
            })
            .build()
            .unwrap();
        for epoch in 1..=2 {
            let batches: Vec<_> = loader.iter().collect::<Result<_, _>>().unwrap();
            assert_eq!(batches.len(), 10);
            let mut c = calls.lock().unwrap().clone();
            // Workers are started per epoch, so each epoch runs the function once per worker.
            assert_eq!(c.len(), workers * epoch, "num_workers={workers}, epoch {epoch}");
            let this_epoch = c.split_off(workers * (epoch - 1));
            let mut ids: Vec<usize> = this_epoch.iter().map(|(id, _, _)| *id).collect();
            ids.sort();
            assert_eq!(ids, (0..workers).collect::<Vec<_>>());
            let base = this_epoch.iter().find(|(id, _, _)| *id == 0).unwrap().1.unwrap().seed;
            for (id, info, name) in &this_epoch {
                let info = info.expect("get_worker_info() works inside worker_init_fn");
                assert_eq!((info.id, info.num_workers), (*id, workers));
                assert_eq!(info.seed, base.wrapping_add(*id as u64), "seed = base_seed + worker_id");
                assert_eq!(name, &format!("tracegrad-dataloader-{id}"), "runs on the worker's own thread");
            }
        }
        assert_eq!(get_worker_info(), None, "the calling thread is not a worker");
    }

    // No workers: never called.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let loader = DataLoader::builder((0..8i64).collect::<Vec<_>>())
        .batch_size(4)
        .worker_init_fn(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    assert_eq!(loader.iter().count(), 2);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// Each sample is the `(worker id, seed)` its worker sees through `get_worker_info()` in `get`.
struct SeedProbe;

impl Dataset for SeedProbe {
    type Item = (usize, u64);

    fn len(&self) -> usize {
        12
    }

    fn get(&self, _index: usize) -> (usize, u64) {
        let info = get_worker_info().expect("inside a worker");
        (info.id, info.seed)
    }
}

#[test]
fn worker_seeds_are_distinct_and_follow_the_loader_seed() {
    let seeds = |seed: u64| -> Vec<Vec<u64>> {
        let loader = DataLoader::builder(SeedProbe)
            .batch_size(2)
            .num_workers(3)
            .seed(seed)
            .collate_fn(|samples: Vec<(usize, u64)>| samples)
            .build()
            .unwrap();
        (0..2)
            .map(|_| {
                let mut per_worker = [None; 3];
                for b in loader.iter() {
                    for (id, s) in b.unwrap() {
                        assert!(per_worker[id].is_none_or(|p| p == s), "one seed per worker and epoch");
                        per_worker[id] = Some(s);
                    }
                }
                per_worker.iter().map(|s| s.expect("every worker fetched")).collect()
            })
            .collect()
    };
    let a = seeds(42);
    for epoch in &a {
        assert_eq!(epoch[1], epoch[0].wrapping_add(1));
        assert_eq!(epoch[2], epoch[0].wrapping_add(2));
    }
    assert_ne!(a[0], a[1], "a new base seed per epoch");
    assert_eq!(seeds(42), a, "the loader seed fixes the workers' seeds");
    assert_ne!(seeds(43), a);
}

#[test]
fn a_panicking_get_yields_the_earlier_batches_then_names_the_index_and_leaves_no_thread() {
    for workers in [0usize, 1, 2, 4] {
        for bad in [0usize, 5, 13] {
            let live = Arc::new(AtomicUsize::new(0));
            let ds = Slow { n: 16, slow_from: 0, delay: Duration::from_millis(1), bad: Some(bad) };
            let loader = DataLoader::builder(ds)
                .batch_size(4)
                .num_workers(workers)
                .worker_init_fn(track_live(&live))
                .build()
                .unwrap();
            let mut it = loader.iter();
            for b in 0..bad / 4 {
                let batch = it.next().unwrap().unwrap_or_else(|e| panic!("batch {b} before the bad one: {e}"));
                assert_eq!(batch.to_vec::<i64>(), (4 * b as i64..4 * b as i64 + 4).collect::<Vec<_>>());
            }
            let err = it.next().unwrap().unwrap_err();
            assert_eq!(err, DataError::GetPanicked { index: bad, message: format!("bad sample {bad}") });
            assert_eq!(err.to_string(), format!("DataLoader worker: dataset.get({bad}) panicked: bad sample {bad}"));
            if workers > 0 {
                assert!(live.load(Ordering::SeqCst) >= 1, "the worker that fetched the bad batch is up");
            }
            drop(it);
            assert_eq!(live.load(Ordering::SeqCst), 0, "num_workers={workers}, bad={bad}: a worker outlived the epoch");
        }
    }
}

#[test]
fn a_panicking_worker_init_fn_is_an_error_not_a_hang() {
    let loader = DataLoader::builder((0..16i64).collect::<Vec<_>>())
        .batch_size(4)
        .num_workers(2)
        .worker_init_fn(|id| {
            if id == 1 {
                panic!("no GPU for worker {id}");
            }
        })
        .build()
        .unwrap();
    let t = Instant::now();
    let items: Vec<_> = loader.iter().collect();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(items.len(), 2, "batch 0 from worker 0, then the error where worker 1's batch was due");
    assert_eq!(items[0].as_ref().unwrap().to_vec::<i64>(), vec![0, 1, 2, 3]);
    let err = items[1].as_ref().unwrap_err();
    assert_eq!(
        err,
        &DataError::WorkerExited { worker: 1, reason: "worker_init_fn panicked: no GPU for worker 1".into() }
    );
    assert_eq!(
        err.to_string(),
        "DataLoader worker 1 exited unexpectedly: worker_init_fn panicked: no GPU for worker 1"
    );
}
