//! `tracegrad::vision::ImageFolder`, `load_image` and `save_png`: class indexing as
//! torchvision's `ImageFolder`, an exact u8 PNG round trip, and decode errors that name the
//! file.

use std::path::{Path, PathBuf};

use image::{ImageBuffer, Luma, Rgb, RgbImage};
use tracegrad::data::{DataError, DataLoader, Dataset};
use tracegrad::vision::transforms::{Compose, Normalize, ToTensor};
use tracegrad::vision::{load_image, save_png, ImageError, ImageFolder, ImageMode};
use tracegrad::{DType, Tensor};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("tracegrad-image-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A deterministic RGB image; at 16×16 every byte value occurs in every channel.
fn pixels(w: u32, h: u32, salt: u32) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, y| {
        let v = (y * w + x + salt * 53) % 256;
        Rgb([v as u8, (v * 7 % 256) as u8, (255 - v) as u8])
    })
}

fn write_png(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

#[test]
fn image_folder_png_round_trip_is_exact() {
    let tmp = TempDir::new("roundtrip");
    let src = pixels(16, 16, 1);
    // Every byte value appears somewhere across the channels.
    let all: std::collections::HashSet<u8> = src.as_raw().iter().copied().collect();
    assert_eq!(all.len(), 256);
    write_png(&tmp.path().join("only/img.png"), &src);
    let ds = ImageFolder::new(tmp.path()).unwrap().with_transform(ToTensor);
    let (t, class) = ds.try_get(0).unwrap();
    assert_eq!((t.shape(), t.dtype(), class), (vec![3, 16, 16], DType::F32, 0));
    // ToTensor's values are the bytes / 255, in CHW order.
    let v = t.to_vec_f32();
    for (i, p) in src.pixels().enumerate() {
        for c in 0..3 {
            assert_eq!(v[c * 256 + i], p.0[c] as f32 / 255.0);
        }
    }
    let out = tmp.path().join("saved.png");
    save_png(&t, &out).unwrap();
    let back = image::open(&out).unwrap();
    assert_eq!(back.color(), image::ColorType::Rgb8);
    assert_eq!(back.into_rgb8().as_raw(), src.as_raw(), "the PNG written back has the same pixels");
    // And the file reads back to the same tensor.
    let again = ToTensor.apply_to(&load_image(&out, ImageMode::Rgb).unwrap());
    assert!(again.equal(&t));
}

/// Shorthand for applying a transform by reference in these tests.
trait ApplyTo {
    fn apply_to(&self, t: &Tensor) -> Tensor;
}

impl<T: tracegrad::vision::Transform> ApplyTo for T {
    fn apply_to(&self, t: &Tensor) -> Tensor {
        self.apply(t.clone())
    }
}

#[test]
fn image_folder_grayscale_and_u8_round_trip() {
    let tmp = TempDir::new("gray");
    let gray: ImageBuffer<Luma<u8>, Vec<u8>> = ImageBuffer::from_fn(5, 3, |x, y| Luma([(x * 50 + y * 3) as u8]));
    let path = tmp.path().join("g.png");
    gray.save(&path).unwrap();
    let t = load_image(&path, ImageMode::L).unwrap();
    assert_eq!((t.shape(), t.dtype()), (vec![3, 5, 1], DType::U8));
    // A u8 [1, H, W] tensor is written as it is.
    let chw = ToTensor.apply_to(&t).to_dtype(DType::F64);
    let out = tmp.path().join("g2.png");
    save_png(&chw, &out).unwrap();
    assert_eq!(image::open(&out).unwrap().into_luma8().as_raw(), gray.as_raw());
    let u8_chw = Tensor::from_buffer(t.permute(&[2, 0, 1]).buffer());
    save_png(&u8_chw, &out).unwrap();
    assert_eq!(image::open(&out).unwrap().into_luma8().as_raw(), gray.as_raw());
    // RGB conversion replicates the channel; RGBA adds opaque alpha.
    let rgb = load_image(&path, ImageMode::Rgb).unwrap();
    assert_eq!(rgb.shape(), vec![3, 5, 3]);
    let rgba = load_image(&path, ImageMode::Rgba).unwrap();
    assert_eq!(rgba.narrow(2, 3, 1).to_vec::<u8>(), vec![255u8; 15]);
}

#[test]
fn image_folder_classes_and_order() {
    let tmp = TempDir::new("classes");
    let root = tmp.path();
    // Created out of order; classes and files come back sorted.
    write_png(&root.join("dog/b.png"), &pixels(4, 4, 2));
    write_png(&root.join("dog/a.PNG"), &pixels(4, 4, 3));
    write_png(&root.join("cat/z.png"), &pixels(4, 4, 4));
    write_png(&root.join("cat/sub/y.png"), &pixels(4, 4, 5));
    pixels(4, 4, 6).save(root.join("cat/x.jpg")).unwrap();
    std::fs::write(root.join("cat/notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("README"), "a file at the root is not a class").unwrap();
    let ds = ImageFolder::new(root).unwrap();
    assert_eq!(ds.classes(), ["cat", "dog"]);
    assert_eq!(ds.class_to_idx().get("dog"), Some(&1));
    let names: Vec<String> =
        ds.samples().iter().map(|(p, _)| p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/")).collect();
    assert_eq!(names, ["cat/x.jpg", "cat/z.png", "cat/sub/y.png", "dog/a.PNG", "dog/b.png"]);
    assert_eq!(ds.targets(), [0, 0, 0, 1, 1]);
    assert_eq!(ds.len(), 5);
    // Without a transform, items are u8 HWC images.
    let (img, class) = ds.get(3);
    assert_eq!((img.shape(), img.dtype(), class), (vec![4, 4, 3], DType::U8, 1));
    assert_eq!(img.to_vec::<u8>(), pixels(4, 4, 3).into_raw());
    // The JPEG decodes to the right size and roughly the right colors.
    let (jpg, _) = ds.get(0);
    assert_eq!(jpg.shape(), vec![4, 4, 3]);
    let err: f64 =
        jpg.to_vec_f64().iter().zip(pixels(4, 4, 6).into_raw()).map(|(a, b)| (a - b as f64).abs()).sum::<f64>() / 48.0;
    assert!(err < 40.0, "mean JPEG error {err}");
}

#[test]
fn image_folder_through_a_data_loader() {
    let tmp = TempDir::new("loader");
    for i in 0..5 {
        write_png(&tmp.path().join(format!("a/{i}.png")), &pixels(6, 4, i));
        write_png(&tmp.path().join(format!("b/{i}.png")), &pixels(6, 4, i + 10));
    }
    let ds = ImageFolder::builder(tmp.path())
        .transform(Compose::new().add(ToTensor).add(Normalize::new(&[0.5; 3], &[0.5; 3])))
        .build()
        .unwrap();
    let loader = DataLoader::builder(ds).batch_size(4).num_workers(2).build().unwrap();
    let batches: Vec<(Tensor, Tensor)> = loader.iter().map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].0.shape(), vec![4, 3, 4, 6]);
    assert_eq!(batches[0].1.dtype(), DType::I64);
    let labels: Vec<i64> = batches.iter().flat_map(|(_, y)| y.to_vec::<i64>()).collect();
    assert_eq!(labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
    let x = &batches[2].0;
    assert!(x.min().item() >= -1.0 && x.max().item() <= 1.0);
}

#[test]
fn image_folder_decode_error_names_the_file() {
    let tmp = TempDir::new("corrupt");
    write_png(&tmp.path().join("ok/good.png"), &pixels(3, 3, 0));
    let bad = tmp.path().join("ok/broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap();
    let ds = ImageFolder::new(tmp.path()).unwrap().with_transform(ToTensor);
    assert_eq!(ds.len(), 2);
    let err = ds.try_get(0).unwrap_err();
    assert!(matches!(&err, ImageError::Decode { path, .. } if path == &bad), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("broken.png") && msg.contains("cannot decode"), "{msg}");
    assert!(ds.try_get(1).is_ok());
    // Through a loader: an Err batch naming the index and the file; the epoch goes on.
    let loader = DataLoader::builder(ds).batch_size(1).build().unwrap();
    let items: Vec<_> = loader.iter().collect();
    assert_eq!(items.len(), 2);
    match &items[0] {
        Err(DataError::GetPanicked { index, message }) => {
            assert_eq!(*index, 0);
            assert!(message.contains("broken.png"), "{message}");
        }
        other => panic!("expected an error naming the file, got {:?}", other.as_ref().map(|_| ())),
    }
    assert!(items[1].is_ok());
    // A missing file is an I/O error naming it.
    let gone = load_image(tmp.path().join("missing.png"), ImageMode::Rgb).unwrap_err();
    assert!(matches!(gone, ImageError::Io { .. }) && gone.to_string().contains("missing.png"), "{gone}");
}

#[test]
fn image_folder_layout_errors() {
    let tmp = TempDir::new("layout");
    let err = ImageFolder::new(tmp.path()).unwrap_err();
    assert!(matches!(err, ImageError::NoClasses { .. }));
    assert!(err.to_string().starts_with("Couldn't find any class folder in"), "{err}");
    std::fs::create_dir_all(tmp.path().join("empty")).unwrap();
    std::fs::create_dir_all(tmp.path().join("also_empty")).unwrap();
    write_png(&tmp.path().join("full/a.png"), &pixels(2, 2, 0));
    let err = ImageFolder::new(tmp.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Found no valid file for the classes also_empty, empty. Supported extensions are: .jpg, .jpeg, .png"
    );
    let ds = ImageFolder::builder(tmp.path()).allow_empty(true).build().unwrap();
    assert_eq!(ds.classes(), ["also_empty", "empty", "full"]);
    assert_eq!(ds.targets(), [2]);
    let missing = ImageFolder::new(tmp.path().join("nope")).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}

#[test]
fn image_folder_save_png_rejects_non_images() {
    let tmp = TempDir::new("save");
    let err = save_png(&Tensor::zeros(&[2, 4, 4]), tmp.path().join("x.png")).unwrap_err();
    assert!(matches!(err, ImageError::Shape { .. }), "{err}");
    let err = save_png(&Tensor::zeros_dtype(&[3, 4, 4], DType::I64), tmp.path().join("x.png")).unwrap_err();
    assert!(err.to_string().contains("float or u8"), "{err}");
    // Values outside [0, 1] are clamped.
    let t = Tensor::from_vec(vec![-0.5f32, 0.5, 1.5, 1.0], &[1, 2, 2]);
    save_png(&t, tmp.path().join("c.png")).unwrap();
    assert_eq!(image::open(tmp.path().join("c.png")).unwrap().into_luma8().into_raw(), [0, 128, 255, 255]);
}
