//! The standard workloads of DESIGN.md ("Standard workloads"), each runnable eagerly and
//! compiled through the same public API a user would call.
//!
//! A [`Workload`] is a name plus a recipe. [`Workload::setup`] builds its model and inputs from
//! fixed seeds; [`Setup::runner`] gives a [`Runner`] whose [`Runner::step`] does one unit of
//! work (one forward, or one full training step) in the chosen [`Mode`].

use std::sync::Mutex;
use std::time::Duration;

use crate::compile::{compile_dyn, compile_train_step, CompiledModule, StepOptimizer, TrainStep};
use crate::nn::{Linear, Module, ModuleCore, ModuleExt, ReLU, Sequential};
use crate::optim::{Optimizer, Sgd, SgdOptions};
use crate::{Generator, LossReduction, Tensor};

/// The workload names, in the order DESIGN.md lists them (and the bench runs them).
pub const WORKLOADS: [&str; 8] = [
    "pointwise_chain",
    "softmax_rows",
    "layernorm",
    "mlp_train_step",
    "mlp_train_step_large",
    "mlp_inference_b1",
    "cnn_train_step",
    "transformer_block_train_step",
];

/// The learning rate of every training-step workload.
pub const LR: f64 = 0.1;

/// How a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Op by op, with eager autograd and the `optim::Sgd` optimizer.
    Eager,
    /// Through `compile(&module)` (forward workloads) or `compile_train_step` (training steps).
    Compiled,
}

impl Mode {
    /// `"eager"` or `"compiled"`, as in the bench's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Compiled => "compiled",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the standard workloads (see [`workload`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    name: &'static str,
}

/// The workload called `name`; the error lists the valid names.
pub fn workload(name: &str) -> Result<Workload, String> {
    match WORKLOADS.iter().find(|w| **w == name) {
        Some(&name) => Ok(Workload { name }),
        None => Err(format!("unknown workload {name:?}; the workloads are: {}", WORKLOADS.join(", "))),
    }
}

/// Every standard workload, in [`WORKLOADS`] order.
pub fn workloads() -> Vec<Workload> {
    WORKLOADS.iter().map(|&name| Workload { name }).collect()
}

impl Workload {
    /// The workload's name (one of [`WORKLOADS`]).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// DESIGN.md's definition, in one line.
    pub fn about(&self) -> &'static str {
        match self.name {
            "pointwise_chain" => "x, a, b: f32[2^24]; y = tanh(a*x + b) * sigmoid(x) + 0.5*x",
            "softmax_rows" => "x: f32[4096, 1024]; softmax over the last dim",
            "layernorm" => "x: f32[4096, 1024], weight, bias: f32[1024], eps 1e-5",
            "mlp_train_step" => "batch 64, Linear 784→256, ReLU, Linear 256→10, cross-entropy, SGD lr 0.1",
            "mlp_train_step_large" => "batch 256, 784→512→512→10 with ReLU, cross-entropy, SGD lr 0.1",
            "mlp_inference_b1" => "batch 1, 784→256→10 forward only (eval, no grad)",
            "cnn_train_step" => "batch 32 of 1×28×28, conv8-pool-conv16-pool-Linear 784→10, CE, SGD",
            "transformer_block_train_step" => "B 8, T 64, D 128, 4 heads, causal, pre-LN, GELU(tanh) MLP 4×, MSE, SGD",
            _ => unreachable!("workload names are checked by `workload`"),
        }
    }

    /// Timed iterations when `--iters` is not given: one to a few seconds per mode on a
    /// two-core machine, so that the whole default bench takes about a minute.
    pub fn default_iters(&self) -> usize {
        match self.name {
            "pointwise_chain" => 10,
            "softmax_rows" => 150,
            "layernorm" => 150,
            "mlp_train_step" => 3000,
            "mlp_train_step_large" => 300,
            "mlp_inference_b1" => 50000,
            "cnn_train_step" => 500,
            "transformer_block_train_step" => 200,
            _ => unreachable!("workload names are checked by `workload`"),
        }
    }

    /// Builds the model and inputs: model weights from `manual_seed(0)` with each layer's
    /// default initialisation, inputs standard normal from `Generator::new(1)`. Two setups of
    /// one workload are identical, so eager and compiled runs see the same numbers.
    pub fn setup(&self) -> Setup {
        // Seeding and drawing from the default generator must not interleave with another
        // thread doing the same (criterion and tests may build setups concurrently).
        static INIT: Mutex<()> = Mutex::new(());
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        crate::manual_seed(0);
        let mut g = Generator::new(1);
        let kind = match self.name {
            "pointwise_chain" => {
                let n = 1 << 24;
                let x = Tensor::randn_with(&mut g, &[n]);
                let a = Tensor::randn_with(&mut g, &[n]);
                let b = Tensor::randn_with(&mut g, &[n]);
                forward(PointwiseChain { core: ModuleCore::new() }, vec![x, a, b])
            }
            "softmax_rows" => {
                forward(SoftmaxRows { core: ModuleCore::new() }, vec![Tensor::randn_with(&mut g, &[4096, 1024])])
            }
            "layernorm" => {
                let x = Tensor::randn_with(&mut g, &[4096, 1024]);
                let weight = Tensor::randn_with(&mut g, &[1024]);
                let bias = Tensor::randn_with(&mut g, &[1024]);
                forward(LayerNormFn { weight, bias, core: ModuleCore::new() }, vec![x])
            }
            "mlp_train_step" => train(crate::zoo::mlp(), &mut g, &[64, 784], Target::Classes(10), cross_entropy),
            "mlp_train_step_large" => {
                let m = Sequential::new()
                    .add(Linear::new(784, 512))
                    .add(ReLU::new())
                    .add(Linear::new(512, 512))
                    .add(ReLU::new())
                    .add(Linear::new(512, 10));
                train(m, &mut g, &[256, 784], Target::Classes(10), cross_entropy)
            }
            "mlp_inference_b1" => {
                let m = crate::zoo::mlp();
                m.eval();
                forward(m, vec![Tensor::randn_with(&mut g, &[1, 784])])
            }
            "cnn_train_step" => train(crate::zoo::cnn(), &mut g, &[32, 1, 28, 28], Target::Classes(10), cross_entropy),
            "transformer_block_train_step" => {
                let m = crate::zoo::TransformerBlock::new(128, 4);
                train(m, &mut g, &[8, 64, 128], Target::Normal(vec![8, 64, 128]), mse)
            }
            _ => unreachable!("workload names are checked by `workload`"),
        };
        Setup { workload: *self, kind }
    }
}

