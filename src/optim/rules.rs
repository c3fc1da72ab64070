//! The update rules, each written once.
//!
//! The scalar part (bias corrections, step size, the weight decay's form) is written against
//! the [`Build`] trait: eager optimizers evaluate it on 0-d f64 buffers through [`Exact`], the
//! compiled train step (src/compile/train_step.rs) emits it into the step graph, where the
//! learning rate and the step count are graph inputs.
//!
//! The per-element part ([`sgd_rule`], [`adam_rule`]) is written against [`Algebra`], in the
//! operation order of PyTorch's single-tensor kernels. Its [`Scalars`] instance is the eager
//! element loop: values are `T: Real`, `madd` is a fused multiply-add and conditions are plain
//! `bool`s, so after inlining the loop is the hand-written one and stays bit-identical to
//! PyTorch's reference trajectories. Its [`Nodes`] instance emits the same formula into the
//! step graph: values are node ids, `madd(a, b, c)` is `a + b·c` in two ops (the IR has no
//! fused multiply-add, so compiled steps agree with eager ones to rounding, not bit for bit)
//! and conditions are bool nodes. Choices on host constants (maximize, nesterov, whether
//! weight decay is on, the side of ATen's two-sided lerp) are host `if`s in the formula.

use std::convert::Infallible;
use std::marker::PhantomData;

use tracegrad_compiler::graph::{Graph, NodeId};
use tracegrad_compiler::ops::{BinaryOp, UnaryOp};
use tracegrad_compiler::{Build, Emitter, Op, OpError, OpResult, TensorType};
use tracegrad_runtime::Buffer;

use super::Real;

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

/// The per-element arithmetic an update rule needs, over eager scalars ([`Scalars`]) or graph
/// nodes ([`Nodes`]).
pub(crate) trait Algebra {
    /// A value: one element, or a whole tensor's node.
    type V: Copy;
    /// A condition: a `bool`, or a bool node.
    type Cond: Copy;
    /// Why an op failed (nothing fails in eager arithmetic).
    type Error;
    /// `a + b`.
    fn add(&mut self, a: Self::V, b: Self::V) -> Result<Self::V, Self::Error>;
    /// `a − b`.
    fn sub(&mut self, a: Self::V, b: Self::V) -> Result<Self::V, Self::Error>;
    /// `a · b`.
    fn mul(&mut self, a: Self::V, b: Self::V) -> Result<Self::V, Self::Error>;
    /// `a / b`.
    fn div(&mut self, a: Self::V, b: Self::V) -> Result<Self::V, Self::Error>;
    /// `−a`.
    fn neg(&mut self, a: Self::V) -> Result<Self::V, Self::Error>;
    /// `√a`.
    fn sqrt(&mut self, a: Self::V) -> Result<Self::V, Self::Error>;
    /// The larger of `a` and `b`, NaN if either is (`torch.maximum`).
    fn maximum(&mut self, a: Self::V, b: Self::V) -> Result<Self::V, Self::Error>;
    /// `a + b·c` (one rounding where the instance can, see [`Real::madd`]).
    fn madd(&mut self, a: Self::V, b: Self::V, c: Self::V) -> Result<Self::V, Self::Error>;
    /// `a − b·c` (one rounding where the instance can).
    fn msub(&mut self, a: Self::V, b: Self::V, c: Self::V) -> Result<Self::V, Self::Error>;
    /// `a` where `cond` holds, else `b`.
    fn select(&mut self, cond: Self::Cond, a: Self::V, b: Self::V) -> Result<Self::V, Self::Error>;
}

/// The eager instance: plain arithmetic on elements of type `T`.
pub(crate) struct Scalars<T>(PhantomData<T>);

impl<T> Scalars<T> {
    /// The instance (it has no state).
    #[inline(always)]
    pub(crate) fn new() -> Self {
        Scalars(PhantomData)
    }
}

