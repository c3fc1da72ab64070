//! Image transforms on tensors (`torchvision.transforms`), composable with [`Compose`].
//!
//! A [`Transform`] maps one tensor to another. Spatial transforms take images of shape
//! `[..., H, W]` (usually `[C, H, W]`); [`ToTensor`] turns the `u8` `[H, W, C]` images that
//! [`ImageFolder`](super::ImageFolder) decodes into f32 `[C, H, W]` in `[0, 1]`. The
//! deterministic operations behind them are in [`functional`].
//!
//! Random transforms draw from their own [`Generator`] when given one
//! ([`seed`](RandomCrop::seed)/[`generator`](RandomCrop::generator)), otherwise from the
//! process-wide default generator ([`manual_seed`](crate::manual_seed)). Either way a seed
//! replays the same choices; the stream is tracegrad's, not PyTorch's.
//!
//! ```
//! use tracegrad::vision::transforms::{CenterCrop, Compose, Normalize, RandomHorizontalFlip, Transform};
//! use tracegrad::Tensor;
//!
//! let t = Compose::new()
//!     .add(CenterCrop::new(4))
//!     .add(RandomHorizontalFlip::new(0.5).seed(0))
//!     .add(Normalize::new(&[0.5, 0.5, 0.5], &[0.25, 0.25, 0.25]));
//! let img = Tensor::rand(&[3, 6, 8]);
//! assert_eq!(t.apply(img).shape(), vec![3, 4, 4]);
//! ```

pub mod functional;

use std::fmt;
use std::sync::{Arc, Mutex};

use tracegrad_runtime::random;

pub use functional::{InterpolationMode, Padding, PaddingMode};

use crate::tensor::{lock, Tensor};
use crate::Generator;

/// One step of a data pipeline: a tensor in, a tensor out (a torchvision transform's
/// `__call__`).
///
/// `Send + Sync` so that a [`Dataset`](crate::data::Dataset) holding transforms can be read by
/// [`DataLoader`](crate::data::DataLoader) worker threads. A closure becomes a transform
/// through [`Lambda`].
pub trait Transform: Send + Sync {
    /// Applies the transform.
    fn apply(&self, t: Tensor) -> Tensor;
}

/// A closure as a transform (`torchvision.transforms.Lambda`).
///
/// ```
/// use tracegrad::vision::transforms::{Lambda, Transform};
/// use tracegrad::Tensor;
///
/// let double = Lambda::new(|t: Tensor| t.mul_scalar(2.0));
/// assert_eq!(double.apply(Tensor::ones(&[2])).to_vec_f32(), vec![2.0, 2.0]);
/// ```
pub struct Lambda<F>(F);

impl<F: Fn(Tensor) -> Tensor + Send + Sync> Lambda<F> {
    /// Wraps `f`.
    pub fn new(f: F) -> Lambda<F> {
        Lambda(f)
    }
}

impl<F: Fn(Tensor) -> Tensor + Send + Sync> Transform for Lambda<F> {
    fn apply(&self, t: Tensor) -> Tensor {
        (self.0)(t)
    }
}

impl<F> fmt::Debug for Lambda<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Lambda")
    }
}

impl<T: Transform + ?Sized> Transform for Box<T> {
    fn apply(&self, t: Tensor) -> Tensor {
        (**self).apply(t)
    }
}

impl<T: Transform + ?Sized> Transform for Arc<T> {
    fn apply(&self, t: Tensor) -> Tensor {
        (**self).apply(t)
    }
}

/// Where a random transform draws from.
enum Source {
    Default,
    Own(Box<Mutex<Generator>>),
}

impl Source {
    fn with<R>(&self, f: impl FnOnce(&mut Generator) -> R) -> R {
        match self {
            Source::Default => random::with_default(f),
            Source::Own(g) => f(&mut lock(g)),
        }
    }

    /// One U[lo, hi) draw.
    fn uniform(&self, lo: f64, hi: f64) -> f64 {
        self.with(|g| g.uniform(1, lo, hi)[0])
    }

