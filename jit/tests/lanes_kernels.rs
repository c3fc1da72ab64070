//! Pointwise kernels hand their transcendentals to `tracegrad_jit::lanes` in L1 tiles on
//! machines wider than 128 bits. The lanes compute the JIT's own math, so a kernel compiled
//! with the calls gives the same bits as one compiled without them, for every function, both
//! precisions, row lengths that end mid-tile and mid-vector, and chains of wide nodes.

use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::interpret::NoCallbacks;
use tracegrad_compiler::ops::UnaryOp;
use tracegrad_compiler::{Build, TensorType};
use tracegrad_jit::lanes::{self, Width};
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, DType};

/// `sigmoid(f(a·x + b)) · g(x) + x` over [rows, cols]: two wide nodes in a chain and one
/// beside it, a broadcast operand, and an output reading an input.
fn graph(dtype: DType, rows: usize, cols: usize, f: UnaryOp, g2: UnaryOp) -> Graph {
    let mut g = Graph::new();
    let x = g.add_input("x", InputRole::Data, TensorType::new(dtype, &[rows, cols]));
    let a = g.add_input("a", InputRole::Data, TensorType::new(dtype, &[rows, cols]));
    let bias = g.add_input("b", InputRole::Data, TensorType::new(dtype, &[cols]));
    let ax = g.mul(&a, &x).unwrap();
    let z = g.add(&ax, &bias).unwrap();
    let fz = g.unary(f, &z).unwrap();
    let s = g.unary(UnaryOp::Sigmoid, &fz).unwrap();
    let gx = g.unary(g2, &x).unwrap();
    let p = g.mul(&s, &gx).unwrap();
    let out = g.add(&p, &x).unwrap();
    g.add_output("y", out);
    g
}

/// `lanes::set_kernel_calls` is process-wide: the tests that switch it take turns.
static SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn data(dtype: DType, n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            let v = (u * 2.0 - 1.0) * scale;
            if dtype == DType::F32 {
                v as f32 as f64
            } else {
                v
            }
        })
        .collect()
}

fn buffer(dtype: DType, v: Vec<f64>, shape: &[usize]) -> Buffer {
    Buffer::from_vec(v, shape).cast(dtype)
}

#[test]
fn kernels_with_lane_calls_match_inline_math_bit_for_bit() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let wide = matches!(Width::native(), Width::Avx2 | Width::Avx512);
    let fs = [UnaryOp::Exp, UnaryOp::Tanh, UnaryOp::Silu, UnaryOp::Erf, UnaryOp::Gelu, UnaryOp::GeluTanh];
    for dtype in [DType::F32, DType::F64] {
        for (rows, cols) in [(3, 1000), (1, 4099), (5, 64), (2, 63)] {
            for (i, &f) in fs.iter().enumerate() {
                let g2 = fs[(i + 2) % fs.len()];
                let g = graph(dtype, rows, cols, f, g2);
                let n = rows * cols;
                let inputs = [
                    buffer(dtype, data(dtype, n, 1 + i as u64, 8.0), &[rows, cols]),
                    buffer(dtype, data(dtype, n, 7, 1.5), &[rows, cols]),
                    buffer(dtype, data(dtype, cols, 9, 2.0), &[cols]),
                ];
                lanes::set_kernel_calls(true);
                let with = Executable::new(&g, Backend::Jit).unwrap();
                lanes::set_kernel_calls(false);
                let without = Executable::new(&g, Backend::Jit).unwrap();
                lanes::set_kernel_calls(true);
                let calls = with.clif_text().contains("call_indirect");
                assert_eq!(
                    calls,
                    wide && cols >= 64,
                    "{f:?} {dtype} [{rows}, {cols}]: lane calls expected: {}",
                    !calls
                );
                assert!(!without.clif_text().contains("call_indirect"));
                let a = with.run(&inputs, &NoCallbacks).unwrap();
                let b = without.run(&inputs, &NoCallbacks).unwrap();
                let (a, b) = (a[0].to_f64_vec(), b[0].to_f64_vec());
                for (k, (p, q)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                        "{f:?}/{g2:?} {dtype} [{rows}, {cols}] element {k}: with lanes {p:e}, inline {q:e}"
                    );
                }
            }
        }
    }
}

/// softmax, log_softmax and `f(x) / Σ f(x)` over the rows of `x`: row kernels whose exponential
/// (`exp_scaled`, with a row-constant shift) and `f` run on the lanes a whole row at a time.
fn row_graph(dtype: DType, rows: usize, cols: usize, f: UnaryOp) -> Graph {
    use tracegrad_compiler::composite::{log_softmax, softmax};
    let mut g = Graph::new();
    let x = g.add_input("x", InputRole::Data, TensorType::new(dtype, &[rows, cols]));
    let s = softmax(&mut g, &x, -1).unwrap();
    g.add_output("softmax", s);
    let l = log_softmax(&mut g, &x, -1).unwrap();
    g.add_output("log_softmax", l);
    let fx = g.unary(f, &x).unwrap();
    let sum = g.sum(&fx, &[-1], true).unwrap();
    let q = g.div(&fx, &sum).unwrap();
    g.add_output("normalized", q);
    g
}

#[test]
fn row_kernels_with_lane_calls_match_inline_math_bit_for_bit() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let wide = matches!(Width::native(), Width::Avx2 | Width::Avx512);
    let fs = [UnaryOp::Exp, UnaryOp::Sigmoid, UnaryOp::GeluTanh];
    for dtype in [DType::F32, DType::F64] {
        // Row lengths with and without vector and scalar tails after the unrolled steps (the
        // lanes' sums must add those up in the kernel's order).
        for (rows, cols) in [(6, 1000), (5, 64), (5, 1003), (2, 70), (2, 63), (2, 20000)] {
            for (i, &f) in fs.iter().enumerate() {
                let g = row_graph(dtype, rows, cols, f);
                let mut v = data(dtype, rows * cols, 3 + i as u64, 30.0);
                // Rows with +inf, all -inf, a NaN, and a huge range (terms that underflow).
                if rows >= 5 {
                    v[cols + 7] = f64::INFINITY;
                    v[2 * cols..3 * cols].fill(f64::NEG_INFINITY);
                    v[3 * cols + 1] = f64::NAN;
                    v[4 * cols + 3] = 1e4;
                }
                let inputs = [buffer(dtype, v, &[rows, cols])];
                lanes::set_kernel_calls(true);
                let with = Executable::new(&g, Backend::Jit).unwrap();
                lanes::set_kernel_calls(false);
                let without = Executable::new(&g, Backend::Jit).unwrap();
                lanes::set_kernel_calls(true);
                let calls = with.clif_text().contains("call_indirect");
                // A 20000-column row does not fit the stack's wide rows: inline math.
                assert_eq!(calls, wide && (64..20000).contains(&cols), "{f:?} {dtype} [{rows}, {cols}]: lane calls");
                assert!(!without.clif_text().contains("call_indirect"));
                let a = with.run(&inputs, &NoCallbacks).unwrap();
                let b = without.run(&inputs, &NoCallbacks).unwrap();
                for (o, (a, b)) in a.iter().zip(&b).enumerate() {
                    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
                    for (k, (p, q)) in a.iter().zip(&b).enumerate() {
                        assert!(
                            p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                            "{f:?} {dtype} [{rows}, {cols}] output {o} element {k}: with lanes {p:e}, inline {q:e}"
                        );
                    }
                }
            }
        }
    }
}
