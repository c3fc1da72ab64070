//! Lazy layers (`torch.nn.LazyLinear`, `torch.nn.LazyConv2d`): layers whose input size is
//! inferred from the first input they see.
//!
//! The design (placeholders materialized in place) is documented on [`LazyLinear`].

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};

use super::conv::{ConvGeometry, Size2};
use super::init;
use super::module::{AsDyn, FieldVisitor, Module, ModuleCore, ModuleError, ModuleExt, ModuleFields};
use super::python_repr::py_bool;
use crate::tensor::{lock, Tensor, TensorImpl};

/// The placeholders not yet materialized, by tensor id. The `Weak` keeps the allocation (not
/// the value) alive, so an id cannot be reused by another tensor while it is listed here.
static UNINITIALIZED: LazyLock<Mutex<HashMap<usize, Weak<TensorImpl>>>> = LazyLock::new(Default::default);

/// A new uninitialized parameter: an f32 leaf of shape `[0]` that requires grad.
fn placeholder() -> Tensor {
    let t = Tensor::zeros(&[0]).requires_grad_(true);
    let mut reg = lock(&UNINITIALIZED);
    reg.retain(|_, w| w.strong_count() > 0);
    reg.insert(t.id(), Arc::downgrade(&t.0));
    t
}

/// Whether `t` is a lazy layer's parameter that has not been materialized yet (PyTorch's
/// `isinstance(t, UninitializedParameter)`). Clones share the answer; a `detach`ed copy is an
/// ordinary tensor.
pub fn is_uninitialized(t: &Tensor) -> bool {
    lock(&UNINITIALIZED).get(&t.id()).is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&t.0)))
}

fn mark_initialized(t: &Tensor) {
    lock(&UNINITIALIZED).remove(&t.id());
}

/// PyTorch's `ValueError` text for using an uninitialized parameter in `func`.
pub(crate) fn uninitialized_message(func: &str) -> String {
    format!(
        "Attempted to use an uninitialized parameter in {func}. This error happens when you are using a `LazyModule` \
         or explicitly manipulating `torch.nn.parameter.UninitializedParameter` objects. When using LazyModules Call \
         `forward` with a dummy batch to initialize the parameters before calling torch functions"
    )
}

/// `Ok` when no parameter of `module`'s tree is an uninitialized placeholder; otherwise a
/// `ValueError` naming the first one in `named_parameters` order:
/// "ValueError: Attempted to use an uninitialized parameter in check_initialized (`0.weight`). …".
pub fn check_initialized<M: AsDyn + ?Sized>(module: &M) -> Result<(), ModuleError> {
    match module.named_parameters().into_iter().find(|(_, t)| is_uninitialized(t)) {
        Some((name, _)) => {
            Err(ModuleError(format!("ValueError: {}", uninitialized_message(&format!("check_initialized (`{name}`)")))))
        }
        None => Ok(()),
    }
}

/// Replaces the placeholder's value with zeros of `shape` (same tensor, so every handle sees
/// it) and clears its uninitialized mark.
fn materialize_uninitialized(t: &Tensor, shape: &[usize]) {
    let value = Tensor::zeros(shape).buffer();
    t.update_buffer(|b| *b = value);
    mark_initialized(t);
}

#[track_caller]
fn refuse_tracing(layer: &str) {
    if crate::trace_seam::is_tracing() {
        panic!(
            "{layer}: its parameters are not initialized yet; call the model eagerly once with a dummy batch before \
             compiling it"
        );
    }
}

