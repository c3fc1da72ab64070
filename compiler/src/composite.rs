//! Composite ops: functions of primitives, written once against [`Build`] so eager mode and the
//! tracer share them, and their derivatives come from the primitives' rules.

use crate::emitter::{norm_dim, Build};
use crate::ops::{softmax_op, CompareOp, Op, OpError, OpResult, ReduceKind, UnaryOp};
use tracegrad_runtime::{DType, Dims, ShapeDisplay};

/// How a loss reduces over the batch, as PyTorch's `reduction=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LossReduction {
    /// One loss per element.
    None,
    /// The mean (the default).
    #[default]
    Mean,
    /// The sum.
    Sum,
}

fn err(op: &str, msg: String) -> OpError {
    OpError::new(op, msg)
}

fn all_dims(rank: usize) -> Vec<isize> {
    (0..rank as isize).collect()
}

/// Mean over `dims` (all when empty).
pub fn mean<B: Build>(e: &mut B, x: &B::Value, dims: &[isize], keepdim: bool) -> OpResult<B::Value> {
    let t = e.value_type(x);
    if !t.dtype.is_float() {
        return Err(err("mean", format!("mean(): could not infer output dtype. Input dtype must be either a floating point or complex dtype. Got: {}", t.dtype)));
    }
    let dims: Vec<isize> = if dims.is_empty() { all_dims(t.rank()) } else { dims.to_vec() };
    let mut n = 1usize;
    for &d in &dims {
        if t.rank() > 0 {
            n *= t.shape[norm_dim("mean", d, t.rank())?];
        }
    }
    let s = e.sum(x, &dims, keepdim)?;
    e.mul_scalar(&s, 1.0 / n as f64)
}

/// Variance over `dims` with Bessel-style `correction` (1 = unbiased, PyTorch's default).
pub fn var<B: Build>(e: &mut B, x: &B::Value, dims: &[isize], correction: usize, keepdim: bool) -> OpResult<B::Value> {
    let t = e.value_type(x);
    let dims: Vec<isize> = if dims.is_empty() { all_dims(t.rank()) } else { dims.to_vec() };
    let mut n = 1usize;
    for &d in &dims {
        if t.rank() > 0 {
            n *= t.shape[norm_dim("var", d, t.rank())?];
        }
    }
    let m = mean(e, x, &dims, true)?;
    let c = e.sub(x, &m)?;
    let c2 = e.mul(&c, &c)?;
    let s = e.sum(&c2, &dims, keepdim)?;
    // n - correction <= 0 gives inf/nan, as in PyTorch.
    e.mul_scalar(&s, 1.0 / (n as f64 - correction as f64))
}

/// `log(sum(exp(x)))` over `dims`, stable for large inputs: the max is subtracted first and
/// treated as a constant (its gradient contributions cancel exactly).
pub fn logsumexp<B: Build>(e: &mut B, x: &B::Value, dims: &[isize], keepdim: bool) -> OpResult<B::Value> {
    let t = e.value_type(x);
    let dims: Vec<isize> = if dims.is_empty() { all_dims(t.rank()) } else { dims.to_vec() };
    let nd: Vec<usize> = dims.iter().map(|&d| norm_dim("logsumexp", d, t.rank())).collect::<OpResult<_>>()?;
    let m = if t.rank() > 0 && nd.iter().any(|&d| t.shape[d] == 0) {
        // An empty slice has no maximum; its sum of exponentials is 0, so the result is -inf
        // (as PyTorch) with no shift at all.
        let kept: Vec<usize> = t.shape.iter().enumerate().map(|(i, &n)| if nd.contains(&i) { 1 } else { n }).collect();
        e.full(0.0, t.dtype, &kept)?
    } else {
        let m = e.reduce(ReduceKind::Max, x, &dims, true)?;
        // Keep the shift finite when a whole slice is -inf.
        let finite = {
            let inf = e.scalar(f64::INFINITY, t.dtype)?;
            let a = e.unary(UnaryOp::Abs, &m)?;
            e.compare(CompareOp::Ne, &a, &inf)?
        };
        let z = e.zeros_like(&m)?;
        let m = e.where_(&finite, &m, &z)?;
        stop_gradient(e, &m)?
    };
    let c = e.sub(x, &m)?;
    let ex = e.unary(UnaryOp::Exp, &c)?;
    let s = e.sum(&ex, &dims, true)?;
    let l = e.unary(UnaryOp::Log, &s)?;
    let r = e.add(&l, &m)?;
    if keepdim {
        Ok(r)
    } else {
        let shape = reduced_shape(e, x, &dims)?;
        e.reshape(&r, &shape)
    }
}

fn reduced_shape<B: Build>(e: &mut B, x: &B::Value, dims: &[isize]) -> OpResult<Dims> {
    let s = e.shape(x);
    let nd: Vec<usize> = dims.iter().map(|&d| norm_dim("reduce", d, s.len())).collect::<OpResult<_>>()?;
    Ok(s.iter().enumerate().filter(|(i, _)| !nd.contains(i)).map(|(_, &d)| d).collect())
}

/// The same value with no gradient path.
pub fn stop_gradient<B: Build>(e: &mut B, x: &B::Value) -> OpResult<B::Value> {
    e.emit(Op::StopGradient, &[x])
}

/// Softmax along `dim`.
pub fn softmax<B: Build>(e: &mut B, x: &B::Value, dim: isize) -> OpResult<B::Value> {
    let op = softmax_op(dim, e.shape(x).len(), false)?;
    e.emit(op, &[x])
}

/// Log-softmax along `dim`.
pub fn log_softmax<B: Build>(e: &mut B, x: &B::Value, dim: isize) -> OpResult<B::Value> {
    let op = softmax_op(dim, e.shape(x).len(), true)?;
    e.emit(op, &[x])
}

