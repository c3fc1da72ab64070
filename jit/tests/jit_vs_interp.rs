//! Property test: random fused graphs give the same results JIT-compiled as on the reference
//! interpreter. Graphs are pointwise chains with broadcast operands (a row vector, a column,
//! a scalar), comparisons and selects, clamps, and row reductions (sum/max/min, softmax,
//! log_softmax) with their consumers, in f32 and f64, over odd lengths that exercise the
//! vector tails. Kernels are also run directly on unaligned pointers and over arbitrary
//! sub-ranges (how the executor splits work across threads).

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tracegrad_compiler::composite;
use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::interpret::{interpret, NoCallbacks};
use tracegrad_compiler::ops::{BinaryOp, CompareOp, ReduceKind, UnaryOp};
use tracegrad_compiler::{Build, TensorType};
use tracegrad_jit::kernel::lower;
use tracegrad_jit::module::compile_kernels;
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, DType};

const UNARY: [UnaryOp; 17] = [
    UnaryOp::Neg,
    UnaryOp::Abs,
    UnaryOp::Sign,
    UnaryOp::Exp,
    UnaryOp::Log,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Tanh,
    UnaryOp::Sigmoid,
    UnaryOp::Relu,
    UnaryOp::Gelu,
    UnaryOp::GeluTanh,
    UnaryOp::Silu,
    UnaryOp::Erf,
    UnaryOp::Square,
    UnaryOp::Reciprocal,
    UnaryOp::PowScalar(3.0),
];

struct Case {
    graph: Graph,
    inputs: Vec<Buffer>,
    depth: usize,
    dtype: DType,
    /// Row length when the graph reduces rows (summation order differs), else 0.
    row: usize,
}

fn random_buffer(rng: &mut ChaCha8Rng, dtype: DType, shape: &[usize]) -> Buffer {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let r: f64 = rng.random_range(-3.0..3.0);
            // Sprinkle special values.
            match rng.random_range(0..200) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => f64::NEG_INFINITY,
                3 => 0.0,
                _ => r,
            }
        })
        .collect();
    Buffer::from_vec(v, shape).cast(dtype)
}

fn random_case(seed: u64) -> Case {
    random_case_as(seed, None)
}

