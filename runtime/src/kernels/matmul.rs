//! Matrix-multiplication kernels: the batched, broadcasting `matmul` behind the eager op and
//! the strided 2-D `gemm_strided` helper that the convolution kernels build on.
//!
//! Everything here is a thin, copy-free layer over the `gemm` crate: transposes are expressed
//! as element strides, batch broadcasting as repeated (stride-0) operand offsets. Operands are
//! contiguous row-major [`Buffer`]s of f32 or f64 (both the same dtype); shapes have already
//! been validated by the op's shape rule, so the checks here only guard broken invariants.
//! Work is split across rayon threads either between independent products or, for one large
//! product, between blocks of its output columns (each a single-threaded gemm), never both at
//! once.

use crate::buffer::{Buffer, Data};
use crate::shape::{broadcast_shapes, broadcast_strides, numel, Dims, ShapeDisplay};
use gemm::Parallelism;
use num_traits::{One, Zero};
use std::any::TypeId;
use std::mem::MaybeUninit;

/// The largest packed rhs panel one gemm call may allocate (see `Operands::block`).
const PANEL_BYTES: usize = 128 << 10;

/// Rows up to which a product is left whole in depth (see `Operands::block`).
const MR_MAX: usize = 16;

/// Multiply-adds below which threading does not pay for itself (gemm's own default threshold).
pub(crate) const PAR_THRESHOLD: usize = 48 * 48 * 256;

/// How a batch of independent products (or convolution samples) is spread over threads.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Schedule {
    /// One item after another; gemm uses the given parallelism inside each item.
    Serial(Parallelism),
    /// Items in parallel on rayon; each item runs single-threaded.
    Batch,
}

/// Picks a [`Schedule`] for `batch` items of `per_item` multiply-adds each: tiny totals run
/// serially on one thread, many or small items go wide across the batch, and a few big items
/// run one after another with gemm's threads inside each.
pub(crate) fn schedule(batch: usize, per_item: usize) -> Schedule {
    let threads = rayon::current_num_threads();
    let total = batch.saturating_mul(per_item);
    if threads <= 1 || batch <= 1 || total < PAR_THRESHOLD {
        Schedule::Serial(if batch == 1 { threads_for(per_item, threads) } else { Parallelism::None })
    } else if batch >= threads || per_item < PAR_THRESHOLD {
        Schedule::Batch
    } else {
        Schedule::Serial(threads_for(per_item, threads))
    }
}

fn threads_for(work: usize, threads: usize) -> Parallelism {
    if threads <= 1 || work < PAR_THRESHOLD {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

/// Number of threads worth using for an m×n×k product (1 for small ones so they don't pay
/// rayon overhead): `Parallelism::None` below 48·48·256 multiply-adds, otherwise all of
/// rayon's current pool.
pub fn gemm_parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    threads_for(m.saturating_mul(n).saturating_mul(k), rayon::current_num_threads())
}

/// Elements a strided `rows`×`cols` operand spans from its first element (both non-zero).
fn span(what: &str, rows: usize, cols: usize, rs: isize, cs: isize) -> usize {
    assert!(rs >= 0 && cs >= 0, "gemm_strided: negative strides are not supported ({what}: rs={rs}, cs={cs})");
    (rows - 1)
        .checked_mul(rs as usize)
        .and_then(|r| (cols - 1).checked_mul(cs as usize).and_then(|c| r.checked_add(c)))
        .and_then(|s| s.checked_add(1))
        .unwrap_or_else(|| panic!("gemm_strided: {what} extent overflows usize"))
}

/// Plain 2-D product used by the convolutions and by [`matmul`]:
/// `dst[m,n] = (accumulate ? dst : 0) + lhs·rhs`.
///
/// `dst` is row-major and contiguous (exactly `m*n` elements). `lhs` is read as an m×k matrix
/// whose element `(i, p)` is `lhs[i*lhs_rs + p*lhs_cs]`, and `rhs` as a k×n matrix whose element
/// `(p, j)` is `rhs[p*rhs_rs + j*rhs_cs]`; strides are in elements and must be non-negative
/// (zero is allowed), and every addressed element must lie inside its slice (checked).
///
/// With `Parallelism::Rayon(t)` the output is cut into up to `t` blocks of whole columns (or of
/// whole rows, when it is too narrow or the lhs is a transposed view), each one single-threaded
/// gemm on the runtime's team. gemm's own threading
/// splits one product into many small tasks: on a 64×784 · 784×256 product (a linear layer's
/// forward pass) it ran slower on two threads than on one, where the column split runs 1.8×
/// faster.
///
/// # Panics
/// If `T` is not f32 or f64, if `dst.len() != m*n`, or if a strided operand runs past its slice.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided<T: 'static + Copy + Send + Sync + Zero + One>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: &[T],
    rhs_rs: isize,
    rhs_cs: isize,
    par: Parallelism,
) {
    gemm_strided_scaled(m, n, k, dst, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, T::one(), par)
}

