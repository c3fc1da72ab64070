//! Deterministic image operations on tensors (`torchvision.transforms.functional`).
//!
//! Images are tensors of shape `[..., H, W]`: usually `[C, H, W]` or a batch `[N, C, H, W]`.
//! Every leading dimension is a separate plane, and operations that need a channel index
//! (per-channel means, fill colors) take it from dimension `-3`.
//!
//! The results are new leaf tensors: like torchvision's tensor transforms these are
//! data-pipeline operations, and autograd does not see them (except [`normalize`], which is
//! made of tensor ops).
//!
//! Numerics follow PyTorch's CPU kernels: resizing and rotation compute in f32 for f32 and
//! integer images and in f64 for f64 images, with the same source-index and weight formulas;
//! integer images are rounded (half to even) back to their dtype, as torchvision does.
//!
//! # Panics
//!
//! Misuse (a tensor with fewer than two dimensions, a crop of size zero, a fill list of the
//! wrong length, …) panics with a message naming the operation, as eager tensor ops do.

use std::ops::{Add, Div, Mul, Sub};

use tracegrad_runtime::{dispatch, Buffer, DType, Element};

use crate::tensor::Tensor;

/// How pixels between grid points are computed (`torchvision.transforms.InterpolationMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum InterpolationMode {
    /// PyTorch's `'nearest'`: the source index is `floor(dst · in/out)` for resizing, and the
    /// nearest grid point (ties to even) for rotation.
    Nearest,
    /// Bilinear (`align_corners=False`), optionally antialiased when downscaling.
    #[default]
    Bilinear,
}

/// How [`pad`] fills the border (`padding_mode` of `torchvision.transforms.functional.pad`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PaddingMode {
    /// A constant value (`fill`).
    #[default]
    Constant,
    /// The last value at the edge, repeated.
    Edge,
    /// Reflection without repeating the edge value: `3 2 | 1 2 3 4 | 3 2`.
    Reflect,
    /// Reflection repeating the edge value: `2 1 | 1 2 3 4 | 4 3`.
    Symmetric,
}

/// Padding widths `[left, top, right, bottom]`, as torchvision's `padding` argument.
///
/// Converts from one number (all four sides), `[horizontal, vertical]` (left/right, top/bottom),
/// or `[left, top, right, bottom]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Padding(pub [usize; 4]);

impl From<usize> for Padding {
    fn from(p: usize) -> Padding {
        Padding([p; 4])
    }
}

impl From<[usize; 2]> for Padding {
    fn from([h, v]: [usize; 2]) -> Padding {
        Padding([h, v, h, v])
    }
}

impl From<[usize; 4]> for Padding {
    fn from(p: [usize; 4]) -> Padding {
        Padding(p)
    }
}

/// The leading dimensions and `(H, W)` of an image tensor; panics below two dimensions.
#[track_caller]
pub(crate) fn image_dims(t: &Tensor, op: &str) -> (Vec<usize>, usize, usize) {
    let shape = t.shape();
    let n = shape.len();
    assert!(n >= 2, "{op}: expected an image tensor of shape [..., H, W], got shape {shape:?}");
    (shape[..n - 2].to_vec(), shape[n - 2], shape[n - 1])
}

/// Number of channels of an image: dimension `-3`, or 1 for a `[H, W]` tensor.
fn channels(lead: &[usize]) -> usize {
    lead.last().copied().unwrap_or(1)
}

fn with_hw(lead: &[usize], h: usize, w: usize) -> Vec<usize> {
    let mut s = lead.to_vec();
    s.extend([h, w]);
    s
}

/// Builds an `[..., oh, ow]` image whose pixel `(y, x)` is input pixel `(map_y[y], map_x[x])`,
/// or `fill` where either map is `None`. Works for every dtype; crop, pad, flips and nearest
/// resizing are all this.
fn remap(t: &Tensor, map_y: &[Option<usize>], map_x: &[Option<usize>], fill: f64, op: &str) -> Tensor {
    let (lead, h, w) = image_dims(t, op);
    let planes: usize = lead.iter().product();
    let (oh, ow) = (map_y.len(), map_x.len());
    let buf = t.buffer();
    let out_shape = with_hw(&lead, oh, ow);
    let out = dispatch!(all, buf.data(), |v: T| {
        let fill = T::from_f64(fill);
        let mut out: Vec<T> = Vec::with_capacity(planes * oh * ow);
        for p in 0..planes {
            let plane = &v[p * h * w..(p + 1) * h * w];
            for my in map_y {
                match my {
                    Some(y) => {
                        let row = &plane[y * w..(y + 1) * w];
                        out.extend(map_x.iter().map(|mx| mx.map_or(fill, |x| row[x])));
                    }
                    None => out.extend(std::iter::repeat_n(fill, ow)),
                }
            }
        }
        Buffer::from_vec(out, &out_shape)
    });
    Tensor::from_buffer(out)
}