    /// One integer in `[0, n)`.
    fn below(&self, n: usize) -> usize {
        self.with(|g| g.randint(1, 0, n as i64)[0] as usize)
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default generator",
            Source::Own(_) => "own generator",
        })
    }
}

macro_rules! seeded {
    ($t:ty) => {
        impl $t {
            /// Draws from a generator seeded with `seed` instead of the default generator.
            pub fn seed(self, seed: u64) -> Self {
                self.generator(Generator::new(seed))
            }

            /// Draws from `generator` (PyTorch's `generator=`) instead of the default generator.
            pub fn generator(mut self, generator: Generator) -> Self {
                self.source = Source::Own(Box::new(Mutex::new(generator)));
                self
            }
        }
    };
}

/// Transforms applied in order (`torchvision.transforms.Compose`).
#[derive(Default)]
pub struct Compose {
    transforms: Vec<Box<dyn Transform>>,
}

impl Compose {
    /// An empty pipeline (the identity); add steps with [`add`](Compose::add).
    pub fn new() -> Compose {
        Compose::default()
    }

    /// Appends a step (builder style).
    #[allow(clippy::should_implement_trait)]
    pub fn add(mut self, t: impl Transform + 'static) -> Compose {
        self.transforms.push(Box::new(t));
        self
    }

    /// A pipeline of already boxed steps.
    pub fn from_boxed(transforms: Vec<Box<dyn Transform>>) -> Compose {
        Compose { transforms }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.transforms.len()
    }

    /// Whether there are no steps.
    pub fn is_empty(&self) -> bool {
        self.transforms.is_empty()
    }
}

impl Transform for Compose {
    fn apply(&self, t: Tensor) -> Tensor {
        self.transforms.iter().fold(t, |t, step| step.apply(t))
    }
}

impl fmt::Debug for Compose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Compose({} transforms)", self.transforms.len())
    }
}

/// `u8` `[H, W, C]` pixels to f32 `[C, H, W]` in `[0, 1]` (`torchvision.transforms.ToTensor`);
/// see [`functional::to_tensor`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ToTensor;

impl Transform for ToTensor {
    fn apply(&self, t: Tensor) -> Tensor {
        functional::to_tensor(&t)
    }
}

/// `(x - mean[c]) / std[c]` per channel (`torchvision.transforms.Normalize`); see
/// [`functional::normalize`].
#[derive(Clone, Debug)]
pub struct Normalize {
    mean: Vec<f64>,
    std: Vec<f64>,
}

impl Normalize {
    /// Per-channel `mean` and `std` (or one value for all channels).
    pub fn new(mean: &[f64], std: &[f64]) -> Normalize {
        Normalize { mean: mean.to_vec(), std: std.to_vec() }
    }
}

impl Transform for Normalize {
    fn apply(&self, t: Tensor) -> Tensor {
        functional::normalize(&t, &self.mean, &self.std)
    }
}

/// Resizes to a fixed size, or the smaller edge to a length (`torchvision.transforms.Resize`);
/// see [`functional::resize`].
///
/// Defaults as torchvision's: bilinear interpolation with antialiasing.
#[derive(Clone, Debug)]
pub struct Resize {
    size: Vec<usize>,
    interpolation: InterpolationMode,
    max_size: Option<usize>,
    antialias: bool,
}

impl Resize {
    /// Resizes to exactly `height × width` (torchvision's `Resize((h, w))`).
    pub fn new(height: usize, width: usize) -> Resize {
        Resize {
            size: vec![height, width],
            interpolation: InterpolationMode::Bilinear,
            max_size: None,
            antialias: true,
        }
    }

    /// Scales the smaller edge to `size`, keeping the aspect ratio (torchvision's
    /// `Resize(size)` with an int).
    pub fn smaller_edge(size: usize) -> Resize {
        Resize { size: vec![size], ..Resize::new(size, size) }
    }

    /// The interpolation (default bilinear).
    pub fn interpolation(mut self, mode: InterpolationMode) -> Resize {
        self.interpolation = mode;
        self
    }

    /// Caps the longer edge (only with [`smaller_edge`](Resize::smaller_edge)).
    pub fn max_size(mut self, max_size: usize) -> Resize {
        self.max_size = Some(max_size);
        self
    }