/// argmax/argmin over `dim` (the flattened tensor when `None`).
pub fn arg_reduce<B: Build>(
    e: &mut B,
    x: &B::Value,
    dim: Option<isize>,
    keepdim: bool,
    min: bool,
) -> OpResult<B::Value> {
    let name = if min { "argmin" } else { "argmax" };
    let dim = match dim {
        Some(d) => Some(norm_dim(name, d, e.shape(x).len())?).filter(|_| !e.shape(x).is_empty()),
        None => None,
    };
    e.emit(Op::ArgReduce { min, dim, keepdim }, &[x])
}

/// `max(dim)` / `min(dim)`: values and the index of the first extreme. The gradient flows to
/// that index, as in PyTorch.
pub fn max_dim<B: Build>(
    e: &mut B,
    x: &B::Value,
    dim: isize,
    keepdim: bool,
    min: bool,
) -> OpResult<(B::Value, B::Value)> {
    let rank = e.shape(x).len();
    let d = norm_dim(if min { "min" } else { "max" }, dim, rank)?;
    let idx = arg_reduce(e, x, Some(dim), true, min)?;
    if rank == 0 {
        return Ok((x.clone(), idx));
    }
    let v = e.emit(Op::Gather { dim: d }, &[x, &idx])?;
    if keepdim {
        Ok((v, idx))
    } else {
        Ok((squeeze(e, &v, Some(d as isize))?, squeeze(e, &idx, Some(d as isize))?))
    }
}

/// Removes size-1 dims (`dim = None`: all of them).
pub fn squeeze<B: Build>(e: &mut B, x: &B::Value, dim: Option<isize>) -> OpResult<B::Value> {
    let s = e.shape(x);
    let out: Vec<usize> = match dim {
        None => s.iter().copied().filter(|&d| d != 1).collect(),
        Some(d) => {
            if s.is_empty() {
                return Ok(x.clone());
            }
            let d = norm_dim("squeeze", d, s.len())?;
            s.iter().enumerate().filter(|&(i, &n)| !(i == d && n == 1)).map(|(_, &n)| n).collect()
        }
    };
    e.reshape(x, &out)
}

/// Inserts a size-1 dim at `dim` (which may be `rank`, or negative).
pub fn unsqueeze<B: Build>(e: &mut B, x: &B::Value, dim: isize) -> OpResult<B::Value> {
    let mut s: Vec<usize> = e.shape(x).to_vec();
    let d = norm_dim("unsqueeze", dim, s.len() + 1)?;
    s.insert(d, 1);
    e.reshape(x, &s)
}

/// Flattens dims `start..=end` into one.
pub fn flatten<B: Build>(e: &mut B, x: &B::Value, start: isize, end: isize) -> OpResult<B::Value> {
    let s = e.shape(x);
    if s.is_empty() {
        return e.reshape(x, &[1]);
    }
    let a = norm_dim("flatten", start, s.len())?;
    let b = norm_dim("flatten", end, s.len())?;
    if a > b {
        return Err(err("flatten", "flatten() has invalid args: start_dim cannot come after end_dim".into()));
    }
    let mut out: Vec<usize> = s[..a].to_vec();
    out.push(s[a..=b].iter().product());
    out.extend_from_slice(&s[b + 1..]);
    e.reshape(x, &out)
}

/// `reshape` with one inferred `-1` dimension.
pub fn reshape_infer<B: Build>(e: &mut B, x: &B::Value, shape: &[isize]) -> OpResult<B::Value> {
    let n: usize = e.shape(x).iter().product();
    let known: usize = shape.iter().filter(|&&d| d >= 0).map(|&d| d as usize).product();
    let infer = shape.iter().filter(|&&d| d == -1).count();
    let bad = || {
        err(
            "reshape",
            format!(
                "reshape: shape '{:?}' is invalid for input of size {n} (input shape {})",
                shape,
                ShapeDisplay(&e.shape(x))
            ),
        )
    };
    if infer > 1 || shape.iter().any(|&d| d < -1) {
        return Err(bad());
    }
    let out: Vec<usize> =
        shape.iter().map(|&d| if d == -1 { n.checked_div(known).unwrap_or(0) } else { d as usize }).collect();
    if out.iter().product::<usize>() != n {
        return Err(bad());
    }
    e.reshape(x, &out)
}

/// `transpose(a, b)` / `swapdims` with possibly negative dims.
pub fn swapdims<B: Build>(e: &mut B, x: &B::Value, a: isize, b: isize) -> OpResult<B::Value> {
    let r = e.shape(x).len();
    if r == 0 {
        return Ok(x.clone());
    }
    let (a, b) = (norm_dim("transpose", a, r)?, norm_dim("transpose", b, r)?);
    e.transpose(x, a, b)
}

/// `permute` with possibly negative dims.
pub fn permute<B: Build>(e: &mut B, x: &B::Value, dims: &[isize]) -> OpResult<B::Value> {
    let r = e.shape(x).len();
    let p: Vec<usize> = dims.iter().map(|&d| norm_dim("permute", d, r)).collect::<OpResult<_>>()?;
    e.emit(Op::Permute(p.into_iter().collect()), &[x])
}

/// `cat` with a possibly negative dim.
pub fn cat<B: Build>(e: &mut B, xs: &[&B::Value], dim: isize) -> OpResult<B::Value> {
    if xs.is_empty() {
        return Err(err("cat", "cat(): expected a non-empty list of Tensors".into()));
    }
    let d = norm_dim("cat", dim, e.shape(xs[0]).len())?;
    e.emit(Op::Cat { dim: d }, xs)
}