/// [`gemm_strided`] with the product scaled: `dst = (accumulate ? dst : 0) + beta·lhs·rhs`.
#[allow(clippy::too_many_arguments)]
fn gemm_strided_scaled<T: 'static + Copy + Send + Sync + Zero + One>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: &[T],
    rhs_rs: isize,
    rhs_cs: isize,
    beta: T,
    par: Parallelism,
) {
    assert_eq!(dst.len(), m * n, "gemm_strided: dst must hold exactly m*n = {}x{} elements", m, n);
    let op = Operands::checked(m, n, k, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs);
    // SAFETY: `dst` is an exclusive borrow of exactly m×n initialised elements (so it may be
    // read when accumulating), which cannot alias the shared `lhs`/`rhs`.
    unsafe { op.run(dst.as_mut_ptr(), accumulate, beta, par) }
}

/// [`gemm_strided`] into storage that need not be initialised: `dst = lhs·rhs`.
///
/// # Panics
/// As [`gemm_strided`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided_uninit<T: 'static + Copy + Send + Sync + Zero + One>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<T>],
    lhs: &[T],
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: &[T],
    rhs_rs: isize,
    rhs_cs: isize,
    par: Parallelism,
) {
    assert_eq!(dst.len(), m * n, "gemm_strided: dst must hold exactly m*n = {}x{} elements", m, n);
    let op = Operands::checked(m, n, k, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs);
    // SAFETY: `dst` is an exclusive borrow of exactly m×n elements, which cannot alias the
    // shared `lhs`/`rhs`; without accumulation nothing reads it before it is written, and every
    // element is written (`Operands::run`), with valid values of `T`.
    unsafe { op.run(dst.as_mut_ptr().cast::<T>(), false, T::one(), par) }
}

/// A checked product's operands: sizes, base pointers and strides.
struct Operands<T> {
    m: usize,
    n: usize,
    k: usize,
    lhs: *const T,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const T,
    rhs_rs: isize,
    rhs_cs: isize,
}

// SAFETY: the pointers address shared, immutable operand slices that outlive every use (the
// borrow in `gemm_strided*` spans the whole call, parallel blocks included).
unsafe impl<T: Sync> Sync for Operands<T> {}

/// A destination pointer that parallel blocks write disjoint elements through.
struct Dst<T>(*mut T);

// SAFETY: each parallel block writes (and, accumulating, reads) only its own columns or rows.
unsafe impl<T: Send> Sync for Dst<T> {}

