//! `tracegrad bench --distributed` (run it under `mpirun -np N`): data-parallel scaling of the
//! training workloads at equal per-rank batch.
//!
//! Per workload and mode: rank 0 first times the plain step alone while the other ranks wait
//! at a barrier (the 1-rank time), then every rank times the step wrapped in
//! [`DistributedDataParallel`] (the N-rank time: the slowest rank's median). The
//! communication share is the part of the N-rank step spent blocked on gradient averages the
//! backward did not hide; the scaling efficiency is `t(1 rank) / t(N ranks)`, 1 when N ranks
//! do N times the work in the same time.

use std::time::Instant;

use serde::Serialize;

use super::workloads::{Mode, Runner, TrainParts, Workload};
use super::{time_calls, Times, LR};
use crate::compile::{compile_train_step, StepOptimizer};
use crate::distributed::{DistributedDataParallel, ProcessGroup, ReduceOp};
use crate::nn::ModuleExt;
use crate::optim::{Optimizer, Sgd, SgdOptions};
use crate::tensor::Tensor;

/// The workloads the distributed bench runs by default.
pub const DISTRIBUTED_WORKLOADS: [&str; 2] = ["mlp_train_step_large", "transformer_block_train_step"];

/// One line of the distributed bench.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingRow {
    /// Workload name.
    pub workload: String,
    /// `eager` or `compiled`.
    pub mode: String,
    /// Number of ranks of the job.
    pub ranks: usize,
    /// Median step time of one process alone (ms).
    pub step_ms_1_rank: f64,
    /// Median step time with all ranks under DDP, the slowest rank's (ms).
    pub step_ms_n_ranks: f64,
    /// Share of the N-rank step spent waiting on communication.
    pub comm_share: f64,
    /// `step_ms_1_rank / step_ms_n_ranks` at equal per-rank batch.
    pub efficiency: f64,
}

fn median_ms(ms: &[f64]) -> f64 {
    Times::of(ms).median_ms
}

/// One process's step on the workload, without DDP.
fn time_alone(w: Workload, mode: Mode, iters: usize) -> Result<f64, String> {
    let setup = w.setup();
    let mut runner = setup.runner(mode);
    for _ in 0..3 {
        runner.step()?;
    }
    Ok(median_ms(&time_calls(iters, || runner.step().map(drop))?))
}

/// Every rank's DDP step; returns (median ms, communication share) on this rank.
fn time_ddp(group: &ProcessGroup, w: Workload, mode: Mode, iters: usize) -> Result<(f64, f64), String> {
    let TrainParts { module, x, y, loss } =
        w.setup().into_train().ok_or_else(|| format!("{}: not a training workload", w.name()))?;
    let ddp = DistributedDataParallel::new(module, group).map_err(|e| e.to_string())?;
    let mut runner: Box<dyn Runner + '_> = match mode {
        Mode::Eager => Box::new(DdpEager { opt: Sgd::new(ddp.parameters(), LR), ddp: &ddp, x: &x, y: &y, loss }),
        Mode::Compiled => {
            let opt = StepOptimizer::Sgd(SgdOptions { lr: LR, ..Default::default() });
            let step = compile_train_step(&ddp, loss, opt);
            Box::new(DdpCompiled { step, x: &x, y: &y })
        }
    };
    for _ in 0..3 {
        runner.step()?;
    }
    group.barrier().map_err(|e| e.to_string())?;
    let waited = ddp.communication_wait();
    let t0 = Instant::now();
    let ms = time_calls(iters, || runner.step().map(drop))?;
    let total = t0.elapsed().as_secs_f64();
    let share = (ddp.communication_wait() - waited).as_secs_f64() / total.max(1e-12);
    Ok((median_ms(&ms), share))
}

struct DdpEager<'a> {
    ddp: &'a DistributedDataParallel<Box<dyn crate::nn::Module>>,
    opt: Sgd,
    x: &'a Tensor,
    y: &'a Tensor,
    loss: fn(&Tensor, &Tensor) -> Tensor,
}

impl Runner for DdpEager<'_> {
    fn step(&mut self) -> Result<Tensor, String> {
        self.opt.zero_grad();
        let loss = (self.loss)(&self.ddp.call(self.x), self.y);
        loss.try_backward().map_err(|e| e.to_string())?;
        self.opt.step();
        Ok(loss.detach())
    }
}