/// The graph of `seed`, optionally with every value in `dtype` instead (same structure and
/// same input values).
fn random_case_as(seed: u64, dtype: Option<DType>) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let drawn = if rng.random_bool(0.2) { DType::F64 } else { DType::F32 };
    let dtype = dtype.unwrap_or(drawn);
    let rows_mode = rng.random_bool(0.4);
    let mut shape: Vec<usize> = match rng.random_range(0..4) {
        0 => vec![rng.random_range(1..80)],
        1 => vec![rng.random_range(1..9), rng.random_range(1..40)],
        2 => vec![rng.random_range(1..5), rng.random_range(1..5), rng.random_range(2..30)],
        _ => vec![rng.random_range(1..4), rng.random_range(100..700)],
    };
    if rows_mode && *shape.last().unwrap() < 2 {
        *shape.last_mut().unwrap() = 2;
    }
    let rank = shape.len();
    let mut g = Graph::new();
    let mut inputs = Vec::new();
    let mut add_input = |g: &mut Graph, rng: &mut ChaCha8Rng, s: &[usize]| {
        let name = format!("x{}", inputs.len());
        let n = g.add_input(&name, InputRole::Data, TensorType::new(dtype, s));
        inputs.push(random_buffer(rng, dtype, s));
        n
    };
    let mut full = vec![add_input(&mut g, &mut rng, &shape)];
    for _ in 0..rng.random_range(0..3) {
        full.push(add_input(&mut g, &mut rng, &shape));
    }
    // Broadcast operands: along the last dim, per row, a scalar.
    let n_inputs = full.len();
    let mut bcast = Vec::new();
    bcast.push(add_input(&mut g, &mut rng, &shape[rank - 1..]));
    let mut col = shape.clone();
    col[rank - 1] = 1;
    bcast.push(add_input(&mut g, &mut rng, &col));
    bcast.push(add_input(&mut g, &mut rng, &[]));
    let steps = rng.random_range(1..9);
    let mut depth = 1;
    for _ in 0..steps {
        let x = full[rng.random_range(0..full.len())];
        let other = if rng.random_bool(0.5) {
            full[rng.random_range(0..full.len())]
        } else {
            bcast[rng.random_range(0..bcast.len())]
        };
        let v = match rng.random_range(0..10) {
            0..=2 => {
                let u = UNARY[rng.random_range(0..UNARY.len())];
                if matches!(u, UnaryOp::Reciprocal | UnaryOp::Rsqrt) {
                    // Keep the argument away from zero (x² + 1): the comparison is about
                    // kernels, not about amplifying one rounding through a pole.
                    let sq = g.unary(UnaryOp::Square, &x).unwrap();
                    let d = g.add_scalar(&sq, 1.0).unwrap();
                    g.unary(u, &d).unwrap()
                } else if matches!(u, UnaryOp::Log | UnaryOp::Sqrt) {
                    // Branch cuts at 0: on an input (NaN and ±inf included), or on x² + 1. On a
                    // computed value, a tiny negative from the JIT where the reference rounds
                    // to -0 (GELU of x ≪ 0: the JIT keeps relative accuracy) reads NaN vs -inf.
                    if rng.random_bool(0.5) {
                        g.unary(u, &full[rng.random_range(0..n_inputs)]).unwrap()
                    } else {
                        let sq = g.unary(UnaryOp::Square, &x).unwrap();
                        let d = g.add_scalar(&sq, 1.0).unwrap();
                        g.unary(u, &d).unwrap()
                    }
                } else if u == UnaryOp::Sign {
                    // sign is discontinuous at 0: apply it to an input, not to a computed
                    // value whose last-bit differences (or an underflow to ±0 in one of
                    // them) it would turn into ±1.
                    g.unary(u, &full[0]).unwrap()
                } else {
                    g.unary(u, &x).unwrap()
                }
            }
            3..=5 => {
                let op =
                    [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Maximum, BinaryOp::Minimum]
                        [rng.random_range(0..6)];
                let (a, b) = if rng.random_bool(0.5) { (x, other) } else { (other, x) };
                if op == BinaryOp::Div {
                    // Divisor b² + 1, as above.
                    let sq = g.unary(UnaryOp::Square, &b).unwrap();
                    let d = g.add_scalar(&sq, 1.0).unwrap();
                    g.div(&a, &d).unwrap()
                } else {
                    g.binary(op, &a, &b).unwrap()
                }
            }
            6 => {
                let c = [CompareOp::Lt, CompareOp::Le, CompareOp::Gt, CompareOp::Ge, CompareOp::Eq, CompareOp::Ne]
                    [rng.random_range(0..6)];
                // Compare inputs, not computed values: a last-bit difference between two
                // nearly equal computed values would flip the mask (the comparison itself is
                // exact either way).
                let a = full[rng.random_range(0..n_inputs)];
                let b = if rng.random_bool(0.5) {
                    full[rng.random_range(0..n_inputs)]
                } else {
                    bcast[rng.random_range(0..bcast.len())]
                };
                let m = g.compare(c, &a, &b).unwrap();
                let y = full[rng.random_range(0..full.len())];
                g.where_(&m, &x, &y).unwrap()
            }
            7 => composite::clamp(&mut g, &x, Some(-1.5), if rng.random_bool(0.5) { Some(2.0) } else { None }).unwrap(),
            8 if rows_mode => {
                let kind = [ReduceKind::Sum, ReduceKind::Max, ReduceKind::Min][rng.random_range(0..3)];
                let r = g.reduce(kind, &x, &[-1], true).unwrap();
                if rng.random_bool(0.5) {
                    g.sub(&x, &r).unwrap()
                } else {
                    let t = g.unary(UnaryOp::Tanh, &r).unwrap();
                    g.mul(&t, &x).unwrap()
                }
            }
            9 if rows_mode => {
                if rng.random_bool(0.5) {
                    composite::softmax(&mut g, &x, -1).unwrap()
                } else {
                    composite::log_softmax(&mut g, &x, -1).unwrap()
                }
            }
            _ => g.mul_scalar(&x, 0.5).unwrap(),
        };
        depth += 1;
        full.push(v);
    }
    let last = *full.last().unwrap();
    g.add_output("y", last);
    if full.len() > 2 && rng.random_bool(0.5) {
        let extra = full[rng.random_range(1..full.len() - 1)];
        g.add_output("z", extra);
    }
    if rows_mode && rng.random_bool(0.5) {
        // A per-row output.
        let s = g.sum(&last, &[-1], false).unwrap();
        g.add_output("s", s);
    }
    let row = if rows_mode { shape[rank - 1] } else { 0 };
    Case { graph: g, inputs, depth, dtype, row }
}