/// The region `top..top+height`, `left..left+width` (`torchvision.transforms.functional.crop`).
///
/// Offsets may be negative and the region may extend past the image: pixels outside it are
/// zero, as torchvision's tensor `crop` pads.
#[track_caller]
pub fn crop(img: &Tensor, top: i64, left: i64, height: usize, width: usize) -> Tensor {
    let (_, h, w) = image_dims(img, "crop");
    let axis = |start: i64, len: usize, n: usize| -> Vec<Option<usize>> {
        (0..len as i64).map(|i| usize::try_from(start + i).ok().filter(|&s| s < n)).collect()
    };
    remap(img, &axis(top, height, h), &axis(left, width, w), 0.0, "crop")
}

/// The central `height × width` region (`torchvision.transforms.functional.center_crop`).
///
/// Offsets are `round((H - height) / 2)` and `round((W - width) / 2)` with Python's rounding
/// (half to even). Where the crop is larger than the image, the image is first padded with
/// zeros, `(height - H) / 2` rows above (rounded down) and the rest below, and likewise for
/// columns.
#[track_caller]
pub fn center_crop(img: &Tensor, height: usize, width: usize) -> Tensor {
    let (_, h, w) = image_dims(img, "center_crop");
    let offset = |n: usize, c: usize| -> i64 {
        if c > n {
            -(((c - n) / 2) as i64)
        } else {
            ((n - c) as f64 / 2.0).round_ties_even() as i64
        }
    };
    crop(img, offset(h, height), offset(w, width), height, width)
}

/// Pads the last two dimensions (`torchvision.transforms.functional.pad`): `padding` as
/// [`Padding`] (`[left, top, right, bottom]`), `fill` for [`PaddingMode::Constant`].
///
/// Reflections repeat periodically when the padding is wider than the image.
#[track_caller]
pub fn pad(img: &Tensor, padding: impl Into<Padding>, fill: f64, mode: PaddingMode) -> Tensor {
    let Padding([l, t, r, b]) = padding.into();
    let (_, h, w) = image_dims(img, "pad");
    let axis = |before: usize, after: usize, n: usize| -> Vec<Option<usize>> {
        (0..before + n + after)
            .map(|o| {
                let i = o as i64 - before as i64;
                pad_index(i, n as i64, mode)
            })
            .collect()
    };
    remap(img, &axis(t, b, h), &axis(l, r, w), fill, "pad")
}

/// Where padded position `i` (relative to the first real element) reads from, for an axis of
/// length `n`; `None` for a constant fill.
fn pad_index(i: i64, n: i64, mode: PaddingMode) -> Option<usize> {
    if (0..n).contains(&i) {
        return Some(i as usize);
    }
    let j = match mode {
        PaddingMode::Constant => return None,
        _ if n == 0 => return None,
        PaddingMode::Edge => i.clamp(0, n - 1),
        PaddingMode::Reflect if n == 1 => 0,
        PaddingMode::Reflect => {
            let period = 2 * (n - 1);
            let m = i.rem_euclid(period);
            if m >= n {
                period - m
            } else {
                m
            }
        }
        PaddingMode::Symmetric => {
            let period = 2 * n;
            let m = i.rem_euclid(period);
            if m >= n {
                period - 1 - m
            } else {
                m
            }
        }
    };
    Some(j as usize)
}

/// Mirrors left to right (`torchvision.transforms.functional.hflip`).
#[track_caller]
pub fn hflip(img: &Tensor) -> Tensor {
    let (_, h, w) = image_dims(img, "hflip");
    let ys: Vec<Option<usize>> = (0..h).map(Some).collect();
    let xs: Vec<Option<usize>> = (0..w).rev().map(Some).collect();
    remap(img, &ys, &xs, 0.0, "hflip")
}

