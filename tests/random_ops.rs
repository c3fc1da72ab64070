//! Random ops inside compiled graphs: dropout, `rand`/`randn`/`normal`/`bernoulli` draw from
//! the default generator's Philox stream in eager mode, on the interpreter and on the JIT, so
//! one seed gives the same masks and values in all three; every call draws afresh; the
//! backward regenerates dropout masks instead of saving them.

mod common;

use std::sync::{Arc, Mutex, MutexGuard};

use common::gradcheck::{gradcheck, pos, rnd};
use tracegrad::compile::{compile, compile_train_step, Backend, StepOptimizer};
use tracegrad::nn::{Dropout, Module, ModuleCore, ModuleExt};
use tracegrad::optim::SgdOptions;
use tracegrad::zoo::TransformerBlock;
use tracegrad::{no_grad, DType, Op, Tensor};
use tracegrad_compiler::graph::{Graph, NodeKind};
use tracegrad_compiler::ops::Distribution;

/// Tests share the default generator: each holds this while it seeds and draws.
static RNG: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Eager, then the two compiled backends.
const MODES: [Option<Backend>; 3] = [None, Some(Backend::Interpreter), Some(Backend::Jit)];

/// The zoo's transformer block with dropout on the attention output and on the MLP output
/// (GPT-2's residual dropouts).
#[derive(Module)]
struct DropoutBlock {
    #[module]
    block: TransformerBlock,
    #[module]
    drop_attn: Dropout,
    #[module]
    drop_mlp: Dropout,
    core: ModuleCore,
}

const HEADS: usize = 2;

impl DropoutBlock {
    fn new(d: usize, p: f64) -> DropoutBlock {
        DropoutBlock {
            block: TransformerBlock::new(d, HEADS),
            drop_attn: Dropout::new(p),
            drop_mlp: Dropout::new(p),
            core: ModuleCore::new(),
        }
    }
}

impl Module for DropoutBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let b = &self.block;
        let s = x.shape();
        let (bs, t, d) = (s[0] as isize, s[1], s[2]);
        let (h, dh) = (HEADS as isize, (d / HEADS) as isize);
        let qkv = b.qkv.call(&b.ln1.call(x));
        let split: Vec<Tensor> =
            qkv.chunk(3, -1).iter().map(|p| p.reshape(&[bs, t as isize, h, dh]).permute(&[0, 2, 1, 3])).collect();
        let scores = split[0].matmul(&split[1].transpose(-2, -1)).mul_scalar(1.0 / (dh as f64).sqrt());
        let causal: Vec<bool> = (0..t * t).map(|i| i % t > i / t).collect();
        let att = scores.masked_fill(&Tensor::from_vec(causal, &[t, t]), f64::NEG_INFINITY).softmax(-1);
        let y = att.matmul(&split[2]).permute(&[0, 2, 1, 3]).reshape(&[bs, t as isize, d as isize]);
        let x = x + &self.drop_attn.call(&b.proj.call(&y));
        let m = b.fc2.call(&b.act.call(&b.fc1.call(&b.ln2.call(&x))));
        &x + &self.drop_mlp.call(&m)
    }
}

/// What one mode observed over its calls: outputs, parameter gradients, and the zero
/// patterns of both dropouts' outputs (their masks), per call.
struct Run {
    outs: Vec<Vec<f64>>,
    grads: Vec<Vec<Vec<f64>>>,
    masks: Vec<Vec<bool>>,
}