/// `stack`: unsqueeze each at `dim`, then cat.
pub fn stack<B: Build>(e: &mut B, xs: &[&B::Value], dim: isize) -> OpResult<B::Value> {
    if xs.is_empty() {
        return Err(err("stack", "stack expects a non-empty TensorList".into()));
    }
    let s0 = e.shape(xs[0]);
    let d = norm_dim("stack", dim, s0.len() + 1)?;
    let mut parts = Vec::with_capacity(xs.len());
    for (k, x) in xs.iter().enumerate() {
        let s = e.shape(x);
        if s != s0 {
            return Err(err(
                "stack",
                format!(
                    "stack expects each tensor to be equal size, but got {} at entry 0 and {} at entry {k}",
                    ShapeDisplay(&s0),
                    ShapeDisplay(&s)
                ),
            ));
        }
        parts.push(unsqueeze(e, x, d as isize)?);
    }
    let refs: Vec<&B::Value> = parts.iter().collect();
    e.emit(Op::Cat { dim: d }, &refs)
}

/// `narrow` with a possibly negative dim.
pub fn narrow<B: Build>(e: &mut B, x: &B::Value, dim: isize, start: usize, len: usize) -> OpResult<B::Value> {
    let d = norm_dim("narrow", dim, e.shape(x).len())?;
    e.emit(Op::Narrow { dim: d, start, len }, &[x])
}

/// `split(size)`: pieces of `size` along `dim`, the last one smaller.
pub fn split<B: Build>(e: &mut B, x: &B::Value, size: usize, dim: isize) -> OpResult<Vec<B::Value>> {
    let d = norm_dim("split", dim, e.shape(x).len())?;
    let n = e.shape(x)[d];
    if size == 0 && n > 0 {
        return Err(err(
            "split",
            "split_size can only be 0 if dimension size is 0, but got dimension size of ".to_string() + &n.to_string(),
        ));
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = size.min(n - start);
        out.push(e.narrow(x, d, start, len)?);
        start += len;
    }
    if n == 0 {
        out.push(x.clone());
    }
    Ok(out)
}

/// `chunk(chunks)`: pieces of `ceil(n / chunks)`, so there may be fewer than `chunks`.
pub fn chunk<B: Build>(e: &mut B, x: &B::Value, chunks: usize, dim: isize) -> OpResult<Vec<B::Value>> {
    if chunks == 0 {
        return Err(err("chunk", "chunk expects `chunks` to be greater than 0, got: 0".into()));
    }
    let d = norm_dim("chunk", dim, e.shape(x).len())?;
    let n = e.shape(x)[d];
    split(e, x, n.div_ceil(chunks).max(1), d as isize)
}

/// `tensor_split(sections)`: exactly `sections` pieces, the first `n % sections` one longer.
pub fn tensor_split<B: Build>(e: &mut B, x: &B::Value, sections: usize, dim: isize) -> OpResult<Vec<B::Value>> {
    if sections == 0 {
        return Err(err("tensor_split", "number of sections must be larger than 0, got 0".into()));
    }
    let d = norm_dim("tensor_split", dim, e.shape(x).len())?;
    let n = e.shape(x)[d];
    let (q, r) = (n / sections, n % sections);
    let mut out = Vec::with_capacity(sections);
    let mut start = 0;
    for i in 0..sections {
        let len = q + usize::from(i < r);
        out.push(e.emit(Op::Narrow { dim: d, start, len }, &[x])?);
        start += len;
    }
    Ok(out)
}

/// `tensor_split(indices)`: pieces between the given split points (clamped to the size).
pub fn tensor_split_at<B: Build>(e: &mut B, x: &B::Value, indices: &[usize], dim: isize) -> OpResult<Vec<B::Value>> {
    let d = norm_dim("tensor_split", dim, e.shape(x).len())?;
    let n = e.shape(x)[d];
    let mut out = Vec::with_capacity(indices.len() + 1);
    let mut start = 0;
    for &i in indices.iter().chain(std::iter::once(&n)) {
        let end = i.min(n).max(start);
        out.push(e.emit(Op::Narrow { dim: d, start, len: end - start }, &[x])?);
        start = end;
    }
    Ok(out)
}

/// `matmul` with PyTorch's 1-D promotion rules and batch broadcasting.
pub fn matmul<B: Build>(e: &mut B, a: &B::Value, b: &B::Value) -> OpResult<B::Value> {
    let (sa, sb) = (e.shape(a), e.shape(b));
    if sa.is_empty() || sb.is_empty() {
        return Err(err(
            "matmul",
            format!(
                "matmul: both arguments to matmul need to be at least 1D, but they are {}D and {}D",
                sa.len(),
                sb.len()
            ),
        ));
    }
    // Check the contracted sizes here, so that the message names the caller's shapes rather
    // than those of the promoted 2-D operands.
    let ka = sa[sa.len() - 1];
    let kb = if sb.len() == 1 { sb[0] } else { sb[sb.len() - 2] };
    if ka != kb {
        let msg = if sa.len() == 1 && sb.len() == 1 {
            format!(
                "matmul: inconsistent tensor size, expected tensor {} and src {} to have the same number of elements, but got {ka} and {kb} elements respectively",
                ShapeDisplay(&sa),
                ShapeDisplay(&sb)
            )
        } else {
            let m = if sa.len() == 1 { 1 } else { sa[sa.len() - 2] };
            let n = if sb.len() == 1 { 1 } else { sb[sb.len() - 1] };
            format!(
                "matmul: mat1 and mat2 shapes cannot be multiplied ({m}x{ka} and {kb}x{n}) (shapes {} and {})",
                ShapeDisplay(&sa),
                ShapeDisplay(&sb)
            )
        };
        return Err(err("matmul", msg));
    }
    let (a, b) = e.promote(a, b)?;
    let a2 = if sa.len() == 1 { e.reshape(&a, &[1, sa[0]])? } else { a };
    let b2 = if sb.len() == 1 { e.reshape(&b, &[sb[0], 1])? } else { b };
    let y = e.matmul_t(&a2, &b2, false, false)?;
    let mut ys: Vec<usize> = e.shape(&y).to_vec();
    if sb.len() == 1 {
        ys.pop();
    }
    if sa.len() == 1 {
        let l = ys.len();
        ys.remove(l - if sb.len() == 1 { 1 } else { 2 });
    }
    e.reshape(&y, &ys)
}

