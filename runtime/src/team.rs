//! A low-latency team of helper threads for a compiled plan's parallel steps.
//!
//! Handing a small kernel to rayon from a thread outside its pool costs two cross-thread
//! wake-ups (a worker, then the caller again), tens of µs each on a VM whose idle vCPUs halt:
//! on mlp_train_step_large, a 131 072-element pointwise kernel took 96 µs split over two
//! threads and 64 µs on one. [`for_each`] instead posts its tasks to `threads − 1` helper
//! threads that spin for a millisecond after their last job (then park) waiting for more, and
//! the caller claims tasks too: a task nobody has claimed yet is the caller's, so a helper that
//! is slow to wake delays nothing, and the caller never sleeps waiting for a hand-off.
//!
//! One thread holds the team at a time: a compiled plan's run holds it throughout (a
//! [`scope`], taken at its first parallel step), an eager op for the one loop. A thread that
//! finds it held by another, or a loop nested in a task, runs on rayon (or serially) as before.
//!
//! # Protocol
//! The caller publishes a job in `slot` and bumps `epoch`; a helper that sees a new epoch
//! announces itself in `in_use`, then reads `slot`. When the caller has no tasks left to claim
//! it clears `slot` and waits for `in_use` to drop to zero: every helper that read the job has
//! then finished the tasks it claimed and left, so the job (on the caller's stack) can go.
//! All of it is sequentially consistent: a helper whose read of `slot` came before the clear
//! incremented `in_use` before that, so the caller sees it.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper spins after its last job before it parks: long enough to span the
/// serial stretches between a plan's parallel steps, or between eager ops.
const SPIN: Duration = Duration::from_millis(1);

/// One parallel loop: tasks `0..n` of `f`, claimed through `next`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Claims and runs tasks until none is left; a panic is kept for the caller.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                return;
            }
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (self.f)(i))) {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
            }
        }
    }
}

struct Helper {
    thread: Thread,
    parked: AtomicBool,
}

struct Team {
    helpers: Vec<Helper>,
    /// The current job (lifetime erased: see the module's protocol), or null.
    slot: AtomicPtr<Job<'static>>,
    epoch: AtomicU64,
    in_use: AtomicUsize,
    /// Whether a thread holds the team (an open [`scope`]).
    owned: AtomicBool,
}

/// This thread's relation to the team.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Outside any [`scope`].
    No,
    /// Inside a scope that has not needed the team yet.
    Open,
    /// Inside a scope, holding the team.
    Yes,
    /// Inside a scope whose thread found the team held by another: rayon, as outside.
    Elsewhere,
}

thread_local! {
    static HELD: Cell<Held> = const { Cell::new(Held::No) };
    /// Whether this thread is running one of the team's jobs (a nested loop runs serially).
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// The team: `rayon::current_num_threads() − 1` helpers, started on first use.
fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let n = rayon::current_num_threads().saturating_sub(1);
        let (tx, rx) = std::sync::mpsc::channel::<&'static Team>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let handles: Vec<Thread> = (0..n)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("tracegrad-team-{i}"))
                    .spawn(move || {
                        let team = rx.lock().unwrap_or_else(|e| e.into_inner()).recv().expect("the team is built");
                        helper(team, i)
                    })
                    .expect("spawning a team helper")
                    .thread()
                    .clone()
            })
            .collect();
        let team: &'static Team = Box::leak(Box::new(Team {
            helpers: handles.into_iter().map(|thread| Helper { thread, parked: AtomicBool::new(false) }).collect(),
            slot: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            in_use: AtomicUsize::new(0),
            owned: AtomicBool::new(false),
        }));
        for _ in 0..n {
            tx.send(team).expect("helpers wait for the team");
        }
        team
    })
}

/// A helper's life: wait for a new epoch (spinning while a scope is open and work came
/// recently, else parked), then work on the posted job.
fn helper(team: &'static Team, me: usize) {
    let mut seen = team.epoch.load(SeqCst);
    let mut last = Instant::now();
    loop {
        let mut spins = 0u32;
        loop {
            let e = team.epoch.load(SeqCst);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            if last.elapsed() < SPIN {
                // Let a runnable thread (a rayon worker of a step outside the team) have the core.
                std::thread::yield_now();
                continue;
            }
            let h = &team.helpers[me];
            h.parked.store(true, SeqCst);
            if team.epoch.load(SeqCst) == seen {
                std::thread::park_timeout(Duration::from_millis(100));
            }
            h.parked.store(false, SeqCst);
        }
        team.in_use.fetch_add(1, SeqCst);
        let p = team.slot.load(SeqCst);
        if !p.is_null() {
            // SAFETY: a non-null slot read after announcing ourselves in `in_use` points to a
            // job the caller keeps alive until `in_use` is zero again (module protocol).
            unsafe { &*p }.work();
        }
        team.in_use.fetch_sub(1, SeqCst);
        last = Instant::now();
    }
}

/// Runs `f` with the team on call: the first [`for_each`] inside takes the team, if no other
/// thread holds it and the machine has more than one thread, and later ones reuse it; `f`
/// returning (or unwinding) gives it back. A scope that runs no parallel loop costs nothing.
pub fn scope<R>(f: impl FnOnce() -> R) -> R {
    if HELD.with(Cell::get) != Held::No {
        return f();
    }
    struct Close;
    impl Drop for Close {
        fn drop(&mut self) {
            if HELD.with(|h| h.replace(Held::No)) == Held::Yes {
                team().owned.store(false, SeqCst);
            }
        }
    }
    HELD.with(|h| h.set(Held::Open));
    let _close = Close;
    f()
}

