//! A custom image data set end to end: write a small folder of PNG files (two classes), read it
//! with `ImageFolder` through a pipeline of transforms, and split it over two "ranks" with a
//! `DistributedSampler`, as each process of a data-parallel job would.
//!
//! Run with `cargo run --release --example custom_dataset`.

use std::error::Error;
use std::path::Path;
use std::sync::Arc;

use image::{ImageBuffer, Rgb, RgbImage};
use tracegrad::data::{DataLoader, Dataset, DistributedSampler, Sampler};
use tracegrad::vision::transforms::{
    Compose, InterpolationMode, Normalize, RandomCrop, RandomHorizontalFlip, RandomRotation, Resize, ToTensor,
};
use tracegrad::vision::{save_png, ImageFolder};
use tracegrad::Tensor;

/// A 12×12 picture of a filled disc (`round`) or square (`square`) of some color.
fn picture(round: bool, shade: u8) -> RgbImage {
    ImageBuffer::from_fn(12, 12, |x, y| {
        let (dx, dy) = (x as f32 - 5.5, y as f32 - 5.5);
        let inside = if round { dx * dx + dy * dy < 20.0 } else { dx.abs() < 4.0 && dy.abs() < 4.0 };
        if inside {
            Rgb([shade, 255 - shade, 128])
        } else {
            Rgb([16, 16, 16])
        }
    })
}

/// Writes `per_class` pictures into `root/disc/` and `root/square/`.
fn write_folder(root: &Path, per_class: usize) -> Result<(), Box<dyn Error>> {
    for (class, round) in [("disc", true), ("square", false)] {
        std::fs::create_dir_all(root.join(class))?;
        for i in 0..per_class {
            picture(round, (i * 40) as u8).save(root.join(class).join(format!("{i:02}.png")))?;
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let root = std::env::temp_dir().join(format!("tracegrad-custom-dataset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    write_folder(&root, 5)?;

    let transform = Compose::new()
        .add(ToTensor) // u8 [H, W, 3] → f32 [3, H, W] in [0, 1]
        .add(RandomRotation::new(10.0).interpolation(InterpolationMode::Bilinear).seed(1))
        .add(RandomCrop::new(10).padding(1).seed(2))
        .add(RandomHorizontalFlip::new(0.5).seed(3))
        .add(Resize::new(8, 8))
        .add(Normalize::new(&[0.5, 0.5, 0.5], &[0.25, 0.25, 0.25]));
    // One data set shared by both ranks' loaders (in a real job each process opens its own).
    let dataset = Arc::new(ImageFolder::new(&root)?.with_transform(transform));
    println!("{} images, classes {:?}", dataset.len(), dataset.classes());

    // One transformed sample, mapped back to [0, 1] and written out to look at.
    let (sample, class) = dataset.get(0);
    let preview = root.join("preview.png");
    save_png(&sample.mul_scalar(0.25).add_scalar(0.5), &preview)?;
    println!("sample 0: class {class}, shape {:?}, preview written to {}", sample.shape(), preview.display());

    const WORLD: usize = 2;
    for epoch in 0..2u64 {
        println!("epoch {epoch}");
        for rank in 0..WORLD {
            let sampler = Arc::new(DistributedSampler::new(dataset.len(), WORLD, rank as i64)?.seed(42));
            // Every rank sets the same epoch, so they agree on the shuffle and split it.
            sampler.set_epoch(epoch);
            let indices: Vec<usize> = sampler.iter().collect();
            let loader =
                DataLoader::builder(Arc::clone(&dataset)).sampler(Arc::clone(&sampler)).batch_size(2).build()?;
            println!("  rank {rank}: indices {indices:?}");
            for (b, batch) in loader.iter().enumerate() {
                let (images, labels): (Tensor, Tensor) = batch?;
                println!(
                    "    batch {b}: images {:?}, labels {:?}, mean {:+.3}",
                    images.shape(),
                    labels.to_vec::<i64>(),
                    images.mean_all().item()
                );
            }
        }
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
