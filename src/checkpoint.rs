//! Training checkpoints: [`save`] writes everything a run needs to continue exactly where it
//! stopped, [`load`] puts it back.
//!
//! One file holds the model's [`state_dict`](crate::nn::ModuleExt::state_dict), the optimizer's
//! state dict (eager [`Optimizer`]s and the compiled [`TrainStep`] alike, in PyTorch's layout),
//! an LR scheduler's state dict, the step count and the random generator's state. It is a
//! safetensors file: the tensors are its tensors (`model/NAME`, `optimizer/INDEX/SLOT`), and
//! the rest is JSON in its metadata under the key `tracegrad.checkpoint`:
//!
//! ```json
//! {"format": 1, "step": 40, "model": ["0.weight", …],
//!  "optimizer": {"param_groups": [{"lr": 0.1, …, "params": [0, 1, 2, 3]}],
//!                "state": {"0": ["momentum_buffer"], …}},
//!  "scheduler": {"step_size": 10, "gamma": 0.5, "base_lrs": [0.1], …} | null,
//!  "generator": {"seed": 0, "offset": 128, "chacha_words": 5120} | null}
//! ```
//!
//! The generator slot holds a [`RngState`] given by the caller in [`Progress`], usually
//! [`get_rng_state()`](crate::get_rng_state) (the default generator: the Philox stream that
//! dropout and the random tensor ops draw from, and the ChaCha8 stream of initializers and
//! samplers); after a [`load`], the caller restores it with
//! [`set_rng_state`](crate::set_rng_state), so a run with dropout resumes bit for bit.
//!
//! A load reads and checks the whole file, then restores the model, the optimizer and the
//! scheduler. If any of them refuses (another parameter count, a shape, another optimizer or
//! scheduler kind), the ones already restored are put back as they were: a failed load changes
//! nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracegrad_runtime::random::RngState;

use crate::compile::TrainStep;
use crate::nn::{state_from_safetensors, Module, ModuleExt};
use crate::optim::{LrScheduler, Optimizer, OptimizerStateDict};
use crate::tensor::Tensor;

/// The metadata key of the checkpoint's JSON.
const KEY: &str = "tracegrad.checkpoint";
/// The version of the layout written here.
const FORMAT: u32 = 1;

/// Something holding optimizer state in PyTorch's `state_dict()` layout: every eager
/// [`Optimizer`] and the compiled [`TrainStep`].
pub trait OptimizerState {
    /// The state dict (see [`Optimizer::state_dict`]).
    fn optimizer_state(&self) -> Result<OptimizerStateDict, String>;
    /// Restores a state dict; an error changes nothing (see [`Optimizer::load_state_dict`]).
    fn load_optimizer_state(&mut self, sd: &OptimizerStateDict) -> Result<(), String>;
}

impl<T: Optimizer + ?Sized> OptimizerState for T {
    fn optimizer_state(&self) -> Result<OptimizerStateDict, String> {
        Ok(self.state_dict())
    }

    fn load_optimizer_state(&mut self, sd: &OptimizerStateDict) -> Result<(), String> {
        self.load_state_dict(sd)
    }
}

impl OptimizerState for TrainStep<'_> {
    fn optimizer_state(&self) -> Result<OptimizerStateDict, String> {
        self.state_dict()
    }

    fn load_optimizer_state(&mut self, sd: &OptimizerStateDict) -> Result<(), String> {
        self.load_state_dict(sd)
    }
}

/// How far a run has got: what a checkpoint keeps besides the model, optimizer and scheduler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Steps (or whatever unit the caller counts) taken so far.
    pub step: u64,
    /// The random generator's state ([`get_rng_state()`](crate::get_rng_state)), when the
    /// run draws random values.
    pub generator: Option<RngState>,
}

/// The JSON part of a checkpoint.
#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    step: u64,
    /// The model's state dict keys, in its order.
    model: Vec<String>,
    optimizer: OptimizerHeader,
    scheduler: Option<Map<String, Value>>,
    generator: Option<RngState>,
}

/// An optimizer state dict without its tensors: the groups, and each parameter's slot names.
#[derive(Serialize, Deserialize)]
struct OptimizerHeader {
    param_groups: Vec<Map<String, Value>>,
    state: BTreeMap<usize, Vec<String>>,
}

/// A checkpoint read back: the pieces [`load`] restores.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The model's state dict.
    pub model: Vec<(String, Tensor)>,
    /// The optimizer's state dict.
    pub optimizer: OptimizerStateDict,
    /// The scheduler's state dict, if one was saved.
    pub scheduler: Option<Map<String, Value>>,
    /// The step count and generator state.
    pub progress: Progress,
}