/// `bmm`: strictly 3-D batched matmul.
pub fn bmm<B: Build>(e: &mut B, a: &B::Value, b: &B::Value) -> OpResult<B::Value> {
    let (sa, sb) = (e.shape(a), e.shape(b));
    if sa.len() != 3 || sb.len() != 3 {
        return Err(err(
            "bmm",
            format!(
                "bmm: batch1 must be a 3D tensor and batch2 must be a 3D tensor (shapes {} and {})",
                ShapeDisplay(&sa),
                ShapeDisplay(&sb)
            ),
        ));
    }
    if sa[0] != sb[0] {
        return Err(err(
            "bmm",
            format!("bmm: batch1 and batch2 must have same number of batches, got {} and {}", sa[0], sb[0]),
        ));
    }
    e.matmul_t(a, b, false, false)
}

/// `addmm(input, m1, m2, beta, alpha)` = `beta·input + alpha·(m1 @ m2)`.
pub fn addmm<B: Build>(
    e: &mut B,
    input: &B::Value,
    m1: &B::Value,
    m2: &B::Value,
    beta: f64,
    alpha: f64,
) -> OpResult<B::Value> {
    let (s1, s2) = (e.shape(m1), e.shape(m2));
    if s1.len() != 2 || s2.len() != 2 {
        return Err(err(
            "addmm",
            format!("addmm: mat1 and mat2 must be matrices (shapes {} and {})", ShapeDisplay(&s1), ShapeDisplay(&s2)),
        ));
    }
    let p = e.matmul_t(m1, m2, false, false)?;
    let p = if alpha == 1.0 { p } else { e.mul_scalar(&p, alpha)? };
    let i = if beta == 1.0 { input.clone() } else { e.mul_scalar(input, beta)? };
    e.add(&i, &p)
}

/// `linear(x, w, b)` = `x @ wᵀ + b`, with `w: [out, in]`.
pub fn linear<B: Build>(e: &mut B, x: &B::Value, w: &B::Value, b: Option<&B::Value>) -> OpResult<B::Value> {
    let (sx, sw) = (e.shape(x), e.shape(w));
    if sw.len() != 2 || sx.is_empty() || sx[sx.len() - 1] != sw[1] {
        return Err(err(
            "linear",
            format!(
                "linear: mat1 and mat2 shapes cannot be multiplied ({}x{} and {}x{}) (input {}, weight {})",
                sx[..sx.len().saturating_sub(1)].iter().product::<usize>(),
                sx.last().copied().unwrap_or(0),
                sw.get(1).copied().unwrap_or(0),
                sw.first().copied().unwrap_or(0),
                ShapeDisplay(&sx),
                ShapeDisplay(&sw)
            ),
        ));
    }
    // Fold leading dims into one row dimension so the weight is read once.
    let rows: usize = sx[..sx.len() - 1].iter().product();
    let x2 = e.reshape(x, &[rows, sw[1]])?;
    let y = e.matmul_t(&x2, w, false, true)?;
    let y = match b {
        Some(b) => e.add(&y, b)?,
        None => y,
    };
    let mut out: Vec<usize> = sx[..sx.len() - 1].to_vec();
    out.push(sw[0]);
    e.reshape(&y, &out)
}

/// `addcmul(input, t1, t2, value)` = `input + value·t1·t2`.
pub fn addcmul<B: Build>(e: &mut B, input: &B::Value, t1: &B::Value, t2: &B::Value, value: f64) -> OpResult<B::Value> {
    let p = e.mul(t1, t2)?;
    let p = e.mul_scalar(&p, value)?;
    e.add(input, &p)
}

/// `addcdiv(input, t1, t2, value)` = `input + value·t1/t2`.
pub fn addcdiv<B: Build>(e: &mut B, input: &B::Value, t1: &B::Value, t2: &B::Value, value: f64) -> OpResult<B::Value> {
    let p = e.div(t1, t2)?;
    let p = e.mul_scalar(&p, value)?;
    e.add(input, &p)
}

/// `masked_fill(mask, value)`.
pub fn masked_fill<B: Build>(e: &mut B, x: &B::Value, mask: &B::Value, value: f64) -> OpResult<B::Value> {
    if e.dtype(mask) != DType::Bool {
        return Err(err(
            "masked_fill",
            format!("masked_fill_ only supports boolean masks, but got mask with dtype {}", e.dtype(mask)),
        ));
    }
    let v = e.scalar(value, e.dtype(x))?;
    let out = e.where_(mask, &v, x)?;
    let xs = e.shape(x);
    if e.shape(&out) != xs {
        return Err(err(
            "masked_fill",
            format!(
                "masked_fill: mask of shape {} cannot be broadcast to the tensor's shape {}",
                ShapeDisplay(&e.shape(mask)),
                ShapeDisplay(&xs)
            ),
        ));
    }
    Ok(out)
}

/// `clamp(min, max)`.
pub fn clamp<B: Build>(e: &mut B, x: &B::Value, min: Option<f64>, max: Option<f64>) -> OpResult<B::Value> {
    e.emit(Op::Clamp { min, max }, &[x])
}

