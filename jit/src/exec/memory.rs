//! The memory phase: when each value dies, which kernel outputs take an argument's storage
//! (in place, or over a donated input), which freed storage a later output reuses, and the
//! resulting live bytes at every step.
//!
//! Graph inputs are the caller's and reshapes share their operand's storage, so neither
//! counts towards the live bytes.

use std::collections::{HashMap, HashSet};

use tracegrad_compiler::graph::Graph;
use tracegrad_compiler::ops::{Op, TensorType};
use tracegrad_runtime::DType;

use super::plan::{Plan, Step};
use crate::kernel::Space;

/// A plan's memory: what is freed when, what is recycled, and the live bytes.
#[derive(Debug, Default)]
pub(super) struct MemoryPlan {
    /// Values to drop after each step.
    pub free_after: Vec<Vec<usize>>,
    /// Freed values whose storage a later kernel output takes (the rest is released at once).
    pub recycle: Vec<bool>,
    /// Live bytes during each step.
    pub live_at: Vec<usize>,
    /// The high-water mark of `live_at` (and of the constants alone).
    pub peak_bytes: usize,
}

/// Plans the memory of `p`, filling in each kernel step's `reuse`. The inputs marked in
/// `donated` may be overwritten, after the last step that can fail.
pub(super) fn plan_memory(g: &Graph, p: &mut Plan, donated: &[bool]) -> MemoryPlan {
    let (last_use, free_after) = liveness(p);
    choose_in_place(g, p, donated, &last_use, &free_after);
    let (recycle, live_at, peak_bytes) = simulate(g, p, &free_after);
    MemoryPlan { free_after, recycle, live_at, peak_bytes }
}

fn nbytes(t: &TensorType) -> usize {
    t.numel() * t.dtype.size()
}

/// The last step reading each value, and the values to free after each step. Outputs live
/// to the end; so do inputs (the caller's, or donated and handed back on an error), unless a
/// kernel takes one over in place.
fn liveness(p: &Plan) -> (Vec<Option<usize>>, Vec<Vec<usize>>) {
    let mut last_use = vec![None::<usize>; p.types.len()];
    for (si, s) in p.steps.iter().enumerate() {
        for &a in s.args() {
            last_use[a] = Some(si);
        }
    }
    let keep: HashSet<usize> = p.outputs.iter().chain(&p.inputs).copied().collect();
    let mut free_after = vec![Vec::new(); p.steps.len()];
    for (v, lu) in last_use.iter().enumerate() {
        if let Some(si) = lu {
            if !keep.contains(&v) {
                free_after[*si].push(v);
            }
        }
    }
    (last_use, free_after)
}

/// In place: a pointwise kernel's output may take the storage of an argument that dies there,
/// has the same type and is read elementwise (same element count); a donated input only after
/// the last step that can fail, so that an error leaves every donated input intact.
fn choose_in_place(g: &Graph, p: &mut Plan, donated: &[bool], last_use: &[Option<usize>], free_after: &[Vec<usize>]) {
    let last_fallible = p
        .steps
        .iter()
        .rposition(|s| match s {
            Step::Callback { .. } => true,
            Step::Eval { node, .. } => g.op(*node).is_some_and(Op::is_fallible),
            Step::Kernel { .. } | Step::Accumulate { .. } => false,
        })
        .map_or(0, |i| i + 1);
    let donated_vals: HashSet<usize> = p
        .inputs
        .iter()
        .zip(donated.iter().chain(std::iter::repeat(&false)))
        .filter(|(_, &d)| d)
        .map(|(&v, _)| v)
        .collect();
    let graph_inputs: HashSet<usize> = p.inputs.iter().copied().collect();
    let const_vals: HashSet<usize> = p.constants.iter().map(|(v, _)| *v).collect();
    let types = &p.types;
    let owned = |si: usize, a: usize| {
        if graph_inputs.contains(&a) {
            donated_vals.contains(&a) && si >= last_fallible && last_use[a] == Some(si)
        } else {
            free_after[si].contains(&a) && !const_vals.contains(&a)
        }
    };
    for (si, s) in p.steps.iter_mut().enumerate() {
        if let Step::Accumulate { args, in_place, .. } = s {
            // The update overwrites `p` (args[0]) only if nothing reads it afterwards.
            *in_place = owned(si, args[0]);
            continue;
        }
        let Step::Kernel { kernel, args, outs, reuse, .. } = s else { continue };
        let spec = &p.specs[*kernel];
        let mut taken = HashSet::new();
        *reuse = outs
            .iter()
            .enumerate()
            .map(|(o, &out)| {
                if spec.row_kernel || spec.nodes[spec.outputs[o]].space != Space::Elem {
                    return None;
                }
                let ok = |a: usize| {
                    types[a] == types[out] && owned(si, a) && !const_vals.contains(&a) && !taken.contains(&a)
                };
                // Prefer a donated input: the intermediate is then freed instead.
                let inputs_first = args.iter().filter(|a| graph_inputs.contains(a));
                let cand =
                    inputs_first.chain(args.iter().filter(|a| !graph_inputs.contains(a))).copied().find(|&a| ok(a))?;
                taken.insert(cand);
                Some(cand)
            })
            .collect();
    }
}

