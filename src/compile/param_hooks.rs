//! Parameter gradient hooks inside a compiled train step.
//!
//! In eager training, `backward` accumulates each parameter's gradient when it is complete:
//! the parameter's tensor hooks run on it (and may replace it), it lands in `.grad`, then the
//! post-accumulate hooks run and may change `.grad` in place; `step` then reads `.grad`. A
//! compiled step computes the gradients inside its graph, so when a parameter has such hooks
//! the gradients pass through one callback that runs that same accumulation on every parameter,
//! in the order eager's engine would have reached them, and the update reads what the
//! callback returns: `.grad` as the hooks left it. Data-parallel training averages gradients
//! across ranks from exactly these hooks.

use std::collections::{BinaryHeap, HashMap, HashSet};

use tracegrad_compiler::graph::{Graph, NodeId, NodeKind};
use tracegrad_compiler::TensorType;
use tracegrad_runtime::Buffer;

use super::trace::CallbackSpec;
use crate::tensor::Tensor;

/// Names of the parameters of `params` that carry gradient hooks (`register_hook` or
/// post-accumulate hooks); a train step's plan is specialised on them.
pub(crate) fn hooked_parameters(params: &[(String, Tensor)]) -> Vec<String> {
    params.iter().filter(|(_, p)| p.has_grad_hooks()).map(|(n, _)| n.clone()).collect()
}

/// Where eager's engine would have a node: an op node is one; the outputs of one callback
/// are one (eager records a module's hook identity as a single multi-output node).
fn eager_nodes(g: &Graph) -> HashMap<NodeId, NodeId> {
    let mut first: HashMap<usize, NodeId> = HashMap::new();
    for n in g.node_ids() {
        if let NodeKind::Callback { id, .. } = g.kind(n) {
            let f = first.entry(*id).or_insert(n);
            *f = (*f).min(n);
        }
    }
    g.node_ids()
        .filter_map(|n| match g.kind(n) {
            NodeKind::Callback { id, .. } => Some((n, first[id])),
            _ => None,
        })
        .collect()
}

/// The order in which eager backward from `root` accumulates the leaves in `leaves` (graph
/// input node → tensor id), replaying its engine on the traced forward: every edge into a
/// value that requires grad (`requires`) is counted, a node runs once all of its edges have
/// delivered, and among ready nodes a leaf goes first (the larger tensor id on a tie, as the
/// engine's heap orders them), then the most recently created node (node ids grow in trace
/// order, as eager's sequence numbers do).
pub(crate) fn eager_leaf_order(
    g: &Graph,
    root: NodeId,
    requires: &HashSet<NodeId>,
    leaves: &HashMap<NodeId, usize>,
) -> Vec<NodeId> {
    if leaves.contains_key(&root) {
        return vec![root];
    }
    let group = eager_nodes(g);
    let key = |n: NodeId| group.get(&n).copied().unwrap_or(n);
    let inputs =
        |n: NodeId| -> Vec<NodeId> { g.operands(n).into_iter().filter(|o| requires.contains(o)).map(key).collect() };
    let mut deps: HashMap<NodeId, usize> = HashMap::new();
    let mut seen = HashSet::from([key(root)]);
    let mut stack = vec![key(root)];
    while let Some(n) = stack.pop() {
        for i in inputs(n) {
            *deps.entry(i).or_insert(0) += 1;
            if !leaves.contains_key(&i) && seen.insert(i) {
                stack.push(i);
            }
        }
    }
    let mut order = Vec::new();
    let mut ready = BinaryHeap::from([(false, 0, key(root).index())]);
    while let Some((is_leaf, _, k)) = ready.pop() {
        let n = NodeId::new(k);
        if is_leaf {
            order.push(n);
            continue;
        }
        for i in inputs(n) {
            let d = deps.get_mut(&i).expect("every edge was counted");
            *d -= 1;
            if *d == 0 {
                ready.push(match leaves.get(&i) {
                    Some(&id) => (true, id, i.index()),
                    None => (false, i.index(), i.index()),
                });
            }
        }
    }
    order
}

/// Routes the gradients of `params` (graph input, tensor and name of each parameter whose
/// gradient is in `grads`) through one callback that accumulates them in eager's order
/// (see [`eager_leaf_order`]); returns the gradients the update is to read, in `params`' order.
pub(crate) fn append_param_hooks(
    g: &mut Graph,
    callbacks: &mut Vec<CallbackSpec>,
    params: &[(NodeId, Tensor, String)],
    grads: &[NodeId],
    root: NodeId,
    requires: &HashSet<NodeId>,
) -> Vec<NodeId> {
    let leaves: HashMap<NodeId, usize> = params.iter().map(|(n, t, _)| (*n, t.id())).collect();
    let mut order: Vec<usize> = eager_leaf_order(g, root, requires, &leaves)
        .into_iter()
        .filter_map(|n| params.iter().position(|(p, _, _)| *p == n))
        .collect();
    // A parameter the replay did not reach (none should be) keeps its place at the end.
    let missing: Vec<usize> = (0..params.len()).filter(|k| !order.contains(k)).collect();
    order.extend(missing);
    let operands: Vec<NodeId> = order.iter().map(|&k| grads[k]).collect();
    let types: Vec<TensorType> = operands.iter().map(|&n| g.ty(n).clone()).collect();
    let id = callbacks.len();
    callbacks.push(CallbackSpec::ParamGrads {
        params: order.iter().map(|&k| (params[k].2.clone(), params[k].1.clone())).collect(),
    });
    let outs = g.add_callback(id, "parameter gradient hooks", &operands, &types);
    let mut result = grads.to_vec();
    for (&k, out) in order.iter().zip(outs) {
        result[k] = out;
    }
    result
}

/// Runs the accumulation of every parameter in `params` on its gradient in `grads` (already
/// in eager's order): `.grad` is cleared first, as `zero_grad()` before `backward` does, then
/// each parameter's tensor hooks, `.grad`, post-accumulate hooks. Returns each `.grad` after
/// all of them ran.
pub(crate) fn run_param_hooks(params: &[(String, Tensor)], grads: &[Buffer]) -> Result<Vec<Buffer>, String> {
    crate::no_grad(|| {
        for (_, p) in params {
            p.set_grad(None);
        }
        for ((name, p), g) in params.iter().zip(grads) {
            crate::autograd::accumulate_leaf(p, Tensor::from_buffer(g.clone()))
                .map_err(|e| format!("parameter {name}: {e}"))?;
        }
        params
            .iter()
            .zip(grads)
            .map(|((name, p), g)| {
                let Some(new) = p.grad() else {
                    return Err(format!(
                        "a hook cleared the gradient of parameter {name}; a compiled train step updates every parameter, so its .grad must stay set"
                    ));
                };
                let b = new.buffer();
                if TensorType::of(&b) != TensorType::of(g) {
                    return Err(format!(
                        "a hook left the gradient of parameter {name} as {} where {} was expected",
                        TensorType::of(&b),
                        TensorType::of(g)
                    ));
                }
                Ok(b)
            })
            .collect()
    })
}