/// Writes a checkpoint of `model`, `optimizer`, `scheduler` (if any) and `progress` to `path`
/// (see the [module docs](self) for the layout). The file is written whole or, on an error,
/// not replaced.
pub fn save<O: OptimizerState + ?Sized>(
    path: impl AsRef<Path>,
    model: &dyn Module,
    optimizer: &O,
    scheduler: Option<&dyn LrScheduler>,
    progress: Progress,
) -> Result<(), String> {
    let path = path.as_ref();
    let ck = Checkpoint {
        model: model.state_dict(),
        optimizer: optimizer.optimizer_state()?,
        scheduler: scheduler.map(|s| s.state_dict()),
        progress,
    };
    let bytes = to_bytes(&ck).map_err(|e| format!("{}: {e}", path.display()))?;
    // Written beside the target and renamed over it, so a failed write leaves no torn file.
    let tmp = path.with_extension("tmp-checkpoint");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads a checkpoint written by [`save`] without restoring it.
pub fn read(path: impl AsRef<Path>) -> Result<Checkpoint, String> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Restores a checkpoint written by [`save`] into `model`, `optimizer` and `scheduler`, and
/// returns its [`Progress`]. A checkpoint with a scheduler needs one to load into, and one
/// without cannot restore one. Any mismatch (parameter names, count or shapes, optimizer or
/// scheduler kind) is an error, and then none of the three has changed.
pub fn load<O: OptimizerState + ?Sized>(
    path: impl AsRef<Path>,
    model: &dyn Module,
    optimizer: &mut O,
    scheduler: Option<&mut (dyn LrScheduler + '_)>,
) -> Result<Progress, String> {
    let path = path.as_ref();
    let ck = read(path)?;
    restore(&ck, model, optimizer, scheduler).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(ck.progress)
}

/// Restores `ck`, all or nothing: the model and the scheduler are put back as they were when
/// a later part refuses (reloading their own state cannot fail; if it did, that is the error).
fn restore<O: OptimizerState + ?Sized>(
    ck: &Checkpoint,
    model: &dyn Module,
    optimizer: &mut O,
    scheduler: Option<&mut (dyn LrScheduler + '_)>,
) -> Result<(), String> {
    match (&ck.scheduler, &scheduler) {
        (Some(_), None) => return Err("the checkpoint has scheduler state but no scheduler was given".into()),
        (None, Some(_)) => return Err("the checkpoint has no scheduler state to restore the given scheduler".into()),
        _ => {}
    }
    let own: Vec<String> = model.state_dict().into_iter().map(|(k, _)| k).collect();
    let saved: Vec<&String> = ck.model.iter().map(|(k, _)| k).collect();
    if own.len() != saved.len() {
        return Err(format!("the checkpoint's model has {} tensors, this model {}", saved.len(), own.len()));
    }
    let old_model =
        model.state_dict().into_iter().map(|(k, t)| (k, Tensor::from_buffer(t.buffer()))).collect::<Vec<_>>();
    let old_scheduler = scheduler.as_ref().map(|s| s.state_dict());
    model.load_state_dict(&ck.model, true).map_err(|e| e.to_string())?;
    let undo_model = || model.load_state_dict(&old_model, true).map(|_| ()).map_err(|e| e.to_string());
    // The optimizer goes last, so that nothing ever has to undo its load.
    let mut scheduler = scheduler;
    if let (Some(sd), Some(s)) = (&ck.scheduler, scheduler.as_deref_mut()) {
        if let Err(e) = s.load_state_dict(sd) {
            undo_model()?;
            return Err(format!("scheduler: {e}"));
        }
    }
    if let Err(e) = optimizer.load_optimizer_state(&ck.optimizer) {
        undo_model()?;
        if let (Some(old), Some(s)) = (&old_scheduler, scheduler) {
            s.load_state_dict(old)?;
        }
        return Err(format!("optimizer: {e}"));
    }
    Ok(())
}

/// The checkpoint's bytes: a safetensors file with the JSON header in its metadata.
fn to_bytes(ck: &Checkpoint) -> Result<Vec<u8>, String> {
    let mut tensors: Vec<(String, Tensor)> =
        ck.model.iter().map(|(k, t)| (format!("model/{k}"), Tensor::from_buffer(t.buffer()))).collect();
    let mut slots = BTreeMap::new();
    for (i, st) in &ck.optimizer.state {
        slots.insert(*i, st.keys().cloned().collect());
        for (slot, b) in st {
            tensors.push((format!("optimizer/{i}/{slot}"), Tensor::from_buffer(b.clone())));
        }
    }
    let header = Header {
        format: FORMAT,
        step: ck.progress.step,
        model: ck.model.iter().map(|(k, _)| k.clone()).collect(),
        optimizer: OptimizerHeader { param_groups: ck.optimizer.param_groups.clone(), state: slots },
        scheduler: ck.scheduler.clone(),
        generator: ck.progress.generator,
    };
    let json = serde_json::to_string(&header).map_err(|e| e.to_string())?;
    crate::nn::state_to_safetensors_with(&tensors, Some(HashMap::from([(KEY.to_string(), json)])))
        .map_err(|e| e.to_string())
}

/// Parses a checkpoint's bytes; every tensor the header names must be there, and no other.
fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, String> {
    let mut tensors: HashMap<String, Tensor> =
        state_from_safetensors(bytes).map_err(|e| e.to_string())?.into_iter().collect();
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(KEY))
        .ok_or_else(|| format!("not a tracegrad checkpoint: the safetensors metadata has no {KEY:?}"))?;
    let h: Header = serde_json::from_str(json).map_err(|e| format!("invalid checkpoint metadata: {e}"))?;
    if h.format != FORMAT {
        return Err(format!("checkpoint format {} is not supported (this build reads format {FORMAT})", h.format));
    }
    let mut take = |key: String| tensors.remove(&key).ok_or_else(|| format!("the checkpoint lacks tensor {key:?}"));
    let model = h.model.iter().map(|k| Ok((k.clone(), take(format!("model/{k}"))?))).collect::<Result<_, String>>()?;
    let mut state = BTreeMap::new();
    for (i, slots) in &h.optimizer.state {
        let mut st = BTreeMap::new();
        for s in slots {
            st.insert(s.clone(), take(format!("optimizer/{i}/{s}"))?.buffer());
        }
        state.insert(*i, st);
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(format!("the checkpoint has tensor {extra:?}, which its metadata does not name"));
    }
    Ok(Checkpoint {
        model,
        optimizer: OptimizerStateDict { state, param_groups: h.optimizer.param_groups },
        scheduler: h.scheduler,
        progress: Progress { step: h.step, generator: h.generator },
    })
}
