//! `tracegrad bench` through the built binary: the JSON-lines contract, the unknown-workload
//! error and `--plot`. Not a timing test: it checks shapes and sanity, never speed.

use std::process::{Command, Output};

use serde_json::Value;

/// The bench with `args`, uncapped whatever the caller's environment says.
fn bench(args: &[&str]) -> Output {
    bench_with_isa(None, args)
}

/// The bench with `TRACEGRAD_ISA` set to `isa` (removed for `None`).
fn bench_with_isa(isa: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tracegrad"));
    match isa {
        Some(v) => cmd.env("TRACEGRAD_ISA", v),
        None => cmd.env_remove("TRACEGRAD_ISA"),
    };
    cmd.arg("bench").args(args).output().expect("the tracegrad binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const KEYS: [&str; 7] = ["workload", "mode", "median_ms", "min_ms", "max_ms", "peak_bytes", "compile_ms"];

fn positive(row: &Value, key: &str) -> f64 {
    let v = row[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number in {row}"));
    assert!(v.is_finite() && v > 0.0, "{key} = {v} in {row}");
    v
}

#[test]
fn json_lines_follow_the_contract() {
    let out = bench(&[
        "--json",
        "--iters",
        "2",
        "--workload",
        "mlp_inference_b1",
        "--workload",
        "softmax_rows",
        "--mode",
        "both",
        "--small-reference",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(!stderr.contains("warning"), "unexpected warnings:\n{stderr}");
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    for row in &rows {
        assert!(row.is_object(), "{row}");
        for key in KEYS {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
        assert!(row.get("error").is_none(), "a run failed: {row}");
        let (med, lo, hi) = (positive(row, "median_ms"), positive(row, "min_ms"), positive(row, "max_ms"));
        assert!(lo <= med && med <= hi, "median {med} not within [{lo}, {hi}] in {row}");
        // The binary registers the counting allocator, so peak_bytes is measured, not null.
        assert!(row["peak_bytes"].is_u64(), "peak_bytes not a count in {row}");
    }

    let find = |w: &str, mode: &str| {
        rows.iter()
            .find(|r| r["workload"] == w && r["mode"] == mode)
            .unwrap_or_else(|| panic!("no {w} ({mode}) row in:\n{stdout}"))
    };
    for w in ["mlp_inference_b1", "softmax_rows"] {
        assert!(find(w, "eager")["compile_ms"].is_null(), "eager rows have no compile time");
        let c = &find(w, "compiled")["compile_ms"];
        assert!(c.as_f64().is_some_and(|v| v >= 0.0), "compiled {w}: compile_ms = {c}");
    }
    // softmax_rows makes a fresh 16 MiB output each call, in both modes.
    for mode in ["eager", "compiled"] {
        let peak = find("softmax_rows", mode)["peak_bytes"].as_u64().unwrap();
        assert!(peak >= 4096 * 1024 * 4, "softmax_rows ({mode}) peak {peak} is below its output's size");
    }

    let memcpy = find("memcpy", "reference");
    positive(memcpy, "gbps");
    let sgemm = rows
        .iter()
        .find(|r| r["mode"] == "reference" && r["workload"].as_str().is_some_and(|w| w.starts_with("sgemm_")))
        .unwrap_or_else(|| panic!("no sgemm reference row in:\n{stdout}"));
    positive(sgemm, "gflops");
    for r in [memcpy, sgemm] {
        assert!(
            ["avx512", "avx512+gemm-avx2", "avx2", "sse"].contains(&r["isa"].as_str().unwrap_or("?"))
                || !cfg!(target_arch = "x86_64"),
            "{r}"
        );
        assert!(r["threads"].as_u64().is_some_and(|t| t >= 1), "{r}");
    }
    assert_eq!(rows.len(), 2 + 2 * 2, "two reference rows and two modes of two workloads:\n{stdout}");
}

/// `TRACEGRAD_ISA=avx2` shows in the reference rows' `isa`: `avx2` where the products run at
/// AVX2 too, `avx2+gemm-avx512` where gemm's AVX-512 kernels are built in and the CPU has
/// AVX-512. An unknown value stops the bench before it runs anything.
#[test]
fn an_isa_cap_is_reported_and_a_bad_one_refused() {
    let out = bench_with_isa(Some("avx2"), &["--json", "--iters", "1", "--workload", "mlp_inference_b1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let memcpy: Value = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["workload"] == "memcpy")
        .unwrap_or_else(|| panic!("no memcpy row in:\n{stdout}"));
    #[cfg(target_arch = "x86_64")]
    {
        let expect = if !std::arch::is_x86_feature_detected!("avx512f") {
            if std::arch::is_x86_feature_detected!("avx2") {
                "avx2"
            } else {
                "sse"
            }
        } else if cfg!(feature = "gemm-avx512") {
            "avx2+gemm-avx512"
        } else {
            "avx2"
        };
        assert_eq!(memcpy["isa"], expect, "{memcpy}");
    }
    let bad = bench_with_isa(Some("avx9"), &["--iters", "1", "--workload", "mlp_inference_b1"]);
    assert!(!bad.status.success(), "an unknown TRACEGRAD_ISA must fail");
    let stderr = text(&bad.stderr);
    assert!(stderr.contains("TRACEGRAD_ISA") && stderr.contains("\"avx9\""), "{stderr}");
    assert!(bad.stdout.is_empty(), "nothing should run: {}", text(&bad.stdout));
}

#[test]
fn unknown_workload_is_a_clear_error() {
    let out = bench(&["--workload", "no_such_workload", "--iters", "1"]);
    assert!(!out.status.success(), "an unknown workload must fail");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no_such_workload"), "{stderr}");
    for w in tracegrad::bench::WORKLOADS {
        assert!(stderr.contains(w), "the error should list {w}:\n{stderr}");
    }
    assert!(out.stdout.is_empty(), "nothing should run: {}", text(&out.stdout));
}

#[test]
fn plot_writes_an_svg() {
    let dir = std::env::temp_dir().join(format!("tracegrad-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bench.svg");
    let out = bench(&[
        "--iters",
        "1",
        "--workload",
        "mlp_inference_b1",
        "--threads",
        "1",
        "--small-reference",
        "--plot",
        path.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{}", text(&out.stderr));
    // The text table: a header with the speed-up column, the workload and the reference rows.
    assert!(stdout.contains("speed-up") && stdout.contains("mlp_inference_b1"), "{stdout}");
    assert!(stdout.contains("memcpy") && stdout.contains("GB/s") && stdout.contains("GFLOP/s"), "{stdout}");
    let svg = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.trim_end().ends_with("</svg>"), "unterminated SVG");
    assert!(svg.contains("mlp_inference_b1") && svg.contains("eager") && svg.contains("compiled"), "{svg}");
    // `--threads 1` reaches the reference rows.
    assert!(stdout.lines().any(|l| l.starts_with("memcpy") && l.trim_end().ends_with(" 1")), "{stdout}");
}
