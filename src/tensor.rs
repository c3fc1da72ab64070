//! [`Tensor`]: a value plus its autograd record.
//!
//! Storage is a [`Buffer`] (contiguous, row-major, `Arc`-shared). Views (permute, narrow,
//! expand, …) copy; `reshape` shares storage. A tensor made by an op while grad mode is on and
//! some operand requires grad carries a grad_fn: the autograd node that made it, which is all the
//! backward pass needs, since derivative rules live with the op definitions.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracegrad_compiler::ops::Distribution;
use tracegrad_compiler::{OpError, TensorType};
use tracegrad_runtime::random::{self, Generator};
use tracegrad_runtime::{Buffer, DType, Element};

use crate::autograd::{eager, GradHook, Node, PostAccumulateHook};
use crate::trace_seam::{tracer, Symbol};

/// A multi-dimensional array with PyTorch-style autograd. Cloning is cheap and aliases the
/// same tensor (like a Python reference), so gradients and in-place updates are shared.
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<TensorImpl>);

pub(crate) struct TensorImpl {
    pub(crate) data: RwLock<Buffer>,
    /// The node that produced this tensor and the output index there (None for leaves).
    pub(crate) grad_fn: Option<(Arc<Node>, usize)>,
    /// Leaf gradient hooks (non-leaf hooks live on the node).
    pub(crate) hooks: Mutex<Vec<(u64, GradHook)>>,
    pub(crate) post_hooks: Mutex<Vec<(u64, PostAccumulateHook)>>,
    /// For leaves: whether gradients accumulate into `grad`.
    pub(crate) requires_grad: AtomicBool,
    pub(crate) retains_grad: AtomicBool,
    pub(crate) grad: Mutex<Option<Tensor>>,
    /// Set for the symbolic tensors of a trace: they have a type and a graph node, no data.
    pub(crate) symbol: Option<Symbol>,
}

pub(crate) fn lock_poison<T>(r: std::sync::LockResult<T>) -> T {
    r.unwrap_or_else(|e| e.into_inner())
}

