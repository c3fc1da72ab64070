//! [`ImageFolder`] (`torchvision.datasets.ImageFolder`), image decoding ([`load_image`]) and
//! writing ([`save_png`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ExtendedColorType, ImageFormat, ImageReader};
use tracegrad_runtime::DType;

use super::transforms::Transform;
use crate::data::Dataset;
use crate::tensor::Tensor;

/// The file extensions [`ImageFolder`] reads (compared case-insensitively).
pub const IMG_EXTENSIONS: &[&str] = &[".jpg", ".jpeg", ".png"];

/// An error reading or writing an image, or indexing an image folder. Every variant about a
/// file names it.
#[derive(Debug)]
#[non_exhaustive]
pub enum ImageError {
    /// A file or directory could not be read or created.
    Io {
        /// The path.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// A file's contents are not a decodable PNG or JPEG image.
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// An image could not be encoded or written.
    Encode {
        /// The file.
        path: PathBuf,
        /// The encoder's message.
        message: String,
    },
    /// The root of an [`ImageFolder`] has no sub-directories.
    NoClasses {
        /// The root directory.
        root: PathBuf,
    },
    /// Some class directories hold no image file (and empty classes were not allowed).
    EmptyClasses {
        /// The class names, sorted.
        classes: Vec<String>,
    },
    /// A tensor that is not an image [`save_png`] can write.
    Shape {
        /// What is wrong.
        message: String,
    },
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            ImageError::Decode { path, message } => {
                write!(f, "cannot decode image file {}: {message}", path.display())
            }
            ImageError::Encode { path, message } => {
                write!(f, "cannot write image file {}: {message}", path.display())
            }
            ImageError::NoClasses { root } => write!(f, "Couldn't find any class folder in {}.", root.display()),
            ImageError::EmptyClasses { classes } => write!(
                f,
                "Found no valid file for the classes {}. Supported extensions are: {}",
                classes.join(", "),
                IMG_EXTENSIONS.join(", ")
            ),
            ImageError::Shape { message } => f.write_str(message),
        }
    }
}

impl std::error::Error for ImageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ImageError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_path_buf(), source }
}

/// The channels a decoded image is converted to (PIL's `convert(mode)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ImageMode {
    /// Three channels, red, green, blue (torchvision's default loader converts to RGB).
    #[default]
    Rgb,
    /// One luminance channel.
    L,
    /// Four channels, RGB plus alpha.
    Rgba,
}

/// Decodes a PNG or JPEG file (the format is sniffed from the contents) into a `u8` tensor of
/// shape `[H, W, C]`, converted to `mode`: the layout of a PIL image as an array, which
/// [`ToTensor`](super::transforms::ToTensor) turns into f32 `[C, H, W]`.
///
/// Errors name the file: [`ImageError::Io`] if it cannot be read, [`ImageError::Decode`] if
/// its contents are not an image.
pub fn load_image(path: impl AsRef<Path>, mode: ImageMode) -> Result<Tensor, ImageError> {
    let path = path.as_ref();
    let decode_err = |e: image::ImageError| ImageError::Decode { path: path.to_path_buf(), message: e.to_string() };
    let img = ImageReader::open(path)
        .map_err(io_error(path))?
        .with_guessed_format()
        .map_err(io_error(path))?
        .decode()
        .map_err(|e| match e {
            image::ImageError::IoError(source) => ImageError::Io { path: path.to_path_buf(), source },
            e => decode_err(e),
        })?;
    Ok(image_to_tensor(img, mode))
}

