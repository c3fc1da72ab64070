//! Convolution and pooling (NCHW, groups 1, dilation 1, floor mode), and their gradients as ops
//! of their own so that the backward graph is made of ordinary nodes. The conv gradients have
//! derivative rules too (each is linear in both operands), so double backward works.

use super::{require_float, require_same_dtype, sh, Op, OpResult, Props, TensorType};
use crate::emitter::{Build, Emitter};
use tracegrad_runtime::kernels::conv;
use tracegrad_runtime::{Buffer, Dims};

fn out_size(op: &str, input: usize, k: usize, stride: usize, pad: usize) -> Result<usize, String> {
    if stride == 0 {
        return Err(format!("{op}: stride should be greater than zero"));
    }
    if k == 0 {
        return Err(format!("{op}: kernel size should be greater than zero"));
    }
    let padded =
        pad.checked_mul(2).and_then(|p| p.checked_add(input)).ok_or(format!("{op}: padding {pad} overflows"))?;
    if padded < k {
        return Err(format!(
            "{op}: Calculated padded input size per channel: ({padded}). Kernel size: ({k}). Kernel size can't be greater than actual input size"
        ));
    }
    Ok((padded - k) / stride + 1)
}

/// The output shape of pooling a 4-D `input` (the forward's checks, which the gradients of
/// pooling repeat against their recorded input).
fn pool_out(
    op: &str,
    input: &TensorType,
    kernel: &[usize; 2],
    stride: &[usize; 2],
    padding: &[usize; 2],
) -> Result<Dims, String> {
    require_4d(op, "input", input)?;
    for i in 0..2 {
        if padding[i].checked_mul(2).is_none_or(|p| p > kernel[i]) {
            return Err(format!(
                "{op}: pad should be at most half of effective kernel size, but got pad={}, kernel_size={}",
                padding[i], kernel[i]
            ));
        }
    }
    let oh = out_size(op, input.shape[2], kernel[0], stride[0], padding[0])?;
    let ow = out_size(op, input.shape[3], kernel[1], stride[1], padding[1])?;
    Ok(Dims::from_slice(&[input.shape[0], input.shape[1], oh, ow]))
}

/// A gradient operand must have the shape (and dtype) its forward produced.
fn require_grad_shape(op: &str, g: &TensorType, like: &TensorType, expected: &[usize]) -> Result<(), String> {
    require_same_dtype(op, like, g)?;
    if g.shape.as_slice() != expected {
        return Err(format!("{op}: grad_output has shape {} where {} was expected", sh(&g.shape), sh(expected)));
    }
    Ok(())
}

fn require_4d(op: &str, what: &str, t: &TensorType) -> Result<(), String> {
    if t.rank() != 4 {
        return Err(format!("{op}: expected 4-D {what} (N, C, H, W), got shape {}", sh(&t.shape)));
    }
    require_float(op, t)
}

pub(super) fn infer(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let name = op.name();
    let x = &t[0];
    match op {
        Op::Conv2d { stride, padding } => {
            let w = &t[1];
            require_4d(name, "input", x)?;
            require_4d(name, "weight", w)?;
            require_same_dtype(name, x, w)?;
            if x.shape[1] != w.shape[1] {
                return Err(format!(
                    "conv2d: Given groups=1, weight of size {}, expected input{} to have {} channels, but got {} channels instead",
                    sh(&w.shape),
                    sh(&x.shape),
                    w.shape[1],
                    x.shape[1]
                ));
            }
            let oh = out_size(name, x.shape[2], w.shape[2], stride[0], padding[0])?;
            let ow = out_size(name, x.shape[3], w.shape[3], stride[1], padding[1])?;
            Ok(TensorType::new(x.dtype, &[x.shape[0], w.shape[0], oh, ow]))
        }
        Op::Conv2dGradInput { input_hw, stride, padding } => {
            let (g, w) = (&t[0], &t[1]);
            require_4d(name, "grad_output", g)?;
            require_4d(name, "weight", w)?;
            let oh = out_size(name, input_hw[0], w.shape[2], stride[0], padding[0])?;
            let ow = out_size(name, input_hw[1], w.shape[3], stride[1], padding[1])?;
            require_grad_shape(name, g, w, &[g.shape[0], w.shape[0], oh, ow])?;
            Ok(TensorType::new(g.dtype, &[g.shape[0], w.shape[1], input_hw[0], input_hw[1]]))
        }
        Op::Conv2dGradWeight { kernel_hw, stride, padding } => {
            let (x, g) = (&t[0], &t[1]);
            require_4d(name, "input", x)?;
            require_4d(name, "grad_output", g)?;
            let oh = out_size(name, x.shape[2], kernel_hw[0], stride[0], padding[0])?;
            let ow = out_size(name, x.shape[3], kernel_hw[1], stride[1], padding[1])?;
            require_grad_shape(name, g, x, &[x.shape[0], g.shape[1], oh, ow])?;
            Ok(TensorType::new(x.dtype, &[g.shape[1], x.shape[1], kernel_hw[0], kernel_hw[1]]))
        }
        Op::MaxPool2d { kernel, stride, padding } | Op::AvgPool2d { kernel, stride, padding, .. } => {
            Ok(TensorType { dtype: x.dtype, shape: pool_out(name, x, kernel, stride, padding)? })
        }
        Op::MaxPool2dGrad { kernel, stride, padding } => {
            require_grad_shape(name, &t[1], x, &pool_out(name, x, kernel, stride, padding)?)?;
            Ok(x.clone())
        }
        Op::AvgPool2dGrad { kernel, stride, padding, input_shape, .. } => {
            let input = TensorType { dtype: x.dtype, shape: input_shape.clone() };
            require_grad_shape(name, x, &input, &pool_out(name, &input, kernel, stride, padding)?)?;
            Ok(input)
        }
        _ => unreachable!("not an nn op: {}", op.name()),
    }
}

