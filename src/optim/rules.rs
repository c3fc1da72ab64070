//! The scalar part of each update rule, written once against the [`Build`] trait: eager
//! optimizers evaluate it on 0-d f64 buffers through [`Exact`], the compiled train step
//! (src/compile/train_step.rs) emits it into the step graph, where the learning rate and the
//! step count are graph inputs.
//!
//! The per-element part is written twice on purpose. Eager updates run one loop over the
//! elements with fused multiply-adds and ATen's two-sided lerp, which is what keeps them
//! bit-identical to PyTorch's reference trajectories; run through an emitter they would lose
//! the FMAs (the IR has no fused multiply-add) and allocate a tensor per op and parameter.

use tracegrad_compiler::ops::{BinaryOp, UnaryOp};
use tracegrad_compiler::{Build, Emitter, Op, OpResult, TensorType};
use tracegrad_runtime::Buffer;

/// An emitter that evaluates each op at once with the reference kernels, outside autograd
/// and tracing: the eager optimizers' scalar arithmetic (f64 `powf`, `sqrt` and IEEE
/// arithmetic, as PyTorch's Python-float bookkeeping).
pub(crate) struct Exact;

impl Emitter for Exact {
    type Value = Buffer;

    fn emit(&mut self, op: Op, inputs: &[&Buffer]) -> OpResult<Buffer> {
        let types: Vec<TensorType> = inputs.iter().map(|b| TensorType::of(b)).collect();
        let out = op.infer(&types)?;
        op.eval(inputs, &out)
    }

    fn value_type(&self, v: &Buffer) -> TensorType {
        TensorType::of(v)
    }
}

/// How a rule applies weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum WeightDecay {
    /// None (`weight_decay == 0`).
    Off,
    /// An L2 penalty on the gradient: `g ← g + wd·p` (SGD, Adam).
    L2(f64),
    /// Decoupled: `p ← p·(1 − lr·wd)` before the update (AdamW).
    Decoupled(f64),
}

impl WeightDecay {
    /// The form for a coefficient `wd` (0 turns it off).
    pub(crate) fn new(wd: f64, decoupled: bool) -> WeightDecay {
        if wd == 0.0 {
            WeightDecay::Off
        } else if decoupled {
            WeightDecay::Decoupled(wd)
        } else {
            WeightDecay::L2(wd)
        }
    }

    /// The L2 coefficient, if the decay is an L2 penalty.
    pub(crate) fn l2(self) -> Option<f64> {
        match self {
            WeightDecay::L2(wd) => Some(wd),
            _ => None,
        }
    }
}

/// The step-dependent scalars of an Adam or AdamW update, as PyTorch's `_single_tensor_adam`
/// computes them.
pub(crate) struct AdamScalars<V> {
    /// `lr / (1 − β1ᵗ)`.
    pub(crate) step_size: V,
    /// `√(1 − β2ᵗ)`.
    pub(crate) bias_correction2_sqrt: V,
    /// AdamW's parameter factor `1 − lr·wd` (decoupled decay only).
    pub(crate) decay: Option<V>,
}

/// Adam's scalars for learning rate `lr` at step `t` (counting this update), both 0-d values
/// of the dtype to compute in.
pub(crate) fn adam_scalars<B: Build>(
    b: &mut B,
    betas: (f64, f64),
    decay: WeightDecay,
    lr: &B::Value,
    t: &B::Value,
) -> OpResult<AdamScalars<B::Value>> {
    let dtype = b.dtype(lr);
    let bias_correction = |b: &mut B, beta: f64| -> OpResult<B::Value> {
        let beta = b.scalar(beta, dtype)?;
        let power = b.binary(BinaryOp::Pow, &beta, t)?;
        let one = b.scalar(1.0, dtype)?;
        b.sub(&one, &power)
    };
    let bias_correction1 = bias_correction(b, betas.0)?;
    let bias_correction2 = bias_correction(b, betas.1)?;
    let step_size = b.div(lr, &bias_correction1)?;
    let bias_correction2_sqrt = b.unary(UnaryOp::Sqrt, &bias_correction2)?;
    let decay = match decay {
        WeightDecay::Decoupled(wd) => {
            let lr_wd = b.mul_scalar(lr, wd)?;
            let one = b.scalar(1.0, dtype)?;
            Some(b.sub(&one, &lr_wd)?)
        }
        _ => None,
    };
    Ok(AdamScalars { step_size, bias_correction2_sqrt, decay })
}
