//! Python's spelling of values inside module reprs (`eps=1e-05`, `affine=True`, `(3, 3)`), so
//! `extra_repr` strings read exactly as PyTorch prints them.

/// A float as Python's `repr(float)`: the shortest round-trip digits, in scientific notation
/// (`1e-05`, `1.5e+16`) when the decimal exponent is below -4 or at least 16, and with a
/// trailing `.0` for whole numbers (`1.0`).
pub(crate) fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if v != 0.0 && !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let fixed = format!("{v}");
    if fixed.contains('.') {
        fixed
    } else {
        format!("{fixed}.0")
    }
}

/// `True` / `False`.
pub(crate) fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// A tuple of integers: `(3,)`, `(3, 3)`.
pub(crate) fn py_tuple(v: &[usize]) -> String {
    match v {
        [one] => format!("({one},)"),
        _ => format!("({})", v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_read_as_python_prints_them() {
        let cases = [
            (1e-5, "1e-05"),
            (1e-3, "0.001"),
            (1e-4, "0.0001"),
            (0.1, "0.1"),
            (0.5, "0.5"),
            (1.0, "1.0"),
            (0.0, "0.0"),
            (-2.5e-7, "-2.5e-07"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123.25, "123.25"),
        ];
        for (v, want) in cases {
            assert_eq!(py_float(v), want, "{v}");
        }
    }

    #[test]
    fn tuples_and_bools() {
        assert_eq!(py_tuple(&[10]), "(10,)");
        assert_eq!(py_tuple(&[3, 3]), "(3, 3)");
        assert_eq!(py_bool(true), "True");
    }
}
