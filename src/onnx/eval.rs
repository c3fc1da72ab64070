//! The operator table: each ONNX node becomes calls of existing [`Tensor`] ops, so the
//! derivative rules, fusion and the JIT apply unchanged.
//!
//! Values are [`Value::Known`] or [`Value::Live`]. A known value depends on no graph input's
//! data and no parameter: constants, `Shape` of anything (shapes are concrete even while
//! tracing), and whatever is computed from known values only. A node whose inputs are all
//! known runs with tracing suspended and grad mode off, so shape subgraphs
//! (Shape → Gather → Concat → Reshape, ConstantOfShape, Trilu masks) are evaluated at trace
//! time for the traced input shapes and enter the graph as constants. Arguments that ONNX
//! passes as tensors but tracegrad needs as numbers (Reshape's shape, Slice's starts, axes)
//! must be known; otherwise the node is an error naming itself.

use tracegrad_compiler::Op;
use tracegrad_runtime::DType;

use super::model::Node;
use super::proto::AttributeProto;
use super::tensor_proto::{dtype_of, to_buffer};
use crate::tensor::Tensor;

/// The operator types the importer maps (default domain).
pub const SUPPORTED_OPS: [&str; 47] = [
    "Gemm",
    "MatMul",
    "Conv",
    "BatchNormalization",
    "LayerNormalization",
    "Relu",
    "Tanh",
    "Sigmoid",
    "Erf",
    "Softmax",
    "LogSoftmax",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Split",
    "Concat",
    "Slice",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Shape",
    "ConstantOfShape",
    "Constant",
    "Cast",
    "Where",
    "Trilu",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Exp",
    "Log",
    "Neg",
    "Clip",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "Identity",
    "Dropout",
    "Equal",
];

/// A value in the environment of one forward.
#[derive(Clone)]
pub(crate) enum Value {
    /// Concrete and independent of inputs and parameters (computed at trace time).
    Known(Tensor),
    /// Depends on an input or a parameter (symbolic while tracing).
    Live(Tensor),
}

impl Value {
    pub fn tensor(&self) -> &Tensor {
        match self {
            Value::Known(t) | Value::Live(t) => t,
        }
    }
}

type R<T> = Result<T, String>;

/// A node's inputs and attributes, with typed accessors whose errors say what is missing.
pub(crate) struct Args<'a> {
    pub node: &'a Node,
    pub values: Vec<Option<Value>>,
}

impl Args<'_> {
    fn t(&self, i: usize) -> R<&Tensor> {
        self.opt(i).ok_or_else(|| format!("input {i} is required"))
    }

    fn opt(&self, i: usize) -> Option<&Tensor> {
        self.values.get(i).and_then(|v| v.as_ref()).map(Value::tensor)
    }

    fn known(&self, i: usize) -> R<Option<&Tensor>> {
        match self.values.get(i).and_then(|v| v.as_ref()) {
            None => Ok(None),
            Some(Value::Known(t)) => Ok(Some(t)),
            Some(Value::Live(_)) => {
                Err(format!("input {i} must be known at trace time (a constant or computed from shapes)"))
            }
        }
    }

    /// A known integer input as numbers.
    fn ints(&self, i: usize) -> R<Option<Vec<i64>>> {
        match self.known(i)? {
            Some(t) if t.dtype() == DType::I64 => Ok(Some(t.to_vec::<i64>())),
            Some(t) => Err(format!("input {i} must be int64, got {:?}", t.dtype())),
            None => Ok(None),
        }
    }

    /// A known one-element input as a number.
    fn scalar(&self, i: usize) -> R<Option<f64>> {
        match self.known(i)? {
            Some(t) if t.numel() == 1 => Ok(Some(t.to_vec_f64()[0])),
            Some(t) => Err(format!("input {i} must hold one element, got shape {:?}", t.shape())),
            None => Ok(None),
        }
    }

    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attrs.iter().find(|a| a.name() == name)
    }

    fn int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).map_or(default, |a| a.i())
    }

    fn float(&self, name: &str, default: f32) -> f64 {
        self.attr(name).map_or(default, |a| a.f()) as f64
    }

    fn int_list(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }

    fn string(&self, name: &str) -> Option<String> {
        self.attr(name).map(|a| String::from_utf8_lossy(a.s()).into_owned())
    }

    /// Fails if output `i` (optional in ONNX) is requested.
    fn no_output(&self, i: usize, what: &str) -> R<()> {
        match self.node.outputs.get(i) {
            Some(o) if !o.is_empty() => Err(format!("output {i} ({what}) is not supported")),
            _ => Ok(()),
        }
    }
}