/// Layer normalisation over the trailing `normalized` dims (biased variance, as PyTorch).
pub fn layer_norm<B: Build>(
    e: &mut B,
    x: &B::Value,
    normalized: &[usize],
    weight: Option<&B::Value>,
    bias: Option<&B::Value>,
    eps: f64,
) -> OpResult<B::Value> {
    let s = e.shape(x);
    if normalized.len() > s.len() || s[s.len() - normalized.len()..] != *normalized {
        return Err(err(
            "layer_norm",
            format!(
                "layer_norm: Given normalized_shape={}, expected input with shape [*, {}], but got input of size{}",
                ShapeDisplay(normalized),
                normalized.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                ShapeDisplay(&s)
            ),
        ));
    }
    let dims: Vec<isize> = (s.len() - normalized.len()..s.len()).map(|d| d as isize).collect();
    let m = mean(e, x, &dims, true)?;
    let c = e.sub(x, &m)?;
    let c2 = e.mul(&c, &c)?;
    let v = mean(e, &c2, &dims, true)?;
    let v = e.add_scalar(&v, eps)?;
    let r = e.unary(UnaryOp::Rsqrt, &v)?;
    let mut y = e.mul(&c, &r)?;
    if let Some(w) = weight {
        y = e.mul(&y, w)?;
    }
    if let Some(b) = bias {
        y = e.add(&y, b)?;
    }
    Ok(y)
}

/// `embedding(idx, weight)`: rows of `weight` picked by an integer tensor of any shape.
pub fn embedding<B: Build>(e: &mut B, idx: &B::Value, weight: &B::Value) -> OpResult<B::Value> {
    let (si, sw) = (e.shape(idx), e.shape(weight));
    if sw.len() != 2 {
        return Err(err("embedding", format!("embedding: 'weight' must be 2-D, got shape {}", ShapeDisplay(&sw))));
    }
    let flat = e.reshape(idx, &[si.iter().product()])?;
    let rows = e.emit(Op::IndexSelect { dim: 0 }, &[weight, &flat])?;
    let mut out: Vec<usize> = si.to_vec();
    out.push(sw[1]);
    e.reshape(&rows, &out)
}

fn reduce_loss<B: Build>(e: &mut B, l: &B::Value, reduction: LossReduction) -> OpResult<B::Value> {
    match reduction {
        LossReduction::None => Ok(l.clone()),
        LossReduction::Sum => e.sum(l, &[], false),
        LossReduction::Mean => mean(e, l, &[], false),
    }
}

/// The targets that count (`target != ignore_index`), as a bool mask.
fn kept_targets<B: Build>(e: &mut B, target: &B::Value, ignore_index: i64) -> OpResult<B::Value> {
    let ign = e.scalar(ignore_index as f64, DType::I64)?;
    e.compare(CompareOp::Ne, target, &ign)
}

/// [`reduce_loss`] for a loss whose ignored targets `keep` (1 kept, 0 ignored) masks out: the
/// mean is over the kept targets only.
fn reduce_masked_loss<B: Build>(
    e: &mut B,
    l: &B::Value,
    keep: &B::Value,
    reduction: LossReduction,
) -> OpResult<B::Value> {
    match reduction {
        LossReduction::Mean => {
            let s = e.sum(l, &[], false)?;
            let n = e.sum(keep, &[], false)?;
            e.div(&s, &n)
        }
        r => reduce_loss(e, l, r),
    }
}

/// `nll_loss(logp, target)` for `logp: [N, C, ...]` (or `[C]`) and integer `target: [N, ...]`.
/// Targets equal to `ignore_index` contribute nothing and are left out of the mean.
pub fn nll_loss<B: Build>(
    e: &mut B,
    logp: &B::Value,
    target: &B::Value,
    reduction: LossReduction,
    ignore_index: i64,
) -> OpResult<B::Value> {
    let (sl, st) = (e.shape(logp), e.shape(target));
    if e.dtype(target) != DType::I64 {
        return Err(err("nll_loss", format!("nll_loss: expected target of dtype int64 but got {}", e.dtype(target))));
    }
    let batched = sl.len() >= 2;
    let expect: Vec<usize> =
        if batched { std::iter::once(sl[0]).chain(sl[2..].iter().copied()).collect() } else { vec![] };
    if st.as_slice() != expect.as_slice() {
        return Err(err(
            "nll_loss",
            format!(
                "nll_loss: Expected input batch_size ({}) to match target batch_size ({}) (input {}, target {})",
                sl.first().copied().unwrap_or(1),
                st.first().copied().unwrap_or(1),
                ShapeDisplay(&sl),
                ShapeDisplay(&st)
            ),
        ));
    }
    let cdim = if batched { 1 } else { 0 };
    let keep = kept_targets(e, target, ignore_index)?;
    let zero = e.scalar(0.0, DType::I64)?;
    let safe = e.where_(&keep, target, &zero)?;
    let idx = unsqueeze(e, &safe, cdim as isize)?;
    let picked = e.emit(Op::Gather { dim: cdim }, &[logp, &idx])?;
    let picked = squeeze(e, &picked, Some(cdim as isize))?;
    let l = e.neg(&picked)?;
    let keepf = e.cast(&keep, e.dtype(logp))?;
    let l = e.mul(&l, &keepf)?;
    reduce_masked_loss(e, &l, &keepf, reduction)
}

