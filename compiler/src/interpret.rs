//! The reference interpreter: runs any [`Graph`] with the runtime's eager kernels (each op's
//! `Op::eval`, shared with eager mode, not copied). It is the correctness oracle for the JIT.
//!
//! [`eval_node`] is the one node-by-node runner: the interpreter runs every node with it, and
//! the JIT's executor runs the nodes it does not compile (gemm, conv, hooks, ...) with it too.

use std::collections::HashMap;

use tracegrad_runtime::Buffer;

use crate::graph::{node_error, Graph, NodeId, NodeKind};
use crate::ops::{OpError, OpResult, TensorType};

/// Runs the callbacks (hooks) a graph refers to.
pub trait CallbackRunner {
    /// Runs callback `id` on real tensors; returns its results.
    fn run(&self, id: usize, args: &[Buffer]) -> Result<Vec<Buffer>, String>;
}

/// For graphs without callbacks: running one is an error.
pub struct NoCallbacks;

impl CallbackRunner for NoCallbacks {
    fn run(&self, id: usize, _args: &[Buffer]) -> Result<Vec<Buffer>, String> {
        Err(format!("graph refers to callback #{id} but no callbacks were provided"))
    }
}

/// The results of the callbacks run so far in one evaluation of a graph: a callback with
/// several outputs is several nodes, but runs once.
#[derive(Default)]
pub struct CallbackResults(HashMap<usize, Vec<Buffer>>);

/// Evaluates op or callback node `n` of `g` on its operands' values `args`, in order.
pub fn eval_node(
    g: &Graph,
    n: NodeId,
    args: &[&Buffer],
    callbacks: &dyn CallbackRunner,
    results: &mut CallbackResults,
) -> OpResult<Buffer> {
    let node = g.node(n);
    match &node.kind {
        NodeKind::Input { .. } => unreachable!("an input is not evaluated"),
        NodeKind::Op(op) => {
            // A kernel asserts what the validator should have refused; its panic must not
            // cross the run boundary, so it becomes this node's error.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op.eval(args, &node.ty)));
            let r = r.unwrap_or_else(|payload| {
                let why = tracegrad_runtime::panic_message(&*payload).unwrap_or("a kernel panicked");
                Err(op.error(format!("{} (node %{}): kernel panicked: {why}", op.name(), n.index())))
            });
            r.map_err(|e| node_error(g, n, e))
        }
        NodeKind::Callback { id, output, n_outputs, label } => {
            if !results.0.contains_key(id) {
                let args: Vec<Buffer> = args.iter().map(|&b| b.clone()).collect();
                let res = callbacks.run(*id, &args).map_err(|e| OpError::new("callback", format!("{label}: {e}")))?;
                if res.len() != *n_outputs {
                    return Err(OpError::new(
                        "callback",
                        format!("{label} returned {} values, expected {n_outputs}", res.len()),
                    ));
                }
                results.0.insert(*id, res);
            }
            let v = results.0[id][*output].clone();
            if TensorType::of(&v) != node.ty {
                return Err(OpError::new(
                    "callback",
                    format!("{label} returned {} where {} was expected", TensorType::of(&v), node.ty),
                ));
            }
            Ok(v)
        }
    }
}

/// Evaluates `g` on `inputs` (one per `g.inputs`, in order) and returns its outputs in order.
/// Values are dropped after their last use.
pub fn interpret(g: &Graph, inputs: &[Buffer], callbacks: &dyn CallbackRunner) -> OpResult<Vec<Buffer>> {
    if inputs.len() != g.inputs.len() {
        return Err(OpError::new(
            "interpret",
            format!("the graph takes {} inputs, got {}", g.inputs.len(), inputs.len()),
        ));
    }
    let order = g.topo_order().map_err(|e| OpError::new("interpret", e))?;
    // Uses are edges, not distinct users: `x * x` reads `x` twice.
    let mut remaining: HashMap<NodeId, usize> = order.iter().map(|&n| (n, g.use_count(n))).collect();
    for (_, o) in &g.outputs {
        *remaining.entry(*o).or_insert(0) += 1;
    }
    let mut values: HashMap<NodeId, Buffer> = HashMap::new();
    for (&n, b) in g.inputs.iter().zip(inputs) {
        let want = g.ty(n);
        if TensorType::of(b) != *want {
            let name = match g.kind(n) {
                NodeKind::Input { name, .. } => name.clone(),
                _ => format!("%{}", n.index()),
            };
            return Err(OpError::new(
                "interpret",
                format!("input {name} should be {want} but got {}", TensorType::of(b)),
            ));
        }
        values.insert(n, b.clone());
    }
    let mut results = CallbackResults::default();
    for n in order {
        if matches!(g.kind(n), NodeKind::Input { .. }) {
            continue;
        }
        let operands = g.operands(n);
        let args: Vec<&Buffer> = operands.iter().map(|o| &values[o]).collect();
        let value = eval_node(g, n, &args, callbacks, &mut results)?;
        for o in operands {
            let r = remaining.get_mut(&o).expect("operand counted");
            *r -= 1;
            if *r == 0 {
                values.remove(&o);
            }
        }
        values.insert(n, value);
    }
    Ok(g.outputs.iter().map(|(_, o)| values[o].clone()).collect())
}
