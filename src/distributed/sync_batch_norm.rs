//! [`SyncBatchNorm2d`]: batch normalisation whose training statistics are those of the global
//! batch, across every rank of a process group (PyTorch's `SyncBatchNorm`). With it, N ranks at
//! batch B/N compute what one process computes at batch B; plain `BatchNorm2d` under DDP
//! normalises each rank's batch alone.
//!
//! The per-channel sums travel through a differentiable all-reduce (its backward all-reduces
//! the gradient), in two rounds as a two-pass variance: the sum, then the sum of squared
//! deviations from the global mean. Eager only: a compiled graph cannot hold a collective, and
//! tracing it is the process group's error.

use tracegrad_runtime::{Buffer, DType};

use super::{ProcessGroup, ReduceOp};
use crate::autograd::{custom_op, no_grad, CustomBackward};
use crate::nn::{Module, ModuleCore, ModuleExt};
use crate::tensor::Tensor;

/// `BatchNorm2d` over the global batch of `group` (eps 1e-5, momentum 0.1, affine, running
/// statistics: the same parameters and buffers as `nn::BatchNorm2d`, so state dicts carry over).
#[derive(Module)]
pub struct SyncBatchNorm2d {
    /// Per-channel scale γ.
    #[param]
    pub weight: Tensor,
    /// Per-channel shift β.
    #[param]
    pub bias: Tensor,
    /// Running mean of the global batches.
    #[buffer]
    pub running_mean: Tensor,
    /// Running unbiased variance of the global batches.
    #[buffer]
    pub running_var: Tensor,
    /// Training batches seen (an i64 scalar).
    #[buffer]
    pub num_batches_tracked: Tensor,
    group: ProcessGroup,
    core: ModuleCore,
}

impl SyncBatchNorm2d {
    /// `num_features` channels, synchronised over `group`.
    pub fn new(num_features: usize, group: &ProcessGroup) -> SyncBatchNorm2d {
        let c = [num_features];
        SyncBatchNorm2d {
            weight: Tensor::ones(&c).requires_grad_(true),
            bias: Tensor::zeros(&c).requires_grad_(true),
            running_mean: Tensor::zeros(&c),
            running_var: Tensor::ones(&c),
            num_batches_tracked: Tensor::zeros_dtype(&[], DType::I64),
            group: group.clone(),
            core: ModuleCore::new(),
        }
    }
}

/// The sum of `t` over the ranks, as an autograd op whose backward sums the gradient over the
/// ranks (every rank runs the same backward, so the collectives pair up).
fn all_reduce_sum(group: &ProcessGroup, t: &Tensor) -> Tensor {
    let out = t.detach();
    group.all_reduce(&out, ReduceOp::Sum).unwrap_or_else(|e| panic!("SyncBatchNorm2d: {e}"));
    let g = group.clone();
    let backward: CustomBackward = std::sync::Arc::new(move |grads: &[Option<Tensor>]| {
        let Some(grad) = &grads[0] else { return Ok(vec![None]) };
        let summed = grad.detach();
        g.all_reduce(&summed, ReduceOp::Sum).map_err(|e| format!("SyncBatchNorm2d backward: {e}"))?;
        Ok(vec![Some(summed)])
    });
    custom_op("AllReduceBackward", std::slice::from_ref(t), vec![out.buffer()], backward).remove(0)
}

impl Module for SyncBatchNorm2d {
    #[track_caller]
    fn forward(&self, x: &Tensor) -> Tensor {
        let shape = x.shape();
        assert!(shape.len() == 4, "SyncBatchNorm2d: expected 4D input (got {}D input)", shape.len());
        let c = shape[1] as isize;
        let per_channel = |t: &Tensor| t.reshape(&[1, c, 1, 1]);
        if !self.training() {
            let running = Some((&self.running_mean, &self.running_var));
            return x.batch_norm(running, Some(&self.weight), Some(&self.bias), false, 1e-5).0;
        }
        // The global element count per channel (ranks may hold different batch sizes).
        let count = Tensor::from_buffer(Buffer::scalar((shape[0] * shape[2] * shape[3]) as f64, DType::F64));
        self.group.all_reduce(&count, ReduceOp::Sum).unwrap_or_else(|e| panic!("SyncBatchNorm2d: {e}"));
        let m = count.item();
        assert!(m > 1.0, "SyncBatchNorm2d: expected more than 1 value per channel when training, got {m}");
        let mean = all_reduce_sum(&self.group, &x.sum(&[0, 2, 3], false)).div_scalar(m);
        let centered = x - &per_channel(&mean);
        let var = all_reduce_sum(&self.group, &centered.pow(2.0).sum(&[0, 2, 3], false)).div_scalar(m);
        let y = &centered * &per_channel(&var.add_scalar(1e-5).rsqrt());
        let y = &y * &per_channel(&self.weight) + per_channel(&self.bias);
        no_grad(|| {
            let update = |r: &Tensor, batch: &Tensor| r.assign(&r.mul_scalar(0.9).add(&batch.detach().mul_scalar(0.1)));
            update(&self.running_mean, &mean);
            update(&self.running_var, &var.mul_scalar(m / (m - 1.0)));
            self.num_batches_tracked.assign(&self.num_batches_tracked.add_scalar(1.0));
        });
        y
    }

    fn extra_repr(&self) -> String {
        format!("{}, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True", self.weight.numel())
    }
}