/// Agreement within `ulps·depth` relative to the magnitude (or the output's mean magnitude,
/// for values produced by cancellation), widened by `sqrt(row)` for row sums (another
/// summation order); NaN matches NaN, infinities match exactly.
fn close(jit: &[f64], want: &[f64], dtype: DType, depth: usize, row: usize) -> Result<(), String> {
    let eps = if dtype == DType::F32 { f32::EPSILON as f64 } else { f64::EPSILON };
    let finite: Vec<f64> = want.iter().filter(|v| v.is_finite()).map(|v| v.abs()).collect();
    let scale = finite.iter().sum::<f64>() / finite.len().max(1) as f64;
    for (i, (&a, &b)) in jit.iter().zip(want).enumerate() {
        let ok = if b.is_nan() {
            a.is_nan()
        } else if b.is_infinite() {
            a == b
        } else {
            let tol = 64.0 * eps * depth as f64 * (1.0 + (row as f64).sqrt()) * (b.abs().max(scale).max(1.0) + eps);
            (a - b).abs() <= tol
        };
        if !ok {
            return Err(format!("element {i}: jit {a} vs interpreter {b}"));
        }
    }
    Ok(())
}

fn check(seed: u64) -> Result<(), String> {
    let case = random_case(seed);
    let g = &case.graph;
    let want = interpret(g, &case.inputs, &NoCallbacks).map_err(|e| e.to_string())?;
    let exe = Executable::new(g, Backend::Jit)?;
    let got = exe.run(&case.inputs, &NoCallbacks).map_err(|e| e.to_string())?;
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        if a.shape() != b.shape() || a.dtype() != b.dtype() {
            return Err(format!("output {k}: {:?} vs {:?}", TensorType::of(a), TensorType::of(b)));
        }
        let agree = close(&a.to_f64_vec(), &b.to_f64_vec(), case.dtype, case.depth, case.row);
        // Where an f32 reference kernel is the outlier (GELU of x ≪ 0 cancels to -0 in the
        // reference, which keeps PyTorch's formula, while the JIT keeps relative accuracy; an
        // infinity times that value then reads NaN against ±inf), the same graph evaluated
        // in f64 decides.
        let agree = agree.or_else(|e| {
            if case.dtype != DType::F32 {
                return Err(e);
            }
            let wide = random_case_as(seed, Some(DType::F64));
            let w = interpret(&wide.graph, &wide.inputs, &NoCallbacks).map_err(|e| e.to_string())?;
            let w32: Vec<f64> = w[k].to_f64_vec().iter().map(|&v| v as f32 as f64).collect();
            close(&a.to_f64_vec(), &w32, case.dtype, case.depth, case.row).map_err(|_| e)
        });
        agree.map_err(|e| format!("seed {seed} output {k}: {e}\n{}\n{}", g.to_text(), exe.plan_text()))?;
    }
    Ok(())
}

