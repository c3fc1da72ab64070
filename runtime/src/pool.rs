//! A cache of large freed storage blocks, reused by outputs of the same size.
//!
//! A fresh multi-megabyte allocation comes from `mmap` and costs a page fault per page (or per
//! huge page) on first write, plus the kernel's zeroing of each page: for a 64 MiB output,
//! milliseconds on every call. Like PyTorch's caching allocator, the runtime keeps the storage
//! of dropped [`Buffer`](crate::Buffer)s of [`MIN_BYTES`] or more (up to a limit, oldest
//! evicted first) and hands it to the next [`Data::with_capacity`] of that size (the JIT
//! executor's outputs) or [`take_vec`] (the eager elementwise loops), so a function called in
//! a loop writes into warm memory. Only storage that no buffer references
//! any more enters the cache, and a block leaves it before it is written, so no two owners
//! ever see one block. [`empty_cache`] returns everything to the system allocator.
//!
//! Smaller blocks go to the system allocator, which reuses them well only if it keeps what is
//! freed: see [`tune_system_allocator`].

use crate::buffer::{Data, Element};
use crate::dtype::DType;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Blocks smaller than this are left to the system allocator (tuned to reuse them, see
/// [`tune_system_allocator`]).
pub const MIN_BYTES: usize = 8 << 20;

/// Default bound on the bytes kept.
pub const DEFAULT_LIMIT: usize = 512 << 20;

static LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_LIMIT);

struct Cache {
    /// Empty storage (length 0) with its capacity, oldest first.
    blocks: Vec<Data>,
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache { blocks: Vec::new(), bytes: 0 });

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // The cache holds no invariant a panic elsewhere could break.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes a cached block of `dtype` with room for `n` elements (and at most a quarter more),
/// as empty storage.
pub(crate) fn take(dtype: DType, n: usize) -> Option<Data> {
    if n * dtype.size() < MIN_BYTES {
        return None;
    }
    let mut c = cache();
    let i = c.blocks.iter().position(|d| d.dtype() == dtype && (n..=n + n / 4).contains(&d.capacity()))?;
    let d = c.blocks.remove(i);
    c.bytes -= d.capacity_bytes();
    Some(d)
}

/// An empty vector with room for `n` elements: a cached block when there is one of that size
/// (at most a quarter larger), else a fresh `Vec::new()` (which the caller's collect allocates).
pub fn take_vec<T: Element>(n: usize) -> Vec<T> {
    match take(T::DTYPE, n) {
        Some(mut d) => T::slice_mut(&mut d).map(std::mem::take).unwrap_or_default(),
        None => Vec::new(),
    }
}

/// Keeps `d`'s allocation for reuse if it is large enough; otherwise frees it.
pub(crate) fn give(mut d: Data) {
    let bytes = d.capacity_bytes();
    let limit = LIMIT.load(Ordering::Relaxed);
    if bytes < MIN_BYTES || bytes > limit {
        return;
    }
    d.clear();
    let evicted = {
        let mut c = cache();
        let evicted = c.evict_to(limit - bytes);
        c.bytes += bytes;
        c.blocks.push(d);
        evicted
    };
    // Freed outside the lock.
    drop(evicted);
}

/// Heap blocks up to this size come from glibc's heap rather than `mmap`.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// glibc returns the top of its heap to the system only when this much of it is free.
pub const TRIM_THRESHOLD: usize = 128 << 20;

static TUNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets glibc's allocator, once per process, to keep freed storage for the next step: blocks
/// below [`MMAP_THRESHOLD`] come from the heap, and the heap is trimmed only past
/// [`TRIM_THRESHOLD`] free bytes. Called on the first [`Buffer`](crate::Buffer) or
/// [`Data::with_capacity`]; `TRACEGRAD_MALLOC=system` in the environment leaves glibc's
/// defaults. Only Linux with glibc; elsewhere it does nothing.
///
/// glibc starts with a 128 KiB mmap threshold and trims its heap whenever 128 KiB at the top
/// are free. It raises both once the process frees a large mapped block (up to 32 MiB and
/// 64 MiB), but a training step whose buffers are a few hundred KiB never frees one: every
/// step then gets its memory fresh from the kernel and faults on every page. An eager
/// transformer_block_train_step in a fresh process took 13.9 ms with glibc's defaults and
/// 8.9 ms with the heap kept (3,300 page faults a step → about 30), cnn_train_step 4.2 → 3.4;
/// the peak resident set did not change.
pub fn tune_system_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("TRACEGRAD_MALLOC").is_ok_and(|v| v == "system") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: mallopt only changes glibc's allocation parameters (it takes the arena
            // lock itself); both values are in range for a c_int.
            let ok = unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
            };
            TUNED.store(ok, Ordering::Relaxed);
        }
    });
}

/// Whether [`tune_system_allocator`] has set glibc's parameters in this process.
pub fn system_allocator_tuned() -> bool {
    TUNED.load(Ordering::Relaxed)
}