/// `torch.nn.LazyLinear`: a [`Linear`](super::Linear) layer whose `in_features` is taken from
/// the last dimension of its first input. Until then its `weight` and `bias` are uninitialized
/// placeholders (see below) and it prints as
/// `LazyLinear(in_features=0, out_features=4, bias=True)`; afterwards it is a `Linear` in name
/// (type name, repr) and in behaviour, initialized as `Linear::new(in_features, out_features)`
/// would be from the default generator.
///
/// # Uninitialized parameters
///
/// PyTorch gives a lazy layer `UninitializedParameter`s: parameters with no shape and no data,
/// that raise on use and are materialized in place (same object) by the first forward call.
/// Here a lazy layer's parameters are likewise real [`Tensor`]s from the start: *placeholders*
/// of shape `[0]` that are marked uninitialized ([`is_uninitialized`]). They are declared
/// parameters, so `named_parameters`, `parameters` and `state_dict` list them before the first
/// call, as PyTorch lists `weight` and `bias`. The first call fixes the input size, replaces
/// each placeholder's value **in place** with a tensor of the right shape (so every handle to
/// it, and its name in the module tree, now sees the real parameter), initializes it exactly as
/// [`Linear`](super::Linear) / [`Conv2d`](super::Conv2d) do from the default generator, and
/// clears the mark. From then on the layer reports the type name `Linear` / `Conv2d` and the
/// matching repr, as PyTorch's lazy modules turn into their `cls_to_become`.
///
/// Uninitialized parameters cannot be used by mistake:
///
/// * building an optimizer ([`Sgd`](crate::optim::Sgd), [`Adam`](crate::optim::Adam),
///   [`AdamW`](crate::optim::AdamW)) over a list that contains one is an error
///   ([`OptimError::UninitializedParameter`](crate::optim::OptimError::UninitializedParameter))
///   with PyTorch's "Attempted to use an uninitialized parameter in …" text: call the model
///   once on a dummy batch first;
/// * [`check_initialized`] reports the first uninitialized parameter of a module tree by name;
/// * tracing (`compile`) a lazy layer that has not been called eagerly panics with a message
///   saying so.
///
/// Loading a state dict into a lazy layer that has not been called is a size-mismatch error
/// (PyTorch materializes from the state dict instead): call
/// [`LazyLinear::materialize`] / [`LazyConv2d::materialize`] first.
///
/// ```
/// use tracegrad::nn::{LazyLinear, ModuleExt};
/// use tracegrad::Tensor;
///
/// let layer = LazyLinear::new(3);
/// assert_eq!(layer.repr(), "LazyLinear(in_features=0, out_features=3, bias=True)");
/// assert!(tracegrad::optim::Adam::new(layer.parameters(), 1e-3).is_err());
/// let y = layer.call(&Tensor::randn(&[2, 5]));
/// assert_eq!(y.shape(), vec![2, 3]);
/// assert_eq!(layer.repr(), "Linear(in_features=5, out_features=3, bias=True)");
/// assert_eq!(layer.weight().shape(), vec![3, 5]);
/// assert!(tracegrad::optim::Adam::new(layer.parameters(), 1e-3).is_ok());
/// ```
pub struct LazyLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    in_features: OnceLock<usize>,
    out_features: usize,
    core: ModuleCore,
}

impl LazyLinear {
    /// A lazy layer with bias producing `out_features` outputs.
    pub fn new(out_features: usize) -> LazyLinear {
        LazyLinear::with_bias(out_features, true)
    }

    /// A lazy layer with or without bias.
    pub fn with_bias(out_features: usize, bias: bool) -> LazyLinear {
        LazyLinear {
            weight: placeholder(),
            bias: bias.then(placeholder),
            in_features: OnceLock::new(),
            out_features,
            core: ModuleCore::new(),
        }
    }

    /// `[out_features, in_features]` once materialized; an uninitialized `[0]` placeholder
    /// before.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[out_features]` once materialized (`None` without bias).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input features: 0 until materialized, as PyTorch reports.
    pub fn in_features(&self) -> usize {
        self.in_features.get().copied().unwrap_or(0)
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Whether the parameters have been materialized (PyTorch's `not has_uninitialized_params()`).
    pub fn is_materialized(&self) -> bool {
        self.in_features.get().is_some()
    }

    /// Materializes the parameters for `in_features` inputs without a forward call (as a first
    /// call with an input of last dimension `in_features` would). A no-op if already
    /// materialized with the same size; an error if with another.
    pub fn materialize(&self, in_features: usize) -> Result<(), ModuleError> {
        let got = *self.in_features.get_or_init(|| {
            materialize_uninitialized(&self.weight, &[self.out_features, in_features]);
            if let Some(b) = &self.bias {
                materialize_uninitialized(b, &[self.out_features]);
            }
            init::reset_affine(&self.weight, self.bias.as_ref());
            in_features
        });
        if got != in_features {
            return Err(ModuleError(format!(
                "RuntimeError: LazyLinear was already materialized with in_features={got}, not {in_features}"
            )));
        }
        Ok(())
    }
}

impl ModuleFields for LazyLinear {
    /// `LazyLinear` until materialized, then `Linear` (PyTorch's `cls_to_become`).
    fn type_name(&self) -> String {
        if self.is_materialized() { "Linear" } else { "LazyLinear" }.to_string()
    }

    fn core(&self) -> &ModuleCore {
        &self.core
    }

    fn visit_fields<'a>(&'a self, v: &mut dyn FieldVisitor<'a>) {
        v.parameter("weight", Some(&self.weight));
        v.parameter("bias", self.bias.as_ref());
    }
}

impl Module for LazyLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        if !self.is_materialized() {
            refuse_tracing("LazyLinear");
            let in_features = x.size(-1);
            // Another thread may have materialized it meanwhile; a different size then fails
            // in the matmul below, as it would in PyTorch.
            let _ = self.materialize(in_features);
        }
        crate::linear(x, &self.weight, self.bias.as_ref())
    }

    fn extra_repr(&self) -> String {
        format!(
            "in_features={}, out_features={}, bias={}",
            self.in_features(),
            self.out_features,
            py_bool(self.bias.is_some())
        )
    }
}

