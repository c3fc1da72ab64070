//! The main job: train a classifier (an MLP, a CNN or a small transformer) on a
//! [`crate::data::Labeled`] set and report per-epoch loss and test accuracy, optionally saving
//! a [`checkpoint`] after every epoch and resuming from one. Used by
//! `tracegrad train` and by the tests.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use tracegrad_runtime::Generator;

use crate::checkpoint::{self, Progress};
use crate::data::Labeled;
use crate::nn::{self, Module, ModuleCore, ModuleExt};
use crate::no_grad;
use crate::optim::{Adam, AdamW, Optimizer, Sgd};
use crate::tensor::Tensor;

/// Training settings.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Learning rate.
    pub lr: f64,
    /// Seeds initialisation and shuffling.
    pub seed: u64,
    /// Hidden width of the MLP.
    pub hidden: usize,
    /// The network.
    pub model: ModelKind,
    /// The update rule.
    pub optimizer: OptimizerKind,
    /// Run each step compiled (`compile_train_step`, one graph per batch shape) instead of
    /// eagerly.
    pub compiled: bool,
    /// Write a checkpoint here after every epoch (model, optimizer, epochs done).
    pub save: Option<PathBuf>,
    /// Continue the run saved here: its epochs are skipped (`epochs` is the total), the
    /// shuffling replays up to where it stopped, and the model and optimizer state are
    /// restored, so the result is the uninterrupted run's.
    pub resume: Option<PathBuf>,
}

/// Which network [`train_classifier`] trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModelKind {
    /// [`mlp`]: Linear, ReLU, Linear.
    #[default]
    Mlp,
    /// [`cnn`]: each sample as a one-channel square image.
    Cnn,
    /// [`transformer`]: each square image as a sequence of its rows.
    Transformer,
}

/// Which optimizer `train_mlp` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    /// Plain SGD.
    #[default]
    Sgd,
    /// Adam.
    Adam,
    /// AdamW (decoupled weight decay 0.01).
    AdamW,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            batch_size: 32,
            lr: 0.1,
            seed: 0,
            hidden: 128,
            optimizer: OptimizerKind::Sgd,
            compiled: false,
            model: ModelKind::Mlp,
            save: None,
            resume: None,
        }
    }
}

/// What one epoch achieved.
#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub loss: f64,
    /// Accuracy on the held-out set after the epoch.
    pub test_accuracy: f64,
    /// Wall time of the epoch's training steps.
    pub seconds: f64,
}

/// The summary printed by `tracegrad train --json` (DESIGN.md's CLI contract).
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// `eager` (the compiled step arrives with the compiler).
    pub mode: String,
    /// Epochs run.
    pub epochs: usize,
    /// Mean loss of the last epoch.
    pub final_loss: f64,
    /// Held-out accuracy at the end.
    pub test_accuracy: f64,
    /// Time spent in training steps.
    pub train_seconds: f64,
    /// Training steps per second.
    pub steps_per_second: f64,
}

impl TrainSummary {
    /// The summary of a run of `cfg` whose last epoch was `last`, after `steps` steps taking
    /// `train_seconds` in all.
    pub(crate) fn new(cfg: &TrainConfig, last: &EpochReport, train_seconds: f64, steps: usize) -> TrainSummary {
        TrainSummary {
            mode: if cfg.compiled { "compiled" } else { "eager" }.into(),
            epochs: cfg.epochs,
            final_loss: last.loss,
            test_accuracy: last.test_accuracy,
            train_seconds,
            steps_per_second: steps as f64 / train_seconds.max(1e-9),
        }
    }
}

/// An MLP `d → hidden → classes` with ReLU.
pub fn mlp(d: usize, hidden: usize, classes: usize) -> nn::Sequential {
    nn::Sequential::new().add(nn::Linear::new(d, hidden)).add(nn::ReLU::new()).add(nn::Linear::new(hidden, classes))
}

/// Reshapes each sample (`[batch, …]` to `[batch, shape…]`), so that a flat feature vector
/// can feed a convolution.
#[derive(Module)]
pub struct Reshape {
    shape: Vec<isize>,
    core: ModuleCore,
}