impl<T: Real> Algebra for Scalars<T> {
    type V = T;
    type Cond = bool;
    type Error = Infallible;
    #[inline(always)]
    fn add(&mut self, a: T, b: T) -> Result<T, Infallible> {
        Ok(a + b)
    }
    #[inline(always)]
    fn sub(&mut self, a: T, b: T) -> Result<T, Infallible> {
        Ok(a - b)
    }
    #[inline(always)]
    fn mul(&mut self, a: T, b: T) -> Result<T, Infallible> {
        Ok(a * b)
    }
    #[inline(always)]
    fn div(&mut self, a: T, b: T) -> Result<T, Infallible> {
        Ok(a / b)
    }
    #[inline(always)]
    fn neg(&mut self, a: T) -> Result<T, Infallible> {
        Ok(-a)
    }
    #[inline(always)]
    fn sqrt(&mut self, a: T) -> Result<T, Infallible> {
        Ok(a.sqrt())
    }
    #[inline(always)]
    fn maximum(&mut self, a: T, b: T) -> Result<T, Infallible> {
        Ok(if a.is_nan() || b.is_nan() {
            a + b
        } else if b > a {
            b
        } else {
            a
        })
    }
    #[inline(always)]
    fn madd(&mut self, a: T, b: T, c: T) -> Result<T, Infallible> {
        Ok(T::madd(a, b, c))
    }
    #[inline(always)]
    fn msub(&mut self, a: T, b: T, c: T) -> Result<T, Infallible> {
        Ok(T::msub(a, b, c))
    }
    #[inline(always)]
    fn select(&mut self, cond: bool, a: T, b: T) -> Result<T, Infallible> {
        Ok(if cond { a } else { b })
    }
}

/// The value of an eager rule, which cannot fail.
#[inline(always)]
pub(crate) fn infallible<R>(r: Result<R, Infallible>) -> R {
    match r {
        Ok(r) => r,
        Err(e) => match e {},
    }
}

/// The graph instance: each op appends nodes to the step graph.
pub(crate) struct Nodes<'g>(pub(crate) &'g mut Graph);

impl Algebra for Nodes<'_> {
    type V = NodeId;
    type Cond = NodeId;
    type Error = OpError;
    fn add(&mut self, a: NodeId, b: NodeId) -> OpResult<NodeId> {
        self.0.add(&a, &b)
    }
    fn sub(&mut self, a: NodeId, b: NodeId) -> OpResult<NodeId> {
        self.0.sub(&a, &b)
    }
    fn mul(&mut self, a: NodeId, b: NodeId) -> OpResult<NodeId> {
        self.0.mul(&a, &b)
    }
    fn div(&mut self, a: NodeId, b: NodeId) -> OpResult<NodeId> {
        self.0.div(&a, &b)
    }
    fn neg(&mut self, a: NodeId) -> OpResult<NodeId> {
        self.0.neg(&a)
    }
    fn sqrt(&mut self, a: NodeId) -> OpResult<NodeId> {
        self.0.unary(UnaryOp::Sqrt, &a)
    }
    fn maximum(&mut self, a: NodeId, b: NodeId) -> OpResult<NodeId> {
        self.0.binary(BinaryOp::Maximum, &a, &b)
    }
    fn madd(&mut self, a: NodeId, b: NodeId, c: NodeId) -> OpResult<NodeId> {
        let bc = self.0.mul(&b, &c)?;
        self.0.add(&a, &bc)
    }
    fn msub(&mut self, a: NodeId, b: NodeId, c: NodeId) -> OpResult<NodeId> {
        let bc = self.0.mul(&b, &c)?;
        self.0.sub(&a, &bc)
    }
    fn select(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> OpResult<NodeId> {
        self.0.where_(&cond, &a, &b)
    }
}

/// What a rule returns: the new parameter and the new state `S`.
pub(crate) type Updated<A, S> = Result<(<A as Algebra>::V, S), <A as Algebra>::Error>;

/// The scalars of one SGD update, in the algebra's values (rounded to the parameter dtype as
/// ATen does); the options that pick the formula's shape are host values.
#[derive(Clone, Copy)]
pub(crate) struct SgdCoeffs<V> {
    pub(crate) neg_lr: V,
    pub(crate) weight_decay: Option<V>,
    pub(crate) momentum: Option<V>,
    pub(crate) one_minus_dampening: V,
    pub(crate) nesterov: bool,
    pub(crate) maximize: bool,
}