/// Whether this thread holds the team now, taking it first in an open scope.
fn take() -> bool {
    match HELD.with(Cell::get) {
        Held::Yes => true,
        Held::No | Held::Elsewhere => false,
        Held::Open => {
            let team = team();
            let got = !team.helpers.is_empty() && team.owned.compare_exchange(false, true, SeqCst, SeqCst).is_ok();
            HELD.with(|h| h.set(if got { Held::Yes } else { Held::Elsewhere }));
            got
        }
    }
}

/// Runs `f(i)` for every `i < n`, in parallel: on the team inside a [`scope`] (the caller
/// works too), on rayon otherwise. A panic in a task is re-raised here once all tasks ended.
pub fn for_each(n: usize, f: &(dyn Fn(usize) + Sync)) {
    if n <= 1 || IN_JOB.with(Cell::get) || rayon::current_num_threads() < 2 {
        (0..n).for_each(f);
        return;
    }
    if HELD.with(Cell::get) == Held::No {
        // Outside a scope: the team for this one loop, if it is free.
        return scope(|| for_each(n, f));
    }
    if !take() {
        (0..n).into_par_iter().for_each(f);
        return;
    }
    let team = team();
    let job = Job { f, n, next: AtomicUsize::new(0), panic: Mutex::new(None) };
    let erased = (&job as *const Job<'_>).cast::<Job<'static>>().cast_mut();
    team.slot.store(erased, SeqCst);
    team.epoch.fetch_add(1, SeqCst);
    for h in &team.helpers {
        if h.parked.load(SeqCst) {
            h.thread.unpark();
        }
    }
    IN_JOB.with(|j| j.set(true));
    job.work();
    IN_JOB.with(|j| j.set(false));
    team.slot.store(std::ptr::null_mut(), SeqCst);
    while team.in_use.load(SeqCst) != 0 {
        std::hint::spin_loop();
    }
    if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(p);
    }
}

/// A pointer that may cross to the team's threads (see [`for_each_chunk_mut`]).
struct SendPtr<T>(*mut T);
// SAFETY: only used to hand out disjoint chunks of one `&mut [T]` with `T: Send`.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// `f(i, piece)` for every `chunk`-long piece of `data` (the last may be shorter; `chunk > 0`),
/// in parallel as [`for_each`].
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    assert!(chunk > 0, "for_each_chunk_mut: chunk must be positive");
    let len = data.len();
    let base = SendPtr(data.as_mut_ptr());
    let base = &base;
    for_each(len.div_ceil(chunk), &|i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: `for_each` runs each index once, so the pieces `[start, end)` handed out are
        // disjoint ranges inside `data`, which this call borrows mutably until every task ended.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        f(i, piece)
    });
}

/// `f(k, item)` for every `item_len`-long item of `data` (`item_len > 0`; a shorter last one
/// included), in parallel as [`for_each`], several items to a task (about four tasks a thread).
pub fn for_each_item_mut<T: Send>(data: &mut [T], item_len: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    assert!(item_len > 0, "for_each_item_mut: items must be non-empty");
    let items = data.len().div_ceil(item_len);
    let per_task = items.div_ceil(rayon::current_num_threads() * 4).max(1);
    for_each_chunk_mut(data, item_len * per_task, &|t, block| {
        for (k, item) in block.chunks_mut(item_len).enumerate() {
            f(t * per_task + k, item);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_inside_and_outside_a_scope() {
        for inside in [false, true] {
            let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
            let run = || {
                for _ in 0..50 {
                    for_each(hits.len(), &|i| {
                        hits[i].fetch_add(1, SeqCst);
                    });
                }
            };
            if inside {
                scope(run)
            } else {
                run()
            }
            assert!(hits.iter().all(|h| h.load(SeqCst) == 50), "inside a scope: {inside}");
        }
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        for len in [0usize, 1, 99, 100, 101, 1000] {
            let mut v = vec![0u32; len];
            scope(|| {
                for_each_chunk_mut(&mut v, 10, &|i, piece| {
                    for (k, x) in piece.iter_mut().enumerate() {
                        *x += (i * 10 + k) as u32 + 1;
                    }
                })
            });
            assert!(v.iter().enumerate().all(|(k, &x)| x == k as u32 + 1), "len {len}");
            let mut w = vec![0u32; len];
            for_each_item_mut(&mut w, 7, &|k, item| item.iter_mut().for_each(|x| *x = k as u32));
            assert!(w.iter().enumerate().all(|(i, &x)| x == (i / 7) as u32), "len {len}");
        }
    }

    #[test]
    fn a_task_panic_reaches_the_caller_after_every_task_ended() {
        let done = AtomicUsize::new(0);
        let r = scope(|| {
            catch_unwind(AssertUnwindSafe(|| {
                for_each(64, &|i| {
                    if i == 7 {
                        panic!("task 7");
                    }
                    done.fetch_add(1, SeqCst);
                })
            }))
        });
        let payload = r.expect_err("the panic comes back");
        assert_eq!(crate::panic_message(&*payload), Some("task 7"));
        assert_eq!(done.load(SeqCst), 63);
        // The team still works afterwards.
        let n = AtomicUsize::new(0);
        scope(|| {
            for_each(10, &|_| {
                n.fetch_add(1, SeqCst);
            })
        });
        assert_eq!(n.load(SeqCst), 10);
    }

    #[test]
    fn threads_that_do_not_hold_the_team_fall_back() {
        // Two threads in scopes at once: one holds the team, the other runs on rayon.
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    scope(|| {
                        let n = AtomicUsize::new(0);
                        for _ in 0..200 {
                            for_each(8, &|_| {
                                n.fetch_add(1, SeqCst);
                            });
                        }
                        assert_eq!(n.load(SeqCst), 1600);
                    })
                });
            }
        });
    }
}