fn run_block(mode: Option<Backend>) -> Run {
    let _g = lock();
    tracegrad::manual_seed(7);
    let m = DropoutBlock::new(16, 0.1);
    let xs: Vec<Tensor> = (0..3).map(|_| Tensor::randn(&[2, 8, 16])).collect();
    let w = Tensor::randn(&[2, 8, 16]);
    let masks = Arc::new(Mutex::new(Vec::new()));
    for d in [&m.drop_attn, &m.drop_mlp] {
        let masks = masks.clone();
        d.register_forward_hook(move |_, _, out| {
            masks.lock().unwrap().push(out.to_vec_f64().iter().map(|v| *v == 0.0).collect());
            None
        });
    }
    let mut compiled = mode.map(|b| compile(&m).with_backend(b));
    let (mut outs, mut grads) = (Vec::new(), Vec::new());
    for x in &xs {
        m.zero_grad();
        let y = match compiled.as_mut() {
            Some(c) => c.call(x).unwrap(),
            None => m.call(x),
        };
        y.mul(&w).sum_all().backward();
        outs.push(y.to_vec_f64());
        grads.push(m.parameters().iter().map(|p| p.grad().expect("a gradient").to_vec_f64()).collect());
    }
    let masks = masks.lock().unwrap().clone();
    Run { outs, grads, masks }
}

fn close(what: &str, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what}[{i}]: {x} vs eager {y}");
    }
}

#[test]
fn transformer_block_masks_are_identical_in_eager_interpreter_and_jit() {
    let eager = run_block(None);
    assert_eq!(eager.masks.len(), 6, "two dropouts, three calls");
    // Every call draws fresh masks.
    assert_ne!(eager.masks[0], eager.masks[2]);
    assert_ne!(eager.masks[1], eager.masks[3]);
    for mask in &eager.masks {
        let dropped = mask.iter().filter(|&&z| z).count();
        assert!(dropped > 0 && dropped < mask.len() / 3, "{dropped} of {} dropped at p = 0.1", mask.len());
    }
    for backend in [Backend::Interpreter, Backend::Jit] {
        let run = run_block(Some(backend));
        assert!(run.masks == eager.masks, "{backend:?}: dropout masks differ from eager mode");
        for call in 0..3 {
            close(&format!("{backend:?} call {call} output"), &run.outs[call], &eager.outs[call]);
            for (k, (g, e)) in run.grads[call].iter().zip(&eager.grads[call]).enumerate() {
                close(&format!("{backend:?} call {call} gradient {k}"), g, e);
            }
        }
    }
}

/// `dropout(x * w)`: every op is exact, so all three modes agree bit for bit, outputs and
/// gradients, call after call.
#[derive(Module)]
struct ScaledDropout {
    #[param]
    w: Tensor,
    #[module]
    drop: Dropout,
    core: ModuleCore,
}

impl Module for ScaledDropout {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.drop.call(&x.mul(&self.w))
    }
}

fn run_scaled(mode: Option<Backend>, dtype: DType) -> Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let _g = lock();
    tracegrad::manual_seed(21);
    let w = Tensor::randn(&[64, 33]).to_dtype(dtype).requires_grad_(true);
    let m = ScaledDropout { w, drop: Dropout::new(0.3), core: ModuleCore::new() };
    let mut compiled = mode.map(|b| compile(&m).with_backend(b));
    (0..3)
        .map(|_| {
            let x = Tensor::randn(&[64, 33]).to_dtype(dtype).requires_grad_(true);
            m.zero_grad();
            let y = match compiled.as_mut() {
                Some(c) => c.call(&x).unwrap(),
                None => m.call(&x),
            };
            y.sum_all().backward();
            (y.to_vec_f64(), m.w.grad().unwrap().to_vec_f64(), x.grad().unwrap().to_vec_f64())
        })
        .collect()
}

#[test]
fn exact_dropout_is_bit_identical_across_modes_in_f32_and_f64() {
    for dtype in [DType::F32, DType::F64] {
        let eager = run_scaled(None, dtype);
        assert_ne!(eager[0].0, eager[1].0, "successive calls draw different masks");
        for backend in [Backend::Interpreter, Backend::Jit] {
            assert!(run_scaled(Some(backend), dtype) == eager, "{backend:?} {dtype}: not bit-identical to eager");
        }
    }
    // One seed gives one mask whatever the dtype (the keep test is on the random bits).
    let zeros = |r: &[(Vec<f64>, Vec<f64>, Vec<f64>)]| r[0].0.iter().map(|v| *v == 0.0).collect::<Vec<_>>();
    assert_eq!(zeros(&run_scaled(None, DType::F32)), zeros(&run_scaled(None, DType::F64)));
}