/// `y = tanh(a*x + b) * sigmoid(x) + 0.5*x` of its three inputs `(x, a, b)`.
#[derive(Module)]
pub struct PointwiseChain {
    core: ModuleCore,
}

impl Module for PointwiseChain {
    fn forward_many(&self, xs: &[Tensor]) -> Tensor {
        let [x, a, b] = xs else { panic!("PointwiseChain.forward() takes 3 tensors but {} were given", xs.len()) };
        (a * x + b).tanh() * x.sigmoid() + x.mul_scalar(0.5)
    }
}

/// Softmax over the last dim.
#[derive(Module)]
pub struct SoftmaxRows {
    core: ModuleCore,
}

impl Module for SoftmaxRows {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.softmax(-1)
    }
}

/// Layer normalisation over the last dim with a weight and a bias, eps 1e-5.
#[derive(Module)]
pub struct LayerNormFn {
    /// The scale, one per feature.
    #[buffer]
    pub weight: Tensor,
    /// The shift, one per feature.
    #[buffer]
    pub bias: Tensor,
    core: ModuleCore,
}

impl Module for LayerNormFn {
    fn forward(&self, x: &Tensor) -> Tensor {
        let d = *self.weight.shape().last().expect("LayerNormFn: weight must have one dim");
        x.layer_norm(&[d], Some(&self.weight), Some(&self.bias), 1e-5)
    }
}

fn cross_entropy(out: &Tensor, y: &Tensor) -> Tensor {
    out.cross_entropy(y)
}

fn mse(out: &Tensor, y: &Tensor) -> Tensor {
    out.mse_loss(y, LossReduction::Mean)
}

enum Target {
    /// Class indices in `0..n`, one per sample.
    Classes(i64),
    /// A standard-normal tensor of this shape.
    Normal(Vec<usize>),
}

fn forward(module: impl Module, inputs: Vec<Tensor>) -> Kind {
    Kind::Forward { module: Box::new(module), inputs }
}

fn train(
    module: impl Module,
    g: &mut Generator,
    x_shape: &[usize],
    target: Target,
    loss: fn(&Tensor, &Tensor) -> Tensor,
) -> Kind {
    let x = Tensor::randn_with(g, x_shape);
    let y = match target {
        Target::Classes(n) => Tensor::randint_with(g, 0, n, &x_shape[..1]),
        Target::Normal(shape) => Tensor::randn_with(g, &shape),
    };
    module.train(true);
    Kind::Train { module: Box::new(module), x, y, loss }
}

enum Kind {
    /// A forward call under `no_grad`, on `inputs`.
    Forward { module: Box<dyn Module>, inputs: Vec<Tensor> },
    /// A training step: `loss(module(x), y)`, backward, SGD.
    Train { module: Box<dyn Module>, x: Tensor, y: Tensor, loss: fn(&Tensor, &Tensor) -> Tensor },
}

/// A workload's model and inputs (see [`Workload::setup`]). Runners borrow it.
pub struct Setup {
    workload: Workload,
    kind: Kind,
}

/// Runs one unit of a workload: a forward call or a full training step.
pub trait Runner {
    /// Does one unit of work and returns its result: the forward's output, or the step's
    /// loss (computed before the update). For a compiled runner the first call traces and
    /// compiles; a compile error comes back as text.
    fn step(&mut self) -> Result<Tensor, String>;