/// Writes an image tensor as a PNG file.
///
/// The tensor is `[C, H, W]` with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, or `[H, W]`.
/// Float values in `[0, 1]` are scaled as `torchvision.utils.save_image` does
/// (`clamp(x·255 + 0.5, 0, 255)`, truncated to `u8`), so a `u8` image that went through
/// [`ToTensor`](super::transforms::ToTensor) is written back exactly; `u8` tensors are written
/// as they are.
pub fn save_png(img: &Tensor, path: impl AsRef<Path>) -> Result<(), ImageError> {
    let path = path.as_ref();
    let shape = img.shape();
    let (c, h, w) = match *shape.as_slice() {
        [h, w] => (1, h, w),
        [c, h, w] if matches!(c, 1 | 3 | 4) => (c, h, w),
        _ => {
            return Err(ImageError::Shape {
                message: format!(
                    "save_png: expected an image of shape [C, H, W] with 1, 3 or 4 channels, or [H, W]; got {shape:?}"
                ),
            })
        }
    };
    let chw: Vec<u8> = match img.dtype() {
        DType::U8 => img.to_vec::<u8>(),
        DType::F32 | DType::F64 => {
            img.to_vec_f64().into_iter().map(|x| (x * 255.0 + 0.5).clamp(0.0, 255.0) as u8).collect()
        }
        other => {
            return Err(ImageError::Shape { message: format!("save_png: expected a float or u8 tensor, got {other}") })
        }
    };
    let mut hwc = vec![0u8; chw.len()];
    for k in 0..c {
        for p in 0..h * w {
            hwc[p * c + k] = chw[k * h * w + p];
        }
    }
    let color = match c {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        _ => ExtendedColorType::Rgba8,
    };
    let too_big = |_| ImageError::Shape { message: format!("save_png: image of {h}×{w} pixels is too large") };
    let (w32, h32) = (u32::try_from(w).map_err(too_big)?, u32::try_from(h).map_err(too_big)?);
    image::save_buffer_with_format(path, &hwc, w32, h32, color, ImageFormat::Png).map_err(|e| match e {
        image::ImageError::IoError(source) => ImageError::Io { path: path.to_path_buf(), source },
        e => ImageError::Encode { path: path.to_path_buf(), message: e.to_string() },
    })
}

/// Decodes an in-memory [`DynamicImage`] the way [`load_image`] decodes a file.
pub fn image_to_tensor(img: DynamicImage, mode: ImageMode) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    match mode {
        ImageMode::Rgb => Tensor::from_vec(img.into_rgb8().into_raw(), &[h, w, 3]),
        ImageMode::L => Tensor::from_vec(img.into_luma8().into_raw(), &[h, w, 1]),
        ImageMode::Rgba => Tensor::from_vec(img.into_rgba8().into_raw(), &[h, w, 4]),
    }
}

/// A labelled image data set laid out one class per sub-directory
/// (`torchvision.datasets.ImageFolder`):
///
/// ```text
/// root/cat/001.png      → class 0
/// root/cat/nested/7.jpg → class 0
/// root/dog/a.png        → class 1
/// ```
///
/// Class names are the sub-directories of `root`, sorted; a class's index is its position.
/// Each class directory is searched recursively (following symbolic links), directories in
/// sorted order and files sorted within each, for names ending in one of [`IMG_EXTENSIONS`];
/// other files are skipped. Items are `(image, class index)`: the image is decoded with
/// [`load_image`] (RGB by default) and passed through the transform if one is set, so without
/// one it is the `u8` `[H, W, C]` tensor, and with [`ToTensor`](super::transforms::ToTensor) it
/// is f32 `[C, H, W]`.
///
/// Files are decoded when fetched. [`try_get`](ImageFolder::try_get) returns a decode failure
/// as an [`ImageError`] naming the file; [`Dataset::get`] panics with that message, which a
/// [`DataLoader`](crate::data::DataLoader) reports as an `Err` batch naming the index.
///
/// ```no_run
/// use tracegrad::data::{DataLoader, Dataset};
/// use tracegrad::vision::transforms::{Compose, Resize, ToTensor};
/// use tracegrad::vision::ImageFolder;
///
/// let ds = ImageFolder::new("data/train")?
///     .with_transform(Compose::new().add(ToTensor).add(Resize::new(32, 32)));
/// println!("{} images of {:?}", ds.len(), ds.classes());
/// let loader = DataLoader::builder(ds).batch_size(16).shuffle(true).seed(0).build()?;
/// for batch in &loader {
///     let (images, labels) = batch?;
///     assert_eq!(images.shape()[1..], [3, 32, 32]);
///     assert_eq!(labels.dim(), 1);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, usize)>,
    mode: ImageMode,
    transform: Option<Box<dyn Transform>>,
}

/// Options for an [`ImageFolder`]; see [`ImageFolder::builder`].
pub struct ImageFolderBuilder {
    root: PathBuf,
    mode: ImageMode,
    allow_empty: bool,
    transform: Option<Box<dyn Transform>>,
}

impl ImageFolderBuilder {
    /// The channels images are converted to (default [`ImageMode::Rgb`]).
    pub fn mode(mut self, mode: ImageMode) -> Self {
        self.mode = mode;
        self
    }

    /// Accept class directories without image files (torchvision's `allow_empty`); by default
    /// they are an [`ImageError::EmptyClasses`].
    pub fn allow_empty(mut self, allow: bool) -> Self {
        self.allow_empty = allow;
        self
    }

