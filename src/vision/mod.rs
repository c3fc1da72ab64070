//! Computer vision data (`torchvision`): image [`transforms`] on tensors, the [`ImageFolder`]
//! data set, and PNG/JPEG decoding and PNG writing through the `image` crate.
//!
//! ```
//! use tracegrad::vision::transforms::{functional as F, InterpolationMode};
//! use tracegrad::Tensor;
//!
//! let img = Tensor::rand(&[3, 6, 8]);
//! let small = F::resize(&img, 3, 4, InterpolationMode::Bilinear, false);
//! let turned = F::rotate(&img, 90.0, InterpolationMode::Nearest, Some(&[0.0]));
//! assert_eq!((small.shape(), turned.shape()), (vec![3, 3, 4], vec![3, 6, 8]));
//! ```

mod image_folder;
pub mod transforms;

pub use image_folder::{
    image_to_tensor, load_image, save_png, ImageError, ImageFolder, ImageFolderBuilder, ImageMode, IMG_EXTENSIONS,
};
pub use transforms::Transform;
