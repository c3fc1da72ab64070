//! Graph passes behind one interface, run by a [`PassManager`] that times each pass and (in
//! tests and debug builds) validates the graph after each one.
//!
//! Callback nodes are barriers: no pass removes, reorders, merges or folds through them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracegrad_runtime::Buffer;

use crate::graph::{Graph, NodeId, NodeKind};
use crate::ops::{BinaryOp, Op, OpError, OpResult, TensorType};

/// A graph-to-graph transformation.
pub trait Pass {
    /// Name shown in timings and dumps.
    fn name(&self) -> &'static str;
    /// Rewrites `g`; returns whether anything changed.
    fn run(&self, g: &mut Graph) -> OpResult<bool>;
}

/// One pass execution, as the manager recorded it.
#[derive(Clone, Debug)]
pub struct PassTiming {
    /// Which pass.
    pub name: &'static str,
    /// How long it took.
    pub time: Duration,
    /// Whether it changed the graph.
    pub changed: bool,
    /// Node count after it ran.
    pub nodes_after: usize,
}

/// Runs passes in order, repeating the whole list until nothing changes (at most
/// `max_rounds`), timing each run.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    /// Validate after every pass (on in tests and debug builds).
    pub validate: bool,
    /// Upper bound on fix-point rounds.
    pub max_rounds: usize,
    /// What ran, in order.
    pub timings: Vec<PassTiming>,
}

impl PassManager {
    /// The standard pipeline: simplify, fold, CSE, DCE.
    pub fn standard() -> PassManager {
        PassManager::new(vec![Box::new(AlgebraicSimplify), Box::new(ConstantFold), Box::new(Cse), Box::new(Dce)])
    }

    /// A manager for `passes`.
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager { passes, validate: cfg!(debug_assertions), max_rounds: 8, timings: Vec::new() }
    }

    /// Runs the passes to a fix point.
    pub fn run(&mut self, g: &mut Graph) -> OpResult<()> {
        for _ in 0..self.max_rounds {
            let mut any = false;
            for p in &self.passes {
                let t0 = Instant::now();
                let changed = p.run(g)?;
                self.timings.push(PassTiming {
                    name: p.name(),
                    time: t0.elapsed(),
                    changed,
                    nodes_after: g.node_count(),
                });
                if self.validate {
                    g.validate()
                        .map_err(|e| OpError::new(p.name(), format!("graph invalid after {}: {e}", p.name())))?;
                }
                any |= changed;
            }
            if !any {
                break;
            }
        }
        Ok(())
    }

    /// The timings as a table, for dumps.
    pub fn report(&self) -> String {
        self.timings
            .iter()
            .map(|t| {
                format!(
                    "{:<12} {:>9.3} ms  {:<9} {} nodes",
                    t.name,
                    t.time.as_secs_f64() * 1e3,
                    if t.changed { "changed" } else { "" },
                    t.nodes_after
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Dead-code elimination: drops op nodes no output (or callback) depends on.
pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn run(&self, g: &mut Graph) -> OpResult<bool> {
        let mut roots: Vec<NodeId> = g.outputs.iter().map(|(_, o)| *o).collect();
        roots.extend(g.node_ids().filter(|&n| g.is_callback(n)));
        roots.extend(g.inputs.iter().copied());
        let live = g.ancestors(&roots);
        let dead: Vec<NodeId> = g.node_ids().filter(|n| !live.contains(n)).collect();
        for &n in &dead {
            g.remove_node(n);
        }
        Ok(!dead.is_empty())
    }
}

/// Common-subexpression elimination over op nodes (callbacks and inputs never merge).
pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }
    fn run(&self, g: &mut Graph) -> OpResult<bool> {
        let order = g.topo_order().map_err(|e| OpError::new("cse", e))?;
        let mut seen: HashMap<(Op, Vec<NodeId>), NodeId> = HashMap::new();
        let mut changed = false;
        for n in order {
            let NodeKind::Op(op) = g.kind(n) else { continue };
            // Big literals are not worth hashing; they are rare and not duplicated by tracing.
            if matches!(op, Op::Constant(b) if b.numel() > 64) {
                continue;
            }
            // Op equality is exact (floats and literal data by their bits).
            let key = (op.clone(), g.operands(n));
            match seen.get(&key) {
                Some(&first) => {
                    g.replace_all_uses(n, first);
                    changed = true;
                }
                None => {
                    seen.insert(key, n);
                }
            }
        }
        Ok(changed)
    }
}

/// The value of a node if it is a compile-time constant: `Full` (uniform) or `Constant`.
fn constant_of(g: &Graph, n: NodeId) -> Option<Buffer> {
    match g.kind(n) {
        NodeKind::Op(Op::Full { value, dtype, shape }) => Some(Buffer::full(*value, *dtype, shape)),
        NodeKind::Op(Op::Constant(b)) => Some(b.clone()),
        _ => None,
    }
}

fn uniform_value(g: &Graph, n: NodeId) -> Option<f64> {
    match g.kind(n) {
        NodeKind::Op(Op::Full { value, .. }) => Some(*value),
        _ => None,
    }
}

/// Replaces `n` by a new node computing `op` over `operands`, attributed to `n`'s module:
/// every use of `n` reads the new node.
fn replace_with(g: &mut Graph, n: NodeId, op: Op, operands: &[NodeId]) -> OpResult<()> {
    let node = g.node(n);
    g.scope.push((node.path.clone(), node.module_type.clone()));
    let r = g.add_op(op, operands);
    g.scope.pop();
    g.replace_all_uses(n, r?);
    Ok(())
}

/// Largest folded literal (elements); bigger results of uniform inputs stay `Full`.
const FOLD_LIMIT: usize = 4096;

/// Constant folding: an op whose operands are all constants becomes a constant. Uniform
/// (`Full`) inputs to shape-preserving pointwise ops fold to `Full` at any size.
pub struct ConstantFold;

impl Pass for ConstantFold {
    fn name(&self) -> &'static str {
        "const-fold"
    }
    fn run(&self, g: &mut Graph) -> OpResult<bool> {
        let order = g.topo_order().map_err(|e| OpError::new("const-fold", e))?;
        let mut changed = false;
        for n in order {
            let NodeKind::Op(op) = g.kind(n).clone() else { continue };
            if matches!(op, Op::Full { .. } | Op::Constant(_)) || op.arity() == Some(0) {
                continue;
            }
            let operands = g.operands(n);
            if operands.is_empty() {
                continue;
            }
            let ty = g.ty(n).clone();
            let folded = if op.preserves_uniform() && operands.iter().all(|&o| uniform_value(g, o).is_some()) {
                // Evaluate on one element of each operand, then broadcast the scalar.
                let scalars: Vec<Buffer> =
                    operands.iter().map(|&o| Buffer::scalar(uniform_value(g, o).unwrap(), g.ty(o).dtype)).collect();
                let types: Vec<TensorType> = scalars.iter().map(TensorType::of).collect();
                // An elementwise op is evaluated once; a layout op passes the value through.
                let v = if op.is_elementwise() {
                    let t = op.infer(&types)?;
                    op.eval(&scalars.iter().collect::<Vec<_>>(), &t)?.item()
                } else {
                    scalars[0].item()
                };
                Some(Op::Full { value: v, dtype: ty.dtype, shape: ty.shape.clone() })
            } else if ty.numel() <= FOLD_LIMIT {
                let consts: Option<Vec<Buffer>> = operands.iter().map(|&o| constant_of(g, o)).collect();
                match consts {
                    Some(c) => {
                        let v = op.eval(&c.iter().collect::<Vec<_>>(), &ty)?;
                        Some(Op::Constant(v))
                    }
                    None => None,
                }
            } else {
                None
            };
            if let Some(new_op) = folded {
                replace_with(g, n, new_op, &[])?;
                changed = true;
            }
        }
        Ok(changed)
    }
}

