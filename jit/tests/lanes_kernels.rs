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

/// How CLIF text writes `iconst` of the address `a` (Cranelift's `Imm64` display): the
/// calls to one lanes entry show as that constant.
fn clif_addr(a: usize) -> String {
    let x = a as u64;
    if x < 10_000 {
        return x.to_string();
    }
    let mut pos = (64 - x.leading_zeros() - 1) & 0xf0;
    let mut s = format!("0x{:04x}", (x >> pos) & 0xffff);
    while pos > 0 {
        pos -= 16;
        s += &format!("_{:04x}", (x >> pos) & 0xffff);
    }
    s
}

/// Asserts that `with` (a run with lane calls) and `without` (inline math) hold the same bits
/// element for element (any NaN matching any NaN).
fn assert_same_bits(with: &Buffer, without: &Buffer, what: &str) {
    let (a, b) = (with.to_f64_vec(), without.to_f64_vec());
    for (k, (p, q)) in a.iter().zip(&b).enumerate() {
        assert!(
            p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
            "{what} element {k}: with lanes {p:e}, inline {q:e}"
        );
    }
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
                assert_same_bits(&a[0], &b[0], &format!("{f:?}/{g2:?} {dtype} [{rows}, {cols}]"));
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
                let calls = with.clif_text().contains(&clif_addr(lanes::kernel_entry as *const () as usize));
                // A 20000-column row does not fit the stack's wide rows: inline math (a
                // last sweep may still call `affine_entry`).
                assert_eq!(calls, wide && (64..20000).contains(&cols), "{f:?} {dtype} [{rows}, {cols}]: lane calls");
                assert!(!without.clif_text().contains("call_indirect"));
                let a = with.run(&inputs, &NoCallbacks).unwrap();
                let b = without.run(&inputs, &NoCallbacks).unwrap();
                for (o, (a, b)) in a.iter().zip(&b).enumerate() {
                    assert_same_bits(a, b, &format!("{f:?} {dtype} [{rows}, {cols}] output {o}"));
                }
            }
        }
    }
}

/// Row kernels whose last sweep is one output `((x − c) ∘ p) · w + b` (any of its steps):
/// layer_norm with and without its affine, an RMS norm, softmax, log_softmax and a row sum
/// division, each alone in its graph.
fn affine_graphs(dtype: DType, rows: usize, cols: usize) -> Vec<(&'static str, Graph)> {
    use tracegrad_compiler::composite::{layer_norm, log_softmax, mean, softmax};
    let input = |g: &mut Graph| g.add_input("x", InputRole::Data, TensorType::new(dtype, &[rows, cols]));
    let column = |g: &mut Graph, name: &str| g.add_input(name, InputRole::Data, TensorType::new(dtype, &[cols]));
    let mut out = Vec::new();
    for (name, weight, bias) in
        [("layer_norm", true, true), ("layer_norm, no affine", false, false), ("layer_norm, weight", true, false)]
    {
        let mut g = Graph::new();
        let x = input(&mut g);
        let w = weight.then(|| column(&mut g, "w"));
        let b = bias.then(|| column(&mut g, "b"));
        let y = layer_norm(&mut g, &x, &[cols], w.as_ref(), b.as_ref(), 1e-5).unwrap();
        g.add_output("y", y);
        out.push((name, g));
    }
    let mut g = Graph::new();
    let x = input(&mut g);
    let w = column(&mut g, "w");
    let x2 = g.mul(&x, &x).unwrap();
    let ms = mean(&mut g, &x2, &[-1], true).unwrap();
    let ms = g.add_scalar(&ms, 1e-6).unwrap();
    let r = g.unary(UnaryOp::Rsqrt, &ms).unwrap();
    let y = g.mul(&x, &r).unwrap();
    let y = g.mul(&w, &y).unwrap();
    g.add_output("y", y);
    out.push(("rms_norm", g));
    let mut g = Graph::new();
    let x = input(&mut g);
    let y = softmax(&mut g, &x, -1).unwrap();
    g.add_output("y", y);
    out.push(("softmax", g));
    let mut g = Graph::new();
    let x = input(&mut g);
    let y = log_softmax(&mut g, &x, -1).unwrap();
    g.add_output("y", y);
    out.push(("log_softmax", g));
    let mut g = Graph::new();
    let x = input(&mut g);
    let s = g.sum(&x, &[-1], true).unwrap();
    let y = g.div(&x, &s).unwrap();
    g.add_output("y", y);
    out.push(("x / sum", g));
    out
}