/// `cross_entropy(logits, target)` with class-index targets: log_softmax over dim 1 then
/// nll_loss, with optional label smoothing (PyTorch's formula). Stable for huge logits.
pub fn cross_entropy<B: Build>(
    e: &mut B,
    logits: &B::Value,
    target: &B::Value,
    reduction: LossReduction,
    label_smoothing: f64,
    ignore_index: i64,
) -> OpResult<B::Value> {
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(err(
            "cross_entropy",
            format!("cross_entropy: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"),
        ));
    }
    let sl = e.shape(logits);
    let cdim: isize = if sl.len() >= 2 { 1 } else { 0 };
    let logp = log_softmax(e, logits, cdim)?;
    let nll = nll_loss(e, &logp, target, LossReduction::None, ignore_index)?;
    if label_smoothing == 0.0 {
        return match reduction {
            LossReduction::Mean => nll_loss(e, &logp, target, LossReduction::Mean, ignore_index),
            r => reduce_loss(e, &nll, r),
        };
    }
    let c = sl[cdim as usize] as f64;
    // loss = (1-ε)·nll + ε·mean_c(-logp), ignored targets masked out of both terms.
    let keep = kept_targets(e, target, ignore_index)?;
    let keepf = e.cast(&keep, e.dtype(logits))?;
    let smooth = e.sum(&logp, &[cdim], false)?;
    let smooth = e.mul_scalar(&smooth, -1.0 / c)?;
    let smooth = e.mul(&smooth, &keepf)?;
    let a = e.mul_scalar(&nll, 1.0 - label_smoothing)?;
    let b = e.mul_scalar(&smooth, label_smoothing)?;
    let l = e.add(&a, &b)?;
    reduce_masked_loss(e, &l, &keepf, reduction)
}

/// `mse_loss(input, target)`.
pub fn mse_loss<B: Build>(
    e: &mut B,
    input: &B::Value,
    target: &B::Value,
    reduction: LossReduction,
) -> OpResult<B::Value> {
    let (si, st) = (e.shape(input), e.shape(target));
    if si != st {
        return Err(err(
            "mse_loss",
            format!("mse_loss: input shape {} and target shape {} differ", ShapeDisplay(&si), ShapeDisplay(&st)),
        ));
    }
    let d = e.sub(input, target)?;
    let d2 = e.mul(&d, &d)?;
    reduce_loss(e, &d2, reduction)
}

/// Batch normalisation over every dim but 1 (`[N, C, ...]`).
///
/// In training mode (or without running statistics) it normalises with the batch's mean and
/// biased variance and also returns the batch mean and *unbiased* variance, detached, for the
/// caller's running-statistics update (PyTorch's rule). In eval mode it uses the running
/// statistics and returns `None`.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn batch_norm<B: Build>(
    e: &mut B,
    x: &B::Value,
    running: Option<(&B::Value, &B::Value)>,
    weight: Option<&B::Value>,
    bias: Option<&B::Value>,
    training: bool,
    eps: f64,
) -> OpResult<(B::Value, Option<(B::Value, B::Value)>)> {
    let s = e.shape(x);
    if s.len() < 2 {
        return Err(err(
            "batch_norm",
            format!("batch_norm: expected at least 2-D input (N, C, ...), got shape {}", ShapeDisplay(&s)),
        ));
    }
    let c = s[1];
    let mut bshape = vec![1usize; s.len()];
    bshape[1] = c;
    let per_channel = |e: &mut B, v: &B::Value, what: &str| -> OpResult<B::Value> {
        let vs = e.shape(v);
        if vs.as_slice() != [c] {
            return Err(err(
                "batch_norm",
                format!(
                    "batch_norm: {what} should have shape [{c}], got {} (input {})",
                    ShapeDisplay(&vs),
                    ShapeDisplay(&s)
                ),
            ));
        }
        e.reshape(v, &bshape)
    };
    let (y, stats) = if let (false, Some((rm, rv))) = (training, running) {
        let rm = per_channel(e, rm, "running_mean")?;
        let rv = per_channel(e, rv, "running_var")?;
        let xc = e.sub(x, &rm)?;
        let ve = e.add_scalar(&rv, eps)?;
        let r = e.unary(UnaryOp::Rsqrt, &ve)?;
        (e.mul(&xc, &r)?, None)
    } else if s.contains(&0) {
        // An empty batch has no statistics: PyTorch returns it (through weight and bias) and
        // leaves the running ones alone.
        (e.mul_scalar(x, 1.0)?, None)
    } else {
        let (y, stats) = normalize_with_batch_stats(e, x, &s, eps)?;
        (y, Some(stats))
    };
    let y = match weight {
        Some(w) => {
            let w = per_channel(e, w, "weight")?;
            e.mul(&y, &w)?
        }
        None => y,
    };
    let y = match bias {
        Some(b) => {
            let b = per_channel(e, b, "bias")?;
            e.add(&y, &b)?
        }
        None => y,
    };
    Ok((y, stats))
}

/// Per-channel batch mean and unbiased variance, detached.
type ChannelStats<V> = (V, V);

/// Batch normalisation's training half: `x` (of shape `s`) normalised with the batch's mean
/// and biased variance, and the batch mean and unbiased variance per channel, detached.
fn normalize_with_batch_stats<B: Build>(
    e: &mut B,
    x: &B::Value,
    s: &[usize],
    eps: f64,
) -> OpResult<(B::Value, ChannelStats<B::Value>)> {
    let c = s[1];
    let dims: Vec<isize> = (0..s.len() as isize).filter(|&d| d != 1).collect();
    let n: usize = s.iter().enumerate().filter(|&(i, _)| i != 1).map(|(_, &d)| d).product();
    if n <= 1 {
        return Err(err(
            "batch_norm",
            format!(
                "batch_norm: Expected more than 1 value per channel when training, got input size {}",
                ShapeDisplay(s)
            ),
        ));
    }
    let m = mean(e, x, &dims, true)?;
    let xc = e.sub(x, &m)?;
    let xc2 = e.mul(&xc, &xc)?;
    let v = mean(e, &xc2, &dims, true)?;
    let ve = e.add_scalar(&v, eps)?;
    let r = e.unary(UnaryOp::Rsqrt, &ve)?;
    let y = e.mul(&xc, &r)?;
    let bm = e.reshape(&m, &[c])?;
    let bm = stop_gradient(e, &bm)?;
    let bv = e.reshape(&v, &[c])?;
    let bv = e.mul_scalar(&bv, n as f64 / (n as f64 - 1.0))?;
    let bv = stop_gradient(e, &bv)?;
    Ok((y, (bm, bv)))
}