/// Mirrors top to bottom (`torchvision.transforms.functional.vflip`).
#[track_caller]
pub fn vflip(img: &Tensor) -> Tensor {
    let (_, h, w) = image_dims(img, "vflip");
    let ys: Vec<Option<usize>> = (0..h).rev().map(Some).collect();
    let xs: Vec<Option<usize>> = (0..w).map(Some).collect();
    remap(img, &ys, &xs, 0.0, "vflip")
}

/// `(x - mean[c]) / std[c]` per channel `c` of dimension `-3`
/// (`torchvision.transforms.functional.normalize`).
///
/// `mean` and `std` have one entry, or one per channel, and are converted to the image's dtype
/// first. Made of tensor ops, so gradients flow through it.
///
/// # Panics
///
/// If the image is not a floating-point tensor with at least three dimensions, if the lists
/// have the wrong length, or if a standard deviation is zero after conversion.
#[track_caller]
pub fn normalize(img: &Tensor, mean: &[f64], std: &[f64]) -> Tensor {
    let shape = img.shape();
    assert!(
        shape.len() >= 3,
        "normalize: expected tensor to be a tensor image of size (..., C, H, W), got shape {shape:?}"
    );
    let dtype = img.dtype();
    assert!(dtype.is_float(), "normalize: input tensor should be a float tensor, got {dtype}");
    let c = shape[shape.len() - 3];
    let per_channel = |v: &[f64], what: &str| -> Tensor {
        assert!(
            v.len() == 1 || v.len() == c,
            "normalize: {what} has {} values but the image has {c} channels",
            v.len()
        );
        Tensor::from_buffer(Buffer::from_vec(v.to_vec(), &[v.len(), 1, 1]).cast(dtype))
    };
    let (m, s) = (per_channel(mean, "mean"), per_channel(std, "std"));
    assert!(
        !s.to_vec_f64().contains(&0.0),
        "normalize: std evaluated to zero after conversion to {dtype}, leading to division by zero"
    );
    img.sub(&m).div(&s)
}

/// A `[H, W, C]` (or `[H, W]`) image as `[C, H, W]` (`torchvision.transforms.functional.to_tensor`
/// on an array): `u8` pixels become f32 in `[0, 1]` (divided by 255); other dtypes are only
/// transposed.
#[track_caller]
pub fn to_tensor(pic: &Tensor) -> Tensor {
    let shape = pic.shape();
    let pic = match shape.len() {
        2 => pic.unsqueeze(-1),
        3 => pic.clone(),
        n => panic!("to_tensor: pic should be 2 or 3 dimensional, got {n} dimensions"),
    };
    let chw = Tensor::from_buffer(pic.permute(&[2, 0, 1]).buffer());
    if pic.dtype() == DType::U8 {
        let b = chw.buffer();
        let v: Vec<f32> = b.as_slice::<u8>().iter().map(|&x| x as f32 / 255.0).collect();
        Tensor::from_vec(v, b.shape())
    } else {
        chw
    }
}

/// The output size torchvision's `Resize` picks: `[h, w]` as given, or for a single `size` the
/// smaller edge becomes `size` and the larger keeps the aspect ratio (rounded down), capped at
/// `max_size`.
///
/// # Panics
///
/// If `max_size` is not larger than the requested smaller edge, or `size` has neither one nor
/// two entries.
#[track_caller]
pub fn resized_output_size(image: (usize, usize), size: &[usize], max_size: Option<usize>) -> (usize, usize) {
    let (h, w) = image;
    match *size {
        [s] => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let (mut new_short, mut new_long) = (s, (s as f64 * long as f64 / short as f64) as usize);
            if let Some(max) = max_size {
                assert!(
                    max > s,
                    "resize: max_size = {max} must be strictly greater than the requested size for the smaller edge size = {s}"
                );
                if new_long > max {
                    new_short = (max as f64 * new_short as f64 / new_long as f64) as usize;
                    new_long = max;
                }
            }
            if w <= h {
                (new_long, new_short)
            } else {
                (new_short, new_long)
            }
        }
        [sh, sw] => {
            assert!(
                max_size.is_none(),
                "resize: max_size should only be passed if size specifies the length of the smaller edge"
            );
            (sh, sw)
        }
        _ => panic!("resize: size must have one or two entries, got {}", size.len()),
    }
}