impl<T: 'static + Copy + Send + Sync + Zero + One> Operands<T> {
    #[allow(clippy::too_many_arguments)]
    fn checked(
        m: usize,
        n: usize,
        k: usize,
        lhs: &[T],
        lhs_rs: isize,
        lhs_cs: isize,
        rhs: &[T],
        rhs_rs: isize,
        rhs_cs: isize,
    ) -> Operands<T> {
        assert!(
            TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<f64>(),
            "gemm_strided: only f32 and f64 are supported"
        );
        if m != 0 && n != 0 && k != 0 {
            assert!(span("lhs", m, k, lhs_rs, lhs_cs) <= lhs.len(), "gemm_strided: lhs slice too short");
            assert!(span("rhs", k, n, rhs_rs, rhs_cs) <= rhs.len(), "gemm_strided: rhs slice too short");
        }
        Operands { m, n, k, lhs: lhs.as_ptr(), lhs_rs, lhs_cs, rhs: rhs.as_ptr(), rhs_rs, rhs_cs }
    }

    /// `dst = (accumulate ? dst : 0) + beta·lhs·rhs`, writing every element of the m×n
    /// row-major `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of m×n elements (and reads, when accumulating: then
    /// initialised), and must not overlap the operands.
    unsafe fn run(&self, dst: *mut T, accumulate: bool, beta: T, par: Parallelism) {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                for i in 0..m * n {
                    // SAFETY: i < m·n, inside `dst` (caller).
                    unsafe { dst.add(i).write(T::zero()) };
                }
            }
            return;
        }
        // Blocks of whole columns (at least 16 wide), else of whole rows, one per thread.
        // gemm computes dstᵀ = rhsᵀ·lhsᵀ and packs whatever is not stored the way its kernel
        // reads it: a column-strided lhs (a transposed view, as in a weight gradient gᵀ·x) is
        // packed whole by every column block, so such products split their rows instead, and
        // each block packs only its own rows. On mlp_train_step_large's weight gradients that
        // halves the packing buffers (two 516 KiB → two 258 KiB) and runs faster.
        let threads = match par {
            Parallelism::Rayon(t) => t.max(1),
            _ => 1,
        };
        let rows_first = self.lhs_cs != 1 && self.rhs_cs == 1 && m >= 32;
        // Blocks are multiples of 16 wide; a remainder narrower than that joins the last block
        // (a one-row block would take gemm's matrix-vector path, whose sums differ in the last
        // bit from the full product's).
        let split = |len: usize| {
            let size = len.div_ceil(threads).next_multiple_of(16).min(len);
            (size, (len / size).max(1))
        };
        let ((cols, col_blocks), (rows, row_blocks)) = if n >= 32 && !rows_first {
            (split(n), (m, 1))
        } else if m >= 32 {
            ((n, 1), split(m))
        } else {
            ((n, 1), (m, 1))
        };
        let blocks = col_blocks * row_blocks;
        if threads == 1 || blocks == 1 {
            // SAFETY: forwarded.
            return unsafe { self.block(dst, accumulate, beta, 0, m, 0, n) };
        }
        let out = Dst(dst);
        let out = &out;
        crate::team::for_each(blocks, &|b| {
            // Exactly one of the two counts exceeds 1; the last block runs to the end.
            let (bi, bj) = (b % row_blocks, b % col_blocks);
            let (i0, j0) = (bi * rows, bj * cols);
            let mb = if bi + 1 == row_blocks { m - i0 } else { rows };
            let nb = if bj + 1 == col_blocks { n - j0 } else { cols };
            // SAFETY: the blocks are disjoint sets of elements of `dst`.
            unsafe { self.block(out.0, accumulate, beta, i0, mb, j0, nb) };
        });
    }

    /// Rows `i0..i0+mb`, columns `j0..j0+nb` of the product, on the calling thread.
    ///
    /// # Safety
    /// As [`Operands::run`], for that block of `dst`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(&self, dst: *mut T, accumulate: bool, beta: T, i0: usize, mb: usize, j0: usize, nb: usize) {
        let n_stride = isize::try_from(self.n).expect("gemm_strided: n overflows isize");
        // gemm copies a row-strided rhs (a transposed view: a linear layer's x·Wᵀ) into a packed
        // panel of all `nb` columns over its whole depth block, a fresh allocation per call.
        // With few rows to amortise it over (k ≥ 8·m: a small batch), the panel outweighs the
        // product's output and input, so such products run as several products over slices of
        // k, each adding into dst, deep enough that a block of up to 128 columns packs at most
        // PANEL_BYTES (mlp_train_step's first layer: two blocks of 128 weight rows at once held
        // 2·200 KiB; now 2·100 KiB, for about 5% more time). Larger batches keep gemm's depth:
        // re-reading their output per slice cost mlp_train_step_large 10%. A handful of rows
        // (batch 1) takes gemm's matrix-vector paths, which pack nothing. The slices depend on
        // the whole product only, so every thread count adds in the same order.
        let size = std::mem::size_of::<T>();
        let small_batch = self.rhs_cs != 1 && self.k >= 8 * self.m && self.m > MR_MAX;
        let depth = if small_batch { (PANEL_BYTES / (self.n.min(128) * size)).max(128) } else { self.k };
        let depth = self.k.div_ceil(self.k.div_ceil(depth)); // even slices
        for p0 in (0..self.k).step_by(depth) {
            let kp = depth.min(self.k - p0);
            // SAFETY: T is f32 or f64 (checked in `Operands::checked`), the only types gemm is
            // asked to handle here. The block's elements of `dst` (offsets i·n + j) lie inside
            // the m×n destination (caller). Every element gemm reads from `lhs` (offsets i·lhs_rs
            // + p·lhs_cs, i0 ≤ i < i0 + mb, p0 ≤ p < p0 + kp ≤ k) and `rhs` (p·rhs_rs + j·rhs_cs,
            // j0 ≤ j < j0 + nb) lies within the operand slices: strides are non-negative and the
            // largest offset + 1 (`span`) was checked against the slice lengths. m, n, kp are
            // non-zero. With read_dst = false (the first slice, not accumulating) gemm never
            // reads dst; later slices read what the earlier ones wrote. alpha only scales dst;
            // beta scales the product.
            unsafe {
                gemm::gemm(
                    mb,
                    nb,
                    kp,
                    dst.add(i0 * self.n + j0),
                    1,
                    n_stride,
                    accumulate || p0 > 0,
                    self.lhs.offset(i0 as isize * self.lhs_rs + p0 as isize * self.lhs_cs),
                    self.lhs_cs,
                    self.lhs_rs,
                    self.rhs.offset(j0 as isize * self.rhs_cs + p0 as isize * self.rhs_rs),
                    self.rhs_cs,
                    self.rhs_rs,
                    T::one(),
                    beta,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
    }
}

/// One product's geometry: sizes and the element strides of the (possibly transposed) operands.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    m: usize,
    n: usize,
    k: usize,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs_rs: isize,
    rhs_cs: isize,
}

