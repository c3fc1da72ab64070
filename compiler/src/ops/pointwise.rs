//! Pointwise ops: unary functions, binary arithmetic, comparisons, `where`, `clamp`, casts.
//! Each op's scalar function (the reference kernel the runtime loops call), shape rule and
//! derivative rule are written here, in that order.

use super::{jit_float, require_float, require_same_dtype, sh, Op, OpResult, Props, TensorType};
use crate::emitter::{Build, Emitter};
use num_traits::Float;
use tracegrad_runtime::kernels::pointwise::{map, zip, zip3};
use tracegrad_runtime::shape::broadcast_shapes;
use tracegrad_runtime::{dispatch, Buffer, DType, Element};

/// A float element type with the special functions the op set needs.
pub trait FloatElement: Float + Element {
    /// The error function.
    fn erf(self) -> Self;
}
impl FloatElement for f32 {
    fn erf(self) -> f32 {
        libm::erff(self)
    }
}
impl FloatElement for f64 {
    fn erf(self) -> f64 {
        libm::erf(self)
    }
}

/// Elementwise functions of one float tensor. Equality and hashing take `PowScalar`'s exponent
/// by its bits (see [`Op`]).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub enum UnaryOp {
    /// `-x` (also for integers).
    Neg,
    /// `|x|` (also for integers).
    Abs,
    /// `sign(x)`: -1, 0 or 1.
    Sign,
    /// `e^x`.
    Exp,
    /// Natural log.
    Log,
    /// Square root.
    Sqrt,
    /// `1/sqrt(x)`.
    Rsqrt,
    /// Sine.
    Sin,
    /// Cosine.
    Cos,
    /// Hyperbolic tangent.
    Tanh,
    /// `1/(1+e^-x)`.
    Sigmoid,
    /// `max(x, 0)`.
    Relu,
    /// `x·Φ(x)` (exact, erf-based).
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    /// `x·sigmoid(x)`.
    Silu,
    /// The error function.
    Erf,
    /// `x²`.
    Square,
    /// `1/x`.
    Reciprocal,
    /// `x^p` for a constant exponent.
    PowScalar(#[serde(with = "tracegrad_runtime::buffer::json_f64")] f64),
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
const GELU_TANH_C: f64 = 0.044715;

impl PartialEq for UnaryOp {
    fn eq(&self, other: &UnaryOp) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other) && self.attr_bits() == other.attr_bits()
    }
}

impl Eq for UnaryOp {}

impl std::hash::Hash for UnaryOp {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        self.attr_bits().hash(state);
    }
}

impl UnaryOp {
    /// The bits of the function's attribute (`PowScalar`'s exponent), 0 for the others.
    pub(super) fn attr_bits(self) -> u64 {
        match self {
            UnaryOp::PowScalar(p) => p.to_bits(),
            _ => 0,
        }
    }

    /// Name in errors and dumps.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Sign => "sign",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Silu => "silu",
            UnaryOp::Erf => "erf",
            UnaryOp::Square => "square",
            UnaryOp::Reciprocal => "reciprocal",
            UnaryOp::PowScalar(_) => "pow",
        }
    }

    /// Whether an integer (or bool) input is promoted to the default float type first, as
    /// PyTorch does for its transcendental functions (`torch.arange(3).exp()` is f32).
    pub fn promotes_integers(self) -> bool {
        matches!(
            self,
            UnaryOp::Exp
                | UnaryOp::Log
                | UnaryOp::Sqrt
                | UnaryOp::Rsqrt
                | UnaryOp::Sin
                | UnaryOp::Cos
                | UnaryOp::Tanh
                | UnaryOp::Sigmoid
                | UnaryOp::Erf
                | UnaryOp::Reciprocal
        )
    }

    /// Whether integer tensors are accepted.
    fn integer_ok(self) -> bool {
        matches!(self, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign | UnaryOp::Square | UnaryOp::Relu)
    }

    /// The scalar function (the reference kernel).
    #[inline(always)]
    pub fn apply<T: FloatElement>(self, x: T) -> T {
        let c = |v: f64| T::from(v).unwrap();
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sign => {
                if x > T::zero() {
                    T::one()
                } else if x < T::zero() {
                    -T::one()
                } else {
                    x * T::zero() // keeps NaN
                }
            }
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => T::one() / x.sqrt(),
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => T::one() / (T::one() + (-x).exp()),
            UnaryOp::Relu => {
                if x > T::zero() || x.is_nan() {
                    x
                } else {
                    T::zero()
                }
            }
            UnaryOp::Gelu => c(0.5) * x * (T::one() + (x * c(FRAC_1_SQRT_2)).erf()),
            UnaryOp::GeluTanh => {
                c(0.5) * x * (T::one() + (c(SQRT_2_OVER_PI) * (x + c(GELU_TANH_C) * x * x * x)).tanh())
            }
            UnaryOp::Silu => x / (T::one() + (-x).exp()),
            UnaryOp::Erf => x.erf(),
            UnaryOp::Square => x * x,
            UnaryOp::Reciprocal => T::one() / x,
            UnaryOp::PowScalar(p) => {
                if p == 2.0 {
                    x * x
                } else {
                    x.powf(c(p))
                }
            }
        }
    }

    fn apply_i64(self, x: i64) -> i64 {
        match self {
            UnaryOp::Neg => x.wrapping_neg(),
            UnaryOp::Abs => x.wrapping_abs(),
            UnaryOp::Sign => x.signum(),
            UnaryOp::Square => x.wrapping_mul(x),
            UnaryOp::Relu => x.max(0),
            _ => unreachable!("checked by the shape rule"),
        }
    }
}