/// `ci` cases (the CI count), or `PROPTEST_CASES` when set: the README's "Tests" section runs
/// the suites at 100 000 cases this way (an explicit `cases` would otherwise ignore it).
fn cases_or(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(ci)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases_or(2000), failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn jit_matches_the_interpreter(seed in any::<u64>()) {
        if let Err(e) = check(seed) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
fn the_generated_graphs_fuse() {
    // The property test is about kernels: most random graphs must actually become JIT
    // kernels, not fall back to the reference kernels.
    let mut kernels = 0;
    let mut fallbacks = 0;
    for seed in 0..300 {
        let case = random_case(seed);
        let exe = Executable::new(&case.graph, Backend::Jit).unwrap();
        kernels += exe.kernel_steps();
        fallbacks += exe.plan_text().matches("note:").count();
    }
    assert!(kernels >= 300, "{kernels} kernels");
    assert!(fallbacks * 20 <= kernels, "{fallbacks} groups fell back of {kernels}");
}

#[test]
fn kernels_run_on_unaligned_pointers_and_sub_ranges() {
    // tanh(a*x + b) * sigmoid(x) + 0.5*x over 1031 elements, inputs offset by 1..3 floats
    // from their allocation (never 16-byte aligned), run over ragged sub-ranges.
    let n = 1031;
    let mut g = Graph::new();
    let ty = TensorType::new(DType::F32, &[n]);
    let x = g.add_input("x", InputRole::Data, ty.clone());
    let a = g.add_input("a", InputRole::Data, ty.clone());
    let b = g.add_input("b", InputRole::Data, ty);
    let ax = g.mul(&a, &x).unwrap();
    let axb = g.add(&ax, &b).unwrap();
    let t = g.unary(UnaryOp::Tanh, &axb).unwrap();
    let s = g.unary(UnaryOp::Sigmoid, &x).unwrap();
    let ts = g.mul(&t, &s).unwrap();
    let hx = g.mul_scalar(&x, 0.5).unwrap();
    let y = g.add(&ts, &hx).unwrap();
    g.add_output("y", y);
    let order = g.topo_order().unwrap();
    let nodes: Vec<_> = order
        .into_iter()
        .filter(|&m| !g.inputs.contains(&m))
        .filter(|&m| !matches!(g.op(m), Some(tracegrad_compiler::ops::Op::Full { .. })))
        .collect();
    let lowered = lower(&g, &nodes, false, &|_| true).unwrap();
    let (_code, kernels) = compile_kernels(std::slice::from_ref(&lowered.spec)).unwrap();
    let f = kernels[0].f;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let bufs: Vec<Buffer> = (0..3).map(|_| random_buffer(&mut rng, DType::F32, &[n])).collect();
    let want = interpret(&g, &bufs, &NoCallbacks).unwrap()[0].to_vec::<f32>();
    for off in 1..4 {
        // Copies of the inputs at an odd offset inside bigger allocations.
        let shifted: Vec<Vec<f32>> = lowered
            .args
            .iter()
            .map(|arg| {
                let i = g.inputs.iter().position(|m| m == arg).unwrap();
                let mut v = vec![0.0f32; n + off];
                v[off..].copy_from_slice(bufs[i].as_slice::<f32>());
                v
            })
            .collect();
        let mut out = vec![0.0f32; n + off];
        let args: Vec<*const u8> = shifted.iter().map(|v| v[off..].as_ptr().cast()).collect();
        let outs: Vec<*mut u8> = vec![out[off..].as_mut_ptr().cast()];
        let cuts = [0usize, 3, 4, 17, 64, 65, 500, 1027, 1030, n];
        for w in cuts.windows(2) {
            // SAFETY: pointers address `n` valid elements each; ranges lie inside.
            unsafe { f(args.as_ptr(), outs.as_ptr(), w[0] as i64, w[1] as i64) };
        }
        let got = &out[off..];
        close(
            &got.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &want.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            DType::F32,
            2,
            0,
        )
        .unwrap();
    }
}

#[test]
fn softmax_rows_with_infinities_nans_and_wide_spreads_match_the_interpreter() {
    // Rows that take every branch of the JIT's softmax: all -inf (NaN out), a -inf element in
    // a finite row (0 out), +inf elements (shift 0), NaN, and spreads wide enough that some
    // outputs are subnormal or round to zero.
    let inf = f64::INFINITY;
    let rows: [[f64; 5]; 8] = [
        [-inf, -inf, -inf, -inf, -inf],
        [-inf, 1.0, 2.0, -inf, 0.5],
        [inf, 1.0, -inf, 3.0, 88.5],
        [inf, inf, 0.0, -1.0, -inf],
        [f64::NAN, 1.0, 2.0, 3.0, 4.0],
        [f64::NAN, -inf, -inf, -inf, -inf],
        [0.0, -90.0, -100.0, -104.0, -200.0],
        [0.0, -700.0, -740.0, -745.0, -800.0],
    ];
    for dtype in [DType::F32, DType::F64] {
        for log in [false, true] {
            let mut g = Graph::new();
            let x = g.add_input("x", InputRole::Data, TensorType::new(dtype, &[8, 5]));
            let y = if log { composite::log_softmax(&mut g, &x, -1) } else { composite::softmax(&mut g, &x, -1) };
            g.add_output("y", y.unwrap());
            let flat: Vec<f64> = rows.iter().flatten().copied().collect();
            let input = match dtype {
                DType::F32 => Buffer::from_vec(flat.iter().map(|&v| v as f32).collect::<Vec<f32>>(), &[8, 5]),
                _ => Buffer::from_vec(flat, &[8, 5]),
            };
            let want = interpret(&g, std::slice::from_ref(&input), &NoCallbacks).unwrap()[0].to_f64_vec();
            let exe = Executable::new(&g, Backend::Jit).unwrap();
            assert!(exe.kernel_steps() >= 1, "softmax is a JIT kernel:\n{}", exe.plan_text());
            let got = exe.run(&[input], &NoCallbacks).unwrap()[0].to_f64_vec();
            let eps = if dtype == DType::F32 { f32::EPSILON as f64 } else { f64::EPSILON };
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                let ok =
                    if b.is_nan() { a.is_nan() } else { a == b || (a - b).abs() <= 4.0 * eps * b.abs().max(1e-300) };
                assert!(ok, "{dtype:?} log={log} row {} col {}: jit {a:e} vs interpreter {b:e}", i / 5, i % 5);
            }
        }
    }
}