fn kept_within_4_sigma(what: &str, y: &Tensor, p: f64) {
    let n = y.numel() as f64;
    let kept = y.to_vec_f64().iter().filter(|v| **v != 0.0).count() as f64;
    let sigma = (n * p * (1.0 - p)).sqrt();
    assert!(
        (kept - n * (1.0 - p)).abs() <= 4.0 * sigma,
        "{what}: kept {kept} of {n}, expected {} ± 4·{sigma}",
        n * (1.0 - p)
    );
    // Kept values are scaled by 1/(1-p).
    let scale = (1.0 / (1.0 - p)) as f32 as f64;
    assert!(y.to_vec_f64().iter().all(|v| *v == 0.0 || *v == scale), "{what}: kept values must be 1/(1-p)");
}

#[test]
fn kept_fraction_and_fresh_masks_over_a_million_elements() {
    let _g = lock();
    let p = 0.1;
    let ones = Tensor::ones(&[1_000_000]);
    tracegrad::manual_seed(5);
    let eager = ones.dropout(p, true);
    kept_within_4_sigma("eager", &eager, p);
    let d = Dropout::new(p);
    for backend in [Backend::Jit, Backend::Interpreter] {
        tracegrad::manual_seed(5);
        let mut c = compile(&d).with_backend(backend);
        let first = no_grad(|| c.call(&ones)).unwrap();
        let second = no_grad(|| c.call(&ones)).unwrap();
        kept_within_4_sigma(&format!("{backend:?}"), &first, p);
        kept_within_4_sigma(&format!("{backend:?} second call"), &second, p);
        assert!(first.to_vec_f64() == eager.to_vec_f64(), "{backend:?}: the first call's mask is eager's");
        assert!(first.to_vec_f64() != second.to_vec_f64(), "{backend:?}: two calls drew the same mask");
        assert_eq!(c.plan_count(), 1, "the second call reuses the plan");
    }
}

#[test]
fn the_plan_saves_no_mask_and_the_backward_regenerates_it() {
    let _g = lock();
    tracegrad::manual_seed(1);
    let m = DropoutBlock::new(16, 0.1);
    for backend in [Backend::Jit, Backend::Interpreter] {
        let mut c = compile(&m).with_backend(backend);
        let y = c.call(&Tensor::randn(&[2, 8, 16])).unwrap();
        y.sum_all().backward();
        let plan = c.last_plan().expect("a plan");
        let is_mask =
            |g: &Graph, n| matches!(g.kind(n), NodeKind::Op(Op::Random { dist: Distribution::DropoutMask { .. }, .. }));
        let saved: Vec<_> = plan.graph.outputs.iter().skip(1).map(|(_, n)| *n).collect();
        assert!(!saved.is_empty(), "the backward saves something");
        for &n in &saved {
            assert!(!is_mask(&plan.graph, n), "{backend:?}: a dropout mask is saved for the backward");
        }
        // What the backward saves instead: the generator state the masks are drawn from.
        let state = saved.iter().any(|&n| matches!(plan.graph.kind(n), NodeKind::Input { name, .. } if name == "rng"));
        assert!(state, "{backend:?}: the generator state is saved");
        let backward = plan.backward.as_ref().expect("a backward graph");
        let regenerated = backward.topo_order().unwrap().into_iter().filter(|&n| is_mask(backward, n)).count();
        assert_eq!(regenerated, 2, "{backend:?}: the backward regenerates both masks");
        if backend == Backend::Jit {
            let fwd = plan.exec.plan_text();
            let bwd = plan.backward_exec.as_ref().expect("a backward executable").plan_text();
            // The masks are drawn inside fused kernels (an unfused draw would be a
            // `dropout_mask` step), forward and backward.
            for (what, text) in [("forward", &fwd), ("backward", &bwd)] {
                assert!(!text.contains("dropout_mask") && !text.contains("draws other than"), "{what}:\n{text}");
            }
        }
    }
}