/// Elementwise arithmetic of two tensors of one dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b` (floats only).
    Div,
    /// Elementwise maximum (NaN propagates).
    Maximum,
    /// Elementwise minimum (NaN propagates).
    Minimum,
    /// `a ^ b` (floats only).
    Pow,
}

impl BinaryOp {
    /// Name in errors and dumps.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::Pow => "pow",
        }
    }

    /// The scalar function for floats.
    #[inline(always)]
    pub fn apply<T: FloatElement>(self, a: T, b: T) -> T {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Maximum => extremum(a, b, true),
            BinaryOp::Minimum => extremum(a, b, false),
            BinaryOp::Pow => a.powf(b),
        }
    }

    fn apply_int<T: Copy + Ord + num_traits::WrappingAdd + num_traits::WrappingSub + num_traits::WrappingMul>(
        self,
        a: T,
        b: T,
    ) -> T {
        match self {
            BinaryOp::Add => a.wrapping_add(&b),
            BinaryOp::Sub => a.wrapping_sub(&b),
            BinaryOp::Mul => a.wrapping_mul(&b),
            BinaryOp::Maximum => a.max(b),
            BinaryOp::Minimum => a.min(b),
            BinaryOp::Div | BinaryOp::Pow => unreachable!("checked by the shape rule"),
        }
    }
}

/// IEEE 754-2019 maximum (`max`) or minimum: NaN propagates and -0 < +0, as the JIT's kernels.
#[inline(always)]
fn extremum<T: FloatElement>(a: T, b: T, max: bool) -> T {
    if a.is_nan() || b.is_nan() {
        T::nan()
    } else if a == b {
        // Equal values differ at most in the sign of zero: the maximum is the non-negative one.
        if a.is_sign_negative() == max {
            b
        } else {
            a
        }
    } else if max {
        a.max(b)
    } else {
        a.min(b)
    }
}

/// Elementwise comparisons; the result is bool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CompareOp {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

impl CompareOp {
    /// Name in errors and dumps.
    pub fn name(self) -> &'static str {
        match self {
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
        }
    }

    /// The predicate.
    pub fn apply<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            CompareOp::Eq => a == b,
            CompareOp::Ne => a != b,
            CompareOp::Lt => a < b,
            CompareOp::Le => a <= b,
            CompareOp::Gt => a > b,
            CompareOp::Ge => a >= b,
        }
    }
}