/// SGD's update of parameter `p` with gradient `g`, as `torch.optim.SGD`'s single-tensor
/// loop. `buf` is the momentum buffer (when momentum ≠ 0) and whether it is new, in which case
/// it becomes the (decayed) gradient. Returns the new parameter and the new buffer.
#[inline(always)]
pub(crate) fn sgd_rule<A: Algebra>(
    a: &mut A,
    p: A::V,
    g: A::V,
    buf: Option<(A::V, A::Cond)>,
    c: &SgdCoeffs<A::V>,
) -> Updated<A, Option<A::V>> {
    // grad = -grad if maximize
    let mut d = if c.maximize { a.neg(g)? } else { g };
    // grad = grad.add(param, alpha=weight_decay)
    if let Some(wd) = c.weight_decay {
        d = a.madd(d, wd, p)?;
    }
    let mut new_buf = None;
    if let (Some(m), Some((b, fresh))) = (c.momentum, buf) {
        // buf = clone(grad) on the first step, else buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        let bm = a.mul(b, m)?;
        let later = a.madd(bm, c.one_minus_dampening, d)?;
        let bi = a.select(fresh, d, later)?;
        new_buf = Some(bi);
        // grad = grad.add(buf, alpha=momentum) if nesterov else buf
        d = if c.nesterov { a.madd(d, m, bi)? } else { bi };
    }
    // param.add_(grad, alpha=-lr)
    Ok((a.madd(p, c.neg_lr, d)?, new_buf))
}

/// The scalars of one Adam or AdamW update, in the algebra's values (rounded to the parameter
/// dtype as ATen does), and the host choices that shape the formula.
#[derive(Clone, Copy)]
pub(crate) struct AdamCoeffs<V> {
    /// Adam's L2 penalty.
    pub(crate) weight_decay: Option<V>,
    /// AdamW's factor `1 − lr·weight_decay`.
    pub(crate) decay: Option<V>,
    /// The lerp weight `w = 1 − β1`.
    pub(crate) lerp_weight: V,
    /// `1 − w`, computed in the parameter dtype.
    pub(crate) lerp_weight_complement: V,
    /// `|w| < 0.5` in the parameter dtype: which side of ATen's two-sided lerp applies.
    pub(crate) lerp_from_start: bool,
    pub(crate) beta2: V,
    pub(crate) one_minus_beta2: V,
    pub(crate) bias_correction2_sqrt: V,
    pub(crate) eps: V,
    pub(crate) neg_step_size: V,
    pub(crate) maximize: bool,
}

/// One element's (or tensor's) Adam state: the moments and AMSGrad's running maximum.
#[derive(Clone, Copy)]
pub(crate) struct AdamMoments<V> {
    pub(crate) exp_avg: V,
    pub(crate) exp_avg_sq: V,
    pub(crate) max_exp_avg_sq: Option<V>,
}

/// Adam's (or AdamW's) update of parameter `p` with gradient `g` and state `s`, in the order
/// of PyTorch's `_single_tensor_adam`. Returns the new parameter and state.
#[inline(always)]
pub(crate) fn adam_rule<A: Algebra>(
    a: &mut A,
    p: A::V,
    g: A::V,
    s: AdamMoments<A::V>,
    c: &AdamCoeffs<A::V>,
) -> Updated<A, AdamMoments<A::V>> {
    // grad = -grad if maximize
    let mut d = if c.maximize { a.neg(g)? } else { g };
    // AdamW: param.mul_(1 - lr * weight_decay); Adam: grad = grad.add(param, alpha=weight_decay)
    let p = match c.decay {
        Some(f) => a.mul(p, f)?,
        None => p,
    };
    if let Some(wd) = c.weight_decay {
        d = a.madd(d, wd, p)?;
    }
    // exp_avg.lerp_(grad, 1 - beta1), with ATen's two-sided formula
    let diff = a.sub(d, s.exp_avg)?;
    let exp_avg = if c.lerp_from_start {
        a.madd(s.exp_avg, c.lerp_weight, diff)?
    } else {
        a.msub(d, diff, c.lerp_weight_complement)?
    };
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v_beta2 = a.mul(s.exp_avg_sq, c.beta2)?;
    let d_scaled = a.mul(c.one_minus_beta2, d)?;
    let exp_avg_sq = a.madd(v_beta2, d_scaled, d)?;
    // torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq) (NaN-propagating)
    let max_exp_avg_sq = match s.max_exp_avg_sq {
        Some(vmax) => Some(a.maximum(vmax, exp_avg_sq)?),
        None => None,
    };
    let second = max_exp_avg_sq.unwrap_or(exp_avg_sq);
    // denom = (sqrt / bias_correction2_sqrt).add_(eps)
    let root = a.sqrt(second)?;
    let scaled = a.div(root, c.bias_correction2_sqrt)?;
    let denom = a.add(scaled, c.eps)?;
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    let num = a.mul(c.neg_step_size, exp_avg)?;
    let step = a.div(num, denom)?;
    Ok((a.add(p, step)?, AdamMoments { exp_avg, exp_avg_sq, max_exp_avg_sq }))
}