    /// How long building the plan of the last step took (trace, autodiff, passes, code
    /// generation), as the compile API reports it; `None` for eager runners and before the
    /// first step.
    fn compile_time(&self) -> Option<Duration> {
        None
    }
}

impl Setup {
    /// The workload this was built for.
    pub fn workload(&self) -> Workload {
        self.workload
    }

    /// A runner in `mode`. A compiled runner compiles on its first [`Runner::step`]. Each
    /// runner of a training workload updates the shared parameters in place.
    pub fn runner(&self, mode: Mode) -> Box<dyn Runner + '_> {
        match (&self.kind, mode) {
            (Kind::Forward { module, inputs }, Mode::Eager) => Box::new(EagerForward { module: &**module, inputs }),
            (Kind::Forward { module, inputs }, Mode::Compiled) => {
                Box::new(CompiledForward { compiled: compile_dyn(&**module), inputs })
            }
            (Kind::Train { module, x, y, loss }, Mode::Eager) => {
                Box::new(EagerTrain { module: &**module, opt: Sgd::new(module.parameters(), LR), x, y, loss: *loss })
            }
            (Kind::Train { module, x, y, loss }, Mode::Compiled) => {
                let opt = StepOptimizer::Sgd(SgdOptions { lr: LR, ..Default::default() });
                Box::new(CompiledTrain { step: compile_train_step(&**module, *loss, opt), x, y })
            }
        }
    }
}

/// A training workload's model, batch and loss, for runners built elsewhere (the
/// distributed bench wraps the model in DDP).
pub struct TrainParts {
    /// The model, in training mode.
    pub module: Box<dyn Module>,
    /// The input batch.
    pub x: Tensor,
    /// The target batch.
    pub y: Tensor,
    /// The loss of (output, target).
    pub loss: fn(&Tensor, &Tensor) -> Tensor,
}

impl Setup {
    /// The training workload's parts; `None` for a forward workload.
    pub fn into_train(self) -> Option<TrainParts> {
        match self.kind {
            Kind::Train { module, x, y, loss } => Some(TrainParts { module, x, y, loss }),
            Kind::Forward { .. } => None,
        }
    }
}

struct EagerForward<'a> {
    module: &'a dyn Module,
    inputs: &'a [Tensor],
}

impl Runner for EagerForward<'_> {
    fn step(&mut self) -> Result<Tensor, String> {
        Ok(crate::no_grad(|| self.module.call_many(self.inputs)))
    }
}

struct CompiledForward<'a> {
    compiled: CompiledModule<'a>,
    inputs: &'a [Tensor],
}

impl Runner for CompiledForward<'_> {
    fn step(&mut self) -> Result<Tensor, String> {
        crate::no_grad(|| self.compiled.call_many(self.inputs)).map_err(|e| e.to_string())
    }

    fn compile_time(&self) -> Option<Duration> {
        self.compiled.last_plan().map(|p| p.compile_time)
    }
}

struct EagerTrain<'a> {
    module: &'a dyn Module,
    opt: Sgd,
    x: &'a Tensor,
    y: &'a Tensor,
    loss: fn(&Tensor, &Tensor) -> Tensor,
}

impl Runner for EagerTrain<'_> {
    fn step(&mut self) -> Result<Tensor, String> {
        self.opt.zero_grad();
        let loss = (self.loss)(&self.module.call(self.x), self.y);
        loss.backward();
        self.opt.step();
        Ok(loss.detach())
    }
}

struct CompiledTrain<'a> {
    step: TrainStep<'a>,
    x: &'a Tensor,
    y: &'a Tensor,
}

impl Runner for CompiledTrain<'_> {
    fn step(&mut self) -> Result<Tensor, String> {
        self.step.step(self.x, self.y).map_err(|e| e.to_string())
    }

    fn compile_time(&self) -> Option<Duration> {
        self.step.last_compile_time()
    }
}

/// Compares a compiled result with the eager one: `None` when they agree within
/// `1e-4·(1 + |eager|)` element-wise, otherwise a description of the largest difference.
pub fn compare(eager: &Tensor, compiled: &Tensor) -> Option<String> {
    if eager.shape() != compiled.shape() {
        return Some(format!("shapes differ: eager {:?}, compiled {:?}", eager.shape(), compiled.shape()));
    }
    let (e, c) = (eager.to_vec_f64(), compiled.to_vec_f64());
    let mut worst: Option<(usize, f64)> = None;
    for (i, (a, b)) in e.iter().zip(&c).enumerate() {
        let excess = (a - b).abs() - 1e-4 * (1.0 + a.abs());
        let bad = excess > 0.0 || a.is_nan() != b.is_nan();
        if bad && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    worst.map(|(i, _)| format!("element {i}: eager {} vs compiled {}", e[i], c[i]))
}
