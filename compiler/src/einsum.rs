//! `einsum` as a composite: per operand, repeated labels become diagonals (index_select on a
//! flattened pair of dims) and labels used nowhere else are summed; then operands are folded
//! pairwise into batched matmuls; finally the result is permuted to the output order.

use crate::emitter::Build;
use crate::ops::{Op, OpError, OpResult, ReduceKind};
use tracegrad_runtime::{Buffer, Dims};

fn err(msg: impl Into<String>) -> OpError {
    OpError::new("einsum", format!("einsum(): {}", msg.into()))
}

/// Parses `"ij,jk->ik"`; without `->` the output is every label used once, sorted.
fn parse(eq: &str, n: usize) -> OpResult<(Vec<Vec<char>>, Vec<char>)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    if eq.contains("...") {
        return Err(err("ellipsis ('...') in the equation is not supported"));
    }
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let ins: Vec<Vec<char>> = lhs.split(',').map(|s| s.chars().collect()).collect();
    if ins.len() != n {
        return Err(err(format!(
            "more operands were provided than specified in the equation (equation has {}, got {n})",
            ins.len()
        )));
    }
    for c in ins.iter().flatten() {
        if !c.is_ascii_alphabetic() {
            return Err(err(format!(
                "invalid subscript given at index {c:?} in the equation string, subscripts must be in [a-zA-Z]"
            )));
        }
    }
    let out: Vec<char> = match rhs {
        Some(r) => {
            let out: Vec<char> = r.chars().collect();
            for (i, c) in out.iter().enumerate() {
                if out[..i].contains(c) {
                    return Err(err(format!("output subscript {c} appears more than once in the output")));
                }
                if !ins.iter().flatten().any(|x| x == c) {
                    return Err(err(format!(
                        "output subscript {c} does not appear in the equation for any input operand"
                    )));
                }
            }
            out
        }
        None => {
            let mut once: Vec<char> = ins
                .iter()
                .flatten()
                .copied()
                .filter(|c| ins.iter().flatten().filter(|x| *x == c).count() == 1)
                .collect();
            once.sort_unstable();
            once
        }
    };
    Ok((ins, out))
}

struct Term<V> {
    v: V,
    labels: Vec<char>,
}

/// `einsum(equation, operands)`.
pub fn einsum<B: Build>(e: &mut B, equation: &str, xs: &[&B::Value]) -> OpResult<B::Value> {
    if xs.is_empty() {
        return Err(err("must provide at least one operand"));
    }
    let (ins, out) = parse(equation, xs.len())?;
    let mut sizes: Vec<(char, usize)> = Vec::new();
    let mut terms = Vec::with_capacity(xs.len());
    for (k, (x, labels)) in xs.iter().zip(&ins).enumerate() {
        let s = e.shape(x);
        if s.len() != labels.len() {
            return Err(err(format!("the number of subscripts in the equation ({}) does not match the number of dimensions ({}) for operand {k}", labels.len(), s.len())));
        }
        for (c, &d) in labels.iter().zip(s.iter()) {
            match sizes.iter().find(|(l, _)| l == c) {
                Some(&(_, n)) if n != d => {
                    return Err(err(format!(
                        "operands do not broadcast with remapped shapes: subscript {c} has size {n} and {d}"
                    )));
                }
                Some(_) => {}
                None => sizes.push((*c, d)),
            }
        }
        terms.push(Term { v: (*x).clone(), labels: labels.clone() });
    }
    for t in terms.iter_mut() {
        diagonalize(e, t)?;
    }
    // Fold left to right, summing labels as soon as nothing later needs them.
    let mut acc = terms.remove(0);
    let needed = |rest: &[Term<B::Value>], c: char| out.contains(&c) || rest.iter().any(|t| t.labels.contains(&c));
    sum_unneeded(e, &mut acc, |c| needed(&terms, c))?;
    while !terms.is_empty() {
        let mut next = terms.remove(0);
        let keep = |c: char| needed(&terms, c) || acc.labels.contains(&c);
        sum_unneeded(e, &mut next, keep)?;
        acc = contract(e, acc, next, |c| needed(&terms, c))?;
    }
    let perm: Vec<usize> =
        out.iter().map(|c| acc.labels.iter().position(|l| l == c).expect("output label present")).collect();
    e.permute(&acc.v, &perm)
}

