//! Splits a joint forward+backward graph into a forward graph and a backward graph with
//! explicit saved values, as AOTAutograd does.
//!
//! The forward graph computes the forward outputs and, as extra outputs, every forward value
//! the backward reads (the saved values). The backward graph takes those saved values plus the
//! output gradients as inputs. With `recompute_pointwise`, a saved value that is a cheap
//! pointwise op of values the backward has anyway is recomputed in the backward instead of
//! being saved (a simple form of the min-cut rematerialisation heuristic).

use std::collections::{HashMap, HashSet};

use crate::graph::{Graph, InputRole, NodeId, NodeKind};
use crate::ops::{OpError, OpResult};

/// The two halves.
pub struct Partitioned {
    /// Inputs: the joint graph's forward inputs, in order. Outputs: the forward outputs, then
    /// the saved values.
    pub forward: Graph,
    /// Inputs: the saved values (same order as the forward's extra outputs), then the output
    /// gradients. Outputs: the requested gradients, in order.
    pub backward: Graph,
    /// How many values cross from forward to backward.
    pub saved: usize,
}

/// Copies the nodes `set` of `src` (in topological order) into `dst`, mapping operands through
/// `map` (which must already hold every operand outside `set`).
fn copy_nodes(
    src: &Graph,
    order: &[NodeId],
    set: &HashSet<NodeId>,
    dst: &mut Graph,
    map: &mut HashMap<NodeId, NodeId>,
) {
    for &n in order {
        if !set.contains(&n) || map.contains_key(&n) {
            continue;
        }
        let operands: Vec<NodeId> = src.operands(n).iter().map(|o| map[o]).collect();
        let new = dst.add_node_unchecked(src.node(n).clone(), &operands);
        map.insert(n, new);
    }
}

/// Partitions `joint`. `fwd_outputs` are the forward results, `grad_inputs` the joint graph's
/// inputs that carry output gradients, `grads` the gradient nodes to return.
pub fn partition(
    joint: &Graph,
    fwd_outputs: &[NodeId],
    grad_inputs: &[NodeId],
    grads: &[NodeId],
    recompute_pointwise: bool,
) -> OpResult<Partitioned> {
    let order = joint.topo_order().map_err(|e| OpError::new("partition", e))?;
    let fwd: HashSet<NodeId> = joint.ancestors(fwd_outputs);
    if grad_inputs.iter().any(|gi| fwd.contains(gi)) {
        return Err(OpError::new("partition", "a gradient input feeds the forward outputs".to_string()));
    }
    // Backward-only nodes; forward nodes they read are "saved".
    let mut bwd: HashSet<NodeId> = joint.ancestors(grads).difference(&fwd).copied().collect();
    let saved = saved_values(joint, &order, &fwd, &mut bwd, grad_inputs, grads, recompute_pointwise);
    let forward = forward_graph(joint, &order, &fwd, fwd_outputs, grad_inputs, &saved);
    let backward = backward_graph(joint, &order, &bwd, &saved, grad_inputs, grads)?;
    Ok(Partitioned { forward, backward, saved: saved.len() })
}

/// The forward values the backward reads. With `recompute`, saved cheap ops move into `bwd`
/// (recomputed there) while that does not save more values than it removes.
fn saved_values(
    joint: &Graph,
    order: &[NodeId],
    fwd: &HashSet<NodeId>,
    bwd: &mut HashSet<NodeId>,
    grad_inputs: &[NodeId],
    grads: &[NodeId],
    recompute: bool,
) -> Vec<NodeId> {
    let forward_inputs: HashSet<NodeId> = joint.inputs.iter().copied().filter(|i| !grad_inputs.contains(i)).collect();
    loop {
        let saved = crossing(joint, order, fwd, bwd, grads);
        if !recompute {
            return saved;
        }
        let movable = recomputable(joint, &saved, &forward_inputs, grads);
        if movable.is_empty() {
            return saved;
        }
        bwd.extend(movable);
    }
}

/// The forward values (in `order`) that backward nodes read, then the gradients that are
/// themselves forward values (e.g. d(x+y)/dy = seed... or a constant).
fn crossing(
    joint: &Graph,
    order: &[NodeId],
    fwd: &HashSet<NodeId>,
    bwd: &HashSet<NodeId>,
    grads: &[NodeId],
) -> Vec<NodeId> {
    let mut s: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|n| fwd.contains(n) && !bwd.contains(n) && joint.users(*n).iter().any(|u| bwd.contains(u)))
        .collect();
    for g in grads {
        if fwd.contains(g) && !s.contains(g) {
            s.push(*g);
        }
    }
    s
}

/// The saved cheap ops to recompute in the backward: all their operands are forward inputs
/// (always available to save) or already saved, and at most one is not saved yet (so
/// recomputing does not save more values than it removes).
fn recomputable(joint: &Graph, saved: &[NodeId], forward_inputs: &HashSet<NodeId>, grads: &[NodeId]) -> Vec<NodeId> {
    let saved_set: HashSet<NodeId> = saved.iter().copied().collect();
    saved
        .iter()
        .copied()
        .filter(|&n| {
            matches!(joint.kind(n), NodeKind::Op(op) if op.cheap_to_recompute())
                && !grads.contains(&n)
                && joint.operands(n).iter().all(|o| forward_inputs.contains(o) || saved_set.contains(o))
                && !joint.operands(n).is_empty()
        })
        .filter(|&n| joint.operands(n).iter().filter(|o| !saved_set.contains(o)).count() <= 1)
        .collect()
}

