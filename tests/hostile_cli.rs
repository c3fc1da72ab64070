//! The CLI as a careless or hostile user runs it: every case must end with a clear error line
//! and a non-zero exit, never a panic (101), an abort (134), a stack overflow (139) or a hang.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `tracegrad args` with a deadline; returns (exit code, stderr).
fn run(args: &[&str], timeout: Duration) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tracegrad"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tracegrad");
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            let code = status.code().unwrap_or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                128 + status.signal().unwrap_or(0)
            });
            return (code, err);
        }
        if t0.elapsed() > timeout {
            child.kill().ok();
            panic!("tracegrad {args:?} ran past {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a clean failure whose last stderr line is `error: …` containing `want`.
#[track_caller]
fn fails_with(args: &[&str], want: &str) {
    let (code, err) = run(args, Duration::from_secs(60));
    assert!(![101, 134, 139].contains(&code), "tracegrad {args:?} crashed ({code}):\n{err}");
    assert_ne!(code, 0, "tracegrad {args:?} succeeded:\n{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(want),
        "tracegrad {args:?}: last line {last:?}, want {want:?}"
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracegrad-hostile-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::File::create(path).unwrap().write_all(bytes).unwrap();
}

/// An IDX images file `[n, rows, cols]` and a labels file `[n]`.
fn idx_pair(dir: &Path, split: &str, n: u32, rows: u32, cols: u32, payload: bool) {
    let mut img = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        img.extend(d.to_be_bytes());
    }
    if payload {
        img.extend((0..n * rows * cols).map(|i| (i % 251) as u8));
    }
    let mut lbl = vec![0, 0, 8, 1];
    lbl.extend(n.to_be_bytes());
    lbl.extend((0..n).map(|i| (i % 10) as u8));
    write(&dir.join(format!("{split}-images-idx3-ubyte")), &img);
    write(&dir.join(format!("{split}-labels-idx1-ubyte")), &lbl);
}

#[test]
fn bad_hyperparameters_fail_before_training() {
    fails_with(&["train", "--lr=-0.1", "--epochs", "1"], "Invalid learning rate: -0.1");
    fails_with(&["train", "--lr=-0.1", "--epochs", "1", "--mode", "eager"], "Invalid learning rate: -0.1");
    fails_with(&["train", "--lr=-0.1", "--epochs", "1", "--optimizer", "adam"], "Invalid learning rate");
    fails_with(&["train", "--lr", "nan"], "--lr must be a finite number");
    fails_with(&["train", "--lr", "inf", "--mode", "eager"], "--lr must be a finite number");
    fails_with(&["train", "--epochs", "0"], "--epochs must be at least 1");
    fails_with(&["train", "--batch-size", "0"], "--batch-size must be positive");
    fails_with(&["train", "--dataset", "cifar"], "unknown dataset");
}

#[test]
fn hostile_csv_files_are_errors() {
    let dir = scratch("csv");
    fails_with(&["train", "--dataset", "mnist-csv:/dev/zero"], "longer than");
    fails_with(&["train", "--dataset", &format!("mnist-csv:{}", dir.join("missing.csv").display())], "missing.csv");
    let row = |label: &str, pixel: &str| {
        let mut s = vec![pixel; 784].join(",");
        s.push(',');
        s.push_str(label);
        s.push('\n');
        s
    };
    for (name, label, pixel, want) in [
        ("big.csv", "1000000000", "1", "label 1000000000 is outside 0..10000"),
        ("huge.csv", "9223372036854775807", "1", "outside 0..10000"),
        ("million.csv", "1000000", "1", "label 1000000 is outside"),
        ("neg.csv", "-3", "1", "label -3"),
        ("nan.csv", "1", "NaN", "is not finite"),
        ("inf.csv", "1", "inf", "is not finite"),
        ("text.csv", "1", "abc", "bad pixel value"),
    ] {
        let p = dir.join(name);
        write(&p, row(label, pixel).repeat(3).as_bytes());
        fails_with(&["train", "--epochs", "1", "--dataset", &format!("mnist-csv:{}", p.display())], want);
    }
    let empty = dir.join("empty.csv");
    write(&empty, b"\n\n");
    fails_with(&["train", "--dataset", &format!("mnist-csv:{}", empty.display())], "no samples");
    // Two samples split 0.8/0.2 leave an empty... or a one-sample test split: never NaN accuracy.
    let one = dir.join("one.csv");
    write(&one, row("1", "3").as_bytes());
    fails_with(&["train", "--epochs", "1", "--dataset", &format!("mnist-csv:{}", one.display())], "must be non-empty");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hostile_idx_files_are_errors() {
    let spec = |d: &Path| format!("mnist-idx:{}", d.display());
    let d = scratch("idx-overflow");
    idx_pair(&d, "train", 4, 1 << 31, 1 << 31, false);
    fails_with(&["train", "--dataset", &spec(&d)], "overflow");
    let d = scratch("idx-empty");
    idx_pair(&d, "train", 0, 28, 28, true);
    fails_with(&["train", "--dataset", &spec(&d)], "no images");
    let d = scratch("idx-zero");
    idx_pair(&d, "train", 5, 0, 0, true);
    fails_with(&["train", "--dataset", &spec(&d)], "0x0 pixels");
    let d = scratch("idx-mismatch");
    idx_pair(&d, "train", 20, 4, 4, true);
    idx_pair(&d, "t10k", 5, 3, 3, true);
    fails_with(&["train", "--epochs", "1", "--dataset", &spec(&d)], "16 features but test samples have 9");
    let d = scratch("idx-corrupt-test");
    idx_pair(&d, "train", 20, 4, 4, true);
    write(&d.join("t10k-images-idx3-ubyte"), &[0, 0, 8, 3, 0, 0]);
    write(&d.join("t10k-labels-idx1-ubyte"), &[0, 0, 8, 1, 0, 0, 0, 0]);
    fails_with(&["train", "--epochs", "1", "--dataset", &spec(&d)], "truncated IDX header");
    let d = scratch("idx-missing");
    fails_with(&["train", "--dataset", &spec(&d)], "no train-images-idx3-ubyte");
    for name in ["overflow", "empty", "zero", "mismatch", "corrupt-test", "missing"] {
        std::fs::remove_dir_all(scratch(&format!("idx-{name}"))).ok();
    }
}

#[test]
fn a_small_valid_idx_set_trains_with_real_numbers() {
    let d = scratch("idx-ok");
    idx_pair(&d, "train", 40, 4, 4, true);
    idx_pair(&d, "t10k", 10, 4, 4, true);
    let out = Command::new(env!("CARGO_BIN_EXE_tracegrad"))
        .args([
            "train",
            "--epochs",
            "1",
            "--mode",
            "eager",
            "--json",
            "--dataset",
            &format!("mnist-idx:{}", d.display()),
        ])
        .output()
        .expect("run tracegrad");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains("NaN"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(v["test_accuracy"].as_f64().unwrap().is_finite());
    std::fs::remove_dir_all(&d).ok();
}

/// Asserts a clean usage error from clap (exit 2, `error: invalid value …`).
#[track_caller]
fn usage_error(args: &[&str], want: &str) {
    let (code, err) = run(args, Duration::from_secs(30));
    assert_eq!(code, 2, "tracegrad {args:?}:\n{err}");
    assert!(err.lines().next().unwrap_or_default().starts_with("error: ") && err.contains(want), "{err}");
}

#[test]
fn bench_and_dump_bounds_fail_before_any_work() {
    usage_error(&["bench", "--iters", "18446744073709551615"], "is not in 1..=100000");
    usage_error(&["bench", "--iters", "0"], "is not in 1..=100000");
    usage_error(&["bench", "--threads", "100000"], "is not in 1..=1024");
    usage_error(&["bench", "--workload", "nope"], "invalid value 'nope'");
    let t0 = Instant::now();
    fails_with(&["bench", "--plot", "/nonexistent/dir/x.svg"], "--plot /nonexistent/dir/x.svg");
    assert!(t0.elapsed() < Duration::from_secs(10), "the plot path was checked only after measuring");
    fails_with(&["dump", "--model", "mlp", "--batch", "4611686018427387905", "--stage", "plan"], "outside 1..=");
    fails_with(&["dump", "--model", "mlp", "--batch", "0"], "batch size 0 is outside");
    fails_with(&["dump", "--model", "resnet"], "unknown model");
    fails_with(&["dump", "--model", "mlp", "--stage", "nope"], "nope");
    fails_with(&["dump", "--model", "mlp", "--format", "pdf"], "unknown format");
    fails_with(&["dump", "--model", "mlp", "-o", "/nonexistent/dir/g.txt"], "/nonexistent/dir/g.txt");
}

/// Files for the ONNX, `.npy` and checkpoint cases: garbage, empty, random bytes, a directory.
fn hostile_files(dir: &Path) {
    write(&dir.join("bad.onnx"), b"garbage");
    write(&dir.join("empty.onnx"), b"");
    let noise: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    write(&dir.join("rand.onnx"), &noise);
    write(&dir.join("rand.ckpt"), &noise[..3000]);
    write(&dir.join("bad.npy"), b"\x93NUMPY\x01\x00garbage");
    write(&dir.join("bad.ckpt"), b"not a checkpoint");
    write(&dir.join("empty.ckpt"), b"");
    std::fs::create_dir_all(dir.join("adir")).unwrap();
}

/// Corrupt variants of the real checkpoint `a.ckpt`: cut in half, its last tensor bytes
/// overwritten with 0xff (NaN weights that still parse), and a header length of 2^63.
fn corrupt_checkpoints(dir: &Path) {
    let good = std::fs::read(dir.join("a.ckpt")).unwrap();
    write(&dir.join("half.ckpt"), &good[..good.len() / 2]);
    let mut nan = good.clone();
    let n = nan.len();
    nan[n - 20..].fill(0xff);
    write(&dir.join("nan.ckpt"), &nan);
    let mut hdr = good;
    hdr[..8].copy_from_slice(&(1u64 << 63).to_le_bytes());
    write(&dir.join("hdr.ckpt"), &hdr);
}

/// 59 failing cases of our own (57 calls, one of them looping over 3 files) and one real
/// `--save` run; with the earlier tests' cases, over 90 in this file. ONNX files for `run`, `dump
/// --onnx` and `bench --onnx`; the CNN and transformer models; `--save`/`--resume` with bad
/// paths and corrupt checkpoints; malformed numbers and names. Each must end in one clear
/// `error:` line and a non-zero exit (`fails_with`: the program's own error, exit 1;
/// `usage_error`: clap's, exit 2).
#[test]
fn hostile_files_and_arguments_for_every_subcommand() {
    let dir = scratch("files");
    hostile_files(&dir);
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (bad, empty, rand, npy, adir) = (p("bad.onnx"), p("empty.onnx"), p("rand.onnx"), p("bad.npy"), p("adir"));
    let out = p("out.npy");
    // run FILE.onnx
    fails_with(&["run", &bad, "--input", &npy, "-o", &out], "not a valid ONNX model");
    fails_with(&["run", &empty, "--input", &npy, "-o", &out], "imports no ai.onnx opset");
    fails_with(&["run", &rand, "--input", &npy, "-o", &out], "not a valid ONNX model");
    fails_with(&["run", "/nonexistent.onnx", "--input", &npy, "-o", &out], "/nonexistent.onnx");
    fails_with(&["run", &adir, "--input", &npy, "-o", &out], "adir");
    fails_with(&["run", &bad, "--input", &npy, "-o", "/nonexistent/dir/y.npy"], "bad.onnx");
    usage_error(&["run", &bad, "--input", &npy, "-o", &out, "--mode", "jit"], "invalid value 'jit'");
    usage_error(&["run", &bad], "required arguments were not provided");
    // dump --onnx
    fails_with(&["dump", "--onnx", &bad], "not a valid ONNX model");
    fails_with(&["dump", "--onnx", &empty], "imports no ai.onnx opset");
    fails_with(&["dump", "--onnx", "/nonexistent.onnx"], "/nonexistent.onnx");
    fails_with(&["dump", "--onnx", &adir], "adir");
    fails_with(&["dump", "--onnx", &rand, "--stage", "plan"], "not a valid ONNX model");
    fails_with(&["dump", "--onnx", &bad, "--batch", "0"], "batch size 0 is outside");
    fails_with(&["dump", "--onnx", &bad, "--format", "pdf"], "unknown format");
    usage_error(&["dump", "--model", "mlp", "--onnx", &bad], "cannot be used with");
    usage_error(&["dump"], "required arguments were not provided");
    fails_with(&["dump", "--model", "mlp", "--stage", "clif", "--format", "svg"], "only a text form");
    // bench --onnx
    usage_error(&["bench", "--onnx", &bad, "--iters", "1"], "required arguments were not provided");
    usage_error(&["bench", "--input-shape", "1,2", "--iters", "1"], "required arguments were not provided");
    fails_with(&["bench", "--onnx", &empty, "--input-shape", "1,2", "--iters", "1"], "imports no ai.onnx opset");
    fails_with(&["bench", "--onnx", &bad, "--input-shape", "1,2", "--iters", "1"], "not a valid ONNX model");
    fails_with(&["bench", "--onnx", &bad, "--input-shape", "x,y", "--iters", "1"], "--input-shape");
    fails_with(&["bench", "--onnx", &bad, "--input-shape", "", "--iters", "1"], "--input-shape");
    fails_with(&["bench", "--onnx", &bad, "--input-shape", "1,,2", "--iters", "1"], "--input-shape");
    fails_with(&["bench", "--onnx", &bad, "--input-shape", "0,18446744073709551615", "--iters", "1"], "--input-shape");
    fails_with(&["bench", "--onnx", &bad, "--input-shape", "1,2", "--iters", "1", "--distributed"], "--distributed");
    // --model cnn|transformer
    fails_with(&["train", "--model", "cnn", "--dataset", "mnist-csv:/nonexistent.csv"], "/nonexistent.csv");
    fails_with(&["train", "--model", "transformer", "--dataset", "mnist-idx:/nonexistent"], "no train-images");
    fails_with(&["train", "--model", "cnn", "--batch-size", "0"], "--batch-size must be positive");
    fails_with(&["train", "--model", "transformer", "--lr=-1"], "Invalid learning rate");
    fails_with(&["train", "--model", "cnn", "--lr", "inf"], "--lr must be a finite number");
    fails_with(&["train", "--model", "cnn", "--dataset", "mnist-csv:/dev/null"], "no samples");
    fails_with(&["train", "--model", "cnn", "--distributed"], "--distributed trains --model mlp only");
    usage_error(&["train", "--model", "rnn"], "invalid value 'rnn'");
    // --save / --resume
    for ck in ["bad.ckpt", "empty.ckpt", "rand.ckpt"] {
        fails_with(&["train", "--resume", &p(ck), "--epochs", "2"], "invalid safetensors data");
    }
    fails_with(&["train", "--resume", "/nonexistent.ckpt"], "no such checkpoint file");
    fails_with(&["train", "--resume", &adir], "no such checkpoint file");
    fails_with(&["train", "--save", "/nonexistent/dir/x.ckpt"], "does not exist");
    fails_with(&["train", "--save", &adir], "is a directory");
    usage_error(&["train", "--save"], "a value is required");
    let (code, err) = run(&["train", "--epochs", "1", "--save", &p("a.ckpt")], Duration::from_secs(120));
    assert_eq!(code, 0, "a real checkpoint: {err}");
    corrupt_checkpoints(&dir);
    let a = p("a.ckpt");
    fails_with(&["train", "--model", "cnn", "--resume", &a, "--epochs", "2"], "has 4 tensors, this model 6");
    fails_with(&["train", "--optimizer", "adam", "--resume", &a, "--epochs", "2"], "not a Adam state dict");
    fails_with(&["train", "--resume", &a, "--epochs", "1"], "leaves noth");
    fails_with(&["train", "--resume", &p("half.ckpt"), "--epochs", "2"], "beyond the end");
    fails_with(&["train", "--resume", &p("nan.ckpt"), "--epochs", "2"], "NaN or infinite");
    fails_with(&["train", "--resume", &p("hdr.ckpt"), "--epochs", "2"], "header too large");
    fails_with(&["train", "--resume", &a, "--save", "/nonexistent/d/b.ckpt", "--epochs", "2"], "does not exist");
    // malformed numbers and names
    fails_with(&["train", "--dataset", "nope:x"], "unknown dataset");
    fails_with(&["train", "--dataset", "mnist-csv:"], "No such file");
    fails_with(&["train", "--dataset", "mnist-idx:"], "no train-images");
    fails_with(&["train", "--lr", "1e400"], "--lr must be a finite number");
    usage_error(&["train", "--seed", "-1"], "unexpected argument '-1'");
    usage_error(&["train", "--batch-size", "1.5"], "invalid value '1.5'");
    usage_error(&["train", "--optimizer", "lbfgs"], "invalid value 'lbfgs'");
    usage_error(&["models", "extra"], "unexpected argument 'extra'");
    // A gzip holding one 1 GiB line (1 MiB compressed): the line bound fires while decoding.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let chunk = vec![b'1'; 1 << 20];
    for _ in 0..1024 {
        gz.write_all(&chunk).unwrap();
    }
    write(&dir.join("line.csv.gz"), &gz.finish().unwrap());
    fails_with(&["train", "--dataset", &format!("mnist-csv:{}", p("line.csv.gz"))], "longer than");
    let _ = std::fs::remove_dir_all(&dir);
}