// ---------------------------------------------------------------------------------------------
// Scatter forms and torch.linalg.

/// `x.scatter(dim, index, src)`: `out[p with dim := index[p]] = src[p]` for every position `p`
/// of `index` (i64, same rank; at most `src`'s and, apart from `dim`, `x`'s size).
pub fn scatter<B: Build>(e: &mut B, x: &B::Value, dim: isize, index: &B::Value, src: &B::Value) -> OpResult<B::Value> {
    let d = norm_dim("scatter", dim, e.shape(x).len())?;
    e.emit(Op::Scatter { dim: d }, &[x, index, src])
}

/// `x.scatter(dim, index, value)`: writes the number `value` (in `x`'s dtype) at the positions
/// `index` names.
pub fn scatter_value<B: Build>(
    e: &mut B,
    x: &B::Value,
    dim: isize,
    index: &B::Value,
    value: f64,
) -> OpResult<B::Value> {
    let v = e.full(value, e.dtype(x), &e.shape(index))?;
    scatter(e, x, dim, index, &v)
}

/// The `reduce=` of `scatter(dim, index, src, reduce)`: `"add"` or `"multiply"`.
fn scatter_mode(reduce: &str) -> OpResult<crate::ops::ScatterReduce> {
    match reduce {
        "add" => Ok(crate::ops::ScatterReduce::Sum),
        "multiply" => Ok(crate::ops::ScatterReduce::Prod),
        _ => Err(err("scatter", "reduce argument must be either add or multiply.".into())),
    }
}

/// `x.scatter(dim, index, src, reduce=...)` with `reduce` `"add"` or `"multiply"`: the values
/// landing on a position are added to (multiplied into) `x`'s value there. The same as
/// `scatter_reduce` with `"sum"`/`"prod"` and `include_self`.
pub fn scatter_with_reduce<B: Build>(
    e: &mut B,
    x: &B::Value,
    dim: isize,
    index: &B::Value,
    src: &B::Value,
    reduce: &str,
) -> OpResult<B::Value> {
    let r = scatter_mode(reduce)?;
    let d = norm_dim("scatter", dim, e.shape(x).len())?;
    e.emit(Op::ScatterReduce { dim: d, reduce: r, include_self: true }, &[x, index, src])
}

/// `x.scatter(dim, index, value, reduce=...)`: [`scatter_with_reduce`] with a number.
pub fn scatter_value_with_reduce<B: Build>(
    e: &mut B,
    x: &B::Value,
    dim: isize,
    index: &B::Value,
    value: f64,
    reduce: &str,
) -> OpResult<B::Value> {
    let v = e.full(value, e.dtype(x), &e.shape(index))?;
    scatter_with_reduce(e, x, dim, index, &v, reduce)
}

/// `x.scatter_reduce(dim, index, src, reduce, include_self)` with `reduce` one of `"sum"`,
/// `"prod"`, `"mean"`, `"amax"`, `"amin"`.
pub fn scatter_reduce<B: Build>(
    e: &mut B,
    x: &B::Value,
    dim: isize,
    index: &B::Value,
    src: &B::Value,
    reduce: &str,
    include_self: bool,
) -> OpResult<B::Value> {
    let r = crate::ops::ScatterReduce::parse(reduce).map_err(|m| err("scatter_reduce", m))?;
    let d = norm_dim("scatter_reduce", dim, e.shape(x).len())?;
    e.emit(Op::ScatterReduce { dim: d, reduce: r, include_self }, &[x, index, src])
}

/// `torch.linalg.vector_norm(x, ord, dim=dims, keepdim)`; `dims` empty means all dims. `ord`
/// is `f64::INFINITY` (max `|x|`), `f64::NEG_INFINITY` (min `|x|`), `0` (non-zero count) or
/// any other `p`: `(Σ|x|^p)^(1/p)`.
pub fn vector_norm<B: Build>(e: &mut B, x: &B::Value, ord: f64, dims: &[isize], keepdim: bool) -> OpResult<B::Value> {
    const OP: &str = "linalg.vector_norm";
    let rank = e.shape(x).len();
    let dims: Vec<isize> = if dims.is_empty() { all_dims(rank) } else { dims.to_vec() };
    let mut d: Vec<usize> = Vec::with_capacity(dims.len());
    for &i in &dims {
        let n = norm_dim(OP, i, rank)?;
        if d.contains(&n) {
            return Err(err(OP, format!("{OP}: dim {n} appears multiple times in the list of dims")));
        }
        d.push(n);
    }
    d.sort_unstable();
    if rank == 0 {
        d.clear();
    }
    e.emit(Op::VectorNorm { ord, dims: d.into_iter().collect(), keepdim }, &[x])
}