pub(super) fn infer(op: &Op, t: &[TensorType]) -> Result<TensorType, String> {
    let name = op.name();
    match op {
        Op::Unary(u) => {
            if !(t[0].dtype.is_float() || (u.integer_ok() && t[0].dtype == DType::I64)) {
                return Err(format!("{name}: not implemented for {} tensors (shape {})", t[0].dtype, sh(&t[0].shape)));
            }
            Ok(t[0].clone())
        }
        Op::Binary(b) => {
            require_same_dtype(name, &t[0], &t[1])?;
            let float_only = matches!(b, BinaryOp::Div | BinaryOp::Pow);
            let ok = t[0].dtype.is_float() || (!float_only && matches!(t[0].dtype, DType::I64 | DType::U8));
            if !ok {
                return Err(format!(
                    "{name}: not implemented for {} tensors (shapes {} and {})",
                    t[0].dtype,
                    sh(&t[0].shape),
                    sh(&t[1].shape)
                ));
            }
            Ok(TensorType { dtype: t[0].dtype, shape: broadcast_shapes(name, &t[0].shape, &t[1].shape)? })
        }
        Op::Compare(_) => {
            require_same_dtype(name, &t[0], &t[1])?;
            Ok(TensorType { dtype: DType::Bool, shape: broadcast_shapes(name, &t[0].shape, &t[1].shape)? })
        }
        Op::Where => {
            if t[0].dtype != DType::Bool {
                return Err(format!(
                    "where: expected condition to be a bool tensor, but got {} of shape {}",
                    t[0].dtype,
                    sh(&t[0].shape)
                ));
            }
            require_same_dtype(name, &t[1], &t[2])?;
            let s = broadcast_shapes(name, &t[1].shape, &t[2].shape)?;
            Ok(TensorType { dtype: t[1].dtype, shape: broadcast_shapes(name, &t[0].shape, &s)? })
        }
        Op::Clamp { min, max } => {
            if min.is_none() && max.is_none() {
                return Err("clamp: At least one of 'min' or 'max' must not be None".into());
            }
            require_float(name, &t[0])?;
            Ok(t[0].clone())
        }
        Op::Cast(d) => Ok(TensorType { dtype: *d, shape: t[0].shape.clone() }),
        _ => unreachable!(),
    }
}

pub(super) fn eval(op: &Op, x: &[&Buffer], out: &TensorType) -> Buffer {
    let shape = &out.shape;
    match op {
        Op::Unary(u) => {
            let u = *u;
            match x[0].data() {
                tracegrad_runtime::Data::I64(v) => Buffer::from_vec(map(v, |a| u.apply_i64(a)), shape),
                d => dispatch!(float, d, u.name(), |v: T| {
                    // One element loop per op, the op a constant inside it (as for binary ops),
                    // so the loop does not dispatch on the op per element and can vectorize.
                    macro_rules! per_op {
                        ($($op:ident),*) => {
                            match u {
                                $(UnaryOp::$op => map(v, |a: T| UnaryOp::$op.apply(a)),)*
                                UnaryOp::PowScalar(e) => map(v, |a: T| UnaryOp::PowScalar(e).apply(a)),
                            }
                        };
                    }
                    let out = per_op!(
                        Neg, Abs, Sign, Exp, Log, Sqrt, Rsqrt, Sin, Cos, Tanh, Sigmoid, Relu, Gelu, GeluTanh, Silu,
                        Erf, Square, Reciprocal
                    );
                    Buffer::from_vec(out, shape)
                }),
            }
        }
        Op::Binary(b) => {
            let b = *b;
            let (sa, sb) = (x[0].shape(), x[1].shape());
            match (x[0].data(), x[1].data()) {
                (tracegrad_runtime::Data::I64(p), tracegrad_runtime::Data::I64(q)) => {
                    Buffer::from_vec(zip(p, sa, q, sb, shape, |a, c| b.apply_int(a, c)), shape)
                }
                (tracegrad_runtime::Data::U8(p), tracegrad_runtime::Data::U8(q)) => {
                    Buffer::from_vec(zip(p, sa, q, sb, shape, |a, c| b.apply_int(a, c)), shape)
                }
                (d, _) => dispatch!(float, d, b.name(), |p: T| {
                    let q = x[1].as_slice::<T>();
                    // One element loop per op, the op a constant inside it, so the loop does
                    // not dispatch on the op per element.
                    macro_rules! per_op {
                        ($($op:ident),*) => {
                            match b {
                                $(BinaryOp::$op => zip(p, sa, q, sb, shape, |a: T, c: T| BinaryOp::$op.apply(a, c)),)*
                            }
                        };
                    }
                    Buffer::from_vec(per_op!(Add, Sub, Mul, Div, Maximum, Minimum, Pow), shape)
                }),
            }
        }
        Op::Compare(c) => {
            let c = *c;
            dispatch!(all, x[0].data(), |p: T| {
                let q = x[1].as_slice::<T>();
                Buffer::from_vec(zip(p, x[0].shape(), q, x[1].shape(), shape, |a: T, b: T| c.apply(a, b)), shape)
            })
        }
        Op::Where => {
            let cond = x[0].as_slice::<bool>();
            dispatch!(all, x[1].data(), |p: T| {
                let q = x[2].as_slice::<T>();
                let v = zip3(
                    cond,
                    x[0].shape(),
                    p,
                    x[1].shape(),
                    q,
                    x[2].shape(),
                    shape,
                    |c, a: T, b: T| if c { a } else { b },
                );
                Buffer::from_vec(v, shape)
            })
        }
        Op::Clamp { min, max } => dispatch!(float, x[0].data(), "clamp", |v: T| {
            let lo = min.map(<T as Element>::from_f64);
            let hi = max.map(<T as Element>::from_f64);
            Buffer::from_vec(
                map(v, |a: T| {
                    if a.is_nan() {
                        return a;
                    }
                    let a = match lo {
                        Some(l) if a < l => l,
                        _ => a,
                    };
                    match hi {
                        Some(h) if a > h => h,
                        _ => a,
                    }
                }),
                shape,
            )
        }),
        Op::Cast(d) => x[0].cast(*d),
        _ => unreachable!(),
    }
}