impl Reshape {
    /// Reshapes every sample to `shape`.
    pub fn new(shape: &[usize]) -> Reshape {
        Reshape { shape: shape.iter().map(|&d| d as isize).collect(), core: ModuleCore::new() }
    }
}

impl Module for Reshape {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut shape = vec![x.shape()[0] as isize];
        shape.extend(&self.shape);
        x.reshape(&shape)
    }

    fn extra_repr(&self) -> String {
        format!("shape={:?}", self.shape)
    }
}

/// The side of the square images whose pixels are `d` features, or an error naming `model`.
fn square_side(d: usize, model: &str) -> Result<usize, String> {
    let side = (d as f64).sqrt().round() as usize;
    if side * side != d || side < 4 {
        return Err(format!(
            "--model {model} reads each sample as a square image of at least 4×4, but samples have {d} features"
        ));
    }
    Ok(side)
}

/// A CNN for `side × side` one-channel images given as `side²` features: conv 1→16 3×3 pad 1,
/// ReLU, maxpool 2, conv 16→32 3×3 pad 1, ReLU, maxpool 2, flatten, Linear to `classes`.
pub fn cnn(side: usize, classes: usize) -> nn::Sequential {
    let pooled = side / 2 / 2;
    nn::Sequential::new()
        .add(Reshape::new(&[1, side, side]))
        .add(nn::Conv2d::new(1, 16, 3).padding(1))
        .add(nn::ReLU::new())
        .add(nn::MaxPool2d::new(2))
        .add(nn::Conv2d::new(16, 32, 3).padding(1))
        .add(nn::ReLU::new())
        .add(nn::MaxPool2d::new(2))
        .add(nn::Flatten::new())
        .add(nn::Linear::new(32 * pooled * pooled, classes))
}

/// A transformer classifier reading a `side × side` image (given as `side²` features) as
/// `side` tokens of `side` features: a linear embedding plus learned positions, one pre-LN
/// block of causal multi-head self-attention and a GELU MLP (dropout after each), a final
/// LayerNorm, and a linear head on the tokens' mean.
#[derive(Module)]
pub struct Transformer {
    /// Token embedding, features → width.
    #[module]
    pub embed: nn::Linear,
    /// Learned positions, `[tokens, width]`.
    #[param]
    pub pos: Tensor,
    #[module]
    ln1: nn::LayerNorm,
    #[module]
    qkv: nn::Linear,
    #[module]
    proj: nn::Linear,
    #[module]
    drop1: nn::Dropout,
    #[module]
    ln2: nn::LayerNorm,
    #[module]
    fc1: nn::Linear,
    #[module]
    act: nn::GELU,
    #[module]
    fc2: nn::Linear,
    #[module]
    drop2: nn::Dropout,
    #[module]
    ln_f: nn::LayerNorm,
    /// The classifier.
    #[module]
    pub head: nn::Linear,
    tokens: usize,
    heads: usize,
    core: ModuleCore,
}

/// The transformer of [`ModelKind::Transformer`]: width 32, 2 heads, MLP 4×, dropout `p`.
pub fn transformer(side: usize, classes: usize, p: f64) -> Transformer {
    let (d, heads) = (32, 2);
    Transformer {
        embed: nn::Linear::new(side, d),
        pos: Tensor::randn(&[side, d]).mul_scalar(0.02).requires_grad_(true),
        ln1: nn::LayerNorm::new(&[d]),
        qkv: nn::Linear::new(d, 3 * d),
        proj: nn::Linear::new(d, d),
        drop1: nn::Dropout::new(p),
        ln2: nn::LayerNorm::new(&[d]),
        fc1: nn::Linear::new(d, 4 * d),
        act: nn::GELU::new(),
        fc2: nn::Linear::new(4 * d, d),
        drop2: nn::Dropout::new(p),
        ln_f: nn::LayerNorm::new(&[d]),
        head: nn::Linear::new(d, classes),
        tokens: side,
        heads,
        core: ModuleCore::new(),
    }
}

