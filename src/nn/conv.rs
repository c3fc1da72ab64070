//! `Conv2d` and [`Size2`], the one-or-two-numbers size its arguments take.

use std::fmt;

use super::init;
use super::{Module, ModuleCore};
use crate::tensor::Tensor;

/// A 2-D size given as one number (`3`, meaning `(3, 3)`) or a pair (`(3, 5)`), remembered as
/// given: pooling layers print it back that way, as PyTorch does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size2 {
    /// The same value for height and width.
    One(usize),
    /// `(height, width)`.
    Two([usize; 2]),
}

impl Size2 {
    /// `[height, width]`.
    pub fn pair(self) -> [usize; 2] {
        match self {
            Size2::One(v) => [v, v],
            Size2::Two(p) => p,
        }
    }

    /// As a tuple always: `(3, 3)`.
    pub(crate) fn tuple(self) -> String {
        let [h, w] = self.pair();
        format!("({h}, {w})")
    }
}

impl From<usize> for Size2 {
    fn from(v: usize) -> Size2 {
        Size2::One(v)
    }
}

impl From<[usize; 2]> for Size2 {
    fn from(p: [usize; 2]) -> Size2 {
        Size2::Two(p)
    }
}

impl From<(usize, usize)> for Size2 {
    fn from((h, w): (usize, usize)) -> Size2 {
        Size2::Two([h, w])
    }
}

impl fmt::Display for Size2 {
    /// `3` or `(3, 5)`, as Python prints an int or a tuple.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size2::One(v) => write!(f, "{v}"),
            Size2::Two(_) => f.write_str(&self.tuple()),
        }
    }
}

/// 2-D convolution over NCHW input (`torch.nn.Conv2d`, zero padding, no dilation or groups).
/// Weight `[out, in, kh, kw]` and bias `[out]` start uniform in ±1/√(in·kh·kw), PyTorch's
/// default (`kaiming_uniform_(a=√5)`).
///
/// ```
/// use tracegrad::nn::{Conv2d, ModuleExt};
///
/// let conv = Conv2d::new(1, 8, 3).padding(1);
/// assert_eq!(conv.repr(), "Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))");
/// let y = conv.call(&tracegrad::Tensor::randn(&[2, 1, 28, 28]));
/// assert_eq!(y.shape(), vec![2, 8, 28, 28]);
/// ```
#[derive(Module)]
pub struct Conv2d {
    /// `[out_channels, in_channels, kh, kw]`.
    #[param]
    pub weight: Tensor,
    /// `[out_channels]`.
    #[param]
    pub bias: Option<Tensor>,
    in_channels: usize,
    geometry: ConvGeometry,
    core: ModuleCore,
}

/// A convolution's settings besides its input channels: output channels, kernel, stride and
/// padding. [`Conv2d`] and `LazyConv2d` (whose input channels come later) share it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvGeometry {
    pub(crate) out_channels: usize,
    pub(crate) kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
}

impl ConvGeometry {
    /// Stride 1, no padding.
    pub(crate) fn new(out_channels: usize, kernel_size: impl Into<Size2>) -> ConvGeometry {
        ConvGeometry { out_channels, kernel_size: kernel_size.into().pair(), stride: [1, 1], padding: [0, 0] }
    }

    pub(crate) fn stride(self, stride: impl Into<Size2>) -> ConvGeometry {
        ConvGeometry { stride: stride.into().pair(), ..self }
    }

    pub(crate) fn padding(self, padding: impl Into<Size2>) -> ConvGeometry {
        ConvGeometry { padding: padding.into().pair(), ..self }
    }

    /// `[out_channels, in_channels, kh, kw]`.
    pub(crate) fn weight_shape(&self, in_channels: usize) -> [usize; 4] {
        let [kh, kw] = self.kernel_size;
        [self.out_channels, in_channels, kh, kw]
    }

    pub(crate) fn forward(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        x.conv2d(weight, bias, self.stride, self.padding)
    }

    /// PyTorch's `extra_repr`: `3, 8, kernel_size=(3, 3), stride=(1, 1)[, padding=…][, bias=False]`.
    pub(crate) fn extra_repr(&self, in_channels: usize, bias: bool) -> String {
        let mut s = format!(
            "{}, {}, kernel_size={}, stride={}",
            in_channels,
            self.out_channels,
            Size2::Two(self.kernel_size).tuple(),
            Size2::Two(self.stride).tuple()
        );
        if self.padding != [0, 0] {
            s += &format!(", padding={}", Size2::Two(self.padding).tuple());
        }
        if !bias {
            s += ", bias=False";
        }
        s
    }
}

impl Conv2d {
    /// A convolution with bias, stride 1 and no padding, initialised from the default
    /// generator. Set stride and padding with [`stride`](Self::stride) and
    /// [`padding`](Self::padding).
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: impl Into<Size2>) -> Conv2d {
        Conv2d::with_bias(in_channels, out_channels, kernel_size, true)
    }

    /// A convolution with or without bias.
    pub fn with_bias(in_channels: usize, out_channels: usize, kernel_size: impl Into<Size2>, bias: bool) -> Conv2d {
        let geometry = ConvGeometry::new(out_channels, kernel_size);
        let weight = Tensor::zeros(&geometry.weight_shape(in_channels));
        let bias = bias.then(|| Tensor::zeros(&[out_channels]));
        init::reset_affine(&weight, bias.as_ref());
        Conv2d {
            weight: weight.requires_grad_(true),
            bias: bias.map(|b| b.requires_grad_(true)),
            in_channels,
            geometry,
            core: ModuleCore::new(),
        }
    }

    /// Sets the stride (builder style).
    pub fn stride(self, stride: impl Into<Size2>) -> Conv2d {
        Conv2d { geometry: self.geometry.stride(stride), ..self }
    }

    /// Sets the zero padding on each side (builder style).
    pub fn padding(self, padding: impl Into<Size2>) -> Conv2d {
        Conv2d { geometry: self.geometry.padding(padding), ..self }
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.geometry.out_channels
    }

    /// `[kh, kw]`.
    pub fn kernel_size(&self) -> [usize; 2] {
        self.geometry.kernel_size
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.geometry.forward(x, &self.weight, self.bias.as_ref())
    }

    fn extra_repr(&self) -> String {
        self.geometry.extra_repr(self.in_channels, self.bias.is_some())
    }
}