    /// Whether bilinear downscaling is antialiased (default `true`, as torchvision ≥ 0.17).
    pub fn antialias(mut self, antialias: bool) -> Resize {
        self.antialias = antialias;
        self
    }
}

impl Transform for Resize {
    fn apply(&self, t: Tensor) -> Tensor {
        let (_, h, w) = functional::image_dims(&t, "Resize");
        let (oh, ow) = functional::resized_output_size((h, w), &self.size, self.max_size);
        functional::resize(&t, oh, ow, self.interpolation, self.antialias)
    }
}

/// The central region, zero-padded where the crop is larger than the image
/// (`torchvision.transforms.CenterCrop`); see [`functional::center_crop`].
#[derive(Clone, Copy, Debug)]
pub struct CenterCrop {
    height: usize,
    width: usize,
}

impl CenterCrop {
    /// A `size × size` crop.
    pub fn new(size: usize) -> CenterCrop {
        CenterCrop::rect(size, size)
    }

    /// A `height × width` crop.
    pub fn rect(height: usize, width: usize) -> CenterCrop {
        CenterCrop { height, width }
    }
}

impl Transform for CenterCrop {
    fn apply(&self, t: Tensor) -> Tensor {
        functional::center_crop(&t, self.height, self.width)
    }
}

/// A crop at a random position (`torchvision.transforms.RandomCrop`), after optional padding.
///
/// The image is first padded by `padding` (if set); with `pad_if_needed`, a side shorter than
/// the crop is then padded on both sides by the shortfall. The top-left corner is uniform over
/// the positions that fit.
///
/// # Panics
///
/// When the (padded) image is smaller than the crop, with torchvision's message.
#[derive(Debug)]
pub struct RandomCrop {
    height: usize,
    width: usize,
    padding: Option<Padding>,
    pad_if_needed: bool,
    fill: f64,
    padding_mode: PaddingMode,
    source: Source,
}

impl RandomCrop {
    /// A random `size × size` crop.
    pub fn new(size: usize) -> RandomCrop {
        RandomCrop::rect(size, size)
    }

    /// A random `height × width` crop.
    pub fn rect(height: usize, width: usize) -> RandomCrop {
        RandomCrop {
            height,
            width,
            padding: None,
            pad_if_needed: false,
            fill: 0.0,
            padding_mode: PaddingMode::Constant,
            source: Source::Default,
        }
    }

    /// Pads the image first: one number, `[horizontal, vertical]` or `[l, t, r, b]`.
    pub fn padding(mut self, padding: impl Into<Padding>) -> RandomCrop {
        self.padding = Some(padding.into());
        self
    }

    /// Pads sides shorter than the crop instead of failing.
    pub fn pad_if_needed(mut self, on: bool) -> RandomCrop {
        self.pad_if_needed = on;
        self
    }

    /// The constant for [`PaddingMode::Constant`] (default 0).
    pub fn fill(mut self, fill: f64) -> RandomCrop {
        self.fill = fill;
        self
    }

    /// How padding fills (default constant).
    pub fn padding_mode(mut self, mode: PaddingMode) -> RandomCrop {
        self.padding_mode = mode;
        self
    }
}
seeded!(RandomCrop);

impl Transform for RandomCrop {
    #[track_caller]
    fn apply(&self, t: Tensor) -> Tensor {
        let mut img = t;
        if let Some(p) = self.padding {
            img = functional::pad(&img, p, self.fill, self.padding_mode);
        }
        let (_, h, w) = functional::image_dims(&img, "RandomCrop");
        if self.pad_if_needed && w < self.width {
            img = functional::pad(&img, [self.width - w, 0], self.fill, self.padding_mode);
        }
        if self.pad_if_needed && h < self.height {
            img = functional::pad(&img, [0, self.height - h], self.fill, self.padding_mode);
        }
        let (_, h, w) = functional::image_dims(&img, "RandomCrop");
        let (th, tw) = (self.height, self.width);
        assert!(h >= th && w >= tw, "Required crop size ({th}, {tw}) is larger than input image size ({h}, {w})");
        if (h, w) == (th, tw) {
            return img;
        }
        let i = self.source.below(h - th + 1);
        let j = self.source.below(w - tw + 1);
        functional::crop(&img, i as i64, j as i64, th, tw)
    }
}

