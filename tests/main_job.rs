//! The main job: `tracegrad train` on the embedded digits set.

use std::process::Command;

use tracegrad::data;
use tracegrad::train::{train_classifier, TrainConfig};

#[test]
fn mlp_reaches_95_percent_on_digits() {
    let (train, test) = data::digits().split(0.8, 0);
    let mut epochs_seen = 0;
    let (_, summary) =
        train_classifier(&train, &test, &TrainConfig::default(), |_, _, _| {}, |_| epochs_seen += 1).unwrap();
    assert_eq!(epochs_seen, 20);
    assert!(summary.test_accuracy >= 0.95, "test accuracy {}", summary.test_accuracy);
    assert!(summary.final_loss < 0.3, "final loss {}", summary.final_loss);
}

#[test]
fn cli_train_json_ends_stdout_with_the_contract_object() {
    let out = Command::new(env!("CARGO_BIN_EXE_tracegrad"))
        .args(["train", "--json", "--epochs", "3"])
        .output()
        .expect("run tracegrad");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("some output");
    let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    for key in ["mode", "epochs", "final_loss", "test_accuracy", "train_seconds", "steps_per_second"] {
        assert!(v.get(key).is_some(), "missing {key} in {last}");
    }
    assert_eq!(v["mode"], "compiled", "the default run trains with the compiled step");
    assert_eq!(v["epochs"], 3);
    assert!(stdout.contains("epoch   1/3  loss"), "per-epoch report missing:\n{stdout}");
    assert!(stdout.contains("speed-up over eager: "), "no speed-up line:\n{stdout}");
}

#[test]
fn the_default_run_trains_compiled_to_95_percent() {
    // `cargo run --release` = `tracegrad train` with every default.
    let out = Command::new(env!("CARGO_BIN_EXE_tracegrad")).args(["train", "--json"]).output().expect("run tracegrad");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["mode"], "compiled");
    assert!(v["test_accuracy"].as_f64().unwrap() >= 0.95, "{stdout}");
}

#[test]
fn compiled_training_matches_eager_training() {
    let (train, test) = data::digits().split(0.8, 0);
    let eager = TrainConfig { epochs: 3, ..Default::default() };
    let compiled = TrainConfig { compiled: true, ..eager.clone() };
    let (_, e) = train_classifier(&train, &test, &eager, |_, _, _| {}, |_| {}).unwrap();
    let (_, c) = train_classifier(&train, &test, &compiled, |_, _, _| {}, |_| {}).unwrap();
    assert_eq!(c.mode, "compiled");
    assert!((c.final_loss - e.final_loss).abs() <= 1e-4 * e.final_loss, "{} vs {}", c.final_loss, e.final_loss);
    assert!((c.test_accuracy - e.test_accuracy).abs() <= 0.01);
}

#[test]
fn adam_trains_too() {
    let (train, test) = data::digits().split(0.8, 0);
    let cfg =
        TrainConfig { epochs: 5, lr: 1e-3, optimizer: tracegrad::train::OptimizerKind::Adam, ..Default::default() };
    let (_, s) = train_classifier(&train, &test, &cfg, |_, _, _| {}, |_| {}).unwrap();
    assert!(s.test_accuracy >= 0.9, "{}", s.test_accuracy);
}

#[test]
fn cli_honours_mode_and_optimizer() {
    let out = Command::new(env!("CARGO_BIN_EXE_tracegrad"))
        .args(["train", "--json", "--epochs", "2", "--mode", "compiled", "--optimizer", "adam", "--lr", "0.001"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["mode"], "compiled");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("compiled train step (JIT), Adam lr 0.001"), "{stderr}");
}

#[test]
fn cli_rejects_bad_input() {
    let out = Command::new(env!("CARGO_BIN_EXE_tracegrad"))
        .args(["train", "--dataset", "mnist-csv:/nonexistent.csv"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.csv"));
}
