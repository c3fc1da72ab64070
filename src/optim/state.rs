//! Optimizer state in PyTorch's `state_dict()` layout: `state` maps a parameter's index to its
//! named state tensors (`momentum_buffer`, `step`, `exp_avg`, …) and `param_groups` holds the
//! hyperparameters under PyTorch's names plus `params` (the indices). tracegrad optimizers have
//! one group. A load checks everything before it changes anything, so a failed load leaves
//! the optimizer as it was.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use tracegrad_runtime::{Buffer, DType};

use crate::tensor::Tensor;

/// An optimizer's `state_dict()`.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerStateDict {
    /// Per parameter index, its state tensors by name. A parameter not updated yet has none.
    pub state: BTreeMap<usize, BTreeMap<String, Buffer>>,
    /// The parameter groups: hyperparameters by PyTorch's names, and `params`.
    pub param_groups: Vec<Map<String, Value>>,
}

/// A group's fields, in PyTorch's order, with `params` (and `initial_lr`, which a scheduler
/// adds) appended.
pub(crate) fn group(fields: Vec<(&str, Value)>, initial_lr: Option<f64>, n_params: usize) -> Map<String, Value> {
    let mut g: Map<String, Value> = fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    if let Some(lr) = initial_lr {
        g.insert("initial_lr".into(), json!(lr));
    }
    g.insert("params".into(), json!((0..n_params).collect::<Vec<_>>()));
    g
}

/// The one group of a state dict loaded into an optimizer of `kind` over `params`, after
/// PyTorch's group checks and tracegrad's kind check: every key of `required` must be there
/// (an SGD group has `momentum`, an Adam group `betas`), and `discriminant`, if given, must
/// hold its value (`decoupled_weight_decay` tells Adam from AdamW).
pub(crate) fn checked_group<'a>(
    sd: &'a OptimizerStateDict,
    kind: &str,
    params: &[Tensor],
    required: &[&str],
    discriminant: Option<(&str, bool)>,
) -> Result<&'a Map<String, Value>, String> {
    if sd.param_groups.len() != 1 {
        return Err("loaded state dict has a different number of parameter groups".into());
    }
    let g = &sd.param_groups[0];
    let n = g.get("params").and_then(Value::as_array).map(Vec::len);
    if n != Some(params.len()) {
        return Err(
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group".into()
        );
    }
    for key in required {
        if !g.contains_key(*key) {
            return Err(format!("loaded state dict is not a {kind} state dict: its parameter group has no {key:?}"));
        }
    }
    if let Some((key, want)) = discriminant {
        if g.get(key).and_then(Value::as_bool).unwrap_or(false) != want {
            return Err(format!("loaded state dict is not a {kind} state dict: {key} is not {want}"));
        }
    }
    if let Some(&i) = sd.state.keys().find(|&&i| i >= params.len()) {
        return Err(format!("loaded state dict has state for parameter {i}, but the optimizer has {}", params.len()));
    }
    Ok(g)
}

/// A float hyperparameter of a group.
pub(crate) fn float(g: &Map<String, Value>, key: &str) -> Result<f64, String> {
    g.get(key).and_then(Value::as_f64).ok_or_else(|| format!("loaded state dict: {key:?} is not a number"))
}

/// A boolean hyperparameter of a group (absent reads `false`, as PyTorch's defaults).
pub(crate) fn flag(g: &Map<String, Value>, key: &str) -> Result<bool, String> {
    match g.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(v) => v.as_bool().ok_or_else(|| format!("loaded state dict: {key:?} is not a boolean")),
    }
}

/// `initial_lr`, if a scheduler set it.
pub(crate) fn initial_lr(g: &Map<String, Value>) -> Option<f64> {
    g.get("initial_lr").and_then(Value::as_f64)
}

/// State tensor `name` of parameter `i`: it must exist and have `shape` and `dtype`.
pub(crate) fn tensor(
    state: &BTreeMap<String, Buffer>,
    i: usize,
    name: &str,
    dtype: DType,
    shape: &[usize],
) -> Result<Buffer, String> {
    let b = state.get(name).ok_or_else(|| format!("loaded state dict: parameter {i} has no {name:?}"))?;
    if b.dtype() != dtype || b.shape() != shape {
        return Err(format!(
            "loaded state dict: {name} of parameter {i} is {} {:?}, the parameter needs {dtype} {shape:?}",
            b.dtype(),
            b.shape()
        ));
    }
    Ok(b.clone())
}