/// `torch.linalg.matrix_norm(x, ord, dim=dims, keepdim)` over the two `dims` (PyTorch's
/// default is `(-2, -1)`). `ord`: `"fro"`, `"1"`, `"-1"`, `"inf"`, `"-inf"` (max/min absolute
/// column sum for `1`, row sum for `inf`). `"nuc"`, `"2"` and `"-2"` need singular values,
/// which tracegrad does not have yet: they are errors.
pub fn matrix_norm<B: Build>(
    e: &mut B,
    x: &B::Value,
    ord: &str,
    dims: [isize; 2],
    keepdim: bool,
) -> OpResult<B::Value> {
    const OP: &str = "linalg.matrix_norm";
    let s = e.shape(x);
    if s.len() < 2 {
        return Err(err(OP, format!("{OP}: The input tensor A must have at least 2 dimensions.")));
    }
    let dt = e.dtype(x);
    if !dt.is_float() {
        let got = crate::ops::torch_type(dt);
        return Err(err(OP, format!("{OP}: Expected a floating point or complex tensor as input. Got {got}")));
    }
    let (d0, d1) = (norm_dim(OP, dims[0], s.len())?, norm_dim(OP, dims[1], s.len())?);
    if d0 == d1 {
        return Err(err(OP, format!("{OP}: dims must be different. Got ({}, {})", dims[0], dims[1])));
    }
    match ord {
        "fro" => vector_norm(e, x, 2.0, &[d0 as isize, d1 as isize], keepdim),
        "1" | "-1" | "inf" | "-inf" => {
            let ax = e.unary(UnaryOp::Abs, x)?;
            let (sum_dim, ext_dim) = if ord.ends_with('1') { (d0, d1) } else { (d1, d0) };
            let kind = if ord.starts_with('-') { ReduceKind::Min } else { ReduceKind::Max };
            let sums = e.sum(&ax, &[sum_dim as isize], true)?;
            let m = e.reduce(kind, &sums, &[ext_dim as isize], true)?;
            if keepdim {
                Ok(m)
            } else {
                let out: Vec<usize> =
                    s.iter().enumerate().filter(|&(i, _)| i != d0 && i != d1).map(|(_, &n)| n).collect();
                e.reshape(&m, &out)
            }
        }
        "nuc" | "2" | "-2" => {
            // The singular values of the matrices spanned by (d0, d1), moved to the end.
            let rest: Vec<usize> = (0..s.len()).filter(|&i| i != d0 && i != d1).collect();
            let perm: Vec<usize> = rest.iter().copied().chain([d0, d1]).collect();
            let moved = e.permute(x, &perm)?;
            let sv = e.emit(Op::SvdVals, &[&moved])?;
            let last = [rest.len() as isize];
            let m = match ord {
                "nuc" => e.sum(&sv, &last, false)?,
                "2" => e.reduce(ReduceKind::Max, &sv, &last, false)?,
                _ => e.reduce(ReduceKind::Min, &sv, &last, false)?,
            };
            if keepdim {
                let kept: Vec<usize> =
                    s.iter().enumerate().map(|(i, &n)| if i == d0 || i == d1 { 1 } else { n }).collect();
                e.reshape(&m, &kept)
            } else {
                Ok(m)
            }
        }
        other => Err(err(OP, format!("{OP}: Order {other} not supported."))),
    }
}

/// `torch.linalg.svdvals(a)`: the singular values `[..., min(m, n)]` of `a: [..., m, n]`.
pub fn svdvals<B: Build>(e: &mut B, a: &B::Value) -> OpResult<B::Value> {
    e.emit(Op::SvdVals, &[a])
}

/// `torch.linalg.svd(a, full_matrices=False)`: `(U, S, Vh)`. Gradients flow through `S`; a
/// gradient reaching `U` or `Vh` is an error (their rule is not implemented).
pub fn svd<B: Build>(e: &mut B, a: &B::Value) -> OpResult<(B::Value, B::Value, B::Value)> {
    Ok((e.emit(Op::SvdU, &[a])?, e.emit(Op::SvdVals, &[a])?, e.emit(Op::SvdVh, &[a])?))
}

/// `torch.linalg.det` of `[..., n, n]`.
pub fn det<B: Build>(e: &mut B, a: &B::Value) -> OpResult<B::Value> {
    e.emit(Op::Det, &[a])
}

/// `torch.linalg.inv` of `[..., n, n]`; a singular matrix is PyTorch's error.
pub fn inv<B: Build>(e: &mut B, a: &B::Value) -> OpResult<B::Value> {
    e.emit(Op::Inv, &[a])
}

/// `torch.linalg.solve(A, B)`: `X` with `A X = B`. `B` is `[..., n, k]`, or a vector `[n]` /
/// `[..., n]` (when its shape is `A`'s without the last dim), as in PyTorch; batch dims
/// broadcast.
pub fn solve<B: Build>(e: &mut B, a: &B::Value, b: &B::Value) -> OpResult<B::Value> {
    const OP: &str = "linalg.solve";
    let (sa, sb) = (e.shape(a), e.shape(b));
    if sa.len() < 2 {
        return Err(err(OP, format!("{OP}: The input tensor A must have at least 2 dimensions.")));
    }
    let vector = sb.len() == 1 || (sb.len() + 1 == sa.len() && sb[..] == sa[..sa.len() - 1]);
    let b2 = if vector { unsqueeze(e, b, -1)? } else { b.clone() };
    let sb2 = e.shape(&b2);
    if sb2.len() < 2 {
        return Err(err(OP, format!("{OP}: The input tensor B must have at least 1 dimension.")));
    }
    let (ra, rb) = (sa.len(), sb2.len());
    let incompatible = || {
        err(
            OP,
            format!(
                "{OP}: Incompatible shapes of A and B for the equation AX = B ({}x{} and {}x{}) (shapes {} and {})",
                sa[ra - 2],
                sa[ra - 1],
                sb2[rb - 2],
                sb2[rb - 1],
                ShapeDisplay(&sa),
                ShapeDisplay(&sb)
            ),
        )
    };
    if sa[ra - 1] == sa[ra - 2] && sb2[rb - 2] != sa[ra - 1] {
        return Err(incompatible());
    }
    let batch =
        tracegrad_runtime::shape::broadcast_shapes(OP, &sa[..ra - 2], &sb2[..rb - 2]).map_err(|_| incompatible())?;
    let mut ta: Vec<usize> = batch.to_vec();
    ta.extend_from_slice(&sa[ra - 2..]);
    let mut tb: Vec<usize> = batch.to_vec();
    tb.extend_from_slice(&sb2[rb - 2..]);
    let a2 = e.expand(a, &ta)?;
    let b2 = e.expand(&b2, &tb)?;
    let x = e.emit(Op::Solve, &[&a2, &b2])?;
    if vector {
        let mut s = e.shape(&x).to_vec();
        s.pop();
        e.reshape(&x, &s)
    } else {
        Ok(x)
    }
}
