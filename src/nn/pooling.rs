//! `MaxPool2d` and `AvgPool2d` (floor mode, zero padding).

use super::conv::Size2;
use super::{Module, ModuleCore};
use crate::tensor::Tensor;

/// 2-D max pooling (`torch.nn.MaxPool2d`); the stride defaults to the kernel size.
///
/// ```
/// use tracegrad::nn::{MaxPool2d, ModuleExt};
///
/// let pool = MaxPool2d::new(2);
/// assert_eq!(pool.repr(), "MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)");
/// ```
#[derive(Module)]
pub struct MaxPool2d {
    kernel_size: Size2,
    stride: Size2,
    padding: Size2,
    core: ModuleCore,
}

impl MaxPool2d {
    /// Pooling with stride = kernel size and no padding.
    pub fn new(kernel_size: impl Into<Size2>) -> MaxPool2d {
        let kernel_size = kernel_size.into();
        MaxPool2d { kernel_size, stride: kernel_size, padding: Size2::One(0), core: ModuleCore::new() }
    }

    /// Sets the stride (builder style).
    pub fn stride(mut self, stride: impl Into<Size2>) -> MaxPool2d {
        self.stride = stride.into();
        self
    }

    /// Sets the implicit padding (of -∞) on each side (builder style).
    pub fn padding(mut self, padding: impl Into<Size2>) -> MaxPool2d {
        self.padding = padding.into();
        self
    }
}

impl Module for MaxPool2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.max_pool2d(self.kernel_size.pair(), self.stride.pair(), self.padding.pair())
    }

    fn extra_repr(&self) -> String {
        format!(
            "kernel_size={}, stride={}, padding={}, dilation=1, ceil_mode=False",
            self.kernel_size, self.stride, self.padding
        )
    }
}

/// 2-D average pooling (`torch.nn.AvgPool2d`, padded zeros counted); the stride defaults to the
/// kernel size.
///
/// ```
/// use tracegrad::nn::{AvgPool2d, ModuleExt};
///
/// assert_eq!(AvgPool2d::new(2).repr(), "AvgPool2d(kernel_size=2, stride=2, padding=0)");
/// ```
#[derive(Module)]
pub struct AvgPool2d {
    kernel_size: Size2,
    stride: Size2,
    padding: Size2,
    core: ModuleCore,
}

impl AvgPool2d {
    /// Pooling with stride = kernel size and no padding.
    pub fn new(kernel_size: impl Into<Size2>) -> AvgPool2d {
        let kernel_size = kernel_size.into();
        AvgPool2d { kernel_size, stride: kernel_size, padding: Size2::One(0), core: ModuleCore::new() }
    }

    /// Sets the stride (builder style).
    pub fn stride(mut self, stride: impl Into<Size2>) -> AvgPool2d {
        self.stride = stride.into();
        self
    }

    /// Sets the zero padding on each side (builder style).
    pub fn padding(mut self, padding: impl Into<Size2>) -> AvgPool2d {
        self.padding = padding.into();
        self
    }
}

impl Module for AvgPool2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.avg_pool2d(self.kernel_size.pair(), self.stride.pair(), self.padding.pair())
    }

    fn extra_repr(&self) -> String {
        format!("kernel_size={}, stride={}, padding={}", self.kernel_size, self.stride, self.padding)
    }
}
