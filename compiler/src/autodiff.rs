//! AOT autodiff: a graph-to-graph pass that appends the backward computation to a graph,
//! using the very derivative rules eager mode uses (`Op::vjp` through `Graph`'s `Emitter`).
//! An op without a rule fails here, loudly, with the op and its module path.

use std::collections::{HashMap, HashSet};

use crate::emitter::Build;
use crate::graph::{node_error, Graph, NodeId, NodeKind};
use crate::ops::{OpError, OpResult};

/// Differentiates callback nodes: given all projections of one callback and their output
/// gradients, emits gradients for the callback's operands.
pub type CallbackVjp<'a> = dyn FnMut(&mut Graph, &[NodeId], &[Option<NodeId>]) -> OpResult<Vec<Option<NodeId>>> + 'a;

/// Appends to `g` the gradients of `seeds` (pairs of an output node and the node holding its
/// gradient) with respect to each of `wrt`. Returns one entry per `wrt` (`None` when it does
/// not influence the outputs). Gradients reaching a node along several paths are summed.
pub fn append_backward(
    g: &mut Graph,
    seeds: &[(NodeId, NodeId)],
    wrt: &[NodeId],
    callback_vjp: &mut CallbackVjp<'_>,
) -> OpResult<Vec<Option<NodeId>>> {
    append_backward_hooked(g, seeds, wrt, callback_vjp, &mut |_, _, grad| Ok(grad))
}

/// Rewrites a node's complete gradient (tensor hooks): gets the forward node and its summed
/// gradient, returns the gradient to use from then on.
pub type GradHook<'a> = dyn FnMut(&mut Graph, NodeId, NodeId) -> OpResult<NodeId> + 'a;

/// [`append_backward`] with `grad_hook` applied to every node's gradient once it is complete
/// (all paths summed), before the node's own rule runs, as eager autograd runs tensor hooks.
pub fn append_backward_hooked(
    g: &mut Graph,
    seeds: &[(NodeId, NodeId)],
    wrt: &[NodeId],
    callback_vjp: &mut CallbackVjp<'_>,
    grad_hook: &mut GradHook<'_>,
) -> OpResult<Vec<Option<NodeId>>> {
    let outs: Vec<NodeId> = seeds.iter().map(|(o, _)| *o).collect();
    let down = g.descendants(wrt);
    let up = g.ancestors(&outs);
    let relevant: HashSet<NodeId> = down.intersection(&up).copied().collect();
    let order: Vec<NodeId> =
        g.topo_order().map_err(|e| OpError::new("autodiff", e))?.into_iter().filter(|n| relevant.contains(n)).collect();
    let mut grads: HashMap<NodeId, NodeId> = HashMap::new();
    let add = |g: &mut Graph, grads: &mut HashMap<NodeId, NodeId>, n: NodeId, d: NodeId| -> OpResult<()> {
        let v = match grads.get(&n) {
            Some(&prev) => g.add(&prev, &d)?,
            None => d,
        };
        grads.insert(n, v);
        Ok(())
    };
    for &(o, s) in seeds {
        if relevant.contains(&o) {
            add(g, &mut grads, o, s)?;
        }
    }
    let mut done_callbacks = HashSet::new();
    for &n in order.iter().rev() {
        if let Some(&gn) = grads.get(&n) {
            let hooked = grad_hook(g, n, gn)?;
            grads.insert(n, hooked);
        }
        let operands = g.operands(n);
        let input_grads: Vec<Option<NodeId>> = match g.kind(n).clone() {
            NodeKind::Input { .. } => continue,
            NodeKind::Op(op) => {
                let Some(&gn) = grads.get(&n) else { continue };
                let ops: Vec<&NodeId> = operands.iter().collect();
                // New nodes belong to the module that made the forward node.
                g.scope.push((g.node(n).path.clone(), g.node(n).module_type.clone()));
                let r = op.vjp(g, &ops, &n, &gn);
                g.scope.pop();
                r.map_err(|e| node_error(g, n, e))?
            }
            NodeKind::Callback { id, .. } => {
                if !done_callbacks.insert(id) {
                    continue;
                }
                let group: Vec<NodeId> = order
                    .iter()
                    .copied()
                    .filter(|&m| matches!(g.node(m).kind, NodeKind::Callback { id: i, .. } if i == id))
                    .collect();
                let gs: Vec<Option<NodeId>> = group.iter().map(|m| grads.get(m).copied()).collect();
                if gs.iter().all(Option::is_none) {
                    continue;
                }
                callback_vjp(g, &group, &gs)?
            }
        };
        for (o, gi) in operands.iter().zip(input_grads) {
            if let Some(gi) = gi {
                if relevant.contains(o) {
                    add(g, &mut grads, *o, gi)?;
                }
            }
        }
    }
    Ok(wrt.iter().map(|w| grads.get(w).copied()).collect())
}

/// [`append_backward`] for graphs without callbacks.
pub fn append_backward_plain(
    g: &mut Graph,
    seeds: &[(NodeId, NodeId)],
    wrt: &[NodeId],
) -> OpResult<Vec<Option<NodeId>>> {
    append_backward(g, seeds, wrt, &mut |_, group, _| {
        Err(OpError::new("autodiff", format!("callback node %{} has no derivative rule here", group[0].index())))
    })
}
