//! `Display` for [`Tensor`] in PyTorch's format: `tensor([[1., 2.],\n        [3., 4.]])`,
//! with the same choice between integer-valued, fixed (4 decimals) and scientific notation,
//! summarisation above 1000 elements, and the `dtype=`/`requires_grad=`/`grad_fn=` suffixes.

use std::fmt;

use tracegrad_runtime::DType;

use crate::tensor::Tensor;

const THRESHOLD: usize = 1000;
const EDGE: usize = 3;

enum Style {
    Int,
    Bool,
    /// Integer-valued floats: `1.`
    Whole,
    Fixed,
    Sci,
}

fn sci(v: f64) -> String {
    let s = format!("{v:.4e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = if let Some(d) = e.strip_prefix('-') { ('-', d) } else { ('+', e) };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

fn fmt_value(v: f64, style: &Style) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    match style {
        Style::Int => format!("{}", v as i64),
        Style::Bool => if v != 0.0 { "True" } else { "False" }.into(),
        Style::Whole => format!("{v:.0}."),
        Style::Fixed => format!("{v:.4}"),
        Style::Sci => sci(v),
    }
}

fn choose_style(dtype: DType, shown: &[f64]) -> Style {
    match dtype {
        DType::Bool => return Style::Bool,
        DType::U8 | DType::I64 => return Style::Int,
        _ => {}
    }
    let finite: Vec<f64> = shown.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.iter().all(|v| v.fract() == 0.0) {
        let max = finite.iter().fold(0f64, |m, v| m.max(v.abs()));
        return if max >= 1e8 { Style::Sci } else { Style::Whole };
    }
    let nz: Vec<f64> = finite.iter().map(|v| v.abs()).filter(|&v| v != 0.0).collect();
    let max = nz.iter().copied().fold(0f64, f64::max);
    let min = nz.iter().copied().fold(f64::INFINITY, f64::min);
    if max / min > 1000.0 || max > 1e8 || min < 1e-4 {
        Style::Sci
    } else {
        Style::Fixed
    }
}

/// Indices shown along a dimension of size `n`: all, or the first and last `EDGE`.
fn shown(n: usize, summarize: bool) -> Vec<Option<usize>> {
    if summarize && n > 2 * EDGE {
        (0..EDGE).map(Some).chain(std::iter::once(None)).chain((n - EDGE..n).map(Some)).collect()
    } else {
        (0..n).map(Some).collect()
    }
}

fn collect_shown(v: &[f64], shape: &[usize], summarize: bool, out: &mut Vec<f64>) {
    if shape.is_empty() {
        out.push(v[0]);
        return;
    }
    let inner: usize = shape[1..].iter().product();
    for i in shown(shape[0], summarize).into_iter().flatten() {
        collect_shown(&v[i * inner..(i + 1) * inner], &shape[1..], summarize, out);
    }
}

fn render(v: &[f64], shape: &[usize], style: &Style, width: usize, indent: usize, summarize: bool) -> String {
    if shape.is_empty() {
        return format!("{:>width$}", fmt_value(v[0], style));
    }
    let inner: usize = shape[1..].iter().product();
    let parts: Vec<String> = shown(shape[0], summarize)
        .into_iter()
        .map(|i| match i {
            Some(i) => render(&v[i * inner..(i + 1) * inner], &shape[1..], style, width, indent + 1, summarize),
            None => {
                if shape.len() == 1 {
                    " ...".into()
                } else {
                    "...".into()
                }
            }
        })
        .collect();
    if shape.len() == 1 {
        // PyTorch wraps long rows at 80 columns; keep one row per line for simplicity only when short.
        return format!("[{}]", parts.join(", "));
    }
    let sep = format!(",{}{}", "\n".repeat(shape.len() - 1), " ".repeat(indent + 1));
    format!("[{}]", parts.join(&sep))
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = self.symbol() {
            return write!(f, "tensor(<traced {} %{}>)", s.ty, s.node.index());
        }
        let b = self.buffer();
        let v = b.to_f64_vec();
        let shape = b.shape();
        let summarize = b.numel() > THRESHOLD;
        let body = if b.numel() == 0 {
            "[]".to_string()
        } else {
            let mut vis = Vec::new();
            collect_shown(&v, shape, summarize, &mut vis);
            let style = choose_style(b.dtype(), &vis);
            let width = vis.iter().map(|&x| fmt_value(x, &style).len()).max().unwrap_or(0);
            render(&v, shape, &style, width, "tensor(".len(), summarize)
        };
        write!(f, "tensor({body}")?;
        match b.dtype() {
            DType::F32 | DType::I64 | DType::Bool => {}
            d => write!(f, ", dtype={}", d.torch_name())?,
        }
        if let Some(op_name) = self.grad_fn_name() {
            let name: String = op_name
                .split('_')
                .map(|w| {
                    let mut c = w.chars();
                    c.next().map(|h| h.to_uppercase().chain(c).collect::<String>()).unwrap_or_default()
                })
                .collect();
            write!(f, ", grad_fn=<{name}Backward0>")?;
        } else if self.requires_grad() {
            write!(f, ", requires_grad=True")?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_pytorch() {
        assert_eq!(Tensor::vec1(&[1.0, 2.0, 3.0]).to_string(), "tensor([1., 2., 3.])");
        assert_eq!(Tensor::vec1(&[1.5, -2.0]).to_string(), "tensor([ 1.5000, -2.0000])");
        assert_eq!(Tensor::from_vec(vec![1i64, 2, 3, 4], &[2, 2]).to_string(), "tensor([[1, 2],\n        [3, 4]])");
        assert_eq!(Tensor::scalar(5.0).to_string(), "tensor(5.)");
        assert_eq!(Tensor::from_vec(vec![true, false], &[2]).to_string(), "tensor([ True, False])");
        assert_eq!(Tensor::vec1(&[1e-5, 1.0]).to_string(), "tensor([1.0000e-05, 1.0000e+00])");
        let t = Tensor::zeros(&[2]).requires_grad_(true);
        assert_eq!(t.to_string(), "tensor([0., 0.], requires_grad=True)");
        assert_eq!(Tensor::from_vec(vec![0.5f64], &[1]).to_string(), "tensor([0.5000], dtype=torch.float64)");
        let s = Tensor::arange(0.0, 2000.0, 1.0).to_string();
        assert_eq!(s, "tensor([   0.,    1.,    2.,  ..., 1997., 1998., 1999.])");
    }
}
