//! 2-D convolution and pooling kernels (NCHW layout), with their gradients.
//!
//! Assumes contiguous row-major f32 or f64 [`Buffer`]s whose shapes the op's shape rule has
//! already validated: convolutions take `x: [N, C, H, W]` and `w: [O, C, kh, kw]` (groups = 1,
//! dilation = 1, zero padding); pooling takes `[..., H, W]` (usually `[N, C, H, W]`) and works
//! plane by plane. Output sizes follow PyTorch with `ceil_mode = false`:
//! `OH = (H + 2*pad - kh) / stride + 1`.
//!
//! Convolution is im2col + gemm per sample: `y[n] = W[O, C*kh*kw] · col(x[n])[C*kh*kw, OH*OW]`
//! (a 1×1, stride-1, unpadded kernel skips im2col and multiplies `x[n]` directly). The gradient
//! w.r.t. the input is `col2im(Wᵀ · g[n])`, the one w.r.t. the weight is `Σₙ g[n] · col(x[n])ᵀ`
//! reduced from per-thread partial sums in a fixed order. Samples run in parallel on rayon
//! with single-threaded gemms, or one after another with gemm's threads when there are only a
//! few large samples (see [`super::matmul`]'s scheduling).

use crate::buffer::Buffer;
use crate::kernels::matmul::{gemm_strided, schedule, Schedule};
use crate::team;
use gemm::Parallelism;
use num_traits::Float;
use std::ops::AddAssign;

/// The element types these kernels run on (f32 and f64).
trait ConvFloat: Float + AddAssign + Send + Sync + 'static {}
impl<T: Float + AddAssign + Send + Sync + 'static> ConvFloat for T {}

/// Output elements × window size below which pooling stays on the calling thread.
const POOL_PAR_THRESHOLD: usize = 1 << 15;

/// Output length along one axis (PyTorch, `ceil_mode = false`).
fn out_len(input: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    assert!(kernel > 0 && stride > 0, "conv/pool kernel: kernel and stride must be positive");
    assert!(
        input + 2 * pad >= kernel,
        "conv/pool kernel: padded input ({} + 2*{}) is smaller than the kernel ({})",
        input,
        pad,
        kernel
    );
    (input + 2 * pad - kernel) / stride + 1
}

/// The outputs `o < out` whose tap `o*stride + koff - pad` lands inside `0..input`, as `lo..hi`.
fn valid_range(out: usize, input: usize, koff: usize, stride: usize, pad: usize) -> (usize, usize) {
    let lo = if pad > koff { (pad - koff).div_ceil(stride) } else { 0 };
    let hi = if input + pad > koff { (input + pad - koff - 1) / stride + 1 } else { 0 };
    let lo = lo.min(out);
    (lo, hi.min(out).max(lo))
}

/// Geometry of one convolution sample.
#[derive(Clone, Copy, Debug)]
struct Conv {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
}

