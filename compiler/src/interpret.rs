//! The reference interpreter: runs any [`Graph`] with the runtime's eager kernels (each op's
//! `Op::eval`, shared with eager mode, not copied). It is the correctness oracle for the JIT.

use std::collections::HashMap;

use petgraph::stable_graph::NodeIndex;
use tracegrad_runtime::Buffer;

use crate::graph::{node_error, Graph, NodeKind};
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
    let mut remaining: HashMap<NodeIndex, usize> =
        order.iter().map(|&n| (n, g.g.edges_directed(n, petgraph::Direction::Outgoing).count())).collect();
    for (_, o) in &g.outputs {
        *remaining.entry(*o).or_insert(0) += 1;
    }
    let mut values: HashMap<NodeIndex, Buffer> = HashMap::new();
    for (&n, b) in g.inputs.iter().zip(inputs) {
        let want = &g.g[n].ty;
        if TensorType::of(b) != *want {
            let name = match &g.g[n].kind {
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
    let mut callback_results: HashMap<usize, Vec<Buffer>> = HashMap::new();
    for n in order {
        let node = &g.g[n];
        let operands = g.operands(n);
        let value = match &node.kind {
            NodeKind::Input { .. } => continue,
            NodeKind::Op(op) => {
                let args: Vec<&Buffer> = operands.iter().map(|o| &values[o]).collect();
                op.eval(&args, &node.ty).map_err(|e| node_error(g, n, e))?
            }
            NodeKind::Callback { id, output, n_outputs, label } => {
                if !callback_results.contains_key(id) {
                    let args: Vec<Buffer> = operands.iter().map(|o| values[o].clone()).collect();
                    let res =
                        callbacks.run(*id, &args).map_err(|e| OpError::new("callback", format!("{label}: {e}")))?;
                    if res.len() != *n_outputs {
                        return Err(OpError::new(
                            "callback",
                            format!("{label} returned {} values, expected {n_outputs}", res.len()),
                        ));
                    }
                    callback_results.insert(*id, res);
                }
                let v = callback_results[id][*output].clone();
                if TensorType::of(&v) != node.ty {
                    return Err(OpError::new(
                        "callback",
                        format!("{label} returned {} where {} was expected", TensorType::of(&v), node.ty),
                    ));
                }
                v
            }
        };
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
