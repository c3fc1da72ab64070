//! In-memory data sets: the embedded UCI digits set, readers for MNIST in CSV (plain or gzipped)
//! and IDX form, a fixed train/test split, and shuffled mini-batches.
//!
//! Every reader returns a [`Labeled`] set: features as an f32 `[n, d]` tensor scaled to [0, 1]
//! and labels as an i64 `[n]` tensor. Malformed input is an `Err` naming the file and line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use flate2::read::GzDecoder;

use crate::tensor::Tensor;
use tracegrad_runtime::Generator;

/// The UCI optical-recognition digits (1797 samples of 8×8 pixels with values 0..16, then the
/// label), as shipped by scikit-learn; CC BY 4.0 / BSD-3.
static DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// A data set read into memory.
#[derive(Clone, Debug)]
pub struct Labeled {
    /// `[n, d]` f32 features in [0, 1].
    pub x: Tensor,
    /// `[n]` i64 class labels.
    pub y: Tensor,
    /// Number of classes (largest label + 1).
    pub classes: usize,
}

impl Labeled {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.numel()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples at `idx` (an i64 index tensor).
    pub fn select(&self, idx: &Tensor) -> Labeled {
        Labeled { x: self.x.index_select(0, idx), y: self.y.index_select(0, idx), classes: self.classes }
    }

    /// A fixed split: a permutation drawn from `seed`, the first `train_fraction` for training.
    pub fn split(&self, train_fraction: f64, seed: u64) -> (Labeled, Labeled) {
        let perm = Generator::new(seed).randperm(self.len());
        let n_train = (self.len() as f64 * train_fraction).round() as usize;
        let (a, b) = perm.split_at(n_train);
        (self.select(&Tensor::from_slice(a, &[a.len()])), self.select(&Tensor::from_slice(b, &[b.len()])))
    }

    /// Mini-batches in an order drawn from `g` (a new permutation per call).
    pub fn shuffled_batches(&self, batch_size: usize, g: &mut Generator) -> Vec<Labeled> {
        assert!(batch_size > 0, "batch_size should be a positive integer value, but got batch_size=0");
        let perm = g.randperm(self.len());
        perm.chunks(batch_size).map(|c| self.select(&Tensor::from_slice(c, &[c.len()]))).collect()
    }

    /// Mini-batches in order.
    pub fn batches(&self, batch_size: usize) -> Vec<Labeled> {
        assert!(batch_size > 0, "batch_size should be a positive integer value, but got batch_size=0");
        let idx: Vec<i64> = (0..self.len() as i64).collect();
        idx.chunks(batch_size).map(|c| self.select(&Tensor::from_slice(c, &[c.len()]))).collect()
    }
}

/// The embedded digits set: `x: [1797, 64]` scaled by 1/16, `y: [1797]`.
pub fn digits() -> Labeled {
    read_csv_from(GzDecoder::new(DIGITS_CSV_GZ), "embedded digits.csv.gz", 64, 16.0)
        .expect("the embedded digits data is well-formed")
}

/// Reads an MNIST-style CSV (plain, or gzipped when the name ends in `.gz`): per line `d` pixel
/// values then the label, no header. Pixels are divided by `pixel_max`.
pub fn read_csv(path: &Path, d: usize, pixel_max: f32) -> Result<Labeled, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path.display().to_string();
    if name.ends_with(".gz") {
        read_csv_from(GzDecoder::new(f), &name, d, pixel_max)
    } else {
        read_csv_from(f, &name, d, pixel_max)
    }
}

