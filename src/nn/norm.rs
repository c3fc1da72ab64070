//! Normalisation layers: `BatchNorm1d`, `BatchNorm2d` and `LayerNorm`.
//!
//! Batch norm keeps its running statistics in persistent buffers (`running_mean`,
//! `running_var`, and the i64 scalar `num_batches_tracked`) and updates them in place in
//! training mode, as PyTorch does:
//! `running = (1 - momentum) · running + momentum · batch_stat`, with the batch variance
//! unbiased (divided by n - 1) for the running estimate while the output uses the biased one.

use tracegrad_runtime::DType;

use super::python_repr::{py_bool, py_float, py_tuple};
use super::{Module, ModuleCore, ModuleExt};
use crate::autograd::no_grad;
use crate::tensor::Tensor;

/// What a batch-norm forward needs of the layer.
struct BatchNormState<'a> {
    weight: Option<&'a Tensor>,
    bias: Option<&'a Tensor>,
    running_mean: Option<&'a Tensor>,
    running_var: Option<&'a Tensor>,
    num_batches_tracked: Option<&'a Tensor>,
    momentum: Option<f64>,
    eps: f64,
    training: bool,
}

/// `_BatchNorm.forward`: picks batch or running statistics and updates the running ones.
fn batch_norm_forward(s: BatchNormState, x: &Tensor) -> Tensor {
    let running = s.running_mean.zip(s.running_var);
    // The update factor is a tensor so the same code traces: with momentum None it is
    // 1/num_batches_tracked (a cumulative moving average), computed from the buffer itself.
    let mut factor = Tensor::scalar(s.momentum.unwrap_or(0.0) as f32);
    if s.training && running.is_some() {
        if let Some(n) = s.num_batches_tracked {
            let count = no_grad(|| n.add_scalar(1.0));
            n.assign(&count);
            if s.momentum.is_none() {
                factor = no_grad(|| count.to_dtype(DType::F32).reciprocal());
            }
        }
    }
    let use_batch_stats = s.training || running.is_none();
    let (y, stats) = x.batch_norm(running, s.weight, s.bias, use_batch_stats, s.eps);
    if let (true, Some((rm, rv)), Some((batch_mean, batch_var))) = (s.training, running, stats) {
        no_grad(|| {
            let update = |r: &Tensor, batch: &Tensor| {
                let keep = factor.neg().add_scalar(1.0);
                let new = r.mul(&keep.to_dtype(r.dtype())).add(&batch.mul(&factor.to_dtype(batch.dtype())));
                r.assign(&new);
            };
            update(rm, &batch_mean);
            update(rv, &batch_var);
        });
    }
    y
}

macro_rules! batch_norm_layer {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Module)]
        pub struct $name {
            /// Per-channel scale γ (ones; `None` without affine).
            #[param]
            pub weight: Option<Tensor>,
            /// Per-channel shift β (zeros; `None` without affine).
            #[param]
            pub bias: Option<Tensor>,
            /// Running mean (zeros; `None` without running statistics).
            #[buffer]
            pub running_mean: Option<Tensor>,
            /// Running unbiased variance (ones; `None` without running statistics).
            #[buffer]
            pub running_var: Option<Tensor>,
            /// Training batches seen: an i64 scalar (`None` without running statistics).
            #[buffer]
            pub num_batches_tracked: Option<Tensor>,
            num_features: usize,
            eps: f64,
            momentum: Option<f64>,
            core: ModuleCore,
        }

        impl $name {
            /// The layer with PyTorch's defaults: eps 1e-5, momentum 0.1, affine, tracking
            /// running statistics.
            pub fn new(num_features: usize) -> $name {
                $name::with_options(num_features, true, true)
            }

            /// The layer with or without the affine parameters and the running statistics.
            /// Without running statistics it normalises with batch statistics in eval mode too.
            pub fn with_options(num_features: usize, affine: bool, track_running_stats: bool) -> $name {
                let c = [num_features];
                let param = |v: f64| Tensor::full(&c, v).requires_grad_(true);
                $name {
                    weight: affine.then(|| param(1.0)),
                    bias: affine.then(|| param(0.0)),
                    running_mean: track_running_stats.then(|| Tensor::zeros(&c)),
                    running_var: track_running_stats.then(|| Tensor::ones(&c)),
                    num_batches_tracked: track_running_stats.then(|| Tensor::zeros_dtype(&[], DType::I64)),
                    num_features,
                    eps: 1e-5,
                    momentum: Some(0.1),
                    core: ModuleCore::new(),
                }
            }

            /// Sets the value added to the variance for stability (builder style).
            pub fn eps(mut self, eps: f64) -> $name {
                self.eps = eps;
                self
            }

            /// Sets the running-statistics momentum (builder style); `None` gives a cumulative
            /// moving average over all batches.
            pub fn momentum(mut self, momentum: Option<f64>) -> $name {
                self.momentum = momentum;
                self
            }

            /// The number of channels.
            pub fn num_features(&self) -> usize {
                self.num_features
            }
        }

        impl Module for $name {
            #[track_caller]
            fn forward(&self, x: &Tensor) -> Tensor {
                let check: fn(usize) -> Result<(), String> = $check;
                if let Err(msg) = check(x.dim()) {
                    panic!("ValueError: {msg}");
                }
                let state = BatchNormState {
                    weight: self.weight.as_ref(),
                    bias: self.bias.as_ref(),
                    running_mean: self.running_mean.as_ref(),
                    running_var: self.running_var.as_ref(),
                    num_batches_tracked: self.num_batches_tracked.as_ref(),
                    momentum: self.momentum,
                    eps: self.eps,
                    training: self.training(),
                };
                batch_norm_forward(state, x)
            }

            fn extra_repr(&self) -> String {
                format!(
                    "{}, eps={}, momentum={}, affine={}, track_running_stats={}",
                    self.num_features,
                    py_float(self.eps),
                    self.momentum.map_or("None".to_string(), py_float),
                    py_bool(self.weight.is_some()),
                    py_bool(self.running_mean.is_some())
                )
            }
        }
    };
}

