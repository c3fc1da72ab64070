//! Property test: random well-typed programs (pointwise, broadcasting, reductions, views,
//! matmul) give the same values and the same gradients whether run eagerly (with eager
//! autograd) or built as a graph, differentiated by the AOT autodiff pass and run by the
//! reference interpreter. The program is written once, against `Build`, and handed to both.

use proptest::prelude::*;
use tracegrad::{Buffer, Eager, Tensor};
use tracegrad_compiler::autodiff::append_backward_plain;
use tracegrad_compiler::graph::{Graph, InputRole};
use tracegrad_compiler::interpret::{interpret, NoCallbacks};
use tracegrad_compiler::ops::{BinaryOp, ReduceKind, UnaryOp};
use tracegrad_compiler::passes::PassManager;
use tracegrad_compiler::{Build, OpResult, TensorType};
use tracegrad_runtime::DType;

const INPUT_SHAPES: [&[usize]; 4] = [&[3, 4], &[4], &[3, 1], &[1, 4]];

/// One step: an op code and two operand choices.
type Step = (u8, u16, u16);

/// Builds the program on any emitter; returns the final scalar-izable value.
fn program<B: Build>(e: &mut B, inputs: &[B::Value], steps: &[Step]) -> OpResult<B::Value> {
    let mut vals: Vec<B::Value> = inputs.to_vec();
    for &(code, a, b) in steps {
        let x = vals[a as usize % vals.len()].clone();
        let y = vals[b as usize % vals.len()].clone();
        let (sx, sy) = (e.shape(&x), e.shape(&y));
        let broadcastable = tracegrad_runtime::shape::broadcast_shapes("t", &sx, &sy).is_ok();
        let v = match code % 16 {
            0 => e.unary(UnaryOp::Tanh, &x)?,
            1 => e.unary(UnaryOp::Sigmoid, &x)?,
            2 => e.unary(UnaryOp::Sin, &x)?,
            3 => {
                let t = e.unary(UnaryOp::Tanh, &x)?;
                e.unary(UnaryOp::Exp, &t)?
            }
            4 => e.unary(UnaryOp::Square, &x)?,
            5 if broadcastable => e.binary(BinaryOp::Add, &x, &y)?,
            6 if broadcastable => e.binary(BinaryOp::Mul, &x, &y)?,
            7 if broadcastable => e.binary(BinaryOp::Sub, &x, &y)?,
            8 if broadcastable => {
                // Keep the divisor away from zero: y² + 1.
                let y2 = e.unary(UnaryOp::Square, &y)?;
                let d = e.add_scalar(&y2, 1.0)?;
                e.div(&x, &d)?
            }
            9 if !sx.is_empty() => {
                let d = (a as usize) % sx.len();
                e.reduce(ReduceKind::Sum, &x, &[d as isize], b % 2 == 0)?
            }
            10 if !sx.is_empty() => {
                let d = (a as usize) % sx.len();
                tracegrad_compiler::composite::mean(e, &x, &[d as isize], b % 2 == 1)?
            }
            11 if sx.len() == 2 => e.transpose(&x, 0, 1)?,
            12 => {
                let n: usize = sx.iter().product();
                e.reshape(&x, &[n])?
            }
            13 if sx.len() == 2 && sy.len() == 2 && sx[1] == sy[1] => e.matmul_t(&x, &y, false, true)?,
            14 if sx.len() == 2 => tracegrad_compiler::composite::softmax(e, &x, -1)?,
            15 if sx.len() == 1 && sx[0] > 0 => e.expand(&x, &[2, sx[0]])?,
            _ => e.unary(UnaryOp::Cos, &x)?,
        };
        vals.push(v);
    }
    Ok(vals.pop().expect("at least the inputs"))
}

fn close(a: &[f64], b: &[f64], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len(), "{}: lengths", what);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        prop_assert!((x - y).abs() <= 1e-9 + 1e-9 * y.abs(), "{}[{}]: graph {} vs eager {}", what, i, x, y);
    }
    Ok(())
}

/// `ci` cases (the CI count), or `PROPTEST_CASES` when set: the README's "Tests" section runs
/// the suites at 100 000 cases this way (an explicit `cases` would otherwise ignore it).
fn cases_or(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(ci)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases_or(1000), ..ProptestConfig::default() })]

    #[test]
    fn interpreter_and_autodiff_match_eager(steps in prop::collection::vec((any::<u8>(), any::<u16>(), any::<u16>()), 1..10), seed in any::<u64>()) {
        let mut gen = tracegrad::Generator::new(seed);
        let bufs: Vec<Buffer> = INPUT_SHAPES
            .iter()
            .map(|s| Tensor::randn_with(&mut gen, s).to_dtype(DType::F64).buffer())
            .collect();

        // Eager, with eager autograd.
        let xs: Vec<Tensor> = bufs.iter().map(|b| Tensor::from_buffer(b.clone()).requires_grad_(true)).collect();
        let y = program(&mut Eager, &xs, &steps).unwrap();
        let w = Tensor::randn_with(&mut gen, &y.shape()).to_dtype(DType::F64);
        let loss = (&y * &w).sum_all();
        loss.backward();

        // Graph: trace the same program, append the backward, interpret.
        let mut g = Graph::new();
        let ins: Vec<_> = bufs.iter().enumerate().map(|(i, b)| g.add_input(&format!("x{i}"), InputRole::Data, TensorType::of(b))).collect();
        let yn = program(&mut g, &ins, &steps).unwrap();
        let wn = g.add_input("w", InputRole::Data, TensorType::of(&w.buffer()));
        let prod = g.mul(&yn, &wn).unwrap();
        let ln = g.sum(&prod, &[], false).unwrap();
        let seed_grad = g.full(1.0, DType::F64, &[]).unwrap();
        let grads = append_backward_plain(&mut g, &[(ln, seed_grad)], &ins).unwrap();
        g.add_output("y", yn);
        for (i, gr) in grads.iter().enumerate() {
            if let Some(gr) = gr {
                g.add_output(&format!("dx{i}"), *gr);
            }
        }
        g.validate().map_err(TestCaseError::fail)?;
        let mut args = bufs.clone();
        args.push(w.buffer());
        let out = interpret(&g, &args, &NoCallbacks).unwrap();

        // The optimization pipeline (validated after every pass) must not change any value.
        let mut opt = g.clone();
        let mut pm = PassManager::standard();
        pm.validate = true;
        pm.run(&mut opt).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(opt.node_count() <= g.node_count());
        let out_opt = interpret(&opt, &args, &NoCallbacks).unwrap();
        // Fusion places every node in one kernel, and the kernels can be scheduled.
        tracegrad_compiler::fusion::check_kernels(&opt, &tracegrad_compiler::fusion::fuse(&opt)).map_err(TestCaseError::fail)?;
        for (a, b) in out_opt.iter().zip(&out) {
            close(&a.to_f64_vec(), &b.to_f64_vec(), "optimized")?;
        }

        close(&out[0].to_f64_vec(), &y.to_vec_f64(), "value")?;
        let mut k = 1;
        for (i, gr) in grads.iter().enumerate() {
            match (gr, xs[i].grad()) {
                (Some(_), Some(eg)) => {
                    close(&out[k].to_f64_vec(), &eg.to_vec_f64(), &format!("grad x{i}"))?;
                    k += 1;
                }
                (None, None) => {}
                (None, Some(eg)) => prop_assert!(eg.to_vec_f64().iter().all(|v| *v == 0.0), "x{} has an eager gradient but no graph gradient", i),
                (Some(_), None) => prop_assert!(false, "x{} has a graph gradient but no eager gradient", i),
            }
        }
    }
}