/// The forward graph: the forward inputs, the nodes `fwd`, and as outputs the forward results
/// then the saved values.
fn forward_graph(
    joint: &Graph,
    order: &[NodeId],
    fwd: &HashSet<NodeId>,
    fwd_outputs: &[NodeId],
    grad_inputs: &[NodeId],
    saved: &[NodeId],
) -> Graph {
    let mut forward = Graph::new();
    let mut fmap = HashMap::new();
    for &i in &joint.inputs {
        if grad_inputs.contains(&i) {
            continue;
        }
        let n = forward.add_node_unchecked(joint.node(i).clone(), &[]);
        forward.inputs.push(n);
        fmap.insert(i, n);
    }
    copy_nodes(joint, order, fwd, &mut forward, &mut fmap);
    for (k, o) in fwd_outputs.iter().enumerate() {
        let name =
            joint.outputs.iter().find(|(_, n)| n == o).map(|(s, _)| s.clone()).unwrap_or_else(|| format!("out{k}"));
        forward.add_output(&name, fmap[o]);
    }
    for s in saved {
        forward.add_output(&format!("saved%{}", s.index()), fmap[s]);
    }
    forward
}

/// The backward graph: the saved values and output gradients as inputs, the nodes `bwd`, and
/// the gradients as outputs.
fn backward_graph(
    joint: &Graph,
    order: &[NodeId],
    bwd: &HashSet<NodeId>,
    saved: &[NodeId],
    grad_inputs: &[NodeId],
    grads: &[NodeId],
) -> OpResult<Graph> {
    let mut backward = Graph::new();
    let mut bmap = HashMap::new();
    for s in saved {
        let n = backward.add_input(&format!("saved%{}", s.index()), InputRole::Saved, joint.ty(*s).clone());
        backward.node_mut(n).path = joint.node(*s).path.clone();
        backward.node_mut(n).module_type = joint.node(*s).module_type.clone();
        bmap.insert(*s, n);
    }
    for gi in grad_inputs {
        let name = match joint.kind(*gi) {
            NodeKind::Input { name, .. } => name.clone(),
            _ => format!("grad%{}", gi.index()),
        };
        let n = backward.add_input(&name, InputRole::Grad, joint.ty(*gi).clone());
        bmap.insert(*gi, n);
    }
    copy_nodes(joint, order, bwd, &mut backward, &mut bmap);
    for (k, g) in grads.iter().enumerate() {
        let n = *bmap.get(g).ok_or_else(|| {
            OpError::new("partition", format!("gradient {k} is not computable in the backward graph"))
        })?;
        backward.add_output(&format!("grad{k}"), n);
    }
    Ok(backward)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autodiff::append_backward_plain;
    use crate::emitter::Build;
    use crate::interpret::{interpret, NoCallbacks};
    use crate::ops::{TensorType, UnaryOp};
    use tracegrad_runtime::{Buffer, DType};

    /// y = sum(tanh(x·w) · 2): forward, then the backward from saved values must equal the
    /// joint graph's gradients, with and without recomputation.
    #[test]
    fn forward_and_backward_halves_agree_with_the_joint_graph() {
        for recompute in [false, true] {
            let mut g = Graph::new();
            let x = g.add_input("x", InputRole::Data, TensorType::new(DType::F64, &[3]));
            let w = g.add_input("w", InputRole::Parameter, TensorType::new(DType::F64, &[3]));
            let xw = g.mul(&x, &w).unwrap();
            let t = g.unary(UnaryOp::Tanh, &xw).unwrap();
            let t2 = g.mul_scalar(&t, 2.0).unwrap();
            let y = g.sum(&t2, &[], false).unwrap();
            let seed = g.add_input("grad_out", InputRole::Grad, TensorType::new(DType::F64, &[]));
            let grads = append_backward_plain(&mut g, &[(y, seed)], &[x, w]).unwrap();
            let grads: Vec<NodeId> = grads.into_iter().map(Option::unwrap).collect();
            g.add_output("y", y);
            for (k, gr) in grads.iter().enumerate() {
                g.add_output(&format!("d{k}"), *gr);
            }
            let xs = Buffer::from_vec(vec![0.1f64, -0.4, 0.7], &[3]);
            let ws = Buffer::from_vec(vec![1.5f64, 0.2, -0.3], &[3]);
            let go = Buffer::from_vec(vec![1.0f64], &[]);
            let joint = interpret(&g, &[xs.clone(), ws.clone(), go.clone()], &NoCallbacks).unwrap();
            let p = partition(&g, &[y], &[seed], &grads, recompute).unwrap();
            p.forward.validate().unwrap();
            p.backward.validate().unwrap();
            let f = interpret(&p.forward, &[xs, ws], &NoCallbacks).unwrap();
            assert_eq!(f[0], joint[0]);
            let mut bargs: Vec<Buffer> = f[1..].to_vec();
            bargs.push(go);
            let b = interpret(&p.backward, &bargs, &NoCallbacks).unwrap();
            assert_eq!(b[0], joint[1]);
            assert_eq!(b[1], joint[2]);
            if recompute {
                // tanh's input x·w is recomputed from x and w rather than saved.
                assert!(p.backward.to_text().contains("= mul"), "{}", p.backward.to_text());
            }
        }
    }
}