#[test]
fn affine_last_sweeps_match_inline_math_bit_for_bit() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let wide = matches!(Width::native(), Width::Avx2 | Width::Avx512);
    for dtype in [DType::F32, DType::F64] {
        for (rows, cols) in [(6, 1000), (5, 64), (5, 1003), (2, 70), (2, 63), (2, 20000)] {
            for (name, g) in affine_graphs(dtype, rows, cols) {
                let mut v = data(dtype, rows * cols, 11, 30.0);
                if rows >= 5 {
                    v[cols + 7] = f64::INFINITY;
                    v[3 * cols + 1] = f64::NAN;
                }
                let mut inputs = vec![buffer(dtype, v, &[rows, cols])];
                for k in 1..g.inputs.len() {
                    inputs.push(buffer(dtype, data(dtype, cols, 20 + k as u64, 2.0), &[cols]));
                }
                lanes::set_kernel_calls(true);
                let with = Executable::new(&g, Backend::Jit).unwrap();
                lanes::set_kernel_calls(false);
                let without = Executable::new(&g, Backend::Jit).unwrap();
                lanes::set_kernel_calls(true);
                // Softmax's exponential needs a stack row, which 20000 columns do not fit:
                // that kernel keeps its inline math, and so its last sweep too.
                let expected = wide && cols >= 64 && !(name == "softmax" && cols == 20000);
                let calls = with.clif_text().contains(&clif_addr(lanes::affine_entry as *const () as usize));
                assert_eq!(calls, expected, "{name} {dtype} [{rows}, {cols}]: affine calls");
                assert!(!without.clif_text().contains("call_indirect"));
                let a = with.run(&inputs, &NoCallbacks).unwrap();
                let b = without.run(&inputs, &NoCallbacks).unwrap();
                assert_same_bits(&a[0], &b[0], &format!("{name} {dtype} [{rows}, {cols}]"));
            }
        }
    }
}

/// Every combination of `lanes::affine_at`'s steps, on every path this machine runs, against
/// the same steps written out one element at a time.
#[test]
fn affine_steps_agree_on_every_width() {
    use lanes::{AFFINE_B, AFFINE_DIV_P, AFFINE_MUL_P, AFFINE_SUB_C, AFFINE_SUB_P, AFFINE_W};
    use std::mem::MaybeUninit;
    fn check<T>(code: i64, n: usize)
    where
        T: lanes::AffineFloat + Copy + Into<f64> + std::fmt::Debug,
        T: std::ops::Add<Output = T>
            + std::ops::Sub<Output = T>
            + std::ops::Mul<Output = T>
            + std::ops::Div<Output = T>,
        T: From<f32>,
    {
        let gen =
            |seed: u64| -> Vec<T> { data(DType::F32, n, seed, 5.0).into_iter().map(|v| T::from(v as f32)).collect() };
        let (x, w, b) = (gen(1), gen(2), gen(3));
        let (c, p) = (0.375f32, -1.625f32);
        let expect: Vec<T> = (0..n)
            .map(|i| {
                let mut t = x[i];
                if code & AFFINE_SUB_C != 0 {
                    t = t - T::from(c);
                }
                if code & AFFINE_MUL_P != 0 {
                    t = t * T::from(p);
                } else if code & AFFINE_DIV_P != 0 {
                    t = t / T::from(p);
                } else if code & AFFINE_SUB_P != 0 {
                    t = t - T::from(p);
                }
                if code & AFFINE_W != 0 {
                    t = t * w[i];
                }
                if code & AFFINE_B != 0 {
                    t = t + b[i];
                }
                t
            })
            .collect();
        // No row to prefetch, the row after `x` (past its allocation), and an address no
        // allocation holds: a prefetch is a hint, so none may change a bit or fault.
        let aheads = [0, x.as_ptr().wrapping_add(n) as usize, 16];
        for wd in Width::ALL.into_iter().filter(|w| w.supported()) {
            for ahead in aheads {
                let mut y = vec![MaybeUninit::<T>::uninit(); n];
                lanes::affine_at(code, wd, &x, &w, &b, f64::from(c), f64::from(p), &mut y, ahead);
                for (i, (y, e)) in y.iter().zip(&expect).enumerate() {
                    // SAFETY: `affine_at` writes every element.
                    let y = unsafe { y.assume_init() };
                    assert_eq!(
                        y.into().to_bits(),
                        (*e).into().to_bits(),
                        "code {code} {wd:?} element {i} of {n}, ahead {ahead:#x}"
                    );
                }
            }
        }
    }
    for sub_c in [0, AFFINE_SUB_C] {
        for op in [0, AFFINE_MUL_P, AFFINE_DIV_P, AFFINE_SUB_P] {
            for wb in [0, AFFINE_W, AFFINE_B, AFFINE_W | AFFINE_B] {
                let code = sub_c | op | wb;
                for n in [0, 1, 15, 16, 17, 63, 64, 65, 100, 1003] {
                    check::<f32>(code, n);
                    check::<f64>(code | lanes::AFFINE_F64, n);
                }
            }
        }
    }
}

