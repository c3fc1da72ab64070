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

/// Most classes a reader accepts: a label of `MAX_CLASSES` or more is an error, never a
/// silently huge classifier.
pub const MAX_CLASSES: usize = 10_000;

/// Longest CSV line a reader accepts (a file with no newline is not buffered without bound).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Default for [`max_read_bytes`]: 4 GiB.
const DEFAULT_MAX_READ_BYTES: u64 = 4 << 30;

/// The most bytes a reader decodes from one file: `TRACEGRAD_MAX_ALLOC` (bytes) when set,
/// else 4 GiB. A file (or a gzip stream) that decodes to more is an error before it is held
/// in memory.
pub fn max_read_bytes() -> u64 {
    std::env::var("TRACEGRAD_MAX_ALLOC").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_MAX_READ_BYTES)
}

/// One label, checked against [`MAX_CLASSES`].
fn check_label(name: &str, line: usize, y: i64) -> Result<i64, String> {
    if y < 0 || y as u64 >= MAX_CLASSES as u64 {
        return Err(format!(
            "{name}: line {line}: label {y} is outside 0..{MAX_CLASSES} (at most {MAX_CLASSES} classes)"
        ));
    }
    Ok(y)
}

fn read_csv_from(r: impl Read, name: &str, d: usize, pixel_max: f32) -> Result<Labeled, String> {
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    let mut total = 0u64;
    let limit = max_read_bytes();
    for i in 0.. {
        buf.clear();
        let got = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("{name}: line {}: {e}", i + 1))?;
        if got == 0 {
            break;
        }
        if buf.len() > MAX_LINE_BYTES {
            return Err(format!("{name}: line {} is longer than {MAX_LINE_BYTES} bytes", i + 1));
        }
        total += got as u64;
        if total > limit {
            return Err(format!("{name}: more than {limit} bytes (TRACEGRAD_MAX_ALLOC)"));
        }
        let line = std::str::from_utf8(&buf).map_err(|_| format!("{name}: line {}: not UTF-8 text", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.trim_end_matches(['\n', '\r']).split(',').collect();
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
            if !v.is_finite() {
                return Err(format!("{name}: line {}: pixel value {f:?} is not finite", i + 1));
            }
            xs.push(v / pixel_max);
        }
        let y: i64 =
            fields[d].trim().parse().map_err(|_| format!("{name}: line {}: bad label {:?}", i + 1, fields[d]))?;
        ys.push(check_label(name, i + 1, y)?);
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
    let limit = max_read_bytes();
    if name.ends_with(".gz") {
        GzDecoder::new(f).take(limit + 1).read_to_end(&mut bytes)
    } else {
        BufReader::new(f).take(limit + 1).read_to_end(&mut bytes)
    }
    .map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{name}: more than {limit} bytes (TRACEGRAD_MAX_ALLOC)"));
    }
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
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match n {
        Some(n) if bytes.len() - header == n => Ok((dims, bytes[header..].to_vec())),
        Some(n) => {
            Err(format!("{name}: IDX payload has {} bytes, the header {dims:?} promises {n}", bytes.len() - header))
        }
        None => Err(format!("{name}: IDX dims {dims:?} overflow")),
    }
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
    if n == 0 {
        return Err(format!("{}: no images", images.display()));
    }
    if d == 0 {
        return Err(format!("{}: images of {}x{} pixels", images.display(), idims[1], idims[2]));
    }
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

    #[test]
    fn hostile_csv_is_an_error() {
        let e = read_csv_from("0.5,1000000000\n".as_bytes(), "t.csv", 1, 1.0).unwrap_err();
        assert_eq!(e, "t.csv: line 1: label 1000000000 is outside 0..10000 (at most 10000 classes)");
        let e = read_csv_from("0.5,9223372036854775807\n".as_bytes(), "t.csv", 1, 1.0).unwrap_err();
        assert!(e.contains("outside 0..10000"), "{e}");
        assert!(read_csv_from("0.5,-1\n".as_bytes(), "t.csv", 1, 1.0).unwrap_err().contains("label -1"));
        let e = read_csv_from("NaN,1\n".as_bytes(), "t.csv", 1, 1.0).unwrap_err();
        assert_eq!(e, "t.csv: line 1: pixel value \"NaN\" is not finite");
        assert!(read_csv_from("inf,1\n".as_bytes(), "t.csv", 1, 1.0).unwrap_err().contains("not finite"));
        // A line with no end is refused at the bound, not buffered.
        let zeros = std::io::repeat(b'0').take(3 * MAX_LINE_BYTES as u64);
        let e = read_csv_from(zeros, "z.csv", 1, 1.0).unwrap_err();
        assert_eq!(e, format!("z.csv: line 1 is longer than {MAX_LINE_BYTES} bytes"));
        assert_eq!(read_csv_from("\n\n".as_bytes(), "e.csv", 1, 1.0).unwrap_err(), "e.csv: no samples");
        // CRLF line ends are accepted.
        let d = read_csv_from("0.5,1\r\n0.25,0\r\n".as_bytes(), "t.csv", 1, 1.0).unwrap();
        assert_eq!(d.y.to_vec::<i64>(), vec![1, 0]);
    }

    #[test]
    fn hostile_idx_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tracegrad-idx-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |img: &[u8], lbl: &[u8]| {
            std::fs::write(dir.join("train-images-idx3-ubyte"), img).unwrap();
            std::fs::write(dir.join("train-labels-idx1-ubyte"), lbl).unwrap();
        };
        // [4, 2^31, 2^31]: the dims product wraps to 0 in 64 bits.
        write(&[0, 0, 8, 3, 0, 0, 0, 4, 0x80, 0, 0, 0, 0x80, 0, 0, 0], &[0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4]);
        let e = read_mnist_idx_dir(&dir, "train").unwrap_err();
        assert!(e.contains("overflow"), "{e}");
        // No images.
        write(&[0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2], &[0, 0, 8, 1, 0, 0, 0, 0]);
        assert!(read_mnist_idx_dir(&dir, "train").unwrap_err().contains("no images"));
        // 0×0 images.
        write(&[0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0, 8, 1, 0, 0, 0, 1, 5]);
        assert!(read_mnist_idx_dir(&dir, "train").unwrap_err().contains("0x0 pixels"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