struct DdpCompiled<'a> {
    step: crate::compile::TrainStep<'a>,
    x: &'a Tensor,
    y: &'a Tensor,
}

impl Runner for DdpCompiled<'_> {
    fn step(&mut self) -> Result<Tensor, String> {
        self.step.step(self.x, self.y).map_err(|e| e.to_string())
    }
}

/// A value every rank agrees on: the maximum over the ranks.
fn max_over_ranks(group: &ProcessGroup, v: f64) -> Result<f64, String> {
    let t = Tensor::from_vec(vec![v], &[1]);
    group.all_reduce(&t, ReduceOp::Max).map_err(|e| e.to_string())?;
    Ok(t.to_vec_f64()[0])
}

/// Measures one (workload, mode) on every rank; the row is the same on every rank.
pub fn scaling_row(group: &ProcessGroup, w: Workload, mode: Mode, iters: usize) -> Result<ScalingRow, String> {
    // Rank 0 alone: the others wait at the barrier. A failure still reaches the barrier, so
    // no rank is left waiting, and is then reported on every rank.
    let alone = if group.rank() == 0 { time_alone(w, mode, iters) } else { Ok(0.0) };
    group.barrier().map_err(|e| e.to_string())?;
    let failed = max_over_ranks(group, alone.is_err() as u8 as f64)?;
    let t1 = match alone {
        Err(e) => return Err(e),
        Ok(_) if failed > 0.0 => {
            return Err(format!("{} ({}): the 1-rank run failed on rank 0", w.name(), mode.as_str()))
        }
        Ok(t) => max_over_ranks(group, t)?,
    };
    let (tn, share) = time_ddp(group, w, mode, iters)?;
    let tn = max_over_ranks(group, tn)?;
    let share = max_over_ranks(group, share)?;
    Ok(ScalingRow {
        workload: w.name().into(),
        mode: mode.as_str().into(),
        ranks: group.world_size(),
        step_ms_1_rank: t1,
        step_ms_n_ranks: tn,
        comm_share: share,
        efficiency: t1 / tn,
    })
}

/// The rows as a table.
pub fn scaling_table(rows: &[ScalingRow]) -> String {
    let mut s = format!(
        "{:<30} {:<9} {:>5} {:>12} {:>12} {:>11} {:>10}\n",
        "workload", "mode", "ranks", "1 rank ms", "N ranks ms", "comm share", "efficiency"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<30} {:<9} {:>5} {:>12.3} {:>12.3} {:>10.1}% {:>10.3}\n",
            r.workload,
            r.mode,
            r.ranks,
            r.step_ms_1_rank,
            r.step_ms_n_ranks,
            100.0 * r.comm_share,
            r.efficiency
        ));
    }
    s
}

/// `tracegrad bench --distributed`: joins the job, measures every (workload, mode) and prints
/// the table (or JSON lines) on rank 0 only.
pub fn cli(args: &super::BenchArgs) -> Result<(), String> {
    let group = crate::distributed::init().map_err(|e| e.to_string())?;
    let names: Vec<&str> = if args.workloads.is_empty() {
        DISTRIBUTED_WORKLOADS.to_vec()
    } else {
        args.workloads.iter().map(String::as_str).collect()
    };
    let mut list = Vec::new();
    for name in names {
        let w = super::workload(name)?;
        if w.setup().into_train().is_none() {
            return Err(format!("--distributed times training steps; {name} is a forward workload"));
        }
        list.push(w);
    }
    let run = || -> Result<Vec<ScalingRow>, String> {
        let mut rows = Vec::new();
        for &w in &list {
            for mode in args.mode.modes() {
                let row = scaling_row(&group, w, mode, args.iters.map_or(w.default_iters(), |n| n as usize))?;
                if args.json && group.rank() == 0 {
                    println!("{}", serde_json::to_string(&row).map_err(|e| e.to_string())?);
                }
                rows.push(row);
            }
        }
        Ok(rows)
    };
    let rows = match args.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build()
            .map_err(|e| format!("--threads {n}: cannot build the thread pool: {e}"))?
            .install(run),
        None => run(),
    };
    let rows = match rows {
        // The other ranks may be waiting in a collective: end the whole job.
        Err(e) if group.world_size() > 1 => group.abort(&format!("failed: {e}")),
        other => other?,
    };
    if !args.json && group.rank() == 0 {
        print!("{}", scaling_table(&rows));
    }
    Ok(())
}
