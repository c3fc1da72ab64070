//! The data-parallel main job (`mpirun -np N tracegrad train --distributed`): the MLP of
//! [`crate::train::mlp`] (the single-process job is [`crate::train::train_classifier`])
//! wrapped in [`DistributedDataParallel`]. The global batch is `batch_size`, split evenly
//! across the ranks; each rank reads its shard of every epoch through a
//! [`DistributedSampler`](crate::data::DistributedSampler) whose epoch is set before each
//! pass, so the ranks together see every sample once per epoch.

use std::time::Instant;

use super::{DistError, DistributedDataParallel, ProcessGroup, ReduceOp};
use crate::data::{Labeled, Sampler};
use crate::nn::{ModuleExt, Sequential};
use crate::tensor::Tensor;
use crate::train::{accuracy, mlp, setup, EpochReport, Stepper, TrainConfig, TrainSummary};

fn dist(e: DistError) -> String {
    e.to_string()
}

/// Trains data-parallel over `group`: every rank calls this with the same data and settings.
/// `on_epoch` runs on every rank with the ranks' mean loss (print on rank 0 only).
pub fn train_mlp_distributed(
    group: &ProcessGroup,
    train: &Labeled,
    test: &Labeled,
    cfg: &TrainConfig,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<(DistributedDataParallel<Sequential>, TrainSummary), String> {
    let world = group.world_size();
    if cfg.batch_size == 0 || !cfg.batch_size.is_multiple_of(world) {
        return Err(format!("--batch-size {} must be a positive multiple of the {world} ranks", cfg.batch_size));
    }
    let per_rank = cfg.batch_size / world;
    crate::manual_seed(cfg.seed);
    let model = mlp(train.x.shape()[1], cfg.hidden, train.classes.max(test.classes));
    let ddp = DistributedDataParallel::new(model, group).map_err(dist)?;
    let sampler = group.sampler(train.len()).map_err(dist)?.seed(cfg.seed);
    group.check_sampler(&sampler).map_err(dist)?;
    let mut stepper = setup(&ddp, cfg)?;
    let (mut train_seconds, mut steps) = (0.0, 0usize);
    let mut last = EpochReport { epoch: 0, loss: f64::NAN, test_accuracy: 0.0, seconds: 0.0 };
    for epoch in 1..=cfg.epochs {
        sampler.set_epoch(epoch as u64);
        let order: Vec<i64> = sampler.iter().map(|i| i as i64).collect();
        let t0 = Instant::now();
        let mut total = 0.0;
        let batches = order.chunks(per_rank).count();
        for idx in order.chunks(per_rank) {
            let b = train.select(&Tensor::from_slice(idx, &[idx.len()]));
            let loss = match &mut stepper {
                Stepper::Eager(opt) => {
                    let loss = ddp.call(&b.x).cross_entropy(&b.y);
                    opt.zero_grad();
                    loss.try_backward().map_err(|e| e.to_string())?;
                    opt.step();
                    loss.detach()
                }
                Stepper::Compiled(step) => step.step(&b.x, &b.y).map_err(|e| e.to_string())?,
            };
            group.all_reduce(&loss, ReduceOp::Avg).map_err(dist)?;
            total += loss.item();
            steps += 1;
        }
        let seconds = t0.elapsed().as_secs_f64();
        train_seconds += seconds;
        ddp.sync_buffers().map_err(dist)?;
        last = EpochReport { epoch, loss: total / batches as f64, test_accuracy: accuracy(&ddp.module, test), seconds };
        on_epoch(&last);
    }
    drop(stepper);
    Ok((ddp, TrainSummary::new(cfg, &last, train_seconds, steps)))
}