/// A shifted call computes `f(x − c)`; a plain one (`c` = +0) skips the subtraction, which
/// changes nothing, while `c` = −0 must still turn `x` = −0 into +0 (`−0 − (−0) = +0`).
#[test]
fn shifted_calls_subtract_every_c_but_plus_zero_exactly() {
    use lanes::{Func, LaneFloat};
    use std::mem::MaybeUninit;
    for w in Width::ALL.into_iter().filter(|w| w.supported()) {
        // 37 elements: vector bodies and a scalar tail on every width.
        let x: Vec<f32> = (0..37).map(|i| if i % 2 == 0 { -0.0 } else { i as f32 * 0.25 - 4.0 }).collect();
        for (c, sign_of_zero) in [(0.0f64, -1.0f32), (-0.0, 1.0), (1.5, f32::NAN)] {
            let mut y = vec![MaybeUninit::<f32>::uninit(); x.len()];
            f32::shifted_at(Func::Tanh, w, &x, c, 0.0, &mut y, false);
            let mut want = vec![0f32; x.len()];
            let shifted: Vec<f32> = x.iter().map(|&v| v - c as f32).collect();
            f32::apply_at(Func::Tanh, w, &shifted, &mut want);
            for (k, (y, want)) in y.iter().zip(&want).enumerate() {
                // SAFETY: `shifted_at` wrote every element.
                let y = unsafe { y.assume_init() };
                assert_eq!(y.to_bits(), want.to_bits(), "{w:?} c = {c:?}, element {k}");
                if x[k] == 0.0 && !sign_of_zero.is_nan() {
                    assert_eq!(
                        y.to_bits(),
                        (0.0f32.copysign(sign_of_zero)).to_bits(),
                        "{w:?} c = {c:?}: tanh of a zero"
                    );
                }
            }
        }
    }
}

/// `kernel_entry`'s prefetch addresses are hints: none, a past-the-end one, an unmapped one
/// and null give the same bits as a call without them (and no fault).
#[test]
fn kernel_entry_prefetches_any_address_without_effect() {
    use lanes::Func;
    let x: Vec<f32> = (0..300).map(|i| i as f32 * 0.07 - 10.0).collect();
    let past_end = x.as_ptr().wrapping_add(x.len()) as usize;
    let ahead = [0usize, past_end, 16, usize::MAX - 63];
    for f in [Func::Tanh, Func::Sigmoid, Func::Exp] {
        for count in [0, 1, ahead.len() as i64] {
            let (mut y0, mut y1) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            let code = lanes::kernel_code(f, false) + lanes::CODE_SUM;
            // SAFETY: `x` holds `x.len()` f32s and each `y` room for as many, disjoint; `ahead`
            // holds `count` (≤ its length) addresses.
            let (s0, s1) = unsafe {
                let call = |y: &mut Vec<f32>, n: i64| {
                    lanes::kernel_entry(
                        code,
                        x.as_ptr().cast(),
                        y.as_mut_ptr().cast(),
                        x.len() as i64,
                        ahead.as_ptr(),
                        n,
                        0.5,
                        0.0,
                    )
                };
                (call(&mut y0, 0), call(&mut y1, count))
            };
            assert_eq!(s0.to_bits(), s1.to_bits(), "{f:?}, {count} addresses: the sum");
            for (i, (a, b)) in y0.iter().zip(&y1).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{f:?}, {count} addresses: element {i}");
            }
        }
    }
}