fn read_csv_from(r: impl Read, name: &str, d: usize, pixel_max: f32) -> Result<Labeled, String> {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for (i, line) in BufReader::new(r).lines().enumerate() {
        let line = line.map_err(|e| format!("{name}: line {}: {e}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != d + 1 {
            return Err(format!(
                "{name}: line {}: expected {} comma-separated values, found {}",
                i + 1,
                d + 1,
                fields.len()
            ));
        }
        for f in &fields[..d] {
            let v: f32 = f.trim().parse().map_err(|_| format!("{name}: line {}: bad pixel value {f:?}", i + 1))?;
            xs.push(v / pixel_max);
        }
        let y: i64 =
            fields[d].trim().parse().map_err(|_| format!("{name}: line {}: bad label {:?}", i + 1, fields[d]))?;
        if y < 0 {
            return Err(format!("{name}: line {}: negative label {y}", i + 1));
        }
        ys.push(y);
    }
    if ys.is_empty() {
        return Err(format!("{name}: no samples"));
    }
    let n = ys.len();
    let classes = *ys.iter().max().unwrap() as usize + 1;
    Ok(Labeled { x: Tensor::from_vec(xs, &[n, d]), y: Tensor::from_vec(ys, &[n]), classes })
}

fn read_idx(path: &Path, expect_magic: u32) -> Result<(Vec<usize>, Vec<u8>), String> {
    let name = path.display().to_string();
    let mut bytes = Vec::new();
    let f = File::open(path).map_err(|e| format!("{name}: {e}"))?;
    if name.ends_with(".gz") {
        GzDecoder::new(f).read_to_end(&mut bytes)
    } else {
        BufReader::new(f).read_to_end(&mut bytes)
    }
    .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() < 4 {
        return Err(format!("{name}: truncated IDX header"));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != expect_magic {
        return Err(format!(
            "{name}: IDX magic {magic:#010x}, expected {expect_magic:#010x} (unsigned bytes, {} dims)",
            expect_magic & 0xff
        ));
    }
    let rank = (magic & 0xff) as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(format!("{name}: truncated IDX header"));
    }
    let dims: Vec<usize> =
        (0..rank).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let n: usize = dims.iter().product();
    if bytes.len() != header + n {
        return Err(format!("{name}: IDX payload has {} bytes, the header promises {n}", bytes.len() - header));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Reads a pair of MNIST IDX files (images `[n, rows, cols]` u8, labels `[n]` u8), optionally
/// gzipped. Images are flattened and scaled to [0, 1].
pub fn read_idx_pair(images: &Path, labels: &Path) -> Result<Labeled, String> {
    let (idims, pixels) = read_idx(images, 0x0000_0803)?;
    let (ldims, lbl) = read_idx(labels, 0x0000_0801)?;
    if idims[0] != ldims[0] {
        return Err(format!(
            "{} has {} images but {} has {} labels",
            images.display(),
            idims[0],
            labels.display(),
            ldims[0]
        ));
    }
    let n = idims[0];
    let d = idims[1] * idims[2];
    let xs: Vec<f32> = pixels.iter().map(|&p| p as f32 / 255.0).collect();
    let ys: Vec<i64> = lbl.iter().map(|&l| l as i64).collect();
    let classes = ys.iter().copied().max().unwrap_or(0) as usize + 1;
    Ok(Labeled { x: Tensor::from_vec(xs, &[n, d]), y: Tensor::from_vec(ys, &[n]), classes })
}

/// Reads the standard MNIST training files from a directory (`train-images-idx3-ubyte` and
/// `train-labels-idx1-ubyte`, optionally with `.gz`).
pub fn read_mnist_idx_dir(dir: &Path, split: &str) -> Result<Labeled, String> {
    let find = |stem: &str| {
        let plain = dir.join(stem);
        let gz = dir.join(format!("{stem}.gz"));
        if plain.exists() {
            Ok(plain)
        } else if gz.exists() {
            Ok(gz)
        } else {
            Err(format!("{}: no {stem} (or {stem}.gz)", dir.display()))
        }
    };
    read_idx_pair(&find(&format!("{split}-images-idx3-ubyte"))?, &find(&format!("{split}-labels-idx1-ubyte"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_digits_load() {
        let d = digits();
        assert_eq!(d.x.shape(), vec![1797, 64]);
        assert_eq!(d.classes, 10);
        let (tr, te) = d.split(0.8, 0);
        assert_eq!(tr.len() + te.len(), 1797);
        assert_eq!(tr.len(), 1438);
        let max = d.x.max().item();
        assert!(max <= 1.0 && max > 0.9);
    }

    #[test]
    fn malformed_csv_is_an_error() {
        let e = read_csv_from("1,2,3\n1,2\n".as_bytes(), "t.csv", 2, 1.0).unwrap_err();
        assert_eq!(e, "t.csv: line 2: expected 3 comma-separated values, found 2");
        assert!(read_csv_from("a,1\n".as_bytes(), "t.csv", 1, 1.0).is_err());
    }

    #[test]
    fn idx_round_trip_and_truncation() {
        let dir = std::env::temp_dir().join(format!("tracegrad-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        img.extend([0u8, 255, 128, 0, 1, 2, 3, 4]);
        let lbl = vec![0u8, 0, 8, 1, 0, 0, 0, 2, 7, 3];
        std::fs::write(dir.join("train-images-idx3-ubyte"), &img).unwrap();
        std::fs::write(dir.join("train-labels-idx1-ubyte"), &lbl).unwrap();
        let d = read_mnist_idx_dir(&dir, "train").unwrap();
        assert_eq!(d.x.shape(), vec![2, 4]);
        assert_eq!(d.y.to_vec::<i64>(), vec![7, 3]);
        std::fs::write(dir.join("train-images-idx3-ubyte"), &img[..18]).unwrap();
        assert!(read_mnist_idx_dir(&dir, "train").unwrap_err().contains("payload"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
