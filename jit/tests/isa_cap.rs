//! `TRACEGRAD_ISA=avx2` caps the lanes at AVX2 and keeps Cranelift from AVX-512 encodings,
//! so an AVX-512 machine runs its kernels as an AVX2 machine would: the same bits, from the
//! narrower paths. The cap is read once per process, so each case runs in a child process.

use std::process::Command;

use tracegrad_compiler::composite::{layer_norm, softmax};
use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::interpret::NoCallbacks;
use tracegrad_compiler::ops::UnaryOp;
use tracegrad_compiler::{Build, TensorType};
use tracegrad_jit::lanes::Width;
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, DType};

const CHILD: &str = "TRACEGRAD_ISA_TEST_CHILD";
/// The kernels' rows and columns.
const ROWS: usize = 6;
const COLS: usize = 1000;

/// A pointwise kernel with transcendentals (tiles of lane calls), softmax (row lane calls)
/// and layer_norm with weight and bias (the affine lane call), over rows of 1000.
fn graph() -> Graph {
    let (rows, cols) = (ROWS, COLS);
    let mut g = Graph::new();
    let t = TensorType::new(DType::F32, &[rows, cols]);
    let x = g.add_input("x", InputRole::Data, t);
    let w = g.add_input("w", InputRole::Data, TensorType::new(DType::F32, &[cols]));
    let b = g.add_input("b", InputRole::Data, TensorType::new(DType::F32, &[cols]));
    let th = g.unary(UnaryOp::Tanh, &x).unwrap();
    let ge = g.unary(UnaryOp::Gelu, &x).unwrap();
    let p = g.mul(&th, &ge).unwrap();
    g.add_output("pointwise", p);
    let s = softmax(&mut g, &x, -1).unwrap();
    g.add_output("softmax", s);
    let l = layer_norm(&mut g, &x, &[cols], Some(&w), Some(&b), 1e-5).unwrap();
    g.add_output("layer_norm", l);
    g
}

/// FNV-1a over the outputs' bits.
fn fingerprint() -> u64 {
    let (rows, cols) = (ROWS, COLS);
    let ramp = |n: usize, k: f64| -> Vec<f32> { (0..n).map(|i| ((i as f64 * k).sin() * 6.0) as f32).collect() };
    let inputs = [
        Buffer::from_vec(ramp(rows * cols, 0.37), &[rows, cols]),
        Buffer::from_vec(ramp(cols, 1.1), &[cols]),
        Buffer::from_vec(ramp(cols, 0.7), &[cols]),
    ];
    let exe = Executable::new(&graph(), Backend::Jit).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for out in exe.run(&inputs, &NoCallbacks).unwrap() {
        for v in out.to_f64_vec() {
            for byte in v.to_bits().to_le_bytes() {
                h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    h
}

/// The child's report: the cap (or why the value is refused), the path the lanes take, and
/// the fingerprint of the kernels' outputs.
#[test]
fn child_reports_its_paths() {
    if std::env::var(CHILD).is_err() {
        eprintln!("run by the other tests of this file in a child process; nothing to do here");
        return;
    }
    match Width::env_cap() {
        Ok(cap) => println!("CAP {cap:?} NATIVE {:?} BITS {:x}", Width::native(), fingerprint()),
        Err(e) => println!("CAP_ERR {e}"),
    }
}

fn child(isa: Option<&str>) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_reports_its_paths", "--nocapture", "--test-threads=1"]).env(CHILD, "1");
    match isa {
        Some(v) => cmd.env("TRACEGRAD_ISA", v),
        None => cmd.env_remove("TRACEGRAD_ISA"),
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The harness prints the test's name on the same line, before the report.
    let at = stdout.find("CAP").unwrap_or_else(|| panic!("no report in {stdout:?}"));
    stdout[at..].lines().next().unwrap().to_string()
}

fn widest() -> Width {
    Width::ALL.into_iter().rev().find(|w| w.supported()).unwrap()
}

#[test]
fn avx2_cap_runs_the_narrower_paths_with_the_same_bits() {
    let free = child(None);
    let capped = child(Some("avx2"));
    let expect_free = format!("CAP Avx512 NATIVE {:?} ", widest());
    let expect_capped = format!("CAP Avx2 NATIVE {:?} ", widest().min(Width::Avx2));
    assert!(free.starts_with(&expect_free), "{free}");
    assert!(capped.starts_with(&expect_capped), "{capped}");
    let bits = |r: &str| r.rsplit(' ').next().unwrap().to_string();
    assert_eq!(bits(&free), bits(&capped), "uncapped {free}, capped {capped}");
    assert_eq!(child(Some("AVX512")), free, "the value is case-blind");
}

#[test]
fn an_unknown_isa_is_refused_by_name() {
    let r = child(Some("avx1024"));
    assert!(r.starts_with("CAP_ERR") && r.contains("\"avx1024\"") && r.contains("avx2 or avx512"), "{r}");
}