pub(super) fn vjp<E: Emitter>(
    op: &Op,
    e: &mut E,
    x: &[&E::Value],
    y: &E::Value,
    g: &E::Value,
) -> OpResult<Vec<Option<E::Value>>> {
    let one = |e: &mut E, like: &E::Value| e.scalar(1.0, e.dtype(like));
    let gx = match op {
        Op::Unary(u) => {
            let a = x[0];
            let d = match u {
                UnaryOp::Neg => return Ok(vec![Some(e.neg(g)?)]),
                UnaryOp::Abs => {
                    let s = e.unary(UnaryOp::Sign, a)?;
                    return Ok(vec![Some(e.mul(g, &s)?)]);
                }
                // sign is piecewise constant: its derivative is zero almost everywhere (as in PyTorch).
                UnaryOp::Sign => return Ok(vec![Some(e.zeros_like(g)?)]),
                UnaryOp::Exp => y.clone(),
                UnaryOp::Log => return Ok(vec![Some(e.div(g, a)?)]),
                UnaryOp::Sqrt => {
                    let t = e.mul_scalar(y, 2.0)?;
                    return Ok(vec![Some(e.div(g, &t)?)]);
                }
                UnaryOp::Rsqrt => {
                    // d/dx x^-1/2 = -1/2 y^3
                    let y2 = e.mul(y, y)?;
                    let y3 = e.mul(&y2, y)?;
                    e.mul_scalar(&y3, -0.5)?
                }
                UnaryOp::Sin => e.unary(UnaryOp::Cos, a)?,
                UnaryOp::Cos => {
                    let s = e.unary(UnaryOp::Sin, a)?;
                    e.neg(&s)?
                }
                UnaryOp::Tanh => {
                    let y2 = e.mul(y, y)?;
                    let o = one(e, y)?;
                    e.sub(&o, &y2)?
                }
                UnaryOp::Sigmoid => {
                    let o = one(e, y)?;
                    let t = e.sub(&o, y)?;
                    e.mul(y, &t)?
                }
                UnaryOp::Relu => {
                    let z = e.scalar(0.0, e.dtype(a))?;
                    let m = e.compare(CompareOp::Gt, a, &z)?;
                    let zg = e.zeros_like(g)?;
                    return Ok(vec![Some(e.where_(&m, g, &zg)?)]);
                }
                UnaryOp::Gelu => {
                    // Φ(x) + x·φ(x), with Φ(x) = ½(1 + erf(x/√2)), φ(x) = e^{-x²/2}/√(2π).
                    let xs = e.mul_scalar(a, FRAC_1_SQRT_2)?;
                    let erf = e.unary(UnaryOp::Erf, &xs)?;
                    let cdf = e.add_scalar(&erf, 1.0)?;
                    let cdf = e.mul_scalar(&cdf, 0.5)?;
                    let x2 = e.mul(a, a)?;
                    let ex = e.mul_scalar(&x2, -0.5)?;
                    let pdf = e.unary(UnaryOp::Exp, &ex)?;
                    let pdf = e.mul_scalar(&pdf, 1.0 / (2.0 * std::f64::consts::PI).sqrt())?;
                    let xp = e.mul(a, &pdf)?;
                    e.add(&cdf, &xp)?
                }
                UnaryOp::GeluTanh => {
                    // u = k(x + c x³); y = ½x(1+tanh u); y' = ½(1+t) + ½x(1-t²)·k(1+3c x²)
                    let x2 = e.mul(a, a)?;
                    let x3 = e.mul(&x2, a)?;
                    let cx3 = e.mul_scalar(&x3, GELU_TANH_C)?;
                    let inner = e.add(a, &cx3)?;
                    let u = e.mul_scalar(&inner, SQRT_2_OVER_PI)?;
                    let t = e.unary(UnaryOp::Tanh, &u)?;
                    let left = e.add_scalar(&t, 1.0)?;
                    let left = e.mul_scalar(&left, 0.5)?;
                    let t2 = e.mul(&t, &t)?;
                    let o = one(e, &t)?;
                    let sech2 = e.sub(&o, &t2)?;
                    let du = e.mul_scalar(&x2, 3.0 * GELU_TANH_C)?;
                    let du = e.add_scalar(&du, 1.0)?;
                    let du = e.mul_scalar(&du, SQRT_2_OVER_PI)?;
                    let right = e.mul(&sech2, &du)?;
                    let right = e.mul(&right, a)?;
                    let right = e.mul_scalar(&right, 0.5)?;
                    e.add(&left, &right)?
                }
                UnaryOp::Silu => {
                    // s(1 + x(1 - s))
                    let s = e.unary(UnaryOp::Sigmoid, a)?;
                    let o = one(e, &s)?;
                    let oms = e.sub(&o, &s)?;
                    let t = e.mul(a, &oms)?;
                    let t = e.add_scalar(&t, 1.0)?;
                    e.mul(&s, &t)?
                }
                UnaryOp::Erf => {
                    let x2 = e.mul(a, a)?;
                    let nx2 = e.neg(&x2)?;
                    let ex = e.unary(UnaryOp::Exp, &nx2)?;
                    e.mul_scalar(&ex, 2.0 / std::f64::consts::PI.sqrt())?
                }
                UnaryOp::Square => e.mul_scalar(a, 2.0)?,
                UnaryOp::Reciprocal => {
                    let y2 = e.mul(y, y)?;
                    e.neg(&y2)?
                }
                UnaryOp::PowScalar(p) => {
                    if *p == 0.0 {
                        return Ok(vec![Some(e.zeros_like(g)?)]);
                    }
                    let pm = e.unary(UnaryOp::PowScalar(p - 1.0), a)?;
                    e.mul_scalar(&pm, *p)?
                }
            };
            vec![Some(e.mul(g, &d)?)]
        }
        Op::Binary(b) => {
            let (a, c) = (x[0], x[1]);
            let (ga, gc) = match b {
                BinaryOp::Add => (g.clone(), g.clone()),
                BinaryOp::Sub => (g.clone(), e.neg(g)?),
                BinaryOp::Mul => (e.mul(g, c)?, e.mul(g, a)?),
                BinaryOp::Div => {
                    let ga = e.div(g, c)?;
                    let t = e.div(y, c)?;
                    let t = e.mul(g, &t)?;
                    (ga, e.neg(&t)?)
                }
                BinaryOp::Maximum | BinaryOp::Minimum => {
                    // Ties split the gradient evenly, as in PyTorch.
                    let win = if *b == BinaryOp::Maximum { CompareOp::Gt } else { CompareOp::Lt };
                    let dt = e.dtype(g);
                    let ma = e.compare(win, a, c)?;
                    let ma = e.cast(&ma, dt)?;
                    let mc = e.compare(win, c, a)?;
                    let mc = e.cast(&mc, dt)?;
                    let eq = e.compare(CompareOp::Eq, a, c)?;
                    let eq = e.cast(&eq, dt)?;
                    let half = e.mul_scalar(&eq, 0.5)?;
                    let wa = e.add(&ma, &half)?;
                    let wc = e.add(&mc, &half)?;
                    (e.mul(g, &wa)?, e.mul(g, &wc)?)
                }
                BinaryOp::Pow => {
                    // d/da a^c = c·a^(c-1); d/dc a^c = a^c·ln a. As in PyTorch, the first is 0
                    // where c == 0 (not 0·0^-1 = NaN at a == 0) and the second is 0 where
                    // a == 0 and c >= 0 (not 0·ln 0 = NaN).
                    let z = e.scalar(0.0, e.dtype(a))?;
                    let cm1 = e.add_scalar(c, -1.0)?;
                    let p = e.binary(BinaryOp::Pow, a, &cm1)?;
                    let da = e.mul(c, &p)?;
                    let c_zero = e.compare(CompareOp::Eq, c, &z)?;
                    let da = e.where_(&c_zero, &z, &da)?;
                    let la = e.unary(UnaryOp::Log, a)?;
                    let dc = e.mul(y, &la)?;
                    let a_zero = e.compare(CompareOp::Eq, a, &z)?;
                    let c_nonneg = e.compare(CompareOp::Ge, c, &z)?;
                    let masked = e.where_(&c_nonneg, &z, &dc)?;
                    let dc = e.where_(&a_zero, &masked, &dc)?;
                    (e.mul(g, &da)?, e.mul(g, &dc)?)
                }
            };
            let sa = e.shape(a);
            let sc = e.shape(c);
            vec![Some(e.sum_to(&ga, &sa)?), Some(e.sum_to(&gc, &sc)?)]
        }
        Op::Compare(_) => vec![None, None],
        Op::Where => where_vjp(e, x, g, [true, true])?,
        Op::Clamp { min, max } => {
            // The gradient passes where min <= x <= max (inclusive, as PyTorch).
            let a = x[0];
            let dt = e.dtype(a);
            let mut mask: Option<E::Value> = None;
            for (bound, cmp) in [(min, CompareOp::Ge), (max, CompareOp::Le)] {
                if let Some(v) = bound {
                    let s = e.scalar(*v, dt)?;
                    let m = e.compare(cmp, a, &s)?;
                    let m = e.cast(&m, dt)?;
                    mask = Some(match mask {
                        None => m,
                        Some(prev) => e.mul(&prev, &m)?,
                    });
                }
            }
            let m = mask.expect("clamp has a bound");
            vec![Some(e.mul(g, &m)?)]
        }
        Op::Cast(_) => {
            let from = e.dtype(x[0]);
            if from.is_float() {
                vec![Some(e.cast(g, from)?)]
            } else {
                vec![None]
            }
        }
        _ => unreachable!(),
    };
    Ok(gx)
}