/// Algebraic simplification: `x*1`, `x+0`, `x-0`, `x/1` → `x`; permute∘permute → one permute
/// (or nothing); reshape chains → one reshape; no-op reshape/expand/permute → `x`. A rewrite
/// applies only when the result has exactly `x`'s type (broadcasting can change it).
pub struct AlgebraicSimplify;

impl Pass for AlgebraicSimplify {
    fn name(&self) -> &'static str {
        "simplify"
    }
    fn run(&self, g: &mut Graph) -> OpResult<bool> {
        let order = g.topo_order().map_err(|e| OpError::new("simplify", e))?;
        let mut changed = false;
        for n in order {
            if !g.contains(n) {
                continue;
            }
            let NodeKind::Op(op) = g.kind(n).clone() else { continue };
            let ops = g.operands(n);
            let ty = g.ty(n).clone();
            let same = |g: &Graph, x: NodeId| *g.ty(x) == ty;
            let identity: Option<NodeId> = match &op {
                Op::Binary(b) => {
                    let (x, y) = (ops[0], ops[1]);
                    let (ux, uy) = (uniform_value(g, x), uniform_value(g, y));
                    match b {
                        BinaryOp::Mul if uy == Some(1.0) && same(g, x) => Some(x),
                        BinaryOp::Mul if ux == Some(1.0) && same(g, y) => Some(y),
                        BinaryOp::Add if uy == Some(0.0) && same(g, x) => Some(x),
                        BinaryOp::Add if ux == Some(0.0) && same(g, y) => Some(y),
                        BinaryOp::Sub if uy == Some(0.0) && same(g, x) => Some(x),
                        BinaryOp::Div if uy == Some(1.0) && same(g, x) => Some(x),
                        _ => None,
                    }
                }
                Op::Reshape(_) | Op::Expand(_) if same(g, ops[0]) => Some(ops[0]),
                Op::Permute(p) if p.iter().enumerate().all(|(i, &d)| i == d) => Some(ops[0]),
                _ => None,
            };
            if let Some(x) = identity {
                g.replace_all_uses(n, x);
                changed = true;
                continue;
            }
            // Chains: fold the producer into this node when the producer is of the same kind.
            let inner = ops.first().copied();
            let rewrite = match (&op, inner.map(|i| g.kind(i).clone())) {
                (Op::Permute(p), Some(NodeKind::Op(Op::Permute(q)))) => {
                    let composed: Vec<usize> = p.iter().map(|&i| q[i]).collect();
                    Some((Op::Permute(composed.into_iter().collect()), g.operands(inner.unwrap())[0]))
                }
                (Op::Reshape(s), Some(NodeKind::Op(Op::Reshape(_)))) => {
                    Some((Op::Reshape(s.clone()), g.operands(inner.unwrap())[0]))
                }
                _ => None,
            };
            if let Some((new_op, src)) = rewrite {
                replace_with(g, n, new_op, &[src])?;
                changed = true;
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emitter::Build;
    use crate::graph::InputRole;
    use crate::interpret::{interpret, NoCallbacks};
    use crate::ops::UnaryOp;
    use tracegrad_runtime::DType;

    fn input(g: &mut Graph, shape: &[usize]) -> NodeId {
        g.add_input("x", InputRole::Data, TensorType::new(DType::F32, shape))
    }

    #[test]
    fn simplify_fold_cse_dce_shrink_and_preserve_values() {
        let mut g = Graph::new();
        let x = input(&mut g, &[2, 3]);
        let one = g.full(1.0, DType::F32, &[]).unwrap();
        let zero = g.full(0.0, DType::F32, &[]).unwrap();
        let a = g.mul(&x, &one).unwrap(); // → x
        let b = g.add(&a, &zero).unwrap(); // → x
        let t1 = g.transpose(&b, 0, 1).unwrap();
        let t2 = g.transpose(&t1, 0, 1).unwrap(); // → x
        let e1 = g.unary(UnaryOp::Exp, &t2).unwrap();
        let e2 = g.unary(UnaryOp::Exp, &t2).unwrap(); // duplicate of e1
        let two = g.full(2.0, DType::F32, &[]).unwrap();
        let three = g.full(3.0, DType::F32, &[]).unwrap();
        let six = g.mul(&two, &three).unwrap(); // → Full 6
        let s = g.add(&e1, &e2).unwrap();
        let y = g.mul(&s, &six).unwrap();
        let r1 = g.reshape(&y, &[3, 2]).unwrap();
        let r2 = g.reshape(&r1, &[6]).unwrap();
        let _unused = g.unary(UnaryOp::Sin, &x).unwrap();
        g.add_output("y", r2);
        let xb = Buffer::from_vec(vec![0.1f32, 0.2, 0.3, -0.1, -0.2, 0.5], &[2, 3]);
        let before = interpret(&g, std::slice::from_ref(&xb), &NoCallbacks).unwrap();
        let n0 = g.node_count();
        let mut pm = PassManager::standard();
        pm.validate = true;
        pm.run(&mut g).unwrap();
        let after = interpret(&g, &[xb], &NoCallbacks).unwrap();
        assert_eq!(before, after);
        let text = g.to_text();
        assert_eq!(text.matches("= exp").count(), 1, "{text}");
        assert!(!text.contains("permute"), "{text}");
        assert_eq!(text.matches("= reshape").count(), 1, "{text}");
        assert!(!text.contains("sin"), "{text}");
        assert!(text.contains("full[6]"), "{text}");
        assert!(g.node_count() < n0 / 2, "{n0} -> {}\n{text}", g.node_count());
        assert!(pm.timings.iter().any(|t| t.name == "cse" && t.changed));
    }

    #[test]
    fn callbacks_are_never_removed_or_merged() {
        let mut g = Graph::new();
        let x = input(&mut g, &[2]);
        let ty = g.ty(x).clone();
        let c1 = g.add_callback(0, "hook a", &[x], std::slice::from_ref(&ty))[0];
        let c2 = g.add_callback(1, "hook b", &[x], &[ty])[0];
        let _ = (c1, c2);
        let y = g.unary(UnaryOp::Exp, &x).unwrap();
        g.add_output("y", y);
        PassManager::standard().run(&mut g).unwrap();
        assert_eq!(g.to_text().matches("callback#").count(), 2);
    }

    #[test]
    fn cse_keeps_zero_and_negative_zero_apart() {
        let mut g = Graph::new();
        let x = input(&mut g, &[2]);
        let zero = g.full(0.0, DType::F32, &[2]).unwrap();
        let neg_zero = g.full(-0.0, DType::F32, &[2]).unwrap();
        let a = g.div(&x, &zero).unwrap();
        let b = g.div(&x, &neg_zero).unwrap();
        let a2 = g.div(&x, &zero).unwrap();
        g.add_output("a", a);
        g.add_output("b", b);
        g.add_output("a2", a2);
        assert!(Cse.run(&mut g).unwrap());
        let outs: Vec<NodeId> = g.outputs.iter().map(|(_, o)| *o).collect();
        assert_eq!(outs[0], outs[2]);
        assert_ne!(outs[0], outs[1]);
    }
}