/// Normalizes an axis against `rank` (`-rank..rank`).
fn axis(a: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    if a < -r || a >= r.max(1) {
        return Err(format!("axis {a} is out of range for rank {rank}"));
    }
    Ok(if a < 0 { (a + r) as usize } else { a as usize })
}

fn axes(list: &[i64], rank: usize) -> R<Vec<usize>> {
    let mut out = list.iter().map(|&a| axis(a, rank)).collect::<R<Vec<_>>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn isizes(v: &[usize]) -> Vec<isize> {
    v.iter().map(|&d| d as isize).collect()
}

/// Runs one node. `args.values` holds its inputs in order (`None`: omitted).
pub(crate) fn apply(a: &Args) -> R<Vec<Tensor>> {
    let one = |t: Tensor| Ok(vec![t]);
    match a.node.op_type.as_str() {
        "Identity" => one(a.t(0)?.clone()),
        "Relu" => one(a.t(0)?.relu()),
        "Tanh" => one(a.t(0)?.tanh()),
        "Sigmoid" => one(a.t(0)?.sigmoid()),
        "Erf" => one(a.t(0)?.erf()),
        "Sqrt" => one(a.t(0)?.sqrt()),
        "Reciprocal" => one(a.t(0)?.reciprocal()),
        "Exp" => one(a.t(0)?.exp()),
        "Log" => one(a.t(0)?.log()),
        "Neg" => one(a.t(0)?.neg()),
        "Add" => one(a.t(0)?.add(a.t(1)?)),
        "Sub" => one(a.t(0)?.sub(a.t(1)?)),
        "Mul" => one(a.t(0)?.mul(a.t(1)?)),
        "Div" => div(a).map(|t| vec![t]),
        "Pow" => pow(a).map(|t| vec![t]),
        "Equal" => one(a.t(0)?.eq(a.t(1)?)),
        "Where" => one(Tensor::where_cond(a.t(0)?, a.t(1)?, a.t(2)?)),
        "Clip" => clip(a).map(|t| vec![t]),
        "Softmax" | "LogSoftmax" => softmax(a).map(|t| vec![t]),
        "Gemm" => gemm(a).map(|t| vec![t]),
        "MatMul" => one(a.t(0)?.matmul(a.t(1)?)),
        "Conv" => conv(a).map(|t| vec![t]),
        "BatchNormalization" => batch_norm(a).map(|t| vec![t]),
        "LayerNormalization" => layer_norm(a).map(|t| vec![t]),
        "MaxPool" | "AveragePool" => pool(a).map(|t| vec![t]),
        "GlobalAveragePool" => {
            let x = a.t(0)?;
            let dims: Vec<isize> = (2..x.dim() as isize).collect();
            one(if dims.is_empty() { x.clone() } else { x.mean(&dims, true) })
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" => reduce(a).map(|t| vec![t]),
        "Dropout" => dropout(a).map(|t| vec![t]),
        _ => apply_layout(a),
    }
}

fn apply_layout(a: &Args) -> R<Vec<Tensor>> {
    let one = |t: Tensor| Ok(vec![t]);
    match a.node.op_type.as_str() {
        "Flatten" => {
            let x = a.t(0)?;
            let s = x.shape();
            let k = if a.int("axis", 1) == s.len() as i64 { s.len() } else { axis(a.int("axis", 1), s.len())? };
            let (outer, inner): (usize, usize) = (s[..k].iter().product(), s[k..].iter().product());
            one(x.reshape(&[outer as isize, inner as isize]))
        }
        "Reshape" => reshape(a).map(|t| vec![t]),
        "Transpose" => {
            let x = a.t(0)?;
            let perm = a.int_list("perm").unwrap_or_else(|| (0..x.dim() as i64).rev().collect());
            let mut sorted = axes(&perm, x.dim())?;
            sorted.dedup();
            if sorted.len() != x.dim() || perm.len() != x.dim() {
                return Err(format!("perm {perm:?} is not a permutation of rank {}", x.dim()));
            }
            one(x.permute(&perm.iter().map(|&p| axis(p, x.dim()).map(|p| p as isize)).collect::<R<Vec<_>>>()?))
        }
        "Split" => split(a),
        "Concat" => {
            let ts: Vec<&Tensor> = a.values.iter().flatten().map(Value::tensor).collect();
            let rank = ts.first().ok_or("Concat needs at least one input")?.dim();
            one(Tensor::cat(&ts, axis(a.int("axis", 0), rank)? as isize))
        }
        "Slice" => slice(a).map(|t| vec![t]),
        "Gather" => gather(a).map(|t| vec![t]),
        "Unsqueeze" => unsqueeze(a).map(|t| vec![t]),
        "Squeeze" => squeeze(a).map(|t| vec![t]),
        "Expand" => expand(a).map(|t| vec![t]),
        _ => apply_constant(a),
    }
}

fn apply_constant(a: &Args) -> R<Vec<Tensor>> {
    let one = |t: Tensor| Ok(vec![t]);
    match a.node.op_type.as_str() {
        "Shape" => {
            let s = a.t(0)?.shape();
            let r = s.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (start, end) = (clampi(a.int("start", 0)), clampi(a.int("end", r)));
            let dims: Vec<i64> = s[start..end.max(start)].iter().map(|&d| d as i64).collect();
            let n = dims.len();
            one(Tensor::from_vec(dims, &[n]))
        }
        "ConstantOfShape" => {
            let shape = a.ints(0)?.ok_or("input 0 (shape) is required")?;
            let shape = shape.iter().map(|&d| usize::try_from(d).map_err(|_| format!("negative dim {d}")));
            let shape = shape.collect::<R<Vec<_>>>()?;
            super::tensor_proto::dims_to_shape(&shape.iter().map(|&d| d as i64).collect::<Vec<_>>())?;
            let (v, dt) = match a.attr("value").and_then(|v| v.t.as_ref()) {
                Some(t) => {
                    let b = to_buffer(t)?;
                    if b.numel() != 1 {
                        return Err("attribute value must hold one element".into());
                    }
                    (b.to_f64_vec()[0], b.dtype())
                }
                None => (0.0, DType::F32),
            };
            one(Tensor::full_dtype(&shape, v, dt))
        }
        "Constant" => constant(a).map(|t| vec![t]),
        "Cast" => {
            let to = a.attr("to").ok_or("attribute `to` is required")?.i();
            one(a.t(0)?.to_dtype(dtype_of(to as i32)?))
        }
        "Trilu" => trilu(a).map(|t| vec![t]),
        other => Err(format!("operator {other} has no mapping")),
    }
}

fn div(a: &Args) -> R<Tensor> {
    let (x, y) = (a.t(0)?, a.t(1)?);
    if x.dtype().is_float() || y.dtype().is_float() {
        return Ok(x.div(y));
    }
    // Integer division truncates in ONNX; tracegrad's `div` true-divides, so integer
    // operands (shape arithmetic) are divided exactly here, on known values only.
    let (xs, ys) = (a.ints(0)?.ok_or("input 0 is required")?, a.ints(1)?.ok_or("input 1 is required")?);
    let shape = if xs.len() >= ys.len() { x.shape() } else { y.shape() };
    let n = xs.len().max(ys.len());
    if !(xs.len() == n || xs.len() == 1) || !(ys.len() == n || ys.len() == 1) {
        return Err(format!("integer Div of shapes {:?} and {:?} is not supported", x.shape(), y.shape()));
    }
    let pick = |v: &[i64], i: usize| if v.len() == 1 { v[0] } else { v[i] };
    let q = (0..n)
        .map(|i| pick(&xs, i).checked_div(pick(&ys, i)).ok_or_else(|| "integer division by zero".to_string()))
        .collect::<R<Vec<i64>>>()?;
    Ok(Tensor::from_vec(q, &shape))
}

fn pow(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    match &a.values.get(1) {
        Some(Some(Value::Known(p))) if p.numel() == 1 && x.dtype().is_float() => Ok(x.pow(p.to_vec_f64()[0])),
        _ => Ok(x.pow_tensor(a.t(1)?)),
    }
}

fn clip(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    // Bounds known at trace time become a `clamp`; bounds that are parameters stay tensors.
    let bound = |i: usize, attr: &str| -> R<Option<Result<f64, Tensor>>> {
        Ok(match a.values.get(i).and_then(|v| v.as_ref()) {
            Some(Value::Live(t)) => Some(Err(t.clone())),
            Some(Value::Known(_)) => a.scalar(i)?.map(Ok),
            None => a.attr(attr).map(|v| Ok(v.f() as f64)),
        })
    };
    let (lo, hi) = (bound(1, "min")?, bound(2, "max")?);
    let mut y = match (lo.clone().and_then(Result::ok), hi.clone().and_then(Result::ok)) {
        (None, None) => x.clone(),
        (min, max) => x.clamp(min, max),
    };
    if let Some(Err(t)) = lo {
        y = y.maximum(&t);
    }
    if let Some(Err(t)) = hi {
        y = y.minimum(&t);
    }
    Ok(y)
}

fn softmax(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    let d = axis(a.int("axis", -1), x.dim())? as isize;
    Ok(if a.node.op_type == "Softmax" { x.softmax(d) } else { x.log_softmax(d) })
}

fn gemm(a: &Args) -> R<Tensor> {
    let (mut x, mut w) = (a.t(0)?.clone(), a.t(1)?.clone());
    let (alpha, beta) = (a.float("alpha", 1.0), a.float("beta", 1.0));
    if x.dim() != 2 || w.dim() != 2 {
        return Err(format!("Gemm takes 2-D operands, got {:?} and {:?}", x.shape(), w.shape()));
    }
    if a.int("transA", 0) != 0 {
        x = x.t();
    }
    // The common case, PyTorch's Linear, runs as `linear` (a matmul with a fused epilogue).
    if a.int("transB", 0) != 0 && alpha == 1.0 && beta == 1.0 {
        return Ok(crate::linear(&x, &w, a.opt(2)));
    }
    if a.int("transB", 0) != 0 {
        w = w.t();
    }
    let mut y = x.matmul(&w);
    if alpha != 1.0 {
        y = y.mul_scalar(alpha);
    }
    if let Some(c) = a.opt(2) {
        y = y.add(&if beta != 1.0 { c.mul_scalar(beta) } else { c.clone() });
    }
    Ok(y)
}

/// Symmetric 2-D `pads` (`[top, left, bottom, right]`) as `[h, w]`.
fn pads2(a: &Args) -> R<[usize; 2]> {
    if let Some(p) = a.string("auto_pad").filter(|p| p != "NOTSET") {
        return Err(format!("auto_pad={p} is not supported"));
    }
    let p = a.int_list("pads").unwrap_or_else(|| vec![0; 4]);
    match p.as_slice() {
        [t, l, b, r] if t == b && l == r && *t >= 0 && *l >= 0 => Ok([*t as usize, *l as usize]),
        _ => Err(format!("pads {p:?} are not supported (2-D, symmetric)")),
    }
}

fn pair(a: &Args, name: &str, default: i64) -> R<[usize; 2]> {
    let v = a.int_list(name).unwrap_or_else(|| vec![default; 2]);
    match v.as_slice() {
        [h, w] if *h > 0 && *w > 0 => Ok([*h as usize, *w as usize]),
        _ => Err(format!("{name} {v:?} is not supported (2-D, positive)")),
    }
}

fn conv(a: &Args) -> R<Tensor> {
    let (x, w) = (a.t(0)?, a.t(1)?);
    if w.dim() != 4 || x.dim() != 4 {
        return Err(format!("only 2-D Conv is supported (input {:?}, weight {:?})", x.shape(), w.shape()));
    }
    if a.int("group", 1) != 1 || pair(a, "dilations", 1)? != [1, 1] {
        return Err("grouped or dilated Conv is not supported".into());
    }
    Ok(x.conv2d(w, a.opt(2), pair(a, "strides", 1)?, pads2(a)?))
}

fn pool(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    a.no_output(1, "Indices")?;
    if x.dim() != 4 {
        return Err(format!("only 2-D pooling is supported (input {:?})", x.shape()));
    }
    if a.int("ceil_mode", 0) != 0 || pair(a, "dilations", 1)? != [1, 1] || a.int("storage_order", 0) != 0 {
        return Err("ceil_mode, dilations and storage_order are not supported".into());
    }
    let (kernel, stride, padding) = (pair(a, "kernel_shape", 0)?, pair(a, "strides", 1)?, pads2(a)?);
    if a.node.op_type == "MaxPool" {
        return Ok(x.max_pool2d(kernel, stride, padding));
    }
    let count_include_pad = a.int("count_include_pad", 0) != 0;
    Ok(crate::autograd::eager(|e| {
        tracegrad_compiler::Emitter::emit(e, Op::AvgPool2d { kernel, stride, padding, count_include_pad }, &[x])
    }))
}

fn batch_norm(a: &Args) -> R<Tensor> {
    if a.int("training_mode", 0) != 0 {
        return Err("training_mode=1 is not supported (export the model in eval mode)".into());
    }
    a.no_output(1, "running_mean")?;
    let (x, scale, bias, mean, var) = (a.t(0)?, a.t(1)?, a.t(2)?, a.t(3)?, a.t(4)?);
    let eps = a.float("epsilon", 1e-5);
    Ok(x.batch_norm(Some((mean, var)), Some(scale), Some(bias), false, eps).0)
}

fn layer_norm(a: &Args) -> R<Tensor> {
    a.no_output(1, "Mean")?;
    a.no_output(2, "InvStdDev")?;
    let x = a.t(0)?;
    let k = axis(a.int("axis", -1), x.dim())?;
    let normalized = x.shape()[k..].to_vec();
    Ok(x.layer_norm(&normalized, Some(a.t(1)?), a.opt(2), a.float("epsilon", 1e-5)))
}

fn reduce(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    let listed = match a.ints(1)? {
        Some(v) => Some(v),
        None => a.int_list("axes"),
    };
    let keep = a.int("keepdims", 1) != 0;
    let dims = match listed.filter(|v| !v.is_empty()) {
        Some(v) => axes(&v, x.dim())?,
        None if a.int("noop_with_empty_axes", 0) != 0 => return Ok(x.clone()),
        None => (0..x.dim()).collect(),
    };
    let dims = isizes(&dims);
    Ok(match a.node.op_type.as_str() {
        "ReduceMean" => x.mean(&dims, keep),
        "ReduceSum" => x.sum(&dims, keep),
        _ => x.amax(&dims, keep),
    })
}

fn dropout(a: &Args) -> R<Tensor> {
    a.no_output(1, "mask")?;
    if let Some(t) = a.scalar(2)? {
        if t != 0.0 {
            return Err("training_mode=true is not supported: Dropout is imported for inference".into());
        }
    }
    Ok(a.t(0)?.clone())
}

fn reshape(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    let spec = a.ints(1)?.ok_or("input 1 (shape) is required")?;
    let s = x.shape();
    let allow_zero = a.int("allowzero", 0) != 0;
    let mut out = Vec::with_capacity(spec.len());
    for (i, &d) in spec.iter().enumerate() {
        out.push(match d {
            0 if !allow_zero => {
                *s.get(i).ok_or_else(|| format!("shape {spec:?}: dim {i} copies a missing dim"))? as isize
            }
            -1 => -1,
            d if d >= 0 => d as isize,
            d => return Err(format!("shape {spec:?} has invalid dim {d}")),
        });
    }
    let known: usize = out.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product();
    let holes = out.iter().filter(|&&d| d == -1).count();
    let fits = match holes {
        0 => known == x.numel(),
        1 => known != 0 && x.numel() % known == 0,
        _ => false,
    };
    if !fits {
        return Err(format!("cannot reshape {s:?} to {spec:?}"));
    }
    Ok(x.reshape(&out))
}

fn split(a: &Args) -> R<Vec<Tensor>> {
    let x = a.t(0)?;
    let d = axis(a.int("axis", 0), x.dim())?;
    let n = x.shape()[d];
    let parts = a.node.outputs.len();
    let sizes: Vec<usize> = match a.ints(1)?.or_else(|| a.int_list("split")) {
        Some(v) => {
            v.iter().map(|&s| usize::try_from(s).map_err(|_| format!("negative split {s}"))).collect::<R<_>>()?
        }
        None if parts > 0 => {
            let each = n.div_ceil(parts);
            (0..parts).map(|i| each.min(n.saturating_sub(i * each))).collect()
        }
        None => return Err("Split has no outputs".into()),
    };
    if sizes.iter().sum::<usize>() != n || sizes.len() != parts {
        return Err(format!("split {sizes:?} does not cover dim {d} of {:?} in {parts} parts", x.shape()));
    }
    let mut start = 0;
    let mut out = Vec::new();
    for s in sizes {
        out.push(x.narrow(d as isize, start, s));
        start += s;
    }
    Ok(out)
}

/// ONNX Slice's clamping of one axis; returns the indices taken.
fn slice_indices(dim: usize, start: i64, end: i64, step: i64) -> R<Vec<i64>> {
    if step == 0 {
        return Err("Slice step 0".into());
    }
    let n = dim as i64;
    let norm = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
    let (start, end) = (norm(start), norm(end));
    let (start, end) =
        if step > 0 { (start.clamp(0, n), end.clamp(0, n)) } else { (start.clamp(0, n - 1), end.clamp(-1, n - 1)) };
    let mut out = Vec::new();
    let mut i = start;
    while (step > 0 && i < end) || (step < 0 && i > end) {
        out.push(i);
        i += step;
    }
    Ok(out)
}

fn slice(a: &Args) -> R<Tensor> {
    let mut x = a.t(0)?.clone();
    let starts = a.ints(1)?.ok_or("input 1 (starts) is required")?;
    let ends = a.ints(2)?.ok_or("input 2 (ends) is required")?;
    let ax = a.ints(3)?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = a.ints(4)?.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || ax.len() != starts.len() || steps.len() != starts.len() {
        return Err("starts, ends, axes and steps differ in length".into());
    }
    for i in 0..starts.len() {
        let d = axis(ax[i], x.dim())?;
        let idx = slice_indices(x.shape()[d], starts[i], ends[i], steps[i])?;
        x = match (steps[i], idx.first()) {
            (1, Some(&s)) => x.narrow(d as isize, s as usize, idx.len()),
            _ => {
                let n = idx.len();
                x.index_select(d as isize, &Tensor::from_vec(idx, &[n]))
            }
        };
    }
    Ok(x)
}

fn gather(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    let d = axis(a.int("axis", 0), x.dim())?;
    let idx = a.t(1)?;
    if idx.dtype() != DType::I64 {
        return Err(format!("indices must be int64 or int32, got {:?}", idx.dtype()));
    }
    let n = x.shape()[d] as i64;
    let flat = match a.ints(1) {
        Ok(Some(v)) => {
            let v = v.iter().map(|&i| if i < 0 { i + n } else { i });
            let v = v.map(|i| if (0..n).contains(&i) { Ok(i) } else { Err(format!("index {i} out of range for {n}")) });
            let v = v.collect::<R<Vec<i64>>>()?;
            let len = v.len();
            Tensor::from_vec(v, &[len])
        }
        _ => idx.reshape(&[-1]),
    };
    let picked = x.index_select(d as isize, &flat);
    let s = x.shape();
    let shape: Vec<usize> = s[..d].iter().chain(idx.shape().iter()).chain(s[d + 1..].iter()).copied().collect();
    Ok(picked.reshape(&isizes(&shape)))
}

fn unsqueeze(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    let list = a.ints(1)?.or_else(|| a.int_list("axes")).ok_or("axes are required")?;
    let mut y = x.clone();
    for d in axes(&list, x.dim() + list.len())? {
        y = y.unsqueeze(d as isize);
    }
    Ok(y)
}

fn squeeze(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    match a.ints(1)?.or_else(|| a.int_list("axes")) {
        Some(list) => {
            let dims = axes(&list, x.dim())?;
            if let Some(d) = dims.iter().find(|&&d| x.shape()[d] != 1) {
                return Err(format!("cannot squeeze dim {d} of {:?}", x.shape()));
            }
            Ok(x.squeeze_dims(&isizes(&dims)))
        }
        None => Ok(x.squeeze()),
    }
}

fn expand(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    let spec = a.ints(1)?.ok_or("input 1 (shape) is required")?;
    let s = x.shape();
    let rank = s.len().max(spec.len());
    let mut out = vec![0usize; rank];
    for (i, o) in out.iter_mut().enumerate() {
        let from_x = (i + s.len()).checked_sub(rank).map_or(1, |j| s[j]);
        let from_s = (i + spec.len()).checked_sub(rank).map_or(1, |j| spec[j]);
        let from_s = usize::try_from(from_s).map_err(|_| format!("shape {spec:?} has a negative dim"))?;
        *o = match (from_x, from_s) {
            (a, b) if a == b || b == 1 => a,
            (1, b) => b,
            (a, b) => return Err(format!("cannot expand dim of size {a} to {b}")),
        };
    }
    super::tensor_proto::dims_to_shape(&out.iter().map(|&d| d as i64).collect::<Vec<_>>())?;
    Ok(x.expand(&isizes(&out)))
}

fn constant(a: &Args) -> R<Tensor> {
    let attr = a.node.attrs.first().ok_or("Constant has no value attribute")?;
    Ok(match attr.name() {
        "value" => Tensor::from_buffer(to_buffer(attr.t.as_ref().ok_or("attribute value holds no tensor")?)?),
        "value_float" => Tensor::full_dtype(&[], attr.f() as f64, DType::F32),
        "value_floats" => Tensor::from_vec(attr.floats.clone(), &[attr.floats.len()]),
        "value_int" => Tensor::from_vec(vec![attr.i()], &[]),
        "value_ints" => Tensor::from_vec(attr.ints.clone(), &[attr.ints.len()]),
        other => return Err(format!("Constant attribute {other} is not supported")),
    })
}

fn trilu(a: &Args) -> R<Tensor> {
    let x = a.t(0)?;
    let k = a.scalar(1)?.unwrap_or(0.0) as i64;
    let s = x.shape();
    if s.len() < 2 {
        return Err(format!("Trilu needs rank >= 2, got {s:?}"));
    }
    let (n, m) = (s[s.len() - 2], s[s.len() - 1]);
    let upper = a.int("upper", 1) != 0;
    let keep: Vec<bool> = (0..n * m)
        .map(|p| {
            let (i, j) = ((p / m) as i64, (p % m) as i64);
            if upper {
                j - i >= k
            } else {
                j - i <= k
            }
        })
        .collect();
    let mask = Tensor::from_vec(keep, &[n, m]);
    Ok(Tensor::where_cond(&mask, x, &Tensor::full_dtype(&[], 0.0, x.dtype())))
}