/// Every random function traces: drawn inside a compiled forward, they give eager's values.
#[derive(Module)]
struct Draws {
    core: ModuleCore,
}

impl Module for Draws {
    fn forward(&self, x: &Tensor) -> Tensor {
        let parts = [
            x.rand_like(),
            x.randn_like(),
            Tensor::rand(&x.shape()),
            Tensor::randn(&x.shape()),
            Tensor::normal(2.0, 0.5, &x.shape()),
            Tensor::normal_tensor(x, &x.mul_scalar(0.1)),
            x.bernoulli(),
            x.dropout(0.5, true),
        ];
        Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)
    }
}

#[test]
fn every_random_function_traces_and_matches_eager() {
    let run = |mode: Option<Backend>| {
        let _g = lock();
        tracegrad::manual_seed(9);
        let x = Tensor::rand(&[5, 7]);
        let m = Draws { core: ModuleCore::new() };
        let mut c = mode.map(|b| compile(&m).with_backend(b));
        (0..2)
            .map(|_| match c.as_mut() {
                Some(c) => no_grad(|| c.call(&x)).unwrap().to_vec_f64(),
                None => m.call(&x).to_vec_f64(),
            })
            .collect::<Vec<_>>()
    };
    let eager = run(None);
    assert_ne!(eager[0], eager[1]);
    for mode in &MODES[1..] {
        assert!(run(*mode) == eager, "{mode:?}: draws differ from eager mode");
    }
}

#[test]
fn randn_and_rand_moments_over_a_million() {
    let _g = lock();
    tracegrad::manual_seed(3);
    let n = 1_000_000.0;
    for (what, v, mean, var) in [
        ("randn", Tensor::randn(&[1000, 1000]).to_vec_f64(), 0.0, 1.0),
        ("rand", Tensor::rand(&[1000, 1000]).to_vec_f64(), 0.5, 1.0 / 12.0),
        ("normal", Tensor::normal(3.0, 2.0, &[1_000_000]).to_vec_f64(), 3.0, 4.0),
    ] {
        let m = v.iter().sum::<f64>() / n;
        let s2 = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
        assert!((m - mean).abs() < 4.0 * (var / n).sqrt(), "{what}: mean {m}");
        // The variance of a sample variance is about 2σ⁴/n for a normal, less for a uniform.
        assert!((s2 - var).abs() < 4.0 * var * (2.0 / n).sqrt(), "{what}: variance {s2}");
    }
}

#[test]
fn rng_state_round_trips_and_reproduces_draws() {
    let _g = lock();
    tracegrad::manual_seed(17);
    let _ = Tensor::rand(&[3]);
    let state = tracegrad::get_rng_state();
    let json = serde_json::to_string(&state).unwrap();
    let a = (Tensor::randn(&[6]).to_vec_f64(), Tensor::ones(&[9]).dropout(0.5, true).to_vec_f64());
    tracegrad::manual_seed(0);
    tracegrad::set_rng_state(&serde_json::from_str(&json).unwrap());
    let b = (Tensor::randn(&[6]).to_vec_f64(), Tensor::ones(&[9]).dropout(0.5, true).to_vec_f64());
    assert_eq!(a, b);
    // A compiled call advances the state exactly as the eager draws it replaces.
    let d = Dropout::new(0.5);
    let mut c = compile(&d);
    tracegrad::set_rng_state(&state);
    let _ = Tensor::randn(&[6]);
    let compiled = no_grad(|| c.call(&Tensor::ones(&[9]))).unwrap().to_vec_f64();
    assert_eq!(compiled, a.1);
    assert_eq!(tracegrad::get_rng_state(), {
        tracegrad::set_rng_state(&state);
        let _ = (Tensor::randn(&[6]), Tensor::ones(&[9]).dropout(0.5, true));
        tracegrad::get_rng_state()
    });
}

