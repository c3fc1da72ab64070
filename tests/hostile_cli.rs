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