impl Geometry {
    /// op(a) (m×k) times op(b) (k×n), each a row-major stored matrix read transposed through
    /// its strides when asked.
    fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Geometry {
        let (lhs_rs, lhs_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
        let (rhs_rs, rhs_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
        Geometry { m, n, k, lhs_rs, lhs_cs, rhs_rs, rhs_cs }
    }
}

/// Element offsets of each output batch entry's `a` and `b` matrices, in row-major order of the
/// broadcast batch shape. `sa`/`sb` are batch strides counted in whole matrices.
fn batch_offsets(batch: &[usize], sa: &[usize], a_mat: usize, sb: &[usize], b_mat: usize) -> Vec<(usize, usize)> {
    let nb = numel(batch);
    let mut out = Vec::with_capacity(nb);
    let mut idx: Dims = smallvec::smallvec![0; batch.len()];
    let (mut oa, mut ob) = (0usize, 0usize);
    for _ in 0..nb {
        out.push((oa * a_mat, ob * b_mat));
        // Odometer increment over the batch dims, innermost fastest.
        for d in (0..batch.len()).rev() {
            idx[d] += 1;
            oa += sa[d];
            ob += sb[d];
            if idx[d] < batch[d] {
                break;
            }
            oa -= sa[d] * batch[d];
            ob -= sb[d] * batch[d];
            idx[d] = 0;
        }
    }
    out
}

/// Runs every product of the batch into a fresh output (`offsets.len()` m×n matrices).
fn batched<T: 'static + Copy + Send + Sync + Zero + One>(
    a: &[T],
    b: &[T],
    g: &Geometry,
    offsets: &[(usize, usize)],
) -> Vec<T> {
    let mat = g.m * g.n;
    let total = offsets.len() * mat;
    let mut out: Vec<T> = Vec::with_capacity(total);
    if mat == 0 {
        return out;
    }
    let run = |dst: &mut [MaybeUninit<T>], (oa, ob): (usize, usize), par: Parallelism| {
        gemm_strided_uninit(g.m, g.n, g.k, dst, &a[oa..], g.lhs_rs, g.lhs_cs, &b[ob..], g.rhs_rs, g.rhs_cs, par);
    };
    let spare = &mut out.spare_capacity_mut()[..total];
    match schedule(offsets.len(), g.m.saturating_mul(g.n).saturating_mul(g.k)) {
        Schedule::Serial(par) => {
            for (dst, &off) in spare.chunks_mut(mat).zip(offsets) {
                run(dst, off, par);
            }
        }
        Schedule::Batch => {
            crate::team::for_each_item_mut(spare, mat, &|k, dst| run(dst, offsets[k], Parallelism::None));
        }
    }
    // SAFETY: every product wrote all of its m×n chunk (`gemm_strided_uninit`), and the chunks
    // cover the first `total` elements.
    unsafe { out.set_len(total) };
    out
}

/// Batched matmul with optional transposes and NumPy batch broadcasting.
///
/// `a`: `[..., m, k]` (or `[..., k, m]` when `trans_a`), `b`: `[..., k, n]` (or `[..., n, k]`
/// when `trans_b`); both rank >= 2. Returns shape `[broadcast(batch_a, batch_b)..., m, n]`.
/// f32 and f64 (both operands the same dtype). Transposes are read through strides, never
/// copied; a batched `a` times an unbatched `b` (a linear layer) is folded into one big product.
pub fn matmul(a: &Buffer, b: &Buffer, trans_a: bool, trans_b: bool) -> Buffer {
    let (sa, sb) = (a.shape(), b.shape());
    let (ra, rb) = (sa.len(), sb.len());
    assert!(
        ra >= 2 && rb >= 2,
        "matmul kernel: operands must have rank >= 2, got {} and {}",
        ShapeDisplay(sa),
        ShapeDisplay(sb)
    );
    assert_eq!(a.dtype(), b.dtype(), "matmul kernel: operand dtypes differ");
    let (m, k) = if trans_a { (sa[ra - 1], sa[ra - 2]) } else { (sa[ra - 2], sa[ra - 1]) };
    let (kb, n) = if trans_b { (sb[rb - 1], sb[rb - 2]) } else { (sb[rb - 2], sb[rb - 1]) };
    assert_eq!(
        k,
        kb,
        "matmul kernel: inner dimensions differ for {} (trans {}) and {} (trans {})",
        ShapeDisplay(sa),
        trans_a,
        ShapeDisplay(sb),
        trans_b
    );
    let (batch_a, batch_b) = (&sa[..ra - 2], &sb[..rb - 2]);
    let batch = broadcast_shapes("matmul", batch_a, batch_b).unwrap_or_else(|e| panic!("{e}"));
    let mut out_shape = batch.clone();
    out_shape.push(m);
    out_shape.push(n);
    let nb = numel(&batch);

    let mut g = Geometry::new(m, n, k, trans_a, trans_b);

    let offsets = if nb > 1 && !trans_a && numel(batch_a) == nb && numel(batch_b) == 1 {
        // Every a-matrix is distinct and stacked contiguously, b is shared, and the output is
        // stacked the same way: one [nb*m, k] x [k, n] product does the whole batch.
        g.m = nb * m;
        vec![(0, 0)]
    } else {
        batch_offsets(&batch, &broadcast_strides(batch_a, &batch), m * k, &broadcast_strides(batch_b, &batch), k * n)
    };

    crate::dispatch!(float, a.data(), "matmul", |av: T| {
        let bv = b.as_slice::<T>();
        Buffer::from_vec(batched::<T>(av, bv, &g, &offsets), &out_shape)
    })
}

/// `dst += beta · op(a)·op(b)` in place, for 2-D `a` and `b` (transposes read through
/// strides) and a row-major m×n `dst` of their dtype: an SGD step `p −= lr·(gᵀx)` without
/// the gradient ever being materialized. The product is accumulated in gemm's registers and
/// added to `dst` once per block of the inner dimension.
///
/// # Panics
/// If an operand is not 2-D, the dtypes differ or are not float, or the sizes do not agree.
pub fn matmul_accumulate(dst: &mut Data, a: &Buffer, b: &Buffer, trans_a: bool, trans_b: bool, beta: f64) {
    let (sa, sb) = (a.shape(), b.shape());
    assert!(
        sa.len() == 2 && sb.len() == 2,
        "matmul_accumulate: operands must be 2-D, got {} and {}",
        ShapeDisplay(sa),
        ShapeDisplay(sb)
    );
    let (m, k) = if trans_a { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (kb, n) = if trans_b { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    assert_eq!(k, kb, "matmul_accumulate: inner dimensions differ ({} and {})", ShapeDisplay(sa), ShapeDisplay(sb));
    let g = Geometry::new(m, n, k, trans_a, trans_b);
    let par = gemm_parallelism(m, n, k);
    let (lr, lc, rr, rc) = (g.lhs_rs, g.lhs_cs, g.rhs_rs, g.rhs_cs);
    match (dst, a.data(), b.data()) {
        (Data::F32(d), Data::F32(x), Data::F32(y)) => {
            gemm_strided_scaled(m, n, k, d, true, x, lr, lc, y, rr, rc, beta as f32, par)
        }
        (Data::F64(d), Data::F64(x), Data::F64(y)) => {
            gemm_strided_scaled(m, n, k, d, true, x, lr, lc, y, rr, rc, beta, par)
        }
        (d, x, y) => {
            panic!("matmul_accumulate: needs one float dtype, got {} += {} x {}", d.dtype(), x.dtype(), y.dtype())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) from a 64-bit LCG.
    fn lcg(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn buf64(seed: u64, shape: &[usize]) -> Buffer {
        Buffer::from_vec(lcg(seed, numel(shape)), shape)
    }

    /// Straightforward reference: index every operand element by its broadcast batch index.
    fn naive(a: &[f64], sa: &[usize], b: &[f64], sb: &[usize], ta: bool, tb: bool) -> (Vec<f64>, Vec<usize>) {
        let (ra, rb) = (sa.len(), sb.len());
        let (m, k) = if ta { (sa[ra - 1], sa[ra - 2]) } else { (sa[ra - 2], sa[ra - 1]) };
        let n = if tb { sb[rb - 2] } else { sb[rb - 1] };
        let (ba, bb) = (&sa[..ra - 2], &sb[..rb - 2]);
        let rank = ba.len().max(bb.len());
        let pad = |s: &[usize]| -> Vec<usize> {
            let mut v = vec![1; rank - s.len()];
            v.extend_from_slice(s);
            v
        };
        let (pa, pb) = (pad(ba), pad(bb));
        let batch: Vec<usize> = (0..rank).map(|i| if pa[i] == 1 { pb[i] } else { pa[i] }).collect();
        let nb: usize = batch.iter().product();
        let mut out = crate::buffer::vec_or_panic(nb * m * n, 0.0);
        for bi in 0..nb {
            // Unravel bi, then ravel into a's and b's batch with broadcasting.
            let mut rem = bi;
            let mut idx = vec![0; rank];
            for d in (0..rank).rev() {
                idx[d] = rem % batch[d];
                rem /= batch[d];
            }
            let (mut ia, mut ib) = (0, 0);
            for d in 0..rank {
                ia = ia * pa[d] + if pa[d] == 1 { 0 } else { idx[d] };
                ib = ib * pb[d] + if pb[d] == 1 { 0 } else { idx[d] };
            }
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0;
                    for p in 0..k {
                        let av = if ta { a[ia * m * k + p * m + i] } else { a[ia * m * k + i * k + p] };
                        let bv = if tb { b[ib * k * n + j * k + p] } else { b[ib * k * n + p * n + j] };
                        acc += av * bv;
                    }
                    out[bi * m * n + i * n + j] = acc;
                }
            }
        }
        let mut shape = batch;
        shape.push(m);
        shape.push(n);
        (out, shape)
    }

    fn check(sa: &[usize], sb: &[usize], ta: bool, tb: bool, expect_shape: Option<&[usize]>) {
        let (a, b) = (buf64(sa.iter().sum::<usize>() as u64, sa), buf64(7 + sb.len() as u64, sb));
        let (want, want_shape) = naive(a.as_slice(), sa, b.as_slice(), sb, ta, tb);
        if let Some(s) = expect_shape {
            assert_eq!(want_shape, s);
        }
        let got = matmul(&a, &b, ta, tb);
        assert_eq!(got.shape(), want_shape.as_slice(), "{sa:?} x {sb:?} ta={ta} tb={tb}");
        for (i, (g, w)) in got.as_slice::<f64>().iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-10 * (1.0 + w.abs()), "{sa:?}x{sb:?} ta={ta} tb={tb} [{i}]: {g} vs {w}");
        }
        // f32 too, against the f64 reference.
        let got32 = matmul(&a.cast(crate::dtype::DType::F32), &b.cast(crate::dtype::DType::F32), ta, tb);
        assert_eq!(got32.shape(), want_shape.as_slice());
        for (g, w) in got32.as_slice::<f32>().iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "f32 {sa:?}x{sb:?}: {g} vs {w}");
        }
    }

    #[test]
    fn all_transpose_combinations() {
        for ta in [false, true] {
            for tb in [false, true] {
                let sa: &[usize] = if ta { &[4, 3] } else { &[3, 4] };
                let sb: &[usize] = if tb { &[5, 4] } else { &[4, 5] };
                check(sa, sb, ta, tb, Some(&[3, 5]));
                // Batched, same batch shape on both sides.
                let sa: &[usize] = if ta { &[2, 4, 3] } else { &[2, 3, 4] };
                let sb: &[usize] = if tb { &[2, 5, 4] } else { &[2, 4, 5] };
                check(sa, sb, ta, tb, Some(&[2, 3, 5]));
            }
        }
    }

    #[test]
    fn accumulate_adds_the_scaled_product_in_place() {
        // Sizes past gemm's threading threshold too, so the column-block split accumulates.
        for (m, n, k) in [(3, 5, 4), (96, 200, 64)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let sa: Vec<usize> = if ta { vec![k, m] } else { vec![m, k] };
                    let sb: Vec<usize> = if tb { vec![n, k] } else { vec![k, n] };
                    let (a, b) = (buf64(m as u64 + 3, &sa), buf64(n as u64 + 11, &sb));
                    let (prod, _) = naive(a.as_slice(), &sa, b.as_slice(), &sb, ta, tb);
                    let p0 = lcg(5, m * n);
                    let mut d = Data::F64(p0.clone());
                    matmul_accumulate(&mut d, &a, &b, ta, tb, -0.25);
                    let Data::F64(got) = d else { unreachable!() };
                    for i in 0..m * n {
                        let want = p0[i] - 0.25 * prod[i];
                        assert!((got[i] - want).abs() <= 1e-12 * (1.0 + want.abs()), "{m}x{n}x{k} {ta} {tb} [{i}]");
                    }
                    let mut d32 = Data::F32(p0.iter().map(|&x| x as f32).collect());
                    let (a32, b32) = (a.cast(crate::dtype::DType::F32), b.cast(crate::dtype::DType::F32));
                    matmul_accumulate(&mut d32, &a32, &b32, ta, tb, -0.25);
                    let Data::F32(got) = d32 else { unreachable!() };
                    for i in 0..m * n {
                        let want = p0[i] - 0.25 * prod[i];
                        assert!((got[i] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "f32 [{i}]");
                    }
                }
            }
        }
    }

    #[test]
    fn batch_broadcasting() {
        check(&[2, 1, 3, 4], &[5, 4, 2], false, false, Some(&[2, 5, 3, 2]));
        check(&[2, 1, 4, 3], &[5, 2, 4], true, true, Some(&[2, 5, 3, 2]));
        // Unbatched lhs against a batched rhs, and the folded linear-layer path both ways.
        check(&[3, 4], &[6, 4, 2], false, false, Some(&[6, 3, 2]));
        check(&[2, 3, 3, 4], &[4, 5], false, false, Some(&[2, 3, 3, 5]));
        check(&[2, 3, 3, 4], &[5, 4], false, true, Some(&[2, 3, 3, 5]));
        check(&[2, 3, 4, 3], &[1, 4, 5], true, false, Some(&[2, 3, 3, 5]));
        check(&[2, 1, 3, 4], &[1, 3, 4, 2], false, false, Some(&[2, 3, 3, 2]));
    }

    #[test]
    fn degenerate_sizes() {
        check(&[2, 0], &[0, 3], false, false, Some(&[2, 3]));
        check(&[0, 4], &[4, 3], false, false, Some(&[0, 3]));
        check(&[2, 4], &[4, 0], false, false, Some(&[2, 0]));
        check(&[0, 2, 4], &[4, 3], false, false, Some(&[0, 2, 3]));
        check(&[1, 1], &[1, 1], true, true, Some(&[1, 1]));
    }

    #[test]
    fn large_products_use_threaded_paths() {
        // One big product (gemm threads inside), for every transpose combination.
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let sa: &[usize] = if ta { &[130, 120] } else { &[120, 130] };
            let sb: &[usize] = if tb { &[110, 130] } else { &[130, 110] };
            check(sa, sb, ta, tb, Some(&[120, 110]));
        }
        // Many medium products (parallel over the batch), with broadcasting.
        check(&[40, 1, 24, 20], &[3, 20, 24], false, false, Some(&[40, 3, 24, 24]));
        // A few big products.
        check(&[2, 100, 90], &[2, 80, 90], false, true, Some(&[2, 100, 80]));
    }

    #[test]
    fn gemm_strided_accumulates_and_reads_strides() {
        // lhs is the transpose of a stored 3x2 matrix; rhs reads every other column of a 2x6 one.
        let lhs = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]; // stored [3,2]; op(lhs) = [[1,3,5],[2,4,6]]
        let rhs = lcg(3, 18); // stored [3,6]; op(rhs)(p, j) = rhs[p*6 + 2*j], 3x3
        let mut dst = vec![1.0f64; 6];
        gemm_strided(2, 3, 3, &mut dst, true, &lhs, 1, 2, &rhs, 6, 2, Parallelism::None);
        for i in 0..2 {
            for j in 0..3 {
                let want: f64 = 1.0 + (0..3).map(|p| lhs[p * 2 + i] * rhs[p * 6 + 2 * j]).sum::<f64>();
                assert!((dst[i * 3 + j] - want).abs() < 1e-12);
            }
        }
        let before = dst.clone();
        gemm_strided(2, 3, 0, &mut dst, true, &[], 0, 0, &[], 0, 0, Parallelism::None);
        assert_eq!(dst, before);
        gemm_strided(2, 3, 0, &mut dst, false, &[], 0, 0, &[], 0, 0, Parallelism::None);
        assert_eq!(dst, vec![0.0; 6]);
    }

    #[test]
    fn small_batch_products_slice_their_depth_alike_on_any_thread_count() {
        // x·Wᵀ with 20 rows and 700-deep rows of W: gemm would pack whole 128-column panels, so
        // the product runs as slices of k (f64: 128 deep, six slices).
        let (m, n, k) = (20, 200, 700);
        let x = lcg(1, m * k);
        let w = lcg(2, n * k); // stored n×k, read transposed
        let mut want = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
            }
        }
        let mut one = vec![0.0f64; m * n];
        gemm_strided(m, n, k, &mut one, false, &x, k as isize, 1, &w, 1, k as isize, Parallelism::None);
        for (a, b) in one.iter().zip(&want) {
            assert!((a - b).abs() < 1e-11 * (1.0 + b.abs()), "{a} vs {b}");
        }
        for threads in [2, 3] {
            let mut many = vec![0.0f64; m * n];
            let par = Parallelism::Rayon(threads);
            gemm_strided(m, n, k, &mut many, false, &x, k as isize, 1, &w, 1, k as isize, par);
            assert_eq!(many, one, "{threads} threads");
        }
    }

    #[test]
    fn threaded_blocks_match_one_thread() {
        // Column blocks (n ≥ 32), row blocks (narrow outputs, and transposed lhs), uneven last
        // blocks, both lhs layouts, accumulation, and the uninitialised-destination entry point.
        for &(m, n, k) in &[(64, 100, 37), (100, 10, 23), (33, 33, 5), (7, 200, 64), (50, 1, 9)] {
            for transposed in [true, false] {
                // Stored k×m and read transposed, or stored m×k.
                let lhs = lcg(m as u64, m * k);
                let (lrs, lcs) = if transposed { (1, m as isize) } else { (k as isize, 1) };
                let rhs = lcg(n as u64 + 1, k * n);
                let init = lcg(7, m * n);
                let mut one = init.clone();
                gemm_strided(m, n, k, &mut one, true, &lhs, lrs, lcs, &rhs, n as isize, 1, Parallelism::None);
                let what = format!("{m}×{n}×{k}, lhs transposed: {transposed}");
                for threads in [2, 3, 4] {
                    let mut many = init.clone();
                    let par = Parallelism::Rayon(threads);
                    gemm_strided(m, n, k, &mut many, true, &lhs, lrs, lcs, &rhs, n as isize, 1, par);
                    assert_eq!(many, one, "{what} on {threads} threads, accumulating");
                    let mut fresh = vec![MaybeUninit::<f64>::uninit(); m * n];
                    gemm_strided_uninit(m, n, k, &mut fresh, &lhs, lrs, lcs, &rhs, n as isize, 1, par);
                    // SAFETY: gemm_strided_uninit wrote every element.
                    let fresh: Vec<f64> = fresh.into_iter().map(|v| unsafe { v.assume_init() }).collect();
                    for ((f, o), i) in fresh.iter().zip(&one).zip(&init) {
                        assert!((f + i - o).abs() < 1e-12, "{what} on {threads} threads, fresh");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "rhs slice too short")]
    fn gemm_strided_checks_bounds() {
        let mut dst = vec![0.0f32; 4];
        gemm_strided(2, 2, 2, &mut dst, false, &[1.0; 4], 2, 1, &[1.0; 3], 2, 1, Parallelism::None);
    }

    #[test]
    fn parallelism_heuristic() {
        assert!(matches!(gemm_parallelism(8, 8, 8), Parallelism::None));
        let threads = rayon::current_num_threads();
        if threads > 1 {
            assert!(matches!(gemm_parallelism(1024, 1024, 1024), Parallelism::Rayon(t) if t == threads));
            assert!(matches!(schedule(64, 32 * 32 * 32), Schedule::Batch));
            assert!(matches!(schedule(1, 1 << 30), Schedule::Serial(Parallelism::Rayon(_))));
        }
        assert!(matches!(schedule(4, 8), Schedule::Serial(Parallelism::None)));
    }
}