impl Transformer {
    /// Causal multi-head self-attention over `x` (`[batch, tokens, width]`), before the
    /// output projection.
    fn attention(&self, x: &Tensor) -> Tensor {
        let s = x.shape();
        let (b, t, d) = (s[0] as isize, s[1], s[2] as isize);
        let (h, dh) = (self.heads as isize, d / self.heads as isize);
        let qkv = self.qkv.call(x);
        let split: Vec<Tensor> =
            qkv.chunk(3, -1).iter().map(|p| p.reshape(&[b, t as isize, h, dh]).permute(&[0, 2, 1, 3])).collect();
        let (q, k, v) = (&split[0], &split[1], &split[2]);
        let scores = q.matmul(&k.transpose(-2, -1)).mul_scalar(1.0 / (dh as f64).sqrt());
        let future: Vec<bool> = (0..t * t).map(|i| i % t > i / t).collect();
        let att = scores.masked_fill(&Tensor::from_vec(future, &[t, t]), f64::NEG_INFINITY).softmax(-1);
        att.matmul(v).permute(&[0, 2, 1, 3]).reshape(&[b, t as isize, d])
    }
}

impl Module for Transformer {
    fn forward(&self, x: &Tensor) -> Tensor {
        let b = x.shape()[0] as isize;
        let t = self.tokens as isize;
        let h = &self.embed.call(&x.reshape(&[b, t, t])) + &self.pos;
        let h = &h + &self.drop1.call(&self.proj.call(&self.attention(&self.ln1.call(&h))));
        let m = self.fc2.call(&self.act.call(&self.fc1.call(&self.ln2.call(&h))));
        let h = &h + &self.drop2.call(&m);
        self.head.call(&self.ln_f.call(&h).mean(&[1], false))
    }

    fn extra_repr(&self) -> String {
        format!("tokens={}, heads={}", self.tokens, self.heads)
    }
}

/// Builds `cfg.model` for `d` features and `classes` classes (from the default generator).
fn build(cfg: &TrainConfig, d: usize, classes: usize) -> Result<Box<dyn Module>, String> {
    Ok(match cfg.model {
        ModelKind::Mlp => Box::new(mlp(d, cfg.hidden, classes)),
        ModelKind::Cnn => Box::new(cnn(square_side(d, "cnn")?, classes)),
        ModelKind::Transformer => Box::new(transformer(square_side(d, "transformer")?, classes, 0.1)),
    })
}

/// Fraction of samples whose arg-max prediction equals the label, in eval mode (the model's
/// training flag is restored after).
pub fn accuracy(model: &dyn Module, data: &Labeled) -> f64 {
    let training = model.training();
    model.train(false);
    let acc = no_grad(|| {
        let pred = model.forward(&data.x).argmax(Some(1), false);
        pred.eq(&data.y).to_dtype(tracegrad_runtime::DType::F64).mean_all().item()
    });
    model.train(training);
    acc
}

/// How each step runs: an eager optimizer, or the compiled train step.
pub(crate) enum Stepper<'a> {
    Eager(Box<dyn Optimizer>),
    Compiled(Box<crate::compile::TrainStep<'a>>),
}

impl Stepper<'_> {
    fn save(&self, path: &std::path::Path, model: &dyn Module, epochs_done: usize) -> Result<(), String> {
        // Dropout draws from the default generator: its state is part of where the run is.
        let progress = Progress { step: epochs_done as u64, generator: Some(crate::get_rng_state()) };
        match self {
            Stepper::Eager(opt) => checkpoint::save(path, model, &**opt, None, progress),
            Stepper::Compiled(step) => checkpoint::save(path, model, &**step, None, progress),
        }
    }

    fn load(&mut self, path: &std::path::Path, model: &dyn Module) -> Result<Progress, String> {
        match self {
            Stepper::Eager(opt) => checkpoint::load(path, model, &mut **opt, None),
            Stepper::Compiled(step) => checkpoint::load(path, model, &mut **step, None),
        }
    }
}

