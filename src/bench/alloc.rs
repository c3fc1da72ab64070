//! [`CountingAlloc`]: a global allocator that counts live and peak heap bytes, so the bench can
//! report how much memory one step of a workload needs on top of what was live before it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

/// Bytes currently allocated through [`CountingAlloc`].
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The most bytes live at once since the last [`CountingAlloc::reset_peak`].
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Set by the first allocation that goes through [`CountingAlloc`]: it is the global allocator.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator with live- and peak-byte counters.
///
/// The `tracegrad` binary registers it:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: tracegrad::bench::CountingAlloc = tracegrad::bench::CountingAlloc::new();
/// ```
///
/// The counters are process-wide (there is only one global allocator). When it is not
/// registered, [`CountingAlloc::installed`] is false and the bench reports `peak_bytes` as
/// `null` instead of a made-up 0.
#[derive(Debug, Default)]
pub struct CountingAlloc;

impl CountingAlloc {
    /// The allocator (a unit value; the counters are global).
    pub const fn new() -> CountingAlloc {
        CountingAlloc
    }

    /// Whether a `CountingAlloc` is the global allocator (it has seen an allocation).
    pub fn installed() -> bool {
        INSTALLED.load(Relaxed)
    }

    /// Bytes allocated and not yet freed.
    pub fn live_bytes() -> usize {
        LIVE.load(Relaxed)
    }

    /// The high-water mark of [`CountingAlloc::live_bytes`] since the last reset.
    pub fn peak_bytes() -> usize {
        PEAK.load(Relaxed)
    }

    /// Sets the peak to the current live bytes and returns them.
    pub fn reset_peak() -> usize {
        let live = LIVE.load(Relaxed);
        PEAK.store(live, Relaxed);
        live
    }

    /// Runs `f` and returns its result with the most bytes it had allocated at once on top of
    /// what was live before (`peak − live-before`), or `None` when the counting allocator is
    /// not registered. Allocations by other threads while `f` runs (rayon workers) count too.
    pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<u64>) {
        if !Self::installed() {
            return (f(), None);
        }
        let before = Self::reset_peak();
        let r = f();
        let peak = Self::peak_bytes();
        (r, Some(peak.saturating_sub(before) as u64))
    }

    #[inline]
    fn added(size: usize) {
        if !INSTALLED.load(Relaxed) {
            INSTALLED.store(true, Relaxed);
        }
        let now = LIVE.fetch_add(size, Relaxed) + size;
        if now > PEAK.load(Relaxed) {
            PEAK.fetch_max(now, Relaxed);
        }
    }

    #[inline]
    fn removed(size: usize) {
        LIVE.fetch_sub(size, Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and returns
// its result; the counters are only bookkeeping on the side and never touch the memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::added(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator (hence from `System`) with
        // `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) };
        Self::removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Only the difference counts: large blocks are remapped in place, not copied.
            let old = layout.size();
            if new_size >= old {
                Self::added(new_size - old);
            } else {
                Self::removed(old - new_size);
            }
        }
        p
    }
}