impl Conv {
    fn new(chw: [usize; 3], kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Conv {
        let [c, h, w] = chw;
        Conv {
            c,
            h,
            w,
            kh: kernel[0],
            kw: kernel[1],
            sh: stride[0],
            sw: stride[1],
            ph: padding[0],
            pw: padding[1],
            oh: out_len(h, kernel[0], stride[0], padding[0]),
            ow: out_len(w, kernel[1], stride[1], padding[1]),
        }
    }

    /// Rows of the im2col matrix: C*kh*kw.
    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of the im2col matrix: OH*OW.
    fn l(&self) -> usize {
        self.oh * self.ow
    }

    /// Elements of one input sample: C*H*W.
    fn chw(&self) -> usize {
        self.c * self.h * self.w
    }

    /// A 1×1, stride-1, unpadded kernel, whose im2col matrix is the input itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }

    /// Fills the `kh*kw` im2col rows `[kh*kw, OH*OW]` of one input channel `xc: [H, W]`.
    fn im2col_channel<T: ConvFloat>(&self, xc: &[T], col: &mut [T]) {
        let (l, ow) = (self.l(), self.ow);
        for ki in 0..self.kh {
            let (oh_lo, oh_hi) = valid_range(self.oh, self.h, ki, self.sh, self.ph);
            for kj in 0..self.kw {
                let (ow_lo, ow_hi) = valid_range(self.ow, self.w, kj, self.sw, self.pw);
                let row = &mut col[(ki * self.kw + kj) * l..][..l];
                row[..oh_lo * ow].fill(T::zero());
                row[oh_hi * ow..].fill(T::zero());
                for oh in oh_lo..oh_hi {
                    let dst = &mut row[oh * ow..][..ow];
                    dst[..ow_lo].fill(T::zero());
                    dst[ow_hi..].fill(T::zero());
                    if ow_hi == ow_lo {
                        continue;
                    }
                    let ih = oh * self.sh + ki - self.ph;
                    let iw0 = ow_lo * self.sw + kj - self.pw;
                    let src = &xc[ih * self.w + iw0..(ih + 1) * self.w];
                    let dst = &mut dst[ow_lo..ow_hi];
                    if self.sw == 1 {
                        dst.copy_from_slice(&src[..dst.len()]);
                    } else {
                        for (d, s) in dst.iter_mut().zip(src.iter().step_by(self.sw)) {
                            *d = *s;
                        }
                    }
                }
            }
        }
    }

    /// Adds the `kh*kw` im2col rows of one channel back into its input-gradient plane `dxc`.
    fn col2im_channel<T: ConvFloat>(&self, col: &[T], dxc: &mut [T]) {
        let (l, ow) = (self.l(), self.ow);
        for ki in 0..self.kh {
            let (oh_lo, oh_hi) = valid_range(self.oh, self.h, ki, self.sh, self.ph);
            for kj in 0..self.kw {
                let (ow_lo, ow_hi) = valid_range(self.ow, self.w, kj, self.sw, self.pw);
                if ow_hi == ow_lo {
                    continue;
                }
                let row = &col[(ki * self.kw + kj) * l..][..l];
                for oh in oh_lo..oh_hi {
                    let ih = oh * self.sh + ki - self.ph;
                    let iw0 = ow_lo * self.sw + kj - self.pw;
                    let dst = &mut dxc[ih * self.w + iw0..(ih + 1) * self.w];
                    let src = &row[oh * ow + ow_lo..oh * ow + ow_hi];
                    for (d, s) in dst.iter_mut().step_by(self.sw).zip(src) {
                        *d += *s;
                    }
                }
            }
        }
    }

    /// im2col of one sample `x: [C, H, W]` into `col: [C*kh*kw, OH*OW]`, over channels in
    /// parallel when `wide`.
    fn im2col<T: ConvFloat>(&self, x: &[T], col: &mut [T], wide: bool) {
        let (plane, rows) = (self.h * self.w, self.kh * self.kw * self.l());
        if plane == 0 || rows == 0 {
            col.fill(T::zero());
        } else if wide {
            team::for_each_item_mut(col, rows, &|c, cc| self.im2col_channel(&x[c * plane..(c + 1) * plane], cc));
        } else {
            col.chunks_mut(rows).zip(x.chunks(plane)).for_each(|(cc, xc)| self.im2col_channel(xc, cc));
        }
    }

    /// col2im of `col: [C*kh*kw, OH*OW]` added into one zeroed sample gradient `dx: [C, H, W]`.
    fn col2im<T: ConvFloat>(&self, col: &[T], dx: &mut [T], wide: bool) {
        let (plane, rows) = (self.h * self.w, self.kh * self.kw * self.l());
        if plane == 0 || rows == 0 {
        } else if wide {
            team::for_each_item_mut(dx, plane, &|c, dc| self.col2im_channel(&col[c * rows..(c + 1) * rows], dc));
        } else {
            dx.chunks_mut(plane).zip(col.chunks(rows)).for_each(|(dc, cc)| self.col2im_channel(cc, dc));
        }
    }
}

/// Whether a gemm parallelism asks for threads (then im2col/col2im go wide too).
fn is_wide(par: Parallelism) -> bool {
    !matches!(par, Parallelism::None)
}

/// Reads `[N, C, H, W]` and `[O, C, kh, kw]`, checking the channel counts agree.
fn conv_dims(x: &[usize], w: &[usize]) -> (usize, usize, [usize; 3], [usize; 2]) {
    assert!(x.len() == 4 && w.len() == 4, "conv2d kernel: expected 4-d input and weight, got {x:?} and {w:?}");
    assert_eq!(x[1], w[1], "conv2d kernel: input has {} channels but weight expects {}", x[1], w[1]);
    (x[0], w[0], [x[1], x[2], x[3]], [w[2], w[3]])
}

fn conv2d_typed<T: ConvFloat>(x: &[T], w: &[T], n: usize, o: usize, g: &Conv) -> Vec<T> {
    let (ckk, l, chw) = (g.ckk(), g.l(), g.chw());
    let mut y = crate::buffer::vec_or_panic(n * o * l, T::zero());
    if y.is_empty() || ckk == 0 {
        return y;
    }
    // y[n] (O×L) = W (O×CKK, row-major) · col (CKK×L, row-major).
    let sample = |xn: &[T], yn: &mut [T], col: &mut Vec<T>, par: Parallelism| {
        let src: &[T] = if g.is_pointwise() {
            xn
        } else {
            col.resize(ckk * l, T::zero());
            g.im2col(xn, col, is_wide(par));
            col
        };
        gemm_strided(o, l, ckk, yn, false, w, ckk as isize, 1, src, l as isize, 1, par);
    };
    match schedule(n, o * l * ckk) {
        Schedule::Serial(par) => {
            let mut col = Vec::new();
            for (yn, xn) in y.chunks_mut(o * l).zip(x.chunks(chw)) {
                sample(xn, yn, &mut col, par);
            }
        }
        Schedule::Batch => {
            per_sample_tasks(&mut y, o * l, n, &|s, yn, col| {
                sample(&x[s * chw..(s + 1) * chw], yn, col, Parallelism::None)
            });
        }
    }
    y
}

fn conv2d_grad_input_typed<T: ConvFloat>(gy: &[T], w: &[T], n: usize, o: usize, g: &Conv) -> Vec<T> {
    let (ckk, l, chw) = (g.ckk(), g.l(), g.chw());
    let mut dx = crate::buffer::vec_or_panic(n * chw, T::zero());
    if dx.is_empty() || l == 0 || o == 0 {
        return dx;
    }
    // col = Wᵀ (CKK×O: element (i, p) = w[p*CKK + i]) · g[n] (O×L), then col2im.
    let sample = |gn: &[T], dxn: &mut [T], col: &mut Vec<T>, par: Parallelism| {
        if g.is_pointwise() {
            gemm_strided(ckk, l, o, dxn, false, w, 1, ckk as isize, gn, l as isize, 1, par);
        } else {
            col.resize(ckk * l, T::zero());
            gemm_strided(ckk, l, o, col, false, w, 1, ckk as isize, gn, l as isize, 1, par);
            g.col2im(col, dxn, is_wide(par));
        }
    };
    match schedule(n, o * l * ckk) {
        Schedule::Serial(par) => {
            let mut col = Vec::new();
            for (dxn, gn) in dx.chunks_mut(chw).zip(gy.chunks(o * l)) {
                sample(gn, dxn, &mut col, par);
            }
        }
        Schedule::Batch => {
            per_sample_tasks(&mut dx, chw, n, &|s, dxn, col| {
                sample(&gy[s * o * l..(s + 1) * o * l], dxn, col, Parallelism::None)
            });
        }
    }
    dx
}

fn conv2d_grad_weight_typed<T: ConvFloat>(x: &[T], gy: &[T], n: usize, o: usize, g: &Conv) -> Vec<T> {
    let (ckk, l, chw) = (g.ckk(), g.l(), g.chw());
    let mut dw = crate::buffer::vec_or_panic(o * ckk, T::zero());
    if dw.is_empty() || n == 0 || l == 0 {
        return dw;
    }
    // dW (O×CKK) += g[n] (O×L) · col(x[n])ᵀ (L×CKK: element (p, j) = col[j*L + p]).
    let accumulate = |range: std::ops::Range<usize>, dw: &mut [T], col: &mut Vec<T>, par: Parallelism| {
        for s in range {
            let xn = &x[s * chw..][..chw];
            let gn = &gy[s * o * l..][..o * l];
            let src: &[T] = if g.is_pointwise() {
                xn
            } else {
                col.resize(ckk * l, T::zero());
                g.im2col(xn, col, is_wide(par));
                col
            };
            gemm_strided(o, ckk, l, dw, true, gn, l as isize, 1, src, 1, l as isize, par);
        }
    };
    match schedule(n, o * l * ckk) {
        Schedule::Serial(par) => accumulate(0..n, &mut dw, &mut Vec::new(), par),
        Schedule::Batch => {
            // Contiguous sample ranges, one partial sum each, added up in range order so the
            // result does not depend on which thread finished first.
            let chunk = n.div_ceil(rayon::current_num_threads().min(n));
            let mut partials: Vec<Vec<T>> = vec![Vec::new(); n.div_ceil(chunk)];
            team::for_each_item_mut(&mut partials, 1, &|ci, part| {
                let part = &mut part[0];
                *part = crate::buffer::vec_or_panic(o * ckk, T::zero());
                accumulate(ci * chunk..((ci + 1) * chunk).min(n), part, &mut Vec::new(), Parallelism::None);
            });
            for part in &partials {
                for (d, p) in dw.iter_mut().zip(part) {
                    *d += *p;
                }
            }
        }
    }
    dw
}

/// 2-D convolution: `x: [N, C, H, W]`, `w: [O, C, kh, kw]` → `[N, O, OH, OW]` (no bias).
pub fn conv2d(x: &Buffer, w: &Buffer, stride: [usize; 2], padding: [usize; 2]) -> Buffer {
    assert_eq!(x.dtype(), w.dtype(), "conv2d kernel: input and weight dtypes differ");
    let (n, o, chw, khw) = conv_dims(x.shape(), w.shape());
    let g = Conv::new(chw, khw, stride, padding);
    crate::dispatch!(float, x.data(), "conv2d", |xv: T| {
        let y = conv2d_typed::<T>(xv, w.as_slice::<T>(), n, o, &g);
        Buffer::from_vec(y, &[n, o, g.oh, g.ow])
    })
}

/// Gradient of [`conv2d`] w.r.t. its input: `g: [N, O, OH, OW]`, `w: [O, C, kh, kw]` →
/// `[N, C, H, W]` with `[H, W] = input_hw` (needed because strided convolutions lose it).
pub fn conv2d_grad_input(
    g: &Buffer,
    w: &Buffer,
    input_hw: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Buffer {
    assert_eq!(g.dtype(), w.dtype(), "conv2d_grad_input kernel: gradient and weight dtypes differ");
    let (gs, ws) = (g.shape(), w.shape());
    assert!(gs.len() == 4 && ws.len() == 4, "conv2d_grad_input kernel: expected 4-d gradient and weight");
    assert_eq!(gs[1], ws[0], "conv2d_grad_input kernel: gradient channels do not match the weight");
    let (n, o, c) = (gs[0], ws[0], ws[1]);
    let geo = Conv::new([c, input_hw[0], input_hw[1]], [ws[2], ws[3]], stride, padding);
    assert_eq!(&gs[2..], &[geo.oh, geo.ow], "conv2d_grad_input kernel: gradient spatial size mismatch");
    crate::dispatch!(float, g.data(), "conv2d_grad_input", |gv: T| {
        let dx = conv2d_grad_input_typed::<T>(gv, w.as_slice::<T>(), n, o, &geo);
        Buffer::from_vec(dx, &[n, c, input_hw[0], input_hw[1]])
    })
}

/// Gradient of [`conv2d`] w.r.t. its weight: `x: [N, C, H, W]`, `g: [N, O, OH, OW]` →
/// `[O, C, kh, kw]` with `[kh, kw] = kernel_hw`, summed over the batch.
pub fn conv2d_grad_weight(
    x: &Buffer,
    g: &Buffer,
    kernel_hw: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Buffer {
    assert_eq!(x.dtype(), g.dtype(), "conv2d_grad_weight kernel: input and gradient dtypes differ");
    let (xs, gs) = (x.shape(), g.shape());
    assert!(xs.len() == 4 && gs.len() == 4, "conv2d_grad_weight kernel: expected 4-d input and gradient");
    assert_eq!(xs[0], gs[0], "conv2d_grad_weight kernel: batch sizes differ");
    let (n, o, c) = (xs[0], gs[1], xs[1]);
    let geo = Conv::new([c, xs[2], xs[3]], kernel_hw, stride, padding);
    assert_eq!(&gs[2..], &[geo.oh, geo.ow], "conv2d_grad_weight kernel: gradient spatial size mismatch");
    crate::dispatch!(float, x.data(), "conv2d_grad_weight", |xv: T| {
        let dw = conv2d_grad_weight_typed::<T>(xv, g.as_slice::<T>(), n, o, &geo);
        Buffer::from_vec(dw, &[o, c, kernel_hw[0], kernel_hw[1]])
    })
}

// ---------------------------------------------------------------------------------------------
// Pooling
// ---------------------------------------------------------------------------------------------

/// Geometry of pooling over `planes` independent `[H, W]` planes, with each output row's and
/// column's clipped input window precomputed.
struct Pool {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    /// Window area (the `count_include_pad` divisor).
    area: usize,
    /// In-bounds input rows `lo..hi` of each output row.
    rows: Vec<(usize, usize)>,
    /// In-bounds input columns `lo..hi` of each output column.
    cols: Vec<(usize, usize)>,
}

/// In-bounds input indices of each output position along one axis.
fn windows(out: usize, input: usize, kernel: usize, stride: usize, pad: usize) -> Vec<(usize, usize)> {
    (0..out)
        .map(|o| {
            let start = o * stride;
            let hi = (start + kernel).saturating_sub(pad).min(input);
            (start.saturating_sub(pad).min(hi), hi)
        })
        .collect()
}

impl Pool {
    fn new(shape: &[usize], kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Pool {
        let r = shape.len();
        assert!(r >= 2, "pool kernel: expected at least a 2-d input, got {shape:?}");
        let (h, w) = (shape[r - 2], shape[r - 1]);
        let oh = out_len(h, kernel[0], stride[0], padding[0]);
        let ow = out_len(w, kernel[1], stride[1], padding[1]);
        Pool {
            planes: shape[..r - 2].iter().product(),
            h,
            w,
            oh,
            ow,
            area: kernel[0] * kernel[1],
            rows: windows(oh, h, kernel[0], stride[0], padding[0]),
            cols: windows(ow, w, kernel[1], stride[1], padding[1]),
        }
    }

    fn out_shape(&self, shape: &[usize]) -> Vec<usize> {
        let mut s = shape[..shape.len() - 2].to_vec();
        s.extend([self.oh, self.ow]);
        s
    }

    fn in_plane(&self) -> usize {
        self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }

    /// Whether the job is big enough to spread planes over rayon.
    fn wide(&self) -> bool {
        self.planes > 1 && self.planes.saturating_mul(self.out_plane()).saturating_mul(self.area) >= POOL_PAR_THRESHOLD
    }

    /// The averaging divisor of the window at `(rows, cols)`.
    fn divisor(&self, (hs, he): (usize, usize), (ws, we): (usize, usize), count_include_pad: bool) -> usize {
        if count_include_pad {
            self.area
        } else {
            ((he - hs) * (we - ws)).max(1)
        }
    }

    /// Runs `f(plane_index, plane)` over consecutive `plane_len` chunks of `dst`.
    fn for_each_plane<T: Send>(&self, dst: &mut [T], plane_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        if plane_len == 0 {
            return;
        }
        if self.wide() {
            team::for_each_item_mut(dst, plane_len, &f);
        } else {
            dst.chunks_mut(plane_len).enumerate().for_each(|(i, d)| f(i, d));
        }
    }
}

/// Maximum of one window of plane `x` and the plane index it was taken from, or `None` for a
/// window entirely in the padding. As PyTorch: ties keep the first element in row-major window
/// order, a NaN wins over any number, and an all `-inf` window reports its first element.
fn window_max<T: ConvFloat>(
    x: &[T],
    w: usize,
    (hs, he): (usize, usize),
    (ws, we): (usize, usize),
) -> Option<(T, usize)> {
    if hs == he || ws == we {
        return None;
    }
    let mut best = T::neg_infinity();
    let mut idx = hs * w + ws;
    for ih in hs..he {
        for (iw, &v) in x[ih * w + ws..ih * w + we].iter().enumerate() {
            if v > best || v.is_nan() {
                best = v;
                idx = ih * w + ws + iw;
            }
        }
    }
    Some((best, idx))
}

/// [`window_max`] of the unclipped 2×2 window whose top-left element is `xp[i0]`, in the same
/// row-major order, with the same tie and NaN rules.
#[inline(always)]
fn max_2x2<T: ConvFloat>(xp: &[T], w: usize, i0: usize) -> (T, usize) {
    let (mut best, mut idx) = (xp[i0], i0);
    for k in [i0 + 1, i0 + w, i0 + w + 1] {
        let v = xp[k];
        if v > best || v.is_nan() {
            best = v;
            idx = k;
        }
    }
    (best, idx)
}

impl Pool {
    /// Whether every window is a whole 2×2 block at stride 2 (kernel 2, stride 2, no padding
    /// reaching a window): the common CNN pooling, which gets a loop without window bounds.
    fn is_2x2_stride_2(&self) -> bool {
        let whole = |ws: &[(usize, usize)]| ws.iter().enumerate().all(|(o, &(lo, hi))| lo == 2 * o && hi == 2 * o + 2);
        whole(&self.rows) && whole(&self.cols)
    }
}

fn max_pool_typed<T: ConvFloat>(p: &Pool, x: &[T]) -> Vec<T> {
    let mut y = crate::buffer::vec_or_panic(p.planes * p.out_plane(), T::zero());
    if p.is_2x2_stride_2() {
        p.for_each_plane(&mut y, p.out_plane(), |i, yp| {
            let xp = &x[i * p.in_plane()..][..p.in_plane()];
            for (oh, yr) in yp.chunks_exact_mut(p.ow).enumerate() {
                for (ow, y) in yr.iter_mut().enumerate() {
                    *y = max_2x2(xp, p.w, 2 * oh * p.w + 2 * ow).0;
                }
            }
        });
        return y;
    }
    p.for_each_plane(&mut y, p.out_plane(), |i, yp| {
        let xp = &x[i * p.in_plane()..][..p.in_plane()];
        for (oh, &rows) in p.rows.iter().enumerate() {
            for (ow, &cols) in p.cols.iter().enumerate() {
                yp[oh * p.ow + ow] = window_max(xp, p.w, rows, cols).map_or(T::neg_infinity(), |(v, _)| v);
            }
        }
    });
    y
}

fn max_pool_grad_typed<T: ConvFloat>(p: &Pool, x: &[T], g: &[T]) -> Vec<T> {
    let mut dx = crate::buffer::vec_or_panic(p.planes * p.in_plane(), T::zero());
    if p.is_2x2_stride_2() {
        p.for_each_plane(&mut dx, p.in_plane(), |i, dxp| {
            let xp = &x[i * p.in_plane()..][..p.in_plane()];
            let gp = &g[i * p.out_plane()..][..p.out_plane()];
            for (oh, gr) in gp.chunks_exact(p.ow).enumerate() {
                for (ow, &gv) in gr.iter().enumerate() {
                    dxp[max_2x2(xp, p.w, 2 * oh * p.w + 2 * ow).1] += gv;
                }
            }
        });
        return dx;
    }
    p.for_each_plane(&mut dx, p.in_plane(), |i, dxp| {
        let xp = &x[i * p.in_plane()..][..p.in_plane()];
        let gp = &g[i * p.out_plane()..][..p.out_plane()];
        for (oh, &rows) in p.rows.iter().enumerate() {
            for (ow, &cols) in p.cols.iter().enumerate() {
                if let Some((_, idx)) = window_max(xp, p.w, rows, cols) {
                    dxp[idx] += gp[oh * p.ow + ow];
                }
            }
        }
    });
    dx
}

/// The averaging divisor as `T`.
fn as_real<T: ConvFloat>(n: usize) -> T {
    <T as num_traits::NumCast>::from(n).expect("a window size is representable as a float")
}

fn avg_pool_typed<T: ConvFloat>(p: &Pool, x: &[T], count_include_pad: bool) -> Vec<T> {
    let mut y = crate::buffer::vec_or_panic(p.planes * p.out_plane(), T::zero());
    p.for_each_plane(&mut y, p.out_plane(), |i, yp| {
        let xp = &x[i * p.in_plane()..][..p.in_plane()];
        for (oh, &(hs, he)) in p.rows.iter().enumerate() {
            for (ow, &(ws, we)) in p.cols.iter().enumerate() {
                let mut sum = T::zero();
                for ih in hs..he {
                    for &v in &xp[ih * p.w + ws..ih * p.w + we] {
                        sum += v;
                    }
                }
                let div = p.divisor((hs, he), (ws, we), count_include_pad);
                yp[oh * p.ow + ow] = sum / as_real::<T>(div);
            }
        }
    });
    y
}

fn avg_pool_grad_typed<T: ConvFloat>(p: &Pool, g: &[T], count_include_pad: bool) -> Vec<T> {
    let mut dx = crate::buffer::vec_or_panic(p.planes * p.in_plane(), T::zero());
    p.for_each_plane(&mut dx, p.in_plane(), |i, dxp| {
        let gp = &g[i * p.out_plane()..][..p.out_plane()];
        for (oh, &(hs, he)) in p.rows.iter().enumerate() {
            for (ow, &(ws, we)) in p.cols.iter().enumerate() {
                let div = p.divisor((hs, he), (ws, we), count_include_pad);
                let share = gp[oh * p.ow + ow] / as_real::<T>(div);
                for ih in hs..he {
                    for d in &mut dxp[ih * p.w + ws..ih * p.w + we] {
                        *d += share;
                    }
                }
            }
        }
    });
    dx
}

/// Max pooling over the last two dims (`[..., H, W]` → `[..., OH, OW]`); padding acts as -inf.
/// A NaN in a window makes its output NaN, as in PyTorch.
pub fn max_pool2d(x: &Buffer, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Buffer {
    let p = Pool::new(x.shape(), kernel, stride, padding);
    crate::dispatch!(float, x.data(), "max_pool2d", |xv: T| {
        Buffer::from_vec(max_pool_typed::<T>(&p, xv), &p.out_shape(x.shape()))
    })
}

/// Gradient of [`max_pool2d`] w.r.t. `x`: each output gradient goes to the (first, in row-major
/// window order, as PyTorch) argmax position of its window; overlapping windows accumulate.
pub fn max_pool2d_grad(x: &Buffer, g: &Buffer, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Buffer {
    assert_eq!(x.dtype(), g.dtype(), "max_pool2d_grad kernel: input and gradient dtypes differ");
    let p = Pool::new(x.shape(), kernel, stride, padding);
    assert_eq!(g.shape(), p.out_shape(x.shape()).as_slice(), "max_pool2d_grad kernel: gradient shape mismatch");
    crate::dispatch!(float, x.data(), "max_pool2d_grad", |xv: T| {
        Buffer::from_vec(max_pool_grad_typed::<T>(&p, xv, g.as_slice::<T>()), x.shape())
    })
}

/// Average pooling over the last two dims with PyTorch's defaults (`ceil_mode = false`):
/// the divisor is `kh*kw` when `count_include_pad`, else the number of in-bounds elements.
pub fn avg_pool2d(
    x: &Buffer,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    count_include_pad: bool,
) -> Buffer {
    let p = Pool::new(x.shape(), kernel, stride, padding);
    crate::dispatch!(float, x.data(), "avg_pool2d", |xv: T| {
        Buffer::from_vec(avg_pool_typed::<T>(&p, xv, count_include_pad), &p.out_shape(x.shape()))
    })
}

/// Gradient of [`avg_pool2d`] w.r.t. its input of shape `input_shape`: each output gradient is
/// spread evenly (divided by the same divisor as the forward pass) over its window's in-bounds
/// elements.
pub fn avg_pool2d_grad(
    g: &Buffer,
    input_shape: &[usize],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    count_include_pad: bool,
) -> Buffer {
    let p = Pool::new(input_shape, kernel, stride, padding);
    assert_eq!(g.shape(), p.out_shape(input_shape).as_slice(), "avg_pool2d_grad kernel: gradient shape mismatch");
    crate::dispatch!(float, g.data(), "avg_pool2d_grad", |gv: T| {
        Buffer::from_vec(avg_pool_grad_typed::<T>(&p, gv, count_include_pad), input_shape)
    })
}

/// One sample's work: `(sample index, its output, im2col scratch)`.
type SampleFn<'a, T> = dyn Fn(usize, &mut [T], &mut Vec<T>) + Sync + 'a;

/// `sample(s, out_s, col)` for every sample `s < n` of `out` (`per` elements each), in
/// parallel over the team: a few samples per task, each task with its own im2col scratch.
fn per_sample_tasks<T: Send>(out: &mut [T], per: usize, n: usize, sample: &SampleFn<'_, T>) {
    let per_task = n.div_ceil(rayon::current_num_threads() * 4).max(1);
    team::for_each_chunk_mut(out, per * per_task, &|t, block| {
        let mut col = Vec::new();
        for (k, item) in block.chunks_mut(per).enumerate() {
            sample(t * per_task + k, item, &mut col);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    /// The 2×2 stride-2 loops against the general window walk, on values with ties, NaNs and
    /// -inf, and on odd sizes (the last row and column are dropped, as floor mode does).
    #[test]
    fn max_pool_2x2_fast_path_matches_the_window_walk() {
        for (h, w) in [(28, 28), (7, 9), (2, 2), (5, 4)] {
            let shape = [3, 2, h, w];
            let n: usize = shape.iter().product();
            let x: Vec<f32> = lcg(h as u64 * 31 + w as u64, n)
                .iter()
                .enumerate()
                .map(|(i, &v)| match i % 11 {
                    3 => f32::NAN,
                    5 => f32::NEG_INFINITY,
                    7 => 0.5,
                    _ => (v * 4.0).round() as f32 * 0.25,
                })
                .collect();
            let g: Vec<f32> = lcg(7, n / 4 + 1).iter().map(|&v| v as f32).collect();
            let p = Pool::new(&shape, [2, 2], [2, 2], [0, 0]);
            assert!(p.is_2x2_stride_2());
            let (mut y, mut dx) = (Vec::new(), vec![0.0f32; n]);
            for i in 0..p.planes {
                let xp = &x[i * p.in_plane()..][..p.in_plane()];
                for (oh, &rows) in p.rows.iter().enumerate() {
                    for (ow, &cols) in p.cols.iter().enumerate() {
                        let (v, idx) = window_max(xp, p.w, rows, cols).unwrap();
                        y.push(v);
                        dx[i * p.in_plane() + idx] += g[i * p.out_plane() + oh * p.ow + ow];
                    }
                }
            }
            let fast = max_pool_typed(&p, &x);
            assert_eq!(fast.len(), y.len());
            for (a, b) in fast.iter().zip(&y) {
                assert!(a == b || (a.is_nan() && b.is_nan()), "max_pool {h}x{w}: {a} vs {b}");
            }
            let g = &g[..p.planes * p.out_plane()];
            assert_eq!(max_pool_grad_typed(&p, &x, g), dx, "max_pool grad {h}x{w}");
        }
        // A padded or overlapping pool takes the window walk.
        assert!(!Pool::new(&[1, 1, 6, 6], [2, 2], [2, 2], [1, 1]).is_2x2_stride_2());
        assert!(!Pool::new(&[1, 1, 6, 6], [3, 3], [2, 2], [0, 0]).is_2x2_stride_2());
        assert!(!Pool::new(&[1, 1, 6, 6], [2, 2], [1, 1], [0, 0]).is_2x2_stride_2());
    }

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

    fn buf(seed: u64, shape: &[usize]) -> Buffer {
        Buffer::from_vec(lcg(seed, shape.iter().product()), shape)
    }

    fn dot(a: &Buffer, b: &Buffer) -> f64 {
        assert_eq!(a.shape(), b.shape());
        a.as_slice::<f64>().iter().zip(b.as_slice::<f64>()).map(|(x, y)| x * y).sum()
    }

    fn assert_close(got: &Buffer, want: &[f64], tol: f64, what: &str) {
        let got = got.to_f64_vec();
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
        }
    }

    /// Shapes of one naive convolution problem.
    #[derive(Clone, Copy, Debug)]
    struct P {
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        o: usize,
        kh: usize,
        kw: usize,
        s: [usize; 2],
        p: [usize; 2],
    }

    impl P {
        fn ohw(&self) -> (usize, usize) {
            ((self.h + 2 * self.p[0] - self.kh) / self.s[0] + 1, (self.w + 2 * self.p[1] - self.kw) / self.s[1] + 1)
        }

        /// Calls `f(x_index, w_index, y_index)` for every in-bounds multiply of the convolution.
        fn taps(&self, mut f: impl FnMut(usize, usize, usize)) {
            let (oh, ow) = self.ohw();
            for n in 0..self.n {
                for o in 0..self.o {
                    for y in 0..oh {
                        for x in 0..ow {
                            for c in 0..self.c {
                                for i in 0..self.kh {
                                    for j in 0..self.kw {
                                        let ih = (y * self.s[0] + i) as isize - self.p[0] as isize;
                                        let iw = (x * self.s[1] + j) as isize - self.p[1] as isize;
                                        if ih < 0 || iw < 0 || ih >= self.h as isize || iw >= self.w as isize {
                                            continue;
                                        }
                                        let xi = ((n * self.c + c) * self.h + ih as usize) * self.w + iw as usize;
                                        let wi = ((o * self.c + c) * self.kh + i) * self.kw + j;
                                        let yi = ((n * self.o + o) * oh + y) * ow + x;
                                        f(xi, wi, yi);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn check_conv(p: P) {
        let (oh, ow) = p.ohw();
        let x = buf(1 + p.h as u64, &[p.n, p.c, p.h, p.w]);
        let w = buf(2 + p.kw as u64, &[p.o, p.c, p.kh, p.kw]);
        let g = buf(3, &[p.n, p.o, oh, ow]);
        let (xv, wv, gv) = (x.as_slice::<f64>(), w.as_slice::<f64>(), g.as_slice::<f64>());
        let (mut y, mut dx, mut dw) = (vec![0.0; g.numel()], vec![0.0; x.numel()], vec![0.0; w.numel()]);
        p.taps(|xi, wi, yi| {
            y[yi] += xv[xi] * wv[wi];
            dx[xi] += wv[wi] * gv[yi];
            dw[wi] += xv[xi] * gv[yi];
        });

        let got_y = conv2d(&x, &w, p.s, p.p);
        assert_eq!(got_y.shape(), &[p.n, p.o, oh, ow]);
        assert_close(&got_y, &y, 1e-10, &format!("conv2d {p:?}"));
        let got_dx = conv2d_grad_input(&g, &w, [p.h, p.w], p.s, p.p);
        assert_eq!(got_dx.shape(), x.shape());
        assert_close(&got_dx, &dx, 1e-10, &format!("conv2d_grad_input {p:?}"));
        let got_dw = conv2d_grad_weight(&x, &g, [p.kh, p.kw], p.s, p.p);
        assert_eq!(got_dw.shape(), w.shape());
        assert_close(&got_dw, &dw, 1e-10, &format!("conv2d_grad_weight {p:?}"));

        // Adjoint identities: <conv(x,w), g> = <x, dx(g,w)> = <w, dw(x,g)>.
        let (a, b, c) = (dot(&got_y, &g), dot(&x, &got_dx), dot(&w, &got_dw));
        let scale = a.abs().max(1e-3);
        assert!((a - b).abs() <= 1e-4 * scale && (a - c).abs() <= 1e-4 * scale, "adjoint {p:?}: {a} {b} {c}");

        // f32 agrees with the f64 reference.
        let (x32, w32, g32) = (x.cast(DType::F32), w.cast(DType::F32), g.cast(DType::F32));
        let y32 = conv2d(&x32, &w32, p.s, p.p);
        assert_eq!(y32.dtype(), DType::F32);
        assert_close(&y32, &y, 1e-4, "conv2d f32");
        assert_close(&conv2d_grad_input(&g32, &w32, [p.h, p.w], p.s, p.p), &dx, 1e-4, "grad_input f32");
        assert_close(&conv2d_grad_weight(&x32, &g32, [p.kh, p.kw], p.s, p.p), &dw, 1e-4, "grad_weight f32");
    }

    #[test]
    fn conv_matches_naive() {
        let base = P { n: 2, c: 3, h: 7, w: 6, o: 4, kh: 3, kw: 3, s: [1, 1], p: [0, 0] };
        check_conv(base);
        check_conv(P { s: [2, 2], p: [1, 1], ..base });
        check_conv(P { kh: 2, kw: 3, s: [2, 1], p: [1, 0], ..base });
        check_conv(P { kh: 3, kw: 1, s: [1, 3], p: [0, 1], h: 5, w: 8, ..base });
        check_conv(P { kh: 1, kw: 1, ..base }); // pointwise fast path
        check_conv(P { kh: 1, kw: 1, s: [2, 2], ..base });
        check_conv(P { kh: 5, kw: 4, s: [3, 2], p: [2, 2], h: 4, w: 3, ..base }); // kernel ≥ input
        check_conv(P { n: 1, c: 1, o: 1, ..base });
    }

    #[test]
    fn conv_threaded_paths_match_naive() {
        let big = P { n: 1, c: 8, h: 36, w: 34, o: 16, kh: 3, kw: 3, s: [1, 1], p: [1, 1] };
        check_conv(big); // one large sample: gemm + im2col threads
        check_conv(P { n: 5, ..big }); // several large samples: parallel over the batch
        check_conv(P { n: 9, h: 12, w: 10, ..big }); // many small samples
        check_conv(P { n: 3, kh: 1, kw: 1, p: [0, 0], ..big });
    }

    #[test]
    fn conv_empty_shapes() {
        let x = buf(1, &[0, 3, 5, 5]);
        let w = buf(2, &[4, 3, 3, 3]);
        assert_eq!(conv2d(&x, &w, [1, 1], [0, 0]).shape(), &[0, 4, 3, 3]);
        let dw = conv2d_grad_weight(&x, &Buffer::zeros(DType::F64, &[0, 4, 3, 3]), [3, 3], [1, 1], [0, 0]);
        assert_eq!(dw.to_f64_vec(), vec![0.0; 4 * 27]);
        let w0 = buf(2, &[0, 3, 3, 3]);
        let g0 = Buffer::zeros(DType::F64, &[2, 0, 3, 3]);
        assert_eq!(conv2d_grad_input(&g0, &w0, [5, 5], [1, 1], [0, 0]).to_f64_vec(), vec![0.0; 150]);
    }

    /// Naive pooling: window values (row-major, in-bounds only) for each output, per plane.
    fn naive_windows(h: usize, w: usize, k: [usize; 2], s: [usize; 2], p: [usize; 2]) -> Vec<Vec<usize>> {
        let oh = (h + 2 * p[0] - k[0]) / s[0] + 1;
        let ow = (w + 2 * p[1] - k[1]) / s[1] + 1;
        let mut out = Vec::new();
        for y in 0..oh {
            for x in 0..ow {
                let mut idx = Vec::new();
                for i in 0..k[0] {
                    for j in 0..k[1] {
                        let ih = (y * s[0] + i) as isize - p[0] as isize;
                        let iw = (x * s[1] + j) as isize - p[1] as isize;
                        if ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < w {
                            idx.push(ih as usize * w + iw as usize);
                        }
                    }
                }
                out.push(idx);
            }
        }
        out
    }

    fn check_pool(shape: &[usize], k: [usize; 2], s: [usize; 2], p: [usize; 2], x: &Buffer) {
        let r = shape.len();
        let (h, w) = (shape[r - 2], shape[r - 1]);
        let planes: usize = shape[..r - 2].iter().product();
        let wins = naive_windows(h, w, k, s, p);
        let outp = wins.len();
        let g = buf(9, &[planes * outp]);
        let (xv, gv) = (x.to_f64_vec(), g.to_f64_vec());
        let (mut ymax, mut dmax) = (vec![0.0; planes * outp], vec![0.0; planes * h * w]);
        let (mut yavg, mut davg) = (vec![0.0; planes * outp], vec![0.0; planes * h * w]);
        let (mut yavg_ex, mut davg_ex) = (vec![0.0; planes * outp], vec![0.0; planes * h * w]);
        for pl in 0..planes {
            for (oi, win) in wins.iter().enumerate() {
                let (xo, yo) = (pl * h * w, pl * outp + oi);
                // First maximum in row-major window order.
                let mut best = win[0];
                for &i in win {
                    if xv[xo + i] > xv[xo + best] {
                        best = i;
                    }
                }
                ymax[yo] = xv[xo + best];
                dmax[xo + best] += gv[yo];
                let sum: f64 = win.iter().map(|&i| xv[xo + i]).sum();
                let area = (k[0] * k[1]) as f64;
                yavg[yo] = sum / area;
                yavg_ex[yo] = sum / win.len() as f64;
                for &i in win {
                    davg[xo + i] += gv[yo] / area;
                    davg_ex[xo + i] += gv[yo] / win.len() as f64;
                }
            }
        }
        let mut out_shape = shape[..r - 2].to_vec();
        out_shape.extend([(h + 2 * p[0] - k[0]) / s[0] + 1, (w + 2 * p[1] - k[1]) / s[1] + 1]);
        let g = g.reshaped(&out_shape).cast(x.dtype());
        let tol = if x.dtype() == DType::F32 { 1e-5 } else { 1e-12 };
        let what = format!("{shape:?} k={k:?} s={s:?} p={p:?} {}", x.dtype());

        let y = max_pool2d(x, k, s, p);
        assert_eq!(y.shape(), out_shape.as_slice());
        assert_close(&y, &ymax, tol, &format!("max_pool2d {what}"));
        assert_close(&max_pool2d_grad(x, &g, k, s, p), &dmax, tol, &format!("max_pool2d_grad {what}"));
        assert_close(&avg_pool2d(x, k, s, p, true), &yavg, tol, &format!("avg_pool2d {what}"));
        assert_close(&avg_pool2d(x, k, s, p, false), &yavg_ex, tol, &format!("avg_pool2d excl {what}"));
        let da = avg_pool2d_grad(&g, shape, k, s, p, true);
        assert_eq!(da.shape(), shape);
        assert_close(&da, &davg, tol, &format!("avg_pool2d_grad {what}"));
        assert_close(
            &avg_pool2d_grad(&g, shape, k, s, p, false),
            &davg_ex,
            tol,
            &format!("avg_pool2d_grad excl {what}"),
        );
    }

    /// Input shape, kernel, stride, padding.
    type PoolCase = (&'static [usize], [usize; 2], [usize; 2], [usize; 2]);

    #[test]
    fn pooling_matches_naive() {
        let cases: &[PoolCase] = &[
            (&[2, 3, 6, 6], [2, 2], [2, 2], [0, 0]),
            (&[2, 3, 7, 5], [3, 3], [2, 2], [1, 1]),
            (&[1, 2, 5, 8], [2, 3], [1, 2], [1, 1]),
            (&[1, 1, 4, 4], [3, 2], [3, 1], [1, 0]),
            (&[3, 5, 5], [3, 3], [1, 1], [1, 1]),
            (&[4, 8, 20, 20], [3, 3], [2, 2], [1, 1]), // big enough to go parallel
        ];
        for &(shape, k, s, p) in cases {
            let x = buf(shape.iter().sum::<usize>() as u64, shape);
            check_pool(shape, k, s, p, &x);
            check_pool(shape, k, s, p, &x.cast(DType::F32));
            // Heavily tied data: values from {-1, 0, 1}.
            let tied: Vec<f64> = x.to_f64_vec().iter().map(|v| (v * 1.5).round().clamp(-1.0, 1.0)).collect();
            check_pool(shape, k, s, p, &Buffer::from_vec(tied, shape));
        }
    }

    #[test]
    fn max_pool_ties_pick_first_index() {
        let x = Buffer::from_vec(vec![1.0f64; 16], &[1, 1, 4, 4]);
        let g = Buffer::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], &[1, 1, 2, 2]);
        let dx = max_pool2d_grad(&x, &g, [2, 2], [2, 2], [0, 0]);
        #[rustfmt::skip]
        let want = [1.0, 0.0, 2.0, 0.0,
                    0.0, 0.0, 0.0, 0.0,
                    3.0, 0.0, 4.0, 0.0,
                    0.0, 0.0, 0.0, 0.0];
        assert_eq!(dx.to_f64_vec(), want);

        // With padding the first in-bounds element wins (padding is -inf, never an argmax),
        // and overlapping windows accumulate onto a shared argmax.
        let x = Buffer::from_vec(vec![0.0f32; 9], &[1, 1, 3, 3]);
        let g = Buffer::from_vec(vec![1.0f32; 4], &[1, 1, 2, 2]);
        let dx = max_pool2d_grad(&x, &g, [2, 2], [2, 2], [1, 1]);
        assert_eq!(dx.to_f64_vec(), [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        let dx = max_pool2d_grad(&x, &Buffer::from_vec(vec![1.0f32; 9], &[1, 1, 3, 3]), [3, 3], [1, 1], [1, 1]);
        assert_eq!(dx.to_f64_vec(), [4.0, 2.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn max_pool_propagates_nan_and_neg_inf() {
        let x = Buffer::from_vec(vec![1.0f64, f64::NAN, 3.0, 2.0], &[1, 1, 2, 2]);
        assert!(max_pool2d(&x, [2, 2], [2, 2], [0, 0]).item().is_nan());
        let x = Buffer::from_vec(vec![f64::NEG_INFINITY; 4], &[1, 1, 2, 2]);
        assert_eq!(max_pool2d(&x, [2, 2], [2, 2], [0, 0]).item(), f64::NEG_INFINITY);
        let dx = max_pool2d_grad(&x, &Buffer::from_vec(vec![5.0f64], &[1, 1, 1, 1]), [2, 2], [2, 2], [0, 0]);
        assert_eq!(dx.to_f64_vec(), [5.0, 0.0, 0.0, 0.0]);
    }
}