pub(super) fn eval(op: &Op, x: &[&Buffer], _out: &TensorType) -> Buffer {
    match op {
        Op::Conv2d { stride, padding } => conv::conv2d(x[0], x[1], *stride, *padding),
        Op::Conv2dGradInput { stride, padding, input_hw } => {
            conv::conv2d_grad_input(x[0], x[1], *input_hw, *stride, *padding)
        }
        Op::Conv2dGradWeight { stride, padding, kernel_hw } => {
            conv::conv2d_grad_weight(x[0], x[1], *kernel_hw, *stride, *padding)
        }
        Op::MaxPool2d { kernel, stride, padding } => conv::max_pool2d(x[0], *kernel, *stride, *padding),
        Op::MaxPool2dGrad { kernel, stride, padding } => conv::max_pool2d_grad(x[0], x[1], *kernel, *stride, *padding),
        Op::AvgPool2d { kernel, stride, padding, count_include_pad } => {
            conv::avg_pool2d(x[0], *kernel, *stride, *padding, *count_include_pad)
        }
        Op::AvgPool2dGrad { kernel, stride, padding, count_include_pad, input_shape } => {
            conv::avg_pool2d_grad(x[0], input_shape, *kernel, *stride, *padding, *count_include_pad)
        }
        _ => unreachable!(),
    }
}

/// The gradients of a 2-D convolution's input and weight, those `needs` asks for.
pub(super) fn conv2d_vjp<E: Emitter>(
    op: &Op,
    e: &mut E,
    x: &[&E::Value],
    g: &E::Value,
    needs: [bool; 2],
) -> OpResult<Vec<Option<E::Value>>> {
    let Op::Conv2d { stride, padding } = op else { unreachable!("conv2d_vjp differentiates a Conv2d") };
    let (xs, ws) = (e.shape(x[0]), e.shape(x[1]));
    let gi = if needs[0] {
        let op = Op::Conv2dGradInput { stride: *stride, padding: *padding, input_hw: [xs[2], xs[3]] };
        Some(e.emit(op, &[g, x[1]])?)
    } else {
        None
    };
    let gw = if needs[1] {
        let op = Op::Conv2dGradWeight { stride: *stride, padding: *padding, kernel_hw: [ws[2], ws[3]] };
        Some(e.emit(op, &[x[0], g])?)
    } else {
        None
    };
    Ok(vec![gi, gw])
}

pub(super) fn vjp<E: Emitter>(op: &Op, e: &mut E, x: &[&E::Value], g: &E::Value) -> OpResult<Vec<Option<E::Value>>> {
    Ok(match op {
        Op::Conv2d { .. } => conv2d_vjp(op, e, x, g, [true, true])?,
        Op::Conv2dGradInput { stride, padding, .. } => {
            // y = convᵀ_w(go): d/dgo = conv_w(g); d/dw = grad_weight(g, go).
            let ws = e.shape(x[1]);
            let d_go = e.emit(Op::Conv2d { stride: *stride, padding: *padding }, &[g, x[1]])?;
            let d_w = e.emit(
                Op::Conv2dGradWeight { stride: *stride, padding: *padding, kernel_hw: [ws[2], ws[3]] },
                &[g, x[0]],
            )?;
            vec![Some(d_go), Some(d_w)]
        }
        Op::Conv2dGradWeight { stride, padding, .. } => {
            // y = gw(x, go): d/dx = grad_input(go, g); d/dgo = conv_g(x).
            let xs = e.shape(x[0]);
            let d_x = e.emit(
                Op::Conv2dGradInput { stride: *stride, padding: *padding, input_hw: [xs[2], xs[3]] },
                &[x[1], g],
            )?;
            let d_go = e.emit(Op::Conv2d { stride: *stride, padding: *padding }, &[x[0], g])?;
            vec![Some(d_x), Some(d_go)]
        }
        Op::MaxPool2d { kernel, stride, padding } => {
            vec![Some(e.emit(Op::MaxPool2dGrad { kernel: *kernel, stride: *stride, padding: *padding }, &[x[0], g])?)]
        }
        Op::AvgPool2d { kernel, stride, padding, count_include_pad } => {
            let input_shape: Dims = e.shape(x[0]);
            let op = Op::AvgPool2dGrad {
                kernel: *kernel,
                stride: *stride,
                padding: *padding,
                count_include_pad: *count_include_pad,
                input_shape,
            };
            vec![Some(e.emit(op, &[g])?)]
        }
        Op::AvgPool2dGrad { kernel, stride, padding, count_include_pad, .. } => {
            // Average pooling is linear; its gradient's adjoint is the pooling itself.
            let op = Op::AvgPool2d {
                kernel: *kernel,
                stride: *stride,
                padding: *padding,
                count_include_pad: *count_include_pad,
            };
            vec![Some(e.emit(op, &[g])?)]
        }
        Op::MaxPool2dGrad { .. } => return Err(op.no_derivative()),
        _ => unreachable!(),
    })
}

/// Convolutions and pooling never fail on well-typed operands.
pub(super) fn props(_op: &Op) -> Props {
    Props::NONE
}
