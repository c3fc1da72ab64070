//! Property test: for random broadcast-compatible shape pairs, `add`, `sub` and `mul` equal a
//! naive reference computed by explicit index arithmetic, and their gradients have the input
//! shapes and equal the naive reduced sums.

use proptest::prelude::*;
use tracegrad::Tensor;

/// The NumPy broadcast of two shapes (assumed compatible).
fn broadcast(a: &[usize], b: &[usize]) -> Vec<usize> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            assert!(da == db || da == 1 || db == 1);
            da.max(db)
        })
        .collect()
}

/// The multi-index of linear position `p` in `shape` (row-major).
fn unravel(mut p: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = p % shape[d];
        p /= shape[d];
    }
    idx
}

/// The linear position, in an operand of shape `src`, read by output multi-index `out_idx`:
/// leading output dims are dropped and size-1 dims read index 0.
fn source_position(out_idx: &[usize], src: &[usize]) -> usize {
    let off = out_idx.len() - src.len();
    let mut p = 0;
    for (d, &n) in src.iter().enumerate() {
        let i = if n == 1 { 0 } else { out_idx[d + off] };
        p = p * n + i;
    }
    p
}

#[derive(Debug, Clone)]
struct Case {
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
    a: Vec<f64>,
    b: Vec<f64>,
    w: Vec<f64>,
}

/// An output shape of rank 0..=4, then each operand keeps a suffix of it with some dims set
/// to 1; values for both operands and for the loss weights.
fn case() -> impl Strategy<Value = Case> {
    (prop::collection::vec(1usize..=4, 0..=4), any::<u64>(), any::<u64>(), 0usize..=4, 0usize..=4)
        .prop_map(|(out, ma, mb, da, db)| {
            let derive = |mask: u64, drop: usize| -> Vec<usize> {
                let drop = drop.min(out.len());
                out[drop..].iter().enumerate().map(|(i, &n)| if mask >> i & 1 == 1 { 1 } else { n }).collect()
            };
            (derive(ma, da), derive(mb, db))
        })
        .prop_flat_map(|(a_shape, b_shape)| {
            let (na, nb) = (a_shape.iter().product::<usize>(), b_shape.iter().product::<usize>());
            let no = broadcast(&a_shape, &b_shape).iter().product::<usize>();
            (
                Just(a_shape),
                Just(b_shape),
                prop::collection::vec(-10.0f64..10.0, na),
                prop::collection::vec(-10.0f64..10.0, nb),
                prop::collection::vec(-2.0f64..2.0, no),
            )
        })
        .prop_map(|(a_shape, b_shape, a, b, w)| Case { a_shape, b_shape, a, b, w })
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Add,
    Sub,
    Mul,
}

fn close(x: f64, y: f64) -> bool {
    (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0)
}

fn check(c: &Case, kind: Kind) -> Result<(), TestCaseError> {
    let out_shape = broadcast(&c.a_shape, &c.b_shape);
    let n: usize = out_shape.iter().product();

    // Naive forward and gradients: loss = Σ_p w[p] · f(a[pa], b[pb]).
    let mut want = vec![0.0; n];
    let mut ga = vec![0.0; c.a.len()];
    let mut gb = vec![0.0; c.b.len()];
    for (p, slot) in want.iter_mut().enumerate() {
        let idx = unravel(p, &out_shape);
        let (pa, pb) = (source_position(&idx, &c.a_shape), source_position(&idx, &c.b_shape));
        let (x, y, w) = (c.a[pa], c.b[pb], c.w[p]);
        let (v, dx, dy) = match kind {
            Kind::Add => (x + y, 1.0, 1.0),
            Kind::Sub => (x - y, 1.0, -1.0),
            Kind::Mul => (x * y, y, x),
        };
        *slot = v;
        ga[pa] += w * dx;
        gb[pb] += w * dy;
    }

    let a = Tensor::from_vec(c.a.clone(), &c.a_shape).requires_grad_(true);
    let b = Tensor::from_vec(c.b.clone(), &c.b_shape).requires_grad_(true);
    let out = match kind {
        Kind::Add => a.add(&b),
        Kind::Sub => a.sub(&b),
        Kind::Mul => a.mul(&b),
    };
    prop_assert_eq!(out.shape(), out_shape.clone());
    let got = out.to_vec_f64();
    for (p, (x, y)) in got.iter().zip(&want).enumerate() {
        prop_assert!(x == y, "{:?} element {} (index {:?}): got {}, want {}", kind, p, unravel(p, &out_shape), x, y);
    }

    out.mul(&Tensor::from_vec(c.w.clone(), &out_shape)).sum_all().backward();
    let (gat, gbt) = (a.grad().expect("grad of a"), b.grad().expect("grad of b"));
    prop_assert_eq!(gat.shape(), c.a_shape.clone());
    prop_assert_eq!(gbt.shape(), c.b_shape.clone());
    for (x, y) in gat.to_vec_f64().iter().zip(&ga) {
        prop_assert!(close(*x, *y), "{:?} grad a: got {}, want {}", kind, x, y);
    }
    for (x, y) in gbt.to_vec_f64().iter().zip(&gb) {
        prop_assert!(close(*x, *y), "{:?} grad b: got {}, want {}", kind, x, y);
    }
    Ok(())
}

/// `ci` cases (the CI count), or `PROPTEST_CASES` when set: the README's "Tests" section runs
/// the suites at 100 000 cases this way (an explicit `cases` would otherwise ignore it).
fn cases_or(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(ci)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases_or(256), ..ProptestConfig::default() })]

    #[test]
    fn add_broadcasts_like_the_reference(c in case()) {
        check(&c, Kind::Add)?;
    }

    #[test]
    fn sub_broadcasts_like_the_reference(c in case()) {
        check(&c, Kind::Sub)?;
    }

    #[test]
    fn mul_broadcasts_like_the_reference(c in case()) {
        check(&c, Kind::Mul)?;
    }
}

#[test]
fn reference_helpers_agree_with_a_hand_computed_case() {
    // [3, 1] + [4]: out[i][j] = a[i] + b[j].
    assert_eq!(broadcast(&[3, 1], &[4]), vec![3, 4]);
    assert_eq!(source_position(&[2, 3], &[3, 1]), 2);
    assert_eq!(source_position(&[2, 3], &[4]), 3);
    assert_eq!(unravel(7, &[3, 4]), vec![1, 3]);
    let c = Case {
        a_shape: vec![3, 1],
        b_shape: vec![4],
        a: vec![0.0, 10.0, 20.0],
        b: vec![1.0, 2.0, 3.0, 4.0],
        w: vec![1.0; 12],
    };
    check(&c, Kind::Add).unwrap();
    check(&c, Kind::Mul).unwrap();
}