/// `torch.nn.LazyConv2d`: a [`Conv2d`](super::Conv2d) whose `in_channels` is taken from its
/// first input (`dim 1` of an NCHW batch, `dim 0` of an unbatched CHW input). Until then its
/// `weight` and `bias` are uninitialized placeholders (as described for [`LazyLinear`]) and it prints as
/// `LazyConv2d(0, 8, kernel_size=(3, 3), stride=(1, 1))`; afterwards it is a `Conv2d` in name
/// and behaviour, initialized as `Conv2d::new(in_channels, out_channels, kernel)` would be.
///
/// ```
/// use tracegrad::nn::{LazyConv2d, ModuleExt};
/// use tracegrad::Tensor;
///
/// let conv = LazyConv2d::new(8, 3).padding(1);
/// assert_eq!(conv.repr(), "LazyConv2d(0, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))");
/// let y = conv.call(&Tensor::randn(&[2, 3, 5, 5]));
/// assert_eq!(y.shape(), vec![2, 8, 5, 5]);
/// assert_eq!(conv.repr(), "Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))");
/// ```
pub struct LazyConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    in_channels: OnceLock<usize>,
    geometry: ConvGeometry,
    core: ModuleCore,
}

impl LazyConv2d {
    /// A lazy convolution with bias, stride 1 and no padding.
    pub fn new(out_channels: usize, kernel_size: impl Into<Size2>) -> LazyConv2d {
        LazyConv2d::with_bias(out_channels, kernel_size, true)
    }

    /// A lazy convolution with or without bias.
    pub fn with_bias(out_channels: usize, kernel_size: impl Into<Size2>, bias: bool) -> LazyConv2d {
        LazyConv2d {
            weight: placeholder(),
            bias: bias.then(placeholder),
            in_channels: OnceLock::new(),
            geometry: ConvGeometry::new(out_channels, kernel_size),
            core: ModuleCore::new(),
        }
    }

    /// Sets the stride (builder style).
    pub fn stride(self, stride: impl Into<Size2>) -> LazyConv2d {
        LazyConv2d { geometry: self.geometry.stride(stride), ..self }
    }

    /// Sets the zero padding on each side (builder style).
    pub fn padding(self, padding: impl Into<Size2>) -> LazyConv2d {
        LazyConv2d { geometry: self.geometry.padding(padding), ..self }
    }

    /// `[out_channels, in_channels, kh, kw]` once materialized; an uninitialized `[0]`
    /// placeholder before.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[out_channels]` once materialized (`None` without bias).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input channels: 0 until materialized, as PyTorch reports.
    pub fn in_channels(&self) -> usize {
        self.in_channels.get().copied().unwrap_or(0)
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.geometry.out_channels
    }

    /// `[kh, kw]`.
    pub fn kernel_size(&self) -> [usize; 2] {
        self.geometry.kernel_size
    }

    /// Whether the parameters have been materialized.
    pub fn is_materialized(&self) -> bool {
        self.in_channels.get().is_some()
    }

    /// Materializes the parameters for `in_channels` input channels without a forward call. A
    /// no-op if already materialized with the same size; an error if with another.
    pub fn materialize(&self, in_channels: usize) -> Result<(), ModuleError> {
        let got = *self.in_channels.get_or_init(|| {
            materialize_uninitialized(&self.weight, &self.geometry.weight_shape(in_channels));
            if let Some(b) = &self.bias {
                materialize_uninitialized(b, &[self.geometry.out_channels]);
            }
            init::reset_affine(&self.weight, self.bias.as_ref());
            in_channels
        });
        if got != in_channels {
            return Err(ModuleError(format!(
                "RuntimeError: LazyConv2d was already materialized with in_channels={got}, not {in_channels}"
            )));
        }
        Ok(())
    }
}

impl ModuleFields for LazyConv2d {
    /// `LazyConv2d` until materialized, then `Conv2d`.
    fn type_name(&self) -> String {
        if self.is_materialized() { "Conv2d" } else { "LazyConv2d" }.to_string()
    }

    fn core(&self) -> &ModuleCore {
        &self.core
    }

    fn visit_fields<'a>(&'a self, v: &mut dyn FieldVisitor<'a>) {
        v.parameter("weight", Some(&self.weight));
        v.parameter("bias", self.bias.as_ref());
    }
}

impl Module for LazyConv2d {
    /// Panics, before materializing, on an input that is neither 3-D nor 4-D, with PyTorch's
    /// "Expected 3D (unbatched) or 4D (batched) input to LazyConv2d, but got input of size:
    /// torch.Size([2, 3])".
    fn forward(&self, x: &Tensor) -> Tensor {
        if !self.is_materialized() {
            refuse_tracing("LazyConv2d");
            let shape = x.shape();
            let in_channels = match shape.len() {
                3 => shape[0],
                4 => shape[1],
                _ => panic!(
                    "Expected 3D (unbatched) or 4D (batched) input to LazyConv2d, but got input of size: \
                     torch.Size({shape:?})"
                ),
            };
            let _ = self.materialize(in_channels);
        }
        self.geometry.forward(x, &self.weight, self.bias.as_ref())
    }

    fn extra_repr(&self) -> String {
        self.geometry.extra_repr(self.in_channels(), self.bias.is_some())
    }
}