/// Resizes the last two dimensions to `height × width`
/// (`torchvision.transforms.functional.resize` with an explicit size).
///
/// * [`InterpolationMode::Nearest`]: PyTorch's `'nearest'`, source index `floor(dst · in/out)`
///   computed in f32; `antialias` is ignored.
/// * [`InterpolationMode::Bilinear`] without `antialias`: `F.interpolate(mode='bilinear',
///   align_corners=False)`. With `antialias` (torchvision's default), downscaling uses PyTorch's
///   antialiased triangle filter, whose support grows with the scale; upscaling is the same as
///   without.
///
/// Integer images are resized in f32 and rounded back (half to even), as torchvision's generic
/// tensor path does (PyTorch's dedicated `u8` antialiasing kernel, which torchvision may pick
/// for `u8` input, rounds in fixed point and can differ by one level). An image already of the
/// requested size is returned unchanged.
#[track_caller]
pub fn resize(img: &Tensor, height: usize, width: usize, interpolation: InterpolationMode, antialias: bool) -> Tensor {
    let (lead, h, w) = image_dims(img, "resize");
    assert!(height > 0 && width > 0, "resize: output size must be positive, got ({height}, {width})");
    assert!(h > 0 && w > 0, "resize: input size must be positive, got ({h}, {w})");
    if (h, w) == (height, width) {
        return img.clone();
    }
    match interpolation {
        InterpolationMode::Nearest => {
            let idx = |n: usize, o: usize| -> Vec<Option<usize>> {
                (0..o)
                    .map(|i| {
                        Some(if o == n {
                            i
                        } else if o == 2 * n {
                            i >> 1
                        } else {
                            let scale = n as f32 / o as f32;
                            ((i as f32 * scale).floor() as usize).min(n - 1)
                        })
                    })
                    .collect()
            };
            remap(img, &idx(h, height), &idx(w, width), 0.0, "resize")
        }
        InterpolationMode::Bilinear => float_op(img, |planes| {
            let out_shape = with_hw(&lead, height, width);
            match planes {
                Planes::F32(v) => Buffer::from_vec(bilinear(&v, h, w, height, width, antialias), &out_shape),
                Planes::F64(v) => Buffer::from_vec(bilinear(v, h, w, height, width, antialias), &out_shape),
            }
        }),
    }
}