impl Cache {
    /// Removes the oldest blocks until at most `bytes` are kept; returns them.
    fn evict_to(&mut self, bytes: usize) -> Vec<Data> {
        let mut evicted = Vec::new();
        while self.bytes > bytes && !self.blocks.is_empty() {
            let old = self.blocks.remove(0);
            self.bytes -= old.capacity_bytes();
            evicted.push(old);
        }
        evicted
    }
}

/// Bytes held by the cache.
pub fn cached_bytes() -> usize {
    cache().bytes
}

/// Frees every cached block.
pub fn empty_cache() {
    let evicted = cache().evict_to(0);
    drop(evicted);
}

/// Sets the bound on cached bytes (0 turns caching off), evicting as needed; returns the
/// previous bound.
pub fn set_limit(bytes: usize) -> usize {
    let previous = LIMIT.swap(bytes, Ordering::Relaxed);
    let evicted = cache().evict_to(bytes);
    drop(evicted);
    previous
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;

    /// Element counts no other test uses (the cache is process-wide and tests run in
    /// parallel).
    const N: usize = (MIN_BYTES / 4) + 1234;

    /// Serializes these tests: one of them turns the cache off for a moment.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn filled(n: usize) -> Buffer {
        Buffer::from_vec(vec![1.5f32; n], &[n])
    }

    #[test]
    fn the_last_owner_hands_its_block_to_the_next_allocation_of_that_size() {
        let _serial = serial();
        let a = filled(N);
        let b = a.clone();
        let addr = a.data().as_ptr();
        drop(a);
        // Still referenced by `b`: nothing is cached, a new block is allocated.
        let fresh = Data::with_capacity(DType::F32, N);
        assert_ne!(fresh.as_ptr(), addr);
        drop(fresh);
        drop(b);
        let reused = Data::with_capacity(DType::F32, N);
        assert_eq!(reused.as_ptr(), addr, "the dropped block is reused");
        assert_eq!(reused.len(), 0, "and comes back empty");
        // Another dtype or size does not take it.
        assert!(take(DType::F64, N / 2).is_none_or(|d| d.as_ptr() != addr));
    }

    #[test]
    fn eager_maps_write_into_cached_blocks() {
        let _serial = serial();
        let n = N + 99;
        let a = filled(n);
        let addr = a.data().as_ptr();
        drop(a);
        let x = vec![2.0f32; n];
        let y = crate::kernels::pointwise::map(&x, |v| v * 3.0);
        assert_eq!(y.as_ptr() as *const u8, addr, "the map's output is the cached block");
        assert!(y.len() == n && y.iter().all(|&v| v == 6.0));
    }

    #[test]
    fn broadcast_zips_and_strided_copies_write_every_element_of_cached_blocks() {
        let _serial = serial();
        // Rows of 1000 with a row vector (a bias add), then a transposed copy: each output
        // takes a cached block full of NaN, which any element left unwritten would show.
        let (rows, cols) = (N / 1000 + 7, 1000);
        let n = rows * cols;
        for _ in 0..2 {
            let stale = Buffer::from_vec(vec![f32::NAN; n], &[n]);
            let addr = stale.data().as_ptr();
            drop(stale);
            let x: Vec<f32> = (0..n).map(|i| (i % 977) as f32).collect();
            let w: Vec<f32> = (0..cols).map(|j| j as f32 * 0.5).collect();
            let y = crate::kernels::pointwise::zip(&x, &[rows, cols], &w, &[cols], &[rows, cols], |a, b| a + b);
            assert_eq!(y.as_ptr() as *const u8, addr, "the zip's output is the cached block");
            assert!(y.iter().enumerate().all(|(i, &v)| v == x[i] + w[i % cols]));
            drop(y);
            let t = crate::kernels::layout::strided_copy(&x, &[cols, rows], &[1, cols]);
            assert_eq!(t.as_ptr() as *const u8, addr, "the copy's output is the cached block");
            assert!(t.iter().enumerate().all(|(i, &v)| v == x[(i % rows) * cols + i / rows]));
        }
    }

    #[test]
    fn small_blocks_are_not_cached_and_into_data_keeps_its_storage() {
        let _serial = serial();
        let small = Buffer::from_vec(vec![0u8; 1000], &[1000]);
        drop(small);
        assert!(take(DType::U8, 1000).is_none());
        let big = filled(N + 1);
        let addr = big.data().as_ptr();
        let d = big.into_data().expect("sole owner");
        assert_eq!(d.as_ptr(), addr);
        assert_eq!(d.len(), N + 1);
    }

    #[test]
    fn a_zero_limit_caches_nothing() {
        let _serial = serial();
        // A block given while the limit is 0 is freed.
        let d = Data::F64(vec![0.0; (MIN_BYTES / 8) + 77]);
        let previous = set_limit(0);
        give(d);
        let none = take(DType::F64, (MIN_BYTES / 8) + 77);
        set_limit(previous);
        assert!(none.is_none());
        give(Data::F64(vec![0.0; (MIN_BYTES / 8) + 77]));
        assert!(cached_bytes() >= MIN_BYTES);
        assert!(take(DType::F64, (MIN_BYTES / 8) + 77).is_some());
    }
}