/// Storage recycling and live bytes, by simulating a run as the executor does it. Freed
/// storage is kept for a later kernel output of the same type and length (the pool) only if
/// one will take it; otherwise it goes back to the allocator at once.
///
/// One pass finds, at every step, the bytes freshly allocated and the storage freed; which
/// freed storage a later output takes from the pool (`recycle`) is known only at the end, and
/// decides whether a free releases its bytes. (Holding only recycled storage in the pool
/// changes no pop's outcome: the value a pop takes is always a recycled one.)
fn simulate(g: &Graph, p: &Plan, free_after: &[Vec<usize>]) -> (Vec<bool>, Vec<usize>, usize) {
    let types = &p.types;
    let aliasing = |n| matches!(g.op(n), Some(Op::Reshape(_)));
    // Whether a value's storage is counted (allocated by the plan, not aliased or the caller's).
    let mut counted = vec![false; types.len()];
    let mut recycle = vec![false; types.len()];
    let mut pool: HashMap<(DType, usize), Vec<usize>> = HashMap::new();
    let mut allocated = vec![0usize; p.steps.len()];
    let mut freed: Vec<Vec<usize>> = vec![Vec::new(); p.steps.len()];
    for (si, s) in p.steps.iter().enumerate() {
        match s {
            Step::Kernel { outs, reuse, .. } => {
                for (&o, r) in outs.iter().zip(reuse) {
                    if let Some(r) = r {
                        counted[o] = std::mem::take(&mut counted[*r]);
                        continue;
                    }
                    match pool.get_mut(&(types[o].dtype, types[o].numel())).and_then(|p| p.pop()) {
                        Some(v) => recycle[v] = true,
                        None => allocated[si] += nbytes(&types[o]),
                    }
                    counted[o] = true;
                }
            }
            Step::Accumulate { args, out, in_place: true, .. } => counted[*out] = std::mem::take(&mut counted[args[0]]),
            Step::Eval { node, .. } if aliasing(*node) => {}
            Step::Eval { out, .. } | Step::Callback { out, .. } | Step::Accumulate { out, .. } => {
                allocated[si] += nbytes(&types[*out]);
                counted[*out] = true;
            }
        }
        for &v in &free_after[si] {
            if std::mem::take(&mut counted[v]) {
                pool.entry((types[v].dtype, types[v].numel())).or_default().push(v);
                freed[si].push(v);
            }
        }
    }
    let mut live: usize = p.constants.iter().map(|(_, b)| b.data().nbytes()).sum();
    let mut peak = live;
    let mut live_at = vec![0; p.steps.len()];
    for si in 0..p.steps.len() {
        live += allocated[si];
        peak = peak.max(live);
        live_at[si] = live;
        live -= freed[si].iter().filter(|&&v| !recycle[v]).map(|&v| nbytes(&types[v])).sum::<usize>();
    }
    (recycle, live_at, peak)
}