/// The image's values in the dtype a resampling kernel computes in.
enum Planes<'a> {
    F32(std::borrow::Cow<'a, [f32]>),
    F64(&'a [f64]),
}

/// Runs a resampling kernel in f32 (f32 and integer images) or f64, then casts integer
/// results back with rounding.
fn float_op(img: &Tensor, kernel: impl FnOnce(Planes<'_>) -> Buffer) -> Tensor {
    let buf = img.buffer();
    let dtype = buf.dtype();
    let out = match buf.data() {
        tracegrad_runtime::Data::F64(v) => kernel(Planes::F64(v)),
        tracegrad_runtime::Data::F32(v) => kernel(Planes::F32(std::borrow::Cow::Borrowed(v))),
        _ => {
            let f = buf.cast(DType::F32);
            let r = kernel(Planes::F32(std::borrow::Cow::Owned(f.as_slice::<f32>().to_vec())));
            let rounded: Vec<f32> = r.as_slice::<f32>().iter().map(|x| x.round_ties_even()).collect();
            Buffer::from_vec(rounded, r.shape()).cast(dtype)
        }
    };
    Tensor::from_buffer(out)
}

/// The float type a resampling kernel computes in (f32 or f64), with the operations PyTorch's
/// kernels use.
trait Real: Element + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> {
    fn of(v: f64) -> Self;
    fn floor(self) -> Self;
    fn ceil(self) -> Self;
    fn abs(self) -> Self;
    fn round_even(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn of(v: f64) -> Self {
                v as $t
            }
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
            fn ceil(self) -> Self {
                <$t>::ceil(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn round_even(self) -> Self {
                <$t>::round_ties_even(self)
            }
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            fn min(self, o: Self) -> Self {
                <$t>::min(self, o)
            }
        }
    };
}
real!(f32);
real!(f64);

/// One output position of a 2-tap linear interpolation: `(i0, i1, λ0, λ1)`, as PyTorch's
/// `compute_indices_weights_linear` (align_corners=False).
fn linear_taps<R: Real>(n_in: usize, n_out: usize) -> Vec<(usize, usize, R, R)> {
    let scale = R::of(n_in as f64) / R::of(n_out as f64);
    (0..n_out)
        .map(|i| {
            let src = (scale * (R::of(i as f64) + R::of(0.5)) - R::of(0.5)).max(R::of(0.0));
            let i0 = (src.floor().to_f64() as usize).min(n_in - 1);
            let lambda = (src - R::of(i0 as f64)).max(R::of(0.0)).min(R::of(1.0));
            let i1 = i0 + usize::from(i0 < n_in - 1);
            (i0, i1, R::of(1.0) - lambda, lambda)
        })
        .collect()
}

/// One output position of PyTorch's antialiased linear filter (`_upsample_bilinear2d_aa`):
/// the first input index and the normalized weights.
fn aa_taps<R: Real>(n_in: usize, n_out: usize) -> Vec<(usize, Vec<R>)> {
    let scale = R::of(n_in as f64) / R::of(n_out as f64);
    let one = R::of(1.0);
    let (support, invscale) = if scale >= one { (scale, one / scale) } else { (one, one) };
    let max_taps = (support.ceil().to_f64() as usize) * 2 + 1;
    (0..n_out)
        .map(|i| {
            let center = scale * (R::of(i as f64) + R::of(0.5));
            let xmin = (center - support + R::of(0.5)).to_f64().trunc().max(0.0) as usize;
            let xmax = ((center + support + R::of(0.5)).to_f64().trunc() as usize).min(n_in);
            let size = xmax.saturating_sub(xmin).min(max_taps);
            let mut ws: Vec<R> = (0..size)
                .map(|j| {
                    let x = ((R::of((j + xmin) as f64) - center + R::of(0.5)) * invscale).abs();
                    if x < one {
                        one - x
                    } else {
                        R::of(0.0)
                    }
                })
                .collect();
            let total = ws.iter().fold(R::of(0.0), |a, &b| a + b);
            if total != R::of(0.0) {
                for w in &mut ws {
                    *w = *w / total;
                }
            }
            (xmin, ws)
        })
        .collect()
}

/// Bilinear resampling of every `h × w` plane of `v` to `oh × ow`.
fn bilinear<R: Real>(v: &[R], h: usize, w: usize, oh: usize, ow: usize, antialias: bool) -> Vec<R> {
    let planes = v.len() / (h * w);
    if antialias && (oh < h || ow < w) {
        // Separable, as PyTorch's antialiased kernel: along the width, then along the height.
        let tx = aa_taps::<R>(w, ow);
        let ty = aa_taps::<R>(h, oh);
        let mut tmp = Vec::with_capacity(planes * h * ow);
        for row in v.chunks_exact(w) {
            tmp.extend(
                tx.iter().map(|(x0, ws)| ws.iter().zip(&row[*x0..]).fold(R::of(0.0), |a, (&wt, &p)| a + wt * p)),
            );
        }
        let mut out = Vec::with_capacity(planes * oh * ow);
        for plane in tmp.chunks_exact(h * ow) {
            for (y0, ws) in &ty {
                out.extend(
                    (0..ow).map(|x| {
                        ws.iter().enumerate().fold(R::of(0.0), |a, (k, &wt)| a + wt * plane[(y0 + k) * ow + x])
                    }),
                );
            }
        }
        return out;
    }
    let ty = linear_taps::<R>(h, oh);
    let tx = linear_taps::<R>(w, ow);
    let mut out = Vec::with_capacity(planes * oh * ow);
    for plane in v.chunks_exact(h * w) {
        for &(y0, y1, h0, h1) in &ty {
            let (r0, r1) = (&plane[y0 * w..(y0 + 1) * w], &plane[y1 * w..(y1 + 1) * w]);
            out.extend(
                tx.iter().map(|&(x0, x1, w0, w1)| h0 * (w0 * r0[x0] + w1 * r0[x1]) + h1 * (w0 * r1[x0] + w1 * r1[x1])),
            );
        }
    }
    out
}

/// The inverse affine matrix torchvision's `rotate` samples with
/// (`_get_inverse_affine_matrix(center, -angle, [0, 0], 1, [0, 0])`): output pixel offsets from
/// the center map to input offsets by `[m0 m1 m2; m3 m4 m5]`.
fn inverse_rotation(angle: f64, center: [f64; 2]) -> [f64; 6] {
    let rot = (-angle).to_radians();
    let (a, b, c, d) = (rot.cos(), -rot.sin(), rot.sin(), rot.cos());
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    let [cx, cy] = center;
    m[2] += m[0] * -cx + m[1] * -cy;
    m[5] += m[3] * -cx + m[4] * -cy;
    m[2] += cx;
    m[5] += cy;
    m
}

/// The `(width, height)` that holds the whole rotated image (torchvision's
/// `_compute_affine_output_size`, in f32 with its 1e-4 truncation).
fn expanded_size(m: &[f64; 6], w: usize, h: usize) -> (usize, usize) {
    let (hw, hh) = ((0.5 * w as f64) as f32, (0.5 * h as f64) as f32);
    let t: Vec<f32> = m.iter().map(|&x| x as f32).collect();
    let pts = [(-hw, -hh), (-hw, hh), (hw, hh), (hw, -hh)];
    let mut lo = [f32::INFINITY; 2];
    let mut hi = [f32::NEG_INFINITY; 2];
    for (px, py) in pts {
        let q = [px * t[0] + py * t[1] + t[2], px * t[3] + py * t[4] + t[5]];
        for k in 0..2 {
            lo[k] = lo[k].min(q[k]);
            hi[k] = hi[k].max(q[k]);
        }
    }
    let halfs = [hw, hh];
    let (tol, inv_tol) = (1e-4f32, (1.0f64 / 1e-4) as f32);
    let size: Vec<usize> = (0..2)
        .map(|k| {
            let cmax = (((hi[k] + halfs[k]) * inv_tol).trunc() * tol).ceil();
            let cmin = (((lo[k] + halfs[k]) * inv_tol).trunc() * tol).floor();
            (cmax - cmin).max(0.0) as usize
        })
        .collect();
    (size[0], size[1])
}

/// Rotates the last two dimensions by `angle` degrees counter-clockwise about the center
/// (`torchvision.transforms.functional.rotate` with `expand=False` and no `center`).
///
/// `fill`: `None` leaves zeros where the rotated image does not reach (torchvision's
/// `fill=None`). `Some(values)` (one value, or one per channel) is torchvision's fill: the
/// sampling also rotates a mask of ones, and the result is `fill` where that mask is below 0.5
/// (nearest) or `img·mask + (1 − mask)·fill` (bilinear). Note that `Some(&[0.0])` therefore
/// differs from `None` along the border under bilinear interpolation, exactly as in torchvision.
#[track_caller]
pub fn rotate(img: &Tensor, angle: f64, interpolation: InterpolationMode, fill: Option<&[f64]>) -> Tensor {
    rotate_with(img, angle, interpolation, false, None, fill)
}

/// [`rotate`] with torchvision's remaining options: `expand` enlarges the output to hold the
/// whole rotated image, and `center` (`[x, y]` in pixel coordinates, origin at the top-left
/// corner) moves the pivot from the image center.
#[track_caller]
pub fn rotate_with(
    img: &Tensor,
    angle: f64,
    interpolation: InterpolationMode,
    expand: bool,
    center: Option<[f64; 2]>,
    fill: Option<&[f64]>,
) -> Tensor {
    let (lead, h, w) = image_dims(img, "rotate");
    let c = channels(&lead);
    if let Some(f) = fill {
        assert!(
            f.len() == 1 || f.len() == c,
            "rotate: the number of elements in 'fill' does not match the number of channels of the image ({} != {c})",
            f.len()
        );
    }
    let center_f = center.map_or([0.0, 0.0], |[x, y]| [x - w as f64 * 0.5, y - h as f64 * 0.5]);
    let m = inverse_rotation(angle, center_f);
    let (ow, oh) = if expand { expanded_size(&m, w, h) } else { (w, h) };
    let fill: Option<Vec<f64>> = fill.map(|f| (0..c).map(|k| f[if f.len() == 1 { 0 } else { k }]).collect());
    float_op(img, |planes| {
        let out_shape = with_hw(&lead, oh, ow);
        let g = Grid { m: &m, w, h, ow, oh, channels: c, interpolation, fill: fill.as_deref() };
        match planes {
            Planes::F32(v) => Buffer::from_vec(g.sample(&v), &out_shape),
            Planes::F64(v) => Buffer::from_vec(g.sample(v), &out_shape),
        }
    })
}

/// An affine sampling grid: torchvision's `_gen_affine_grid` followed by PyTorch's CPU
/// `grid_sample` (zeros padding, align_corners=False) and torchvision's fill blending.
struct Grid<'a> {
    m: &'a [f64; 6],
    w: usize,
    h: usize,
    ow: usize,
    oh: usize,
    channels: usize,
    interpolation: InterpolationMode,
    fill: Option<&'a [f64]>,
}

impl Grid<'_> {
    fn sample<R: Real>(&self, v: &[R]) -> Vec<R> {
        let (w, h, ow, oh) = (self.w, self.h, self.ow, self.oh);
        let zero = R::of(0.0);
        let one = R::of(1.0);
        // theta^T rescaled by the input half-size, in the image's compute dtype.
        let th: Vec<R> = self.m.iter().map(|&x| R::of(x)).collect();
        let (sw, sh) = (R::of(0.5 * w as f64), R::of(0.5 * h as f64));
        let rt = [[th[0] / sw, th[3] / sh], [th[1] / sw, th[4] / sh], [th[2] / sw, th[5] / sh]];
        // grid_sample's unnormalize: (g + 1) · size/2 − 0.5.
        let (fw, fh) = (R::of(w as f64) / R::of(2.0), R::of(h as f64) / R::of(2.0));
        let half = R::of(0.5);
        // Source coordinates and tap weights per output pixel, shared by all planes.
        let mut taps: Vec<[(Option<usize>, R); 4]> = Vec::with_capacity(oh * ow);
        for i in 0..oh {
            let yb = R::of(-(oh as f64) * 0.5 + 0.5 + i as f64);
            for j in 0..ow {
                let xb = R::of(-(ow as f64) * 0.5 + 0.5 + j as f64);
                let gx = xb * rt[0][0] + yb * rt[1][0] + rt[2][0];
                let gy = xb * rt[0][1] + yb * rt[1][1] + rt[2][1];
                let x = (gx + one) * fw - half;
                let y = (gy + one) * fh - half;
                let at = |yy: R, xx: R| -> Option<usize> {
                    let (xf, yf) = (xx.to_f64(), yy.to_f64());
                    (xf >= 0.0 && yf >= 0.0 && xf < w as f64 && yf < h as f64).then(|| yf as usize * w + xf as usize)
                };
                taps.push(match self.interpolation {
                    InterpolationMode::Nearest => {
                        [(at(y.round_even(), x.round_even()), one), (None, zero), (None, zero), (None, zero)]
                    }
                    InterpolationMode::Bilinear => {
                        let (x_w, y_n) = (x.floor(), y.floor());
                        let (dw, dn) = (x - x_w, y - y_n);
                        let (de, ds) = (one - dw, one - dn);
                        [
                            (at(y_n, x_w), ds * de),
                            (at(y_n, x_w + one), ds * dw),
                            (at(y_n + one, x_w), dn * de),
                            (at(y_n + one, x_w + one), dn * dw),
                        ]
                    }
                });
            }
        }
        let planes = v.len().checked_div(h * w).unwrap_or(0);
        let mut out = Vec::with_capacity(planes * oh * ow);
        for p in 0..planes {
            let plane = &v[p * h * w..(p + 1) * h * w];
            let fill = self.fill.map(|f| R::of(f[p % self.channels]));
            out.extend(taps.iter().map(|t| {
                let (mut val, mut mask) = (zero, zero);
                for &(idx, wt) in t {
                    if let Some(k) = idx {
                        val = val + plane[k] * wt;
                        mask = mask + wt;
                    }
                }
                match (fill, self.interpolation) {
                    (None, _) => val,
                    (Some(f), InterpolationMode::Nearest) => {
                        if mask < half {
                            f
                        } else {
                            val
                        }
                    }
                    (Some(f), InterpolationMode::Bilinear) => val * mask + (one - mask) * f,
                }
            }));
        }
        out
    }
}
