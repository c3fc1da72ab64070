//! `tracegrad train --model mlp|cnn|transformer` (issue 12, acceptance line 7) and
//! `--save`/`--resume`: each model reaches 95% test accuracy on the embedded digits, eager and
//! compiled; a run resumed after 2 of 4 epochs ends exactly as the uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tracegrad::data;
use tracegrad::nn::ModuleExt;
use tracegrad::train::{train_classifier, ModelKind, TrainConfig};

fn tracegrad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tracegrad")).args(args).output().expect("run tracegrad")
}

/// Runs `tracegrad train ARGS --json`; returns stdout and its final JSON object.
fn train_json(args: &[&str]) -> (String, serde_json::Value) {
    let mut all = vec!["train", "--json"];
    all.extend(args);
    let out = tracegrad(&all);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v = serde_json::from_str(stdout.lines().last().expect("some output")).expect("last line is JSON");
    (stdout, v)
}

fn reaches_95(args: &[&str], mode: &str) {
    let (stdout, v) = train_json(args);
    assert_eq!(v["mode"], mode);
    let acc = v["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "{args:?}: test accuracy {acc}\n{stdout}");
}

#[test]
fn cnn_reaches_95_percent_eager() {
    reaches_95(&["--model", "cnn", "--mode", "eager"], "eager");
}

#[test]
fn cnn_reaches_95_percent_compiled() {
    reaches_95(&["--model", "cnn", "--mode", "compiled"], "compiled");
}

#[test]
fn transformer_reaches_95_percent_eager() {
    reaches_95(&["--model", "transformer", "--mode", "eager"], "eager");
}

#[test]
fn transformer_reaches_95_percent_compiled() {
    reaches_95(&["--model", "transformer", "--mode", "compiled"], "compiled");
}

#[test]
fn non_square_samples_are_an_error_for_image_models() {
    let (train, test) = data::digits().split(0.8, 0);
    let cut = |l: &data::Labeled| data::Labeled { x: l.x.narrow(1, 0, 60), y: l.y.clone(), classes: l.classes };
    for model in [ModelKind::Cnn, ModelKind::Transformer] {
        let cfg = TrainConfig { epochs: 1, model, ..Default::default() };
        let e = train_classifier(&cut(&train), &cut(&test), &cfg, |_, _, _| {}, |_| {}).err().expect("an error");
        assert!(e.contains("reads each sample as a square image of at least 4×4, but samples have 60 features"), "{e}");
    }
}

/// A scratch directory of its own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("tracegrad-resume-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The per-epoch lines without their timing.
fn epoch_lines(stdout: &str) -> Vec<String> {
    stdout.lines().filter(|l| l.starts_with("epoch")).map(|l| l.split("  (").next().unwrap().to_string()).collect()
}

/// `--epochs 2 --save` then `--epochs 4 --resume` against `--epochs 4`: the same epochs 3 and 4
/// and the same summary, bit for bit (all but the timings).
fn cli_resume_matches(mode: &str, optimizer: &[&str]) {
    // Tests run in parallel: each gets its own directory.
    let dir = Scratch::new(&format!("{mode}{}", optimizer.join("")));
    let ck = dir.path("run.safetensors");
    let common: Vec<&str> = [&["--mode", mode], optimizer].concat();
    let (full_out, full) = train_json(&[&common[..], &["--epochs", "4"]].concat());
    let (first_out, _) = train_json(&[&common[..], &["--epochs", "2", "--save", &ck]].concat());
    assert!(Path::new(&ck).is_file());
    let (rest_out, rest) = train_json(&[&common[..], &["--epochs", "4", "--resume", &ck]].concat());
    for key in ["mode", "epochs", "final_loss", "test_accuracy"] {
        assert_eq!(rest[key], full[key], "{mode}: {key} differs:\n{rest_out}\nvs\n{full_out}");
    }
    let (full_epochs, first_epochs, rest_epochs) =
        (epoch_lines(&full_out), epoch_lines(&first_out), epoch_lines(&rest_out));
    assert_eq!(first_epochs.len(), 2);
    assert_eq!(rest_epochs.len(), 2, "the resumed run trains epochs 3 and 4 only:\n{rest_out}");
    assert_eq!(first_epochs[..], full_epochs[..2].iter().map(|l| l.replace("/4", "/2")).collect::<Vec<_>>()[..]);
    assert_eq!(rest_epochs[..], full_epochs[2..]);
}

#[test]
fn cli_resume_after_2_of_4_epochs_is_the_uninterrupted_run_compiled() {
    cli_resume_matches("compiled", &["--optimizer", "adam", "--lr", "0.001"]);
}

#[test]
fn cli_resume_after_2_of_4_epochs_is_the_uninterrupted_run_eager() {
    cli_resume_matches("eager", &[]);
}

/// The library call behind the CLI: the resumed model's parameters are the uninterrupted
/// run's, bit for bit, for each model without dropout.
#[test]
fn resumed_models_are_bit_identical() {
    let (train, test) = data::digits().split(0.8, 0);
    let dir = Scratch::new("lib");
    for (model, compiled) in [(ModelKind::Mlp, true), (ModelKind::Cnn, false), (ModelKind::Cnn, true)] {
        let ck = PathBuf::from(dir.path("lib.safetensors"));
        let cfg = TrainConfig { epochs: 3, model, compiled, ..Default::default() };
        let (full, s_full) = train_classifier(&train, &test, &cfg, |_, _, _| {}, |_| {}).unwrap();
        let first = TrainConfig { epochs: 1, save: Some(ck.clone()), ..cfg.clone() };
        train_classifier(&train, &test, &first, |_, _, _| {}, |_| {}).unwrap();
        let mut epochs = Vec::new();
        let rest = TrainConfig { resume: Some(ck.clone()), ..cfg.clone() };
        let (resumed, s_rest) = train_classifier(&train, &test, &rest, |_, _, _| {}, |r| epochs.push(r.epoch)).unwrap();
        assert_eq!(epochs, vec![2, 3]);
        let (a, b): (Vec<_>, Vec<_>) = (
            full.parameters().iter().map(|p| p.to_vec_f32()).collect(),
            resumed.parameters().iter().map(|p| p.to_vec_f32()).collect(),
        );
        assert_eq!(a, b, "{model:?} compiled={compiled}");
        assert_eq!((s_full.final_loss, s_full.test_accuracy), (s_rest.final_loss, s_rest.test_accuracy));
    }
}

#[test]
fn checkpoint_paths_are_checked_up_front() {
    let dir = Scratch::new("paths");
    let fails = |args: &[&str], want: &str| {
        let out = tracegrad(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {want:?} not in {stderr}");
        assert!(!stderr.contains("training "), "{args:?}: it started training before failing:\n{stderr}");
    };
    let missing = dir.path("missing.safetensors");
    fails(&["train", "--resume", &missing], "no such checkpoint file");
    let in_missing_dir = dir.path("no/such/dir/run.safetensors");
    fails(&["train", "--save", &in_missing_dir], "does not exist");
    fails(&["train", "--save", &dir.0.display().to_string()], "is a directory");
    let junk = dir.path("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    fails(&["train", "--resume", &junk], &junk);
    // A checkpoint with every epoch done leaves nothing to train.
    let ck = dir.path("done.safetensors");
    train_json(&["--mode", "eager", "--epochs", "1", "--save", &ck]);
    let out = tracegrad(&["train", "--mode", "eager", "--epochs", "1", "--resume", &ck]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("leaves nothing to train"));
    // A checkpoint of another model is refused by the load.
    let out = tracegrad(&["train", "--mode", "eager", "--model", "cnn", "--epochs", "2", "--resume", &ck]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&ck));
}

/// The transformer has dropout: resuming restores the default generator's state from the
/// checkpoint, so its masks in epochs 3 and 4 are the uninterrupted run's.
#[test]
fn cli_resume_with_dropout_is_the_uninterrupted_run_compiled() {
    cli_resume_matches("compiled", &["--model", "transformer"]);
}