    /// Applies `transform` to every decoded image.
    pub fn transform(mut self, transform: impl Transform + 'static) -> Self {
        self.transform = Some(Box::new(transform));
        self
    }

    /// Lists the classes and files. Errors: [`ImageError::Io`] naming an unreadable directory,
    /// [`ImageError::NoClasses`], [`ImageError::EmptyClasses`].
    pub fn build(self) -> Result<ImageFolder, ImageError> {
        let root = self.root;
        let mut classes = Vec::new();
        for entry in std::fs::read_dir(&root).map_err(io_error(&root))? {
            let entry = entry.map_err(io_error(&root))?;
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
                classes.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        if classes.is_empty() {
            return Err(ImageError::NoClasses { root });
        }
        classes.sort();
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (index, class) in classes.iter().enumerate() {
            let mut files = Vec::new();
            walk(&root.join(class), &mut files)?;
            files.sort();
            if files.is_empty() {
                empty.push(class.clone());
            }
            samples.extend(files.into_iter().map(|(_, _, path)| (path, index)));
        }
        if !empty.is_empty() && !self.allow_empty {
            return Err(ImageError::EmptyClasses { classes: empty });
        }
        Ok(ImageFolder { root, classes, samples, mode: self.mode, transform: self.transform })
    }
}

/// Collects the image files under `dir` as `(directory, file name, path)`, so that sorting
/// gives Python's `sorted(os.walk(dir))` order with sorted file names.
fn walk(dir: &Path, out: &mut Vec<(String, String, PathBuf)>) -> Result<(), ImageError> {
    let key = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            walk(&path, out)?;
        } else {
            let name = entry.file_name().to_string_lossy().into_owned();
            let lower = name.to_lowercase();
            if IMG_EXTENSIONS.iter().any(|ext| lower.ends_with(ext)) {
                out.push((key.clone(), name, path));
            }
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Indexes `root` with the default options (RGB, no transform, empty classes are an
    /// error); see [`builder`](ImageFolder::builder) for the others.
    pub fn new(root: impl AsRef<Path>) -> Result<ImageFolder, ImageError> {
        ImageFolder::builder(root).build()
    }

    /// Options for indexing `root`.
    pub fn builder(root: impl AsRef<Path>) -> ImageFolderBuilder {
        ImageFolderBuilder {
            root: root.as_ref().to_path_buf(),
            mode: ImageMode::Rgb,
            allow_empty: false,
            transform: None,
        }
    }

    /// Replaces the transform applied to every decoded image.
    pub fn with_transform(mut self, transform: impl Transform + 'static) -> ImageFolder {
        self.transform = Some(Box::new(transform));
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The class names, sorted; a class's index is its position here.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Class name → index (torchvision's `class_to_idx`).
    pub fn class_to_idx(&self) -> BTreeMap<String, usize> {
        self.classes.iter().enumerate().map(|(i, c)| (c.clone(), i)).collect()
    }

    /// Every sample's file and class index, in item order.
    pub fn samples(&self) -> &[(PathBuf, usize)] {
        &self.samples
    }

    /// Every sample's class index, in item order.
    pub fn targets(&self) -> Vec<usize> {
        self.samples.iter().map(|&(_, c)| c).collect()
    }

    /// Item `index`: the decoded, transformed image and its class index. Errors name the file.
    ///
    /// # Panics
    ///
    /// If `index` is out of range, or if the transform panics.
    #[track_caller]
    pub fn try_get(&self, index: usize) -> Result<(Tensor, i64), ImageError> {
        let n = self.samples.len();
        let Some((path, class)) = self.samples.as_slice().get(index) else {
            panic!("index {index} is out of range for an ImageFolder of length {n}");
        };
        let img = load_image(path, self.mode)?;
        let img = match &self.transform {
            Some(t) => t.apply(img),
            None => img,
        };
        Ok((img, *class as i64))
    }
}

impl fmt::Debug for ImageFolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageFolder")
            .field("root", &self.root)
            .field("classes", &self.classes)
            .field("len", &self.samples.len())
            .field("mode", &self.mode)
            .field("transform", &self.transform.is_some())
            .finish()
    }
}

impl Dataset for ImageFolder {
    type Item = (Tensor, i64);

    fn len(&self) -> usize {
        self.samples.len()
    }

    /// [`ImageFolder::try_get`], panicking with the error's message (which names the file).
    #[track_caller]
    fn get(&self, index: usize) -> (Tensor, i64) {
        self.try_get(index).unwrap_or_else(|e| panic!("{e}"))
    }
}