batch_norm_layer!(
    /// Batch normalisation over `[N, C]` or `[N, C, L]` input (`torch.nn.BatchNorm1d`).
    ///
    /// ```
    /// use tracegrad::nn::{BatchNorm1d, ModuleExt};
    ///
    /// let bn = BatchNorm1d::new(32);
    /// assert_eq!(bn.repr(), "BatchNorm1d(32, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)");
    /// ```
    BatchNorm1d,
    |d| if d == 2 || d == 3 { Ok(()) } else { Err(format!("expected 2D or 3D input (got {d}D input)")) }
);

batch_norm_layer!(
    /// Batch normalisation over `[N, C, H, W]` input (`torch.nn.BatchNorm2d`).
    ///
    /// ```
    /// use tracegrad::nn::{BatchNorm2d, ModuleExt};
    ///
    /// let bn = BatchNorm2d::new(8);
    /// let y = bn.call(&tracegrad::Tensor::randn(&[4, 8, 5, 5]));
    /// assert_eq!(bn.num_batches_tracked.as_ref().unwrap().item(), 1.0);
    /// # let _ = y;
    /// ```
    BatchNorm2d,
    |d| if d == 4 { Ok(()) } else { Err(format!("expected 4D input (got {d}D input)")) }
);

/// Layer normalisation over the trailing `normalized_shape` dims (`torch.nn.LayerNorm`), with
/// elementwise weight (ones) and bias (zeros).
///
/// ```
/// use tracegrad::nn::{LayerNorm, ModuleExt};
///
/// assert_eq!(LayerNorm::new(&[10]).repr(), "LayerNorm((10,), eps=1e-05, elementwise_affine=True)");
/// ```
#[derive(Module)]
pub struct LayerNorm {
    /// Elementwise scale (ones; `None` without elementwise affine).
    #[param]
    pub weight: Option<Tensor>,
    /// Elementwise shift (zeros; `None` without elementwise affine).
    #[param]
    pub bias: Option<Tensor>,
    normalized_shape: Vec<usize>,
    eps: f64,
    core: ModuleCore,
}

impl LayerNorm {
    /// The layer with eps 1e-5 and elementwise affine parameters.
    pub fn new(normalized_shape: &[usize]) -> LayerNorm {
        LayerNorm::with_affine(normalized_shape, true)
    }

    /// The layer with or without the elementwise affine parameters.
    pub fn with_affine(normalized_shape: &[usize], elementwise_affine: bool) -> LayerNorm {
        let param = |v: f64| Tensor::full(normalized_shape, v).requires_grad_(true);
        LayerNorm {
            weight: elementwise_affine.then(|| param(1.0)),
            bias: elementwise_affine.then(|| param(0.0)),
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
            core: ModuleCore::new(),
        }
    }

    /// Sets the value added to the variance for stability (builder style).
    pub fn eps(mut self, eps: f64) -> LayerNorm {
        self.eps = eps;
        self
    }

    /// The normalised trailing shape.
    pub fn normalized_shape(&self) -> &[usize] {
        &self.normalized_shape
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(&self.normalized_shape, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }

    fn extra_repr(&self) -> String {
        format!(
            "{}, eps={}, elementwise_affine={}",
            py_tuple(&self.normalized_shape),
            py_float(self.eps),
            py_bool(self.weight.is_some())
        )
    }
}