/// The stepper of `cfg` for `model` (also `train --distributed`'s, over the DDP wrapper).
pub(crate) fn setup<'a>(model: &'a dyn Module, cfg: &TrainConfig) -> Result<Stepper<'a>, String> {
    // The optimizer's own validation runs first in both modes, so a bad hyperparameter is the
    // same error eager or compiled, before any work.
    let eager_opt: Box<dyn Optimizer> = match cfg.optimizer {
        OptimizerKind::Sgd => Box::new(
            Sgd::with_options(model.parameters(), crate::optim::SgdOptions { lr: cfg.lr, ..Default::default() })
                .map_err(|e| e.to_string())?,
        ),
        OptimizerKind::Adam => Box::new(Adam::new(model.parameters(), cfg.lr).map_err(|e| e.to_string())?),
        OptimizerKind::AdamW => Box::new(AdamW::new(model.parameters(), cfg.lr).map_err(|e| e.to_string())?),
    };
    if !cfg.compiled {
        return Ok(Stepper::Eager(eager_opt));
    }
    use crate::compile::StepOptimizer as S;
    let spec = match cfg.optimizer {
        OptimizerKind::Sgd => S::Sgd(crate::optim::SgdOptions { lr: cfg.lr, ..Default::default() }),
        OptimizerKind::Adam => S::Adam(crate::optim::AdamOptions { lr: cfg.lr, ..Default::default() }),
        OptimizerKind::AdamW => S::AdamW(crate::optim::AdamWOptions { lr: cfg.lr, ..Default::default() }),
    };
    Ok(Stepper::Compiled(Box::new(crate::compile::compile_train_step(model, |out, y| out.cross_entropy(y), spec))))
}

/// Trains `cfg.model` with `cfg.optimizer` and cross-entropy, calling `on_step(epoch, step,
/// steps)` after each step and `on_epoch` after each epoch. With `cfg.resume`, the saved
/// epochs are skipped (the callbacks see only the epochs this call runs); with `cfg.save`, a
/// checkpoint is written after every epoch.
pub fn train_classifier(
    train: &Labeled,
    test: &Labeled,
    cfg: &TrainConfig,
    mut on_step: impl FnMut(usize, usize, usize),
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<(Box<dyn Module>, TrainSummary), String> {
    // Seeding and drawing the initial weights from the default generator must not interleave
    // with another thread doing the same, or the run would not be reproducible.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let d = train.x.shape()[1];
    let model = {
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        crate::manual_seed(cfg.seed);
        build(cfg, d, train.classes.max(test.classes))?
    };
    let mut stepper = setup(&*model, cfg)?;
    let mut g = Generator::new(cfg.seed.wrapping_add(1));
    let mut done = 0;
    if let Some(path) = &cfg.resume {
        let progress = stepper.load(path, &*model)?;
        done = progress.step as usize;
        if done >= cfg.epochs {
            return Err(format!(
                "{}: the checkpoint has trained {done} epochs; --epochs is the total, so --epochs {} leaves nothing to train",
                path.display(),
                cfg.epochs
            ));
        }
        if let Some(state) = &progress.generator {
            crate::set_rng_state(state);
        }
        // The shuffling replays the epochs already trained, so the rest sees the same batches.
        for _ in 0..done {
            train.shuffled_batches(cfg.batch_size, &mut g);
        }
    }
    let mut train_seconds = 0.0;
    let mut steps = 0usize;
    let mut last = EpochReport { epoch: 0, loss: f64::NAN, test_accuracy: 0.0, seconds: 0.0 };
    for epoch in done + 1..=cfg.epochs {
        let batches = train.shuffled_batches(cfg.batch_size, &mut g);
        let t0 = Instant::now();
        let mut total = 0.0;
        for (i, b) in batches.iter().enumerate() {
            let loss = match &mut stepper {
                Stepper::Eager(opt) => {
                    let loss = model.call(&b.x).cross_entropy(&b.y);
                    opt.zero_grad();
                    loss.backward();
                    opt.step();
                    loss
                }
                Stepper::Compiled(step) => step.step(&b.x, &b.y).map_err(|e| e.to_string())?,
            };
            total += loss.item();
            steps += 1;
            on_step(epoch, i + 1, batches.len());
        }
        let seconds = t0.elapsed().as_secs_f64();
        train_seconds += seconds;
        last =
            EpochReport { epoch, loss: total / batches.len() as f64, test_accuracy: accuracy(&*model, test), seconds };
        if let Some(path) = &cfg.save {
            stepper.save(path, &*model, epoch)?;
        }
        on_epoch(&last);
    }
    drop(stepper);
    Ok((model, TrainSummary::new(cfg, &last, train_seconds, steps)))
}