/// Replaces each repeated label of a term by its diagonal.
fn diagonalize<B: Build>(e: &mut B, t: &mut Term<B::Value>) -> OpResult<()> {
    loop {
        let dup = t
            .labels
            .iter()
            .enumerate()
            .find_map(|(i, c)| t.labels[i + 1..].iter().position(|x| x == c).map(|j| (i, i + 1 + j)));
        let Some((p, q)) = dup else { return Ok(()) };
        let s = e.shape(&t.v);
        let n = s[p];
        let mut perm: Vec<usize> = (0..s.len()).filter(|&d| d != p && d != q).collect();
        perm.extend([p, q]);
        let moved = e.permute(&t.v, &perm)?;
        let mut flat: Vec<usize> = perm[..perm.len() - 2].iter().map(|&d| s[d]).collect();
        flat.push(n * n);
        let moved = e.reshape(&moved, &flat)?;
        let idx =
            e.constant(Buffer::from_vec((0..n as i64).map(|i| i * (n as i64 + 1)).collect::<Vec<i64>>(), &[n]))?;
        let last = flat.len() - 1;
        t.v = e.emit(Op::IndexSelect { dim: last }, &[&moved, &idx])?;
        let c = t.labels[p];
        t.labels = perm[..perm.len() - 2].iter().map(|&d| t.labels[d]).collect();
        t.labels.push(c);
    }
}

fn sum_unneeded<B: Build>(e: &mut B, t: &mut Term<B::Value>, keep: impl Fn(char) -> bool) -> OpResult<()> {
    let dims: Vec<isize> = (0..t.labels.len()).filter(|&i| !keep(t.labels[i])).map(|i| i as isize).collect();
    if dims.is_empty() {
        return Ok(());
    }
    t.v = e.reduce(ReduceKind::Sum, &t.v, &dims, false)?;
    t.labels = t.labels.iter().enumerate().filter(|(i, _)| !dims.contains(&(*i as isize))).map(|(_, &c)| c).collect();
    Ok(())
}

/// Multiplies two terms, contracting the shared labels that nothing later needs.
fn contract<B: Build>(
    e: &mut B,
    a: Term<B::Value>,
    b: Term<B::Value>,
    needed_later: impl Fn(char) -> bool,
) -> OpResult<Term<B::Value>> {
    let shared: Vec<char> = a.labels.iter().copied().filter(|c| b.labels.contains(c)).collect();
    let batch: Vec<char> = shared.iter().copied().filter(|&c| needed_later(c)).collect();
    let summed: Vec<char> = shared.iter().copied().filter(|&c| !needed_later(c)).collect();
    let left: Vec<char> = a.labels.iter().copied().filter(|c| !shared.contains(c)).collect();
    let right: Vec<char> = b.labels.iter().copied().filter(|c| !shared.contains(c)).collect();
    let size_of = |t: &Term<B::Value>, e: &B, c: char| e.shape(&t.v)[t.labels.iter().position(|&l| l == c).unwrap()];
    let prod = |t: &Term<B::Value>, e: &B, cs: &[char]| cs.iter().map(|&c| size_of(t, e, c)).product::<usize>();
    let (nb, nl, nk, nr) = (prod(&a, e, &batch), prod(&a, e, &left), prod(&a, e, &summed), prod(&b, e, &right));
    let pos = |t: &Term<B::Value>, cs: &[char]| {
        cs.iter().map(|c| t.labels.iter().position(|l| l == c).unwrap()).collect::<Vec<_>>()
    };
    let pa: Vec<usize> = [pos(&a, &batch), pos(&a, &left), pos(&a, &summed)].concat();
    let pb: Vec<usize> = [pos(&b, &batch), pos(&b, &summed), pos(&b, &right)].concat();
    let av = e.permute(&a.v, &pa)?;
    let av = e.reshape(&av, &[nb, nl, nk])?;
    let bv = e.permute(&b.v, &pb)?;
    let bv = e.reshape(&bv, &[nb, nk, nr])?;
    let y = e.matmul_t(&av, &bv, false, false)?;
    let mut shape: Dims = batch.iter().map(|&c| size_of(&a, e, c)).collect();
    shape.extend(left.iter().map(|&c| size_of(&a, e, c)));
    shape.extend(right.iter().map(|&c| size_of(&b, e, c)));
    let y = e.reshape(&y, &shape)?;
    Ok(Term { v: y, labels: [batch, left, right].concat() })
}