#[test]
fn explicit_generators_are_eager_only() {
    let mut g = tracegrad::Generator::new(4);
    let a = Tensor::rand_with(&mut g, &[4]).to_vec_f64();
    let b = Tensor::rand_with(&mut tracegrad::Generator::new(4), &[4]).to_vec_f64();
    assert_eq!(a, b);
    #[derive(Module)]
    struct Explicit {
        core: ModuleCore,
    }
    impl Module for Explicit {
        fn forward(&self, x: &Tensor) -> Tensor {
            x.dropout_with(&mut tracegrad::Generator::new(1), 0.5, true)
        }
    }
    let m = Explicit { core: ModuleCore::new() };
    let e = no_grad(|| compile(&m).call(&Tensor::ones(&[4]))).unwrap_err();
    assert!(e.message.contains("a draw from an explicit generator would be frozen into the graph"), "{e}");
}

#[test]
fn compiled_train_step_draws_fresh_masks_like_eager() {
    use tracegrad::nn::{Linear, Sequential};
    use tracegrad::optim::{Optimizer, Sgd};
    let make = || Sequential::new().add(Linear::new(12, 16)).add(Dropout::new(0.25)).add(Linear::new(16, 3));
    let o = SgdOptions { lr: 0.1, ..Default::default() };
    let (xs, ys): (Vec<Tensor>, Vec<Tensor>) = {
        let _g = lock();
        tracegrad::manual_seed(2);
        (0..4i64).map(|i| (Tensor::randn(&[8, 12]), Tensor::from_vec(vec![i % 3; 8], &[8]))).unzip()
    };
    let eager_losses = {
        let _g = lock();
        tracegrad::manual_seed(4);
        let m = make();
        let mut opt = Sgd::with_options(m.parameters(), o.clone()).unwrap();
        xs.iter()
            .zip(&ys)
            .map(|(x, y)| {
                let loss = m.call(x).cross_entropy(y);
                opt.zero_grad();
                loss.backward();
                opt.step();
                loss.item()
            })
            .collect::<Vec<_>>()
    };
    for backend in [Backend::Jit, Backend::Interpreter] {
        let _g = lock();
        tracegrad::manual_seed(4);
        let m = make();
        let mut step =
            compile_train_step(&m, |out, y| out.cross_entropy(y), StepOptimizer::Sgd(o.clone())).with_backend(backend);
        for (i, (x, y)) in xs.iter().zip(&ys).enumerate() {
            let l = step.step(x, y).unwrap().item();
            let e = eager_losses[i];
            assert!((l - e).abs() <= 1e-5 * e.abs(), "{backend:?} step {i}: compiled loss {l} vs eager {e}");
        }
    }
}

/// Dropout's gradient with its mask held fixed (the same seed before every evaluation), and
/// `normal`'s reparameterised gradients, in f64.
#[test]
fn dropout_and_normal_gradcheck_f64() {
    let _g = lock();
    let x = rnd(1, &[4, 5]);
    gradcheck("dropout", &[&x], |a| {
        tracegrad::manual_seed(8);
        vec![a[0].dropout(0.4, true)]
    });
    let mean = rnd(2, &[3, 4]);
    let std = pos(3, &[3, 4]);
    gradcheck("normal", &[&mean, &std], |a| {
        tracegrad::manual_seed(8);
        vec![Tensor::normal_tensor(&a[0], &a[1])]
    });
    // The f64 uniform holds the f32 draw's values exactly.
    tracegrad::manual_seed(6);
    let u32s = Tensor::rand(&[100]).to_vec_f64();
    tracegrad::manual_seed(6);
    let u64s = Tensor::zeros(&[100]).to_dtype(DType::F64).rand_like();
    assert_eq!(u64s.dtype(), DType::F64);
    assert_eq!(u64s.to_vec_f64(), u32s);
}
