//! The main job: train a classifier on a [`crate::data::Labeled`] set and report
//! per-epoch loss and test accuracy. Used by `tracegrad train` and by the tests.

use std::time::Instant;

use serde::Serialize;
use tracegrad_runtime::Generator;

use crate::data::Labeled;
use crate::nn::{self, Module, ModuleExt};
use crate::no_grad;
use crate::optim::{Adam, AdamW, Optimizer, Sgd};

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
    /// The update rule.
    pub optimizer: OptimizerKind,
    /// Run each step compiled (`compile_train_step`, one graph per batch shape) instead of
    /// eagerly.
    pub compiled: bool,
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

/// An MLP `d → hidden → classes` with ReLU.
pub fn mlp(d: usize, hidden: usize, classes: usize) -> nn::Sequential {
    nn::Sequential::new().add(nn::Linear::new(d, hidden)).add(nn::ReLU::new()).add(nn::Linear::new(hidden, classes))
}

/// Fraction of samples whose arg-max prediction equals the label.
pub fn accuracy(model: &dyn Module, data: &Labeled) -> f64 {
    no_grad(|| {
        let pred = model.forward(&data.x).argmax(Some(1), false);
        pred.eq(&data.y).to_dtype(tracegrad_runtime::DType::F64).mean_all().item()
    })
}

/// Trains an MLP with SGD and cross-entropy, calling `on_step(epoch, step, steps)` after each
/// step and `on_epoch` after each epoch.
pub fn train_mlp(
    train: &Labeled,
    test: &Labeled,
    cfg: &TrainConfig,
    mut on_step: impl FnMut(usize, usize, usize),
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<(nn::Sequential, TrainSummary), String> {
    // Seeding and drawing the initial weights from the default generator must not interleave
    // with another thread doing the same, or the run would not be reproducible.
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let d = train.x.shape()[1];
    let model = {
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        crate::manual_seed(cfg.seed);
        mlp(d, cfg.hidden, train.classes.max(test.classes))
    };
    enum Stepper<'a> {
        Eager(Box<dyn Optimizer>),
        Compiled(Box<crate::compile::TrainStep<'a>>),
    }
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
    let mut stepper = if cfg.compiled {
        use crate::compile::StepOptimizer as S;
        let spec = match cfg.optimizer {
            OptimizerKind::Sgd => S::Sgd(crate::optim::SgdOptions { lr: cfg.lr, ..Default::default() }),
            OptimizerKind::Adam => S::Adam(crate::optim::AdamOptions { lr: cfg.lr, ..Default::default() }),
            OptimizerKind::AdamW => S::AdamW(crate::optim::AdamWOptions { lr: cfg.lr, ..Default::default() }),
        };
        Stepper::Compiled(Box::new(crate::compile::compile_train_step(&model, |out, y| out.cross_entropy(y), spec)))
    } else {
        Stepper::Eager(eager_opt)
    };
    let mut g = Generator::new(cfg.seed.wrapping_add(1));
    let mut train_seconds = 0.0;
    let mut steps = 0usize;
    let mut last = EpochReport { epoch: 0, loss: f64::NAN, test_accuracy: 0.0, seconds: 0.0 };
    for epoch in 1..=cfg.epochs {
        let batches = train.shuffled_batches(cfg.batch_size, &mut g);
        let t0 = Instant::now();
        let mut total = 0.0;
        for (i, b) in batches.iter().enumerate() {
            let loss = match &mut stepper {
                Stepper::Eager(opt) => {
                    let loss = model.forward(&b.x).cross_entropy(&b.y);
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
            EpochReport { epoch, loss: total / batches.len() as f64, test_accuracy: accuracy(&model, test), seconds };
        on_epoch(&last);
    }
    drop(stepper);
    let summary = TrainSummary {
        mode: if cfg.compiled { "compiled" } else { "eager" }.into(),
        epochs: cfg.epochs,
        final_loss: last.loss,
        test_accuracy: last.test_accuracy,
        train_seconds,
        steps_per_second: steps as f64 / train_seconds.max(1e-9),
    };
    Ok((model, summary))
}