/// Pointwise ops are elementwise, cheap to recompute, never fail and map uniform operands to
/// a uniform result.
pub(super) fn props(_op: &Op) -> Props {
    Props { elementwise: true, cheap: true, fallible: false, preserves_uniform: true }
}

/// Which pointwise ops and dtypes the JIT lowers (floats; no sin/cos/pow, which it has no
/// vector code for; casts between a float and itself or bool).
pub(super) fn jit_lowerable(op: &Op, operands: &[DType], out: DType) -> bool {
    let all_float = operands.iter().all(|&d| jit_float(d));
    match op {
        Op::Unary(u) => jit_float(out) && all_float && !matches!(u, UnaryOp::Sin | UnaryOp::Cos),
        Op::Binary(b) => jit_float(out) && all_float && *b != BinaryOp::Pow,
        Op::Compare(_) => all_float,
        Op::Where => match operands {
            [cond, values @ ..] => jit_float(out) && *cond == DType::Bool && values.iter().all(|&d| jit_float(d)),
            [] => false,
        },
        Op::Clamp { .. } => jit_float(out),
        Op::Cast(to) => match operands {
            [from] => {
                (jit_float(*to) && (from == to || *from == DType::Bool)) || (*to == DType::Bool && jit_float(*from))
            }
            _ => false,
        },
        _ => false,
    }
}

/// `where(c, a, b)`'s gradients for `a` and `b`, those `needs` asks for: the output gradient
/// where the condition picks the operand, zero elsewhere (a scalar zero, broadcast, not a
/// zero tensor), summed back to the operand's shape.
pub(super) fn where_vjp<E: Emitter>(
    e: &mut E,
    x: &[&E::Value],
    g: &E::Value,
    needs: [bool; 2],
) -> OpResult<Vec<Option<E::Value>>> {
    let z = e.scalar(0.0, e.dtype(g))?;
    let ga = if needs[0] {
        let ga = e.where_(x[0], g, &z)?;
        let sa = e.shape(x[1]);
        Some(e.sum_to(&ga, &sa)?)
    } else {
        None
    };
    let gb = if needs[1] {
        let gb = e.where_(x[0], &z, g)?;
        let sb = e.shape(x[2]);
        Some(e.sum_to(&gb, &sb)?)
    } else {
        None
    };
    Ok(vec![None, ga, gb])
}