/// Mirrors left to right with probability `p` (`torchvision.transforms.RandomHorizontalFlip`).
#[derive(Debug)]
pub struct RandomHorizontalFlip {
    p: f64,
    source: Source,
}

impl RandomHorizontalFlip {
    /// Flips with probability `p` (torchvision's default is 0.5).
    pub fn new(p: f64) -> RandomHorizontalFlip {
        RandomHorizontalFlip { p, source: Source::Default }
    }
}
seeded!(RandomHorizontalFlip);

impl Transform for RandomHorizontalFlip {
    fn apply(&self, t: Tensor) -> Tensor {
        if self.source.uniform(0.0, 1.0) < self.p {
            functional::hflip(&t)
        } else {
            t
        }
    }
}

/// Mirrors top to bottom with probability `p` (`torchvision.transforms.RandomVerticalFlip`).
#[derive(Debug)]
pub struct RandomVerticalFlip {
    p: f64,
    source: Source,
}

impl RandomVerticalFlip {
    /// Flips with probability `p` (torchvision's default is 0.5).
    pub fn new(p: f64) -> RandomVerticalFlip {
        RandomVerticalFlip { p, source: Source::Default }
    }
}
seeded!(RandomVerticalFlip);

impl Transform for RandomVerticalFlip {
    fn apply(&self, t: Tensor) -> Tensor {
        if self.source.uniform(0.0, 1.0) < self.p {
            functional::vflip(&t)
        } else {
            t
        }
    }
}

/// Rotation by an angle drawn uniformly from `[min, max]` degrees
/// (`torchvision.transforms.RandomRotation`); see [`functional::rotate_with`].
///
/// Defaults as torchvision's: nearest interpolation, no expansion, the image center as pivot,
/// fill 0 (through torchvision's fill mask).
#[derive(Debug)]
pub struct RandomRotation {
    degrees: (f64, f64),
    interpolation: InterpolationMode,
    expand: bool,
    center: Option<[f64; 2]>,
    fill: Vec<f64>,
    source: Source,
}

impl RandomRotation {
    /// Angles in `[-degrees, degrees]`.
    ///
    /// # Panics
    ///
    /// If `degrees` is negative, with torchvision's message.
    #[track_caller]
    pub fn new(degrees: f64) -> RandomRotation {
        assert!(degrees >= 0.0, "If degrees is a single number, it must be positive.");
        RandomRotation::range(-degrees, degrees)
    }

    /// Angles in `[min, max]`.
    pub fn range(min: f64, max: f64) -> RandomRotation {
        RandomRotation {
            degrees: (min, max),
            interpolation: InterpolationMode::Nearest,
            expand: false,
            center: None,
            fill: vec![0.0],
            source: Source::Default,
        }
    }

    /// The interpolation (default nearest).
    pub fn interpolation(mut self, mode: InterpolationMode) -> RandomRotation {
        self.interpolation = mode;
        self
    }

    /// Enlarges the output to hold the whole rotated image.
    pub fn expand(mut self, on: bool) -> RandomRotation {
        self.expand = on;
        self
    }

    /// Rotates about `[x, y]` (pixels from the top-left corner) instead of the center.
    pub fn center(mut self, center: [f64; 2]) -> RandomRotation {
        self.center = Some(center);
        self
    }

    /// The value outside the rotated image: one value, or one per channel (default 0).
    pub fn fill(mut self, fill: &[f64]) -> RandomRotation {
        self.fill = fill.to_vec();
        self
    }
}
seeded!(RandomRotation);

impl Transform for RandomRotation {
    fn apply(&self, t: Tensor) -> Tensor {
        let angle = self.source.uniform(self.degrees.0, self.degrees.1);
        functional::rotate_with(&t, angle, self.interpolation, self.expand, self.center, Some(&self.fill))
    }
}