/// Locks a mutex, ignoring poisoning (a panicking hook must not wedge the tensor).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks, ignoring poisoning.
pub(crate) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks, ignoring poisoning.
pub(crate) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Unwraps an op result in eager mode, where shape misuse panics with PyTorch's message.
#[track_caller]
pub(crate) fn eager_ok<T>(r: Result<T, OpError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

impl Tensor {
    /// A leaf tensor holding `buffer`.
    pub fn from_buffer(buffer: Buffer) -> Tensor {
        Tensor::with_grad_fn(buffer, None)
    }

    pub(crate) fn with_grad_fn(buffer: Buffer, grad_fn: Option<(Arc<Node>, usize)>) -> Tensor {
        Tensor(Arc::new(TensorImpl {
            data: RwLock::new(buffer),
            grad_fn,
            hooks: Mutex::new(Vec::new()),
            post_hooks: Mutex::new(Vec::new()),
            requires_grad: AtomicBool::new(false),
            retains_grad: AtomicBool::new(false),
            grad: Mutex::new(None),
            symbol: None,
        }))
    }

    /// A symbolic tensor of a trace (no data; `requires_grad` as eager mode would have it).
    pub(crate) fn symbolic(symbol: Symbol, requires_grad: bool) -> Tensor {
        let placeholder = Buffer::zeros(symbol.ty.dtype, &[0]);
        Tensor(Arc::new(TensorImpl {
            data: RwLock::new(placeholder),
            grad_fn: None,
            hooks: Mutex::new(Vec::new()),
            post_hooks: Mutex::new(Vec::new()),
            requires_grad: AtomicBool::new(requires_grad),
            retains_grad: AtomicBool::new(false),
            grad: Mutex::new(None),
            symbol: Some(symbol),
        }))
    }

    /// The trace symbol of a symbolic tensor.
    pub(crate) fn symbol(&self) -> Option<&Symbol> {
        self.0.symbol.as_ref()
    }

    /// Whether this is a symbolic tensor inside a trace (it has a type but no values).
    pub fn is_symbolic(&self) -> bool {
        self.0.symbol.is_some()
    }

    #[track_caller]
    fn concrete(&self) -> std::sync::RwLockReadGuard<'_, Buffer> {
        if let Some(s) = &self.0.symbol {
            panic!(
                "the value of a traced tensor ({}) is not available while compiling: data-dependent control flow (item(), to_vec(), printing) cannot be traced",
                s.ty
            );
        }
        read(&self.0.data)
    }

    /// A tensor from a vector and a shape. Panics if the element count does not match.
    #[track_caller]
    pub fn from_vec<T: Element>(values: Vec<T>, shape: &[usize]) -> Tensor {
        let n = tracegrad_runtime::shape::checked_numel(shape).unwrap_or_else(|e| panic!("from_vec: {e}"));
        assert_eq!(values.len(), n, "from_vec: {} values cannot have shape {:?}", values.len(), shape);
        Tensor::from_buffer(Buffer::from_vec(values, shape))
    }

    /// A tensor copied from a slice.
    #[track_caller]
    pub fn from_slice<T: Element>(values: &[T], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape)
    }

    /// A 1-D f32 tensor, like `torch.tensor([..])`.
    pub fn vec1(values: &[f32]) -> Tensor {
        Tensor::from_slice(values, &[values.len()])
    }

    /// A 0-d f32 tensor.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::from_vec(vec![value], &[])
    }

    /// A tensor of `shape` filled with `value`, of `dtype`.
    pub fn full_dtype(shape: &[usize], value: f64, dtype: DType) -> Tensor {
        Tensor::from_buffer(Buffer::full(value, dtype, shape))
    }

    /// An f32 tensor filled with `value`.
    pub fn full(shape: &[usize], value: f64) -> Tensor {
        Tensor::full_dtype(shape, value, DType::F32)
    }

    /// f32 zeros.
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    /// f32 ones.
    pub fn ones(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 1.0)
    }

    /// Zeros of `dtype`.
    pub fn zeros_dtype(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::full_dtype(shape, 0.0, dtype)
    }

    /// `[start, start+step, …)` below `end`, as `torch.arange` (f32).
    pub fn arange(start: f64, end: f64, step: f64) -> Tensor {
        Tensor::arange_dtype(start, end, step, DType::F32)
    }

    /// `torch.arange` with an explicit dtype.
    pub fn arange_dtype(start: f64, end: f64, step: f64, dtype: DType) -> Tensor {
        assert!(step != 0.0, "arange: step must be nonzero");
        assert!((end - start) / step >= 0.0, "arange: upper bound and larger bound inconsistent with step sign");
        let n = ((end - start) / step).ceil() as usize;
        let v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
        Tensor::from_buffer(Buffer::from_vec(v, &[n]).cast(dtype))
    }

    /// The `n`×`n` identity (f32).
    pub fn eye(n: usize) -> Tensor {
        let mut v = vec![0f32; n * n];
        for i in 0..n {
            v[i * n + i] = 1.0;
        }
        Tensor::from_vec(v, &[n, n])
    }

    /// U[0, 1) samples (f32) from the default generator's Philox stream (see [`manual_seed`]).
    /// Inside a compiled forward the draw is a graph op fed by the generator on each call.
    #[track_caller]
    pub fn rand(shape: &[usize]) -> Tensor {
        crate::ops::random_draw(None, Distribution::Uniform, DType::F32, shape, "rand")
    }

    /// U[0, 1) samples from `g`'s Philox stream (eager only).
    #[track_caller]
    pub fn rand_with(g: &mut Generator, shape: &[usize]) -> Tensor {
        crate::ops::random_draw(Some(g), Distribution::Uniform, DType::F32, shape, "rand")
    }

    /// Standard normal samples (f32) from the default generator's Philox stream (Box-Muller).
    #[track_caller]
    pub fn randn(shape: &[usize]) -> Tensor {
        crate::ops::random_draw(None, Distribution::Normal, DType::F32, shape, "randn")
    }

    /// Standard normal samples from `g`'s Philox stream (eager only).
    #[track_caller]
    pub fn randn_with(g: &mut Generator, shape: &[usize]) -> Tensor {
        crate::ops::random_draw(Some(g), Distribution::Normal, DType::F32, shape, "randn")
    }

    /// N(mean, std²) samples (f32, `mean + std·z`) from the default generator's Philox stream.
    #[track_caller]
    pub fn normal(mean: f64, std: f64, shape: &[usize]) -> Tensor {
        assert!(std >= 0.0, "normal expects std >= 0.0, but found std {std}");
        crate::ops::random_draw(None, Distribution::Normal, DType::F32, shape, "normal")
            .mul_scalar(std)
            .add_scalar(mean)
    }

    /// N(mean, std²) samples from `g`'s Philox stream (eager only).
    #[track_caller]
    pub fn normal_with(g: &mut Generator, mean: f64, std: f64, shape: &[usize]) -> Tensor {
        assert!(std >= 0.0, "normal expects std >= 0.0, but found std {std}");
        crate::ops::random_draw(Some(g), Distribution::Normal, DType::F32, shape, "normal")
            .mul_scalar(std)
            .add_scalar(mean)
    }

    /// Integers uniform in `[low, high)` (i64) from the default generator.
    pub fn randint(low: i64, high: i64, shape: &[usize]) -> Tensor {
        random::with_default(|g| Tensor::randint_with(g, low, high, shape))
    }

    /// Integers uniform in `[low, high)` from `g`.
    pub fn randint_with(g: &mut Generator, low: i64, high: i64, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(g.randint(n, low, high), shape)
    }

    /// A copy of the current value.
    #[track_caller]
    pub fn buffer(&self) -> Buffer {
        self.concrete().clone()
    }

    /// Replaces the value in place (as `tensor.data = …` in PyTorch); autograd history is
    /// untouched. Panics if the shape or dtype would change.
    #[track_caller]
    pub fn set_buffer(&self, b: Buffer) {
        assert!(self.0.symbol.is_none(), "set_buffer: a traced tensor has no storage to write");
        let mut d = write(&self.0.data);
        assert!(
            d.shape() == b.shape() && d.dtype() == b.dtype(),
            "set_buffer: cannot replace {} {:?} with {} {:?}",
            d.dtype(),
            d.shape(),
            b.dtype(),
            b.shape()
        );
        *d = b;
    }

    /// Writes `value` into this tensor in place, outside autograd (`buf.copy_(value)` under
    /// `no_grad`), casting to this tensor's dtype. Inside a compiled forward this records a
    /// buffer update that the compiled module writes back after each call. Panics if the
    /// shapes differ.
    #[track_caller]
    pub fn assign(&self, value: &Tensor) {
        if let Some(tracer) = tracer() {
            return tracer.assign(self, value).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(self.shape(), value.shape(), "assign: shape mismatch");
        self.set_buffer(value.buffer().cast(self.dtype()));
    }

    /// Mutates the value in place (copy-on-write if the storage is shared).
    pub fn update_buffer<R>(&self, f: impl FnOnce(&mut Buffer) -> R) -> R {
        assert!(self.0.symbol.is_none(), "update_buffer: a traced tensor has no storage to write");
        f(&mut write(&self.0.data))
    }

    /// Moves the storage out (so its new owner may be its only owner), leaving an empty
    /// buffer of shape `[0]` until [`Tensor::restore_storage`] puts one back. Crate-internal: a
    /// compiled training step donates parameters this way, with no hook able to run between.
    pub(crate) fn take_storage(&self) -> Buffer {
        self.update_buffer(|b| {
            let empty = Buffer::new(tracegrad_runtime::Data::zeroed(b.dtype(), 0), &[0]);
            std::mem::replace(b, empty)
        })
    }

    /// Ends [`Tensor::take_storage`].
    pub(crate) fn restore_storage(&self, b: Buffer) {
        self.update_buffer(|d| *d = b);
    }

    /// Shape.
    pub fn shape(&self) -> Vec<usize> {
        if let Some(s) = &self.0.symbol {
            return s.ty.shape.to_vec();
        }
        read(&self.0.data).shape().to_vec()
    }

    /// Size of one (possibly negative) dimension.
    #[track_caller]
    pub fn size(&self, dim: isize) -> usize {
        let s = self.shape();
        let d = eager_ok(tracegrad_compiler::emitter::norm_dim("size", dim, s.len()));
        s[d]
    }

    /// Number of dimensions.
    pub fn dim(&self) -> usize {
        self.tensor_type().rank()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.tensor_type().numel()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.tensor_type().dtype
    }

    /// Dtype and shape.
    pub fn tensor_type(&self) -> TensorType {
        if let Some(s) = &self.0.symbol {
            return s.ty.clone();
        }
        TensorType::of(&read(&self.0.data))
    }

    /// The elements, converted to `T`.
    #[track_caller]
    pub fn to_vec<T: Element>(&self) -> Vec<T> {
        self.concrete().to_vec()
    }

    /// The elements as f32.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        self.to_vec()
    }

    /// The elements as f64.
    pub fn to_vec_f64(&self) -> Vec<f64> {
        self.to_vec()
    }

    /// The value of a one-element tensor.
    #[track_caller]
    pub fn item(&self) -> f64 {
        self.concrete().item()
    }

    /// Identity of the underlying tensor (what Python's `is` compares).
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// Whether two handles name the same tensor.
    pub fn same(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether gradients flow to or through this tensor.
    pub fn requires_grad(&self) -> bool {
        self.0.grad_fn.is_some() || self.0.requires_grad.load(Ordering::Relaxed)
    }

    /// Sets `requires_grad` on a leaf; returns the tensor for chaining.
    #[track_caller]
    pub fn requires_grad_(self, on: bool) -> Tensor {
        if self.0.grad_fn.is_some() && !on {
            panic!("you can only change requires_grad flags of leaf variables. If you want to use a computed variable in a subgraph that doesn't require differentiation use var_no_grad = var.detach().");
        }
        if on && !self.dtype().is_float() {
            panic!("only Tensors of floating point dtype can require gradients");
        }
        if self.0.grad_fn.is_none() {
            self.0.requires_grad.store(on, Ordering::Relaxed);
        }
        self
    }

    pub(crate) fn grad_fn(&self) -> Option<(Arc<Node>, usize)> {
        self.0.grad_fn.clone()
    }

    /// The name of the op that produced this tensor (`grad_fn`), if any.
    pub fn grad_fn_name(&self) -> Option<String> {
        self.0.grad_fn.as_ref().map(|(n, _)| n.name().to_string())
    }

    /// Whether gradient hooks (`register_hook`, post-accumulate) are registered on this tensor.
    pub(crate) fn has_grad_hooks(&self) -> bool {
        !lock(&self.0.hooks).is_empty() || !lock(&self.0.post_hooks).is_empty()
    }

    /// Whether this tensor was made by the user rather than by a differentiable op.
    pub fn is_leaf(&self) -> bool {
        self.0.grad_fn.is_none()
    }

    /// The accumulated gradient (leaves, and non-leaves after [`retain_grad`](Self::retain_grad)).
    pub fn grad(&self) -> Option<Tensor> {
        lock(&self.0.grad).clone()
    }

    /// Replaces the stored gradient.
    pub fn set_grad(&self, g: Option<Tensor>) {
        *lock(&self.0.grad) = g;
    }

    /// Clears the stored gradient (PyTorch's `set_to_none=True`).
    pub fn zero_grad(&self) {
        self.set_grad(None);
    }

    /// Keeps the gradient of a non-leaf tensor after backward.
    pub fn retain_grad(&self) {
        if self.is_leaf() {
            return;
        }
        self.0.retains_grad.store(true, Ordering::Relaxed);
    }

    /// Whether a non-leaf keeps its gradient.
    pub fn retains_grad(&self) -> bool {
        self.0.retains_grad.load(Ordering::Relaxed)
    }

    /// A new leaf sharing this tensor's storage, outside the autograd graph.
    pub fn detach(&self) -> Tensor {
        if self.is_symbolic() {
            return eager(|e| tracegrad_compiler::composite::stop_gradient(e, self));
        }
        Tensor::from_buffer(self.buffer())
    }

    /// A deep copy that stays in the graph (`torch.clone`).
    pub fn copy(&self) -> Tensor {
        eager(|e| {
            use tracegrad_compiler::Build;
            e.mul_scalar(self, 1.0)
        })
    }
}

/// Reseeds the default generator, both its Philox stream (the tensor random ops) and its
/// ChaCha8 stream (initialisation, samplers) (`torch.manual_seed`).
pub fn manual_seed(seed: u64) {
    random::manual_seed(seed);
}

/// The default generator's state (`torch.get_rng_state`, as plain serde-serializable data:
/// seed, Philox offset, ChaCha8 position), for checkpoints.
pub fn get_rng_state() -> random::RngState {
    random::get_rng_state()
}

/// Restores the default generator's state from [`get_rng_state`]: every later draw repeats.
pub fn set_rng_state(state: &random::RngState) {
    random::set_rng_state(state)
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
