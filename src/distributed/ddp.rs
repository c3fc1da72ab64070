//! [`DistributedDataParallel`]: PyTorch's DDP. Every rank holds a replica of the module; at
//! construction rank 0's parameters and buffers are broadcast, and after each backward the
//! gradients are averaged across the ranks, so every replica takes the same optimizer step.
//!
//! Gradients travel in buckets (about 25 MB each by default), filled in reverse parameter
//! order, the order in which a backward usually finishes them, and after the first backward
//! refilled in the order it actually finished them (rank 0's, so all ranks agree). Each parameter's
//! post-accumulate-grad hook marks it ready; once every gradient of a bucket is final the
//! bucket's average is launched without blocking, so it travels while the backward goes on.
//! Buckets are launched in index order on every rank (a bucket that completes early waits for
//! its predecessors), so the ranks' collectives always pair up. The hook that completes the
//! last bucket waits for all of them and writes the averages back into `.grad`.
//!
//! Under `compile_train_step`, the same hooks run as plan callbacks between the backward and
//! the compiled update; nothing here is specific to either mode.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tracegrad_runtime::{Buffer, DType, Data};

use super::{DistError, ProcessGroup, ReduceOp, Work};
use crate::hooks::RemovableHandle;
use crate::nn::{AsModule, Module, ModuleCore, ModuleExt};
use crate::tensor::Tensor;

/// DDP settings (`bucket_cap_mb`, `broadcast_buffers`).
#[derive(Clone, Debug)]
pub struct DdpOptions {
    /// The size of a gradient bucket in MiB (PyTorch's default: 25).
    pub bucket_cap_mb: f64,
    /// Broadcast rank 0's buffers (BatchNorm running statistics) before each eager forward.
    pub broadcast_buffers: bool,
}

impl Default for DdpOptions {
    fn default() -> Self {
        DdpOptions { bucket_cap_mb: 25.0, broadcast_buffers: true }
    }
}

/// Wraps `module` for data-parallel training over `group` (`torch.nn.parallel.
/// DistributedDataParallel`). Its parameters are the module's, under the name prefix
/// `module.`; an optimizer built on [`parameters`](ModuleExt::parameters) steps all replicas
/// alike.
///
/// In a world of one there is nothing to average: no hook is registered and the wrapper is
/// the module itself.
#[derive(Module)]
pub struct DistributedDataParallel<M: AsModule + Send + Sync + 'static> {
    /// The wrapped replica.
    #[module]
    pub module: M,
    group: ProcessGroup,
    reducer: Option<Arc<Reducer>>,
    handles: Vec<RemovableHandle>,
    broadcast_buffers: bool,
    core: ModuleCore,
}

/// Where a parameter's gradient lives in the flattened buckets.
#[derive(Clone, Copy)]
struct Slot {
    bucket: usize,
    offset: usize,
}

struct Bucket {
    /// Indices into `Reducer::params`.
    params: Vec<usize>,
    dtype: DType,
    numel: usize,
}

/// The cap of the first bucket (PyTorch's `_DEFAULT_FIRST_BUCKET_BYTES`).
const FIRST_BUCKET_BYTES: usize = 1 << 20;

/// The buckets, filled in a given parameter order up to the cap.
struct Layout {
    buckets: Vec<Bucket>,
    slots: Vec<Slot>,
}

impl Layout {
    fn new(params: &[Tensor], order: &[usize], cap_bytes: usize) -> Layout {
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut slots = vec![Slot { bucket: 0, offset: 0 }; params.len()];
        for &i in order {
            let (dtype, n) = (params[i].dtype(), params[i].numel());
            // The first bucket is small (PyTorch's 1 MiB), so communication starts early in
            // the backward instead of after its first 25 MB.
            let cap = if buckets.len() == 1 { cap_bytes.min(FIRST_BUCKET_BYTES) } else { cap_bytes };
            let fits = buckets.last().is_some_and(|b| b.dtype == dtype && (b.numel + n) * dtype.size() <= cap);
            if !fits {
                buckets.push(Bucket { params: Vec::new(), dtype, numel: 0 });
            }
            let index = buckets.len() - 1;
            let b = &mut buckets[index];
            slots[i] = Slot { bucket: index, offset: b.numel };
            b.params.push(i);
            b.numel += n;
        }
        Layout { buckets, slots }
    }
}

/// One backward's progress.
struct Round {
    ready: Vec<bool>,
    /// Per bucket, how many of its gradients are not final yet.
    missing: Vec<usize>,
    next_launch: usize,
    in_flight: Vec<(usize, Work)>,
    /// The order in which the gradients became final.
    order: Vec<usize>,
}

struct State {
    layout: Layout,
    round: Round,
    /// Whether the buckets were already refilled in the order of a first backward.
    rebuilt: bool,
}

struct Reducer {
    group: ProcessGroup,
    names: Vec<String>,
    params: Vec<Tensor>,
    cap_bytes: usize,
    state: Mutex<State>,
    sync: AtomicBool,
    /// Time spent blocked on bucket averages that had not arrived when the backward ended.
    waited: Mutex<Duration>,
}

impl<M: AsModule + Send + Sync + 'static> DistributedDataParallel<M> {
    /// Wraps `module` with the default [`DdpOptions`].
    pub fn new(module: M, group: &ProcessGroup) -> Result<Self, DistError> {
        Self::with_options(module, group, DdpOptions::default())
    }

    /// Wraps `module`: checks that every rank's parameters and buffers have the same shapes
    /// (a mismatch is this error on every rank), broadcasts rank 0's values, and registers
    /// the gradient hooks.
    pub fn with_options(module: M, group: &ProcessGroup, options: DdpOptions) -> Result<Self, DistError> {
        if !(options.bucket_cap_mb.is_finite() && options.bucket_cap_mb > 0.0) {
            return Err(DistError(format!("bucket_cap_mb must be a positive number, got {}", options.bucket_cap_mb)));
        }
        let params = module.as_module().named_parameters();
        let buffers = module.as_module().named_buffers();
        let all: Vec<(String, Tensor)> = params.iter().chain(&buffers).cloned().collect();
        check_same_shapes(group, &all)?;
        let works: Vec<Work> = all.iter().map(|(_, t)| group.broadcast_async(t, 0)).collect::<Result<_, _>>()?;
        for w in works {
            w.wait()?;
        }
        let mut ddp = DistributedDataParallel {
            module,
            group: group.clone(),
            reducer: None,
            handles: Vec::new(),
            broadcast_buffers: options.broadcast_buffers,
            core: ModuleCore::new(),
        };
        if group.world_size() > 1 {
            // Named as the wrapper names them (`module.…`), for errors and `buckets()`.
            let trainable: Vec<(String, Tensor)> = params
                .into_iter()
                .filter(|(_, p)| p.requires_grad())
                .map(|(n, p)| (format!("module.{n}"), p))
                .collect();
            let cap = (options.bucket_cap_mb * 1024.0 * 1024.0) as usize;
            let reducer = Arc::new(Reducer::new(group.clone(), trainable, cap));
            ddp.handles = reducer.register_hooks();
            ddp.reducer = Some(reducer);
        }
        Ok(ddp)
    }

    /// The process group.
    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// The gradient buckets: per bucket, the names of its parameters (launch order).
    pub fn buckets(&self) -> Vec<Vec<String>> {
        match &self.reducer {
            None => Vec::new(),
            Some(r) => {
                r.lock().layout.buckets.iter().map(|b| b.params.iter().map(|&i| r.names[i].clone()).collect()).collect()
            }
        }
    }

    /// Total time backward passes spent waiting for gradient averages still in flight when
    /// their last gradient was final: the communication the backward did not hide.
    pub fn communication_wait(&self) -> Duration {
        self.reducer.as_ref().map_or(Duration::ZERO, |r| *r.waited.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Until the guard drops, backward passes accumulate gradients locally without
    /// communicating (PyTorch's `no_sync()` context): run the micro-batches of gradient
    /// accumulation under it and the last one outside, whose backward averages the sums.
    pub fn no_sync(&self) -> NoSyncGuard<'_> {
        let previous = self.reducer.as_ref().map(|r| r.sync.swap(false, Ordering::SeqCst));
        NoSyncGuard { ddp_reducer: self.reducer.as_deref(), previous }
    }

    /// Broadcasts rank 0's buffers to every rank. The eager forward does this itself (with
    /// `broadcast_buffers`); a compiled step reads buffers inside its plan, so call this
    /// before using running statistics (evaluation, saving) after compiled training.
    pub fn sync_buffers(&self) -> Result<(), DistError> {
        if self.group.world_size() == 1 {
            return Ok(());
        }
        let works: Vec<Work> = self
            .module
            .as_module()
            .buffers()
            .iter()
            .map(|b| self.group.broadcast_async(b, 0))
            .collect::<Result<_, _>>()?;
        works.into_iter().try_for_each(Work::wait)
    }
}

impl<M: AsModule + Send + Sync + 'static> Drop for DistributedDataParallel<M> {
    fn drop(&mut self) {
        for h in &self.handles {
            h.remove();
        }
    }
}

impl<M: AsModule + Send + Sync + 'static> Module for DistributedDataParallel<M> {
    fn forward_many(&self, xs: &[Tensor]) -> Tensor {
        // A traced forward (compile_train_step) runs once per plan: nothing to do per step.
        if !crate::trace_seam::is_tracing() {
            if let Some(r) = &self.reducer {
                r.check_round_finished().unwrap_or_else(|e| panic!("{e}"));
            }
            if self.broadcast_buffers && self.module.as_module().training() {
                self.sync_buffers().unwrap_or_else(|e| panic!("{e}"));
            }
        }
        self.module.as_module().call_many(xs)
    }
}

/// Re-enables gradient averaging when dropped (see [`DistributedDataParallel::no_sync`]).
pub struct NoSyncGuard<'a> {
    ddp_reducer: Option<&'a Reducer>,
    previous: Option<bool>,
}

impl Drop for NoSyncGuard<'_> {
    fn drop(&mut self) {
        if let (Some(r), Some(p)) = (self.ddp_reducer, self.previous) {
            r.sync.store(p, Ordering::SeqCst);
        }
    }
}

/// Encodes each tensor as (dtype, rank, dims…) so ranks can compare layouts.
fn layout_code(tensors: &[(String, Tensor)]) -> Vec<i64> {
    let mut code = vec![tensors.len() as i64];
    for (_, t) in tensors {
        let shape = t.shape();
        code.push(t.dtype() as i64);
        code.push(shape.len() as i64);
        code.extend(shape.iter().map(|&d| d as i64));
    }
    code
}

fn describe(tensors: &[(String, Tensor)]) -> String {
    let items: Vec<String> = tensors.iter().map(|(n, t)| format!("{n} {:?} {}", t.shape(), t.dtype())).collect();
    format!("{} tensors [{}]", tensors.len(), items.join(", "))
}

/// Every rank compares its parameter and buffer layout with rank 0's; a rank that differs
/// makes the check fail on every rank, naming the ranks that differ.
fn check_same_shapes(group: &ProcessGroup, tensors: &[(String, Tensor)]) -> Result<(), DistError> {
    if group.world_size() == 1 {
        return Ok(());
    }
    let mine = layout_code(tensors);
    let len = Tensor::from_vec(vec![mine.len() as i64], &[1]);
    group.broadcast(&len, 0)?;
    let root_len = len.to_vec::<i64>()[0] as usize;
    let theirs = Tensor::from_vec(if group.rank() == 0 { mine.clone() } else { vec![0i64; root_len] }, &[root_len]);
    group.broadcast(&theirs, 0)?;
    let differs = theirs.to_vec::<i64>() != mine;
    let mut flags = vec![0i64; group.world_size()];
    flags[group.rank()] = differs as i64;
    let flags = Tensor::from_vec(flags, &[group.world_size()]);
    group.all_reduce(&flags, ReduceOp::Sum)?;
    let bad: Vec<usize> = flags.to_vec::<i64>().iter().enumerate().filter(|(_, &f)| f != 0).map(|(r, _)| r).collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(DistError(format!(
        "DistributedDataParallel: the parameters and buffers of rank(s) {bad:?} do not match rank 0's in number, shape or dtype; every rank must build the same model (this is rank {}, with {})",
        group.rank(),
        describe(tensors)
    )))
}

impl Reducer {
    /// Buckets first filled in reverse parameter order, the usual order of a backward.
    fn new(group: ProcessGroup, params: Vec<(String, Tensor)>, cap_bytes: usize) -> Reducer {
        let (names, params): (Vec<String>, Vec<Tensor>) = params.into_iter().unzip();
        let order: Vec<usize> = (0..params.len()).rev().collect();
        let layout = Layout::new(&params, &order, cap_bytes);
        let round = Round::fresh(params.len(), &layout);
        Reducer {
            group,
            names,
            params,
            cap_bytes,
            state: Mutex::new(State { layout, round, rebuilt: false }),
            sync: AtomicBool::new(true),
            waited: Mutex::new(Duration::ZERO),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register_hooks(self: &Arc<Self>) -> Vec<RemovableHandle> {
        let weak: Weak<Reducer> = Arc::downgrade(self);
        (0..self.params.len())
            .map(|i| {
                let weak = weak.clone();
                self.params[i].register_post_accumulate_grad_hook(move |_| {
                    if let Some(r) = weak.upgrade() {
                        r.mark_ready(i).unwrap_or_else(|e| panic!("{e}"));
                    }
                })
            })
            .collect()
    }

    /// A parameter's gradient is final: launch every bucket now complete, in index order.
    fn mark_ready(&self, i: usize) -> Result<(), DistError> {
        if !self.sync.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut guard = self.lock();
        let state = &mut *guard;
        let (layout, round) = (&state.layout, &mut state.round);
        if round.ready[i] {
            return Err(DistError(format!(
                "DistributedDataParallel: parameter {} got its gradient twice in one round; run each backward to the end before the next (a parameter reused across backward passes needs no_sync())",
                self.names[i]
            )));
        }
        round.ready[i] = true;
        round.order.push(i);
        round.missing[layout.slots[i].bucket] -= 1;
        while round.next_launch < layout.buckets.len() && round.missing[round.next_launch] == 0 {
            let b = round.next_launch;
            round.in_flight.push((b, self.launch(layout, b)?));
            round.next_launch += 1;
        }
        if round.next_launch < layout.buckets.len() {
            return Ok(());
        }
        for (b, work) in std::mem::take(&mut round.in_flight) {
            let t0 = Instant::now();
            let flat = work.wait_buffer()?;
            *self.waited.lock().unwrap_or_else(|e| e.into_inner()) += t0.elapsed();
            self.scatter(layout, b, flat);
        }
        let order = std::mem::take(&mut round.order);
        if !state.rebuilt {
            state.rebuilt = true;
            state.layout = Layout::new(&self.params, &self.agreed_order(order)?, self.cap_bytes);
        }
        state.round = Round::fresh(self.params.len(), &state.layout);
        Ok(())
    }

    /// After the first backward, buckets are refilled in the order its gradients became final
    /// (PyTorch's bucket rebuild), so that each bucket completes as early as possible. Rank
    /// 0's order is used everywhere, so the ranks' buckets stay the same.
    fn agreed_order(&self, order: Vec<usize>) -> Result<Vec<usize>, DistError> {
        let t = Tensor::from_vec(order.iter().map(|&i| i as i64).collect::<Vec<i64>>(), &[order.len()]);
        self.group.broadcast(&t, 0)?;
        let agreed: Vec<usize> = t.to_vec::<i64>().into_iter().map(|i| i as usize).collect();
        let mut seen = vec![false; self.params.len()];
        for &i in &agreed {
            if i >= seen.len() || std::mem::replace(&mut seen[i], true) {
                return Err(DistError(
                    "DistributedDataParallel: rank 0's gradient order is not a permutation of the parameters".into(),
                ));
            }
        }
        Ok(agreed)
    }

    /// Starts averaging bucket `b`'s gradients.
    fn launch(&self, layout: &Layout, b: usize) -> Result<Work, DistError> {
        let bucket = &layout.buckets[b];
        let mut flat = Buffer::zeros(bucket.dtype, &[bucket.numel]);
        let data = flat.make_mut();
        for &i in &bucket.params {
            let grad = self.params[i].grad().ok_or_else(|| {
                DistError(format!(
                    "DistributedDataParallel: parameter {} was marked ready without a gradient",
                    self.names[i]
                ))
            })?;
            let g = grad.buffer().cast(bucket.dtype);
            let at = layout.slots[i].offset;
            match (&mut *data, g.data()) {
                (Data::F32(dst), Data::F32(src)) => dst[at..at + src.len()].copy_from_slice(src),
                (Data::F64(dst), Data::F64(src)) => dst[at..at + src.len()].copy_from_slice(src),
                (_, src) => {
                    return Err(DistError(format!(
                    "DistributedDataParallel: parameter {} has a {} gradient; only f32 and f64 gradients are averaged",
                    self.names[i],
                    src.dtype()
                )))
                }
            }
        }
        self.group.all_reduce_async(&Tensor::from_buffer(flat), ReduceOp::Avg)
    }

    /// Writes bucket `b`'s averaged gradients back into `.grad`.
    fn scatter(&self, layout: &Layout, b: usize, flat: Buffer) {
        for &i in &layout.buckets[b].params {
            let p = &self.params[i];
            let at = layout.slots[i].offset;
            let n = p.numel();
            let part = match flat.data() {
                Data::F32(v) => Buffer::from_vec(v[at..at + n].to_vec(), &p.shape()),
                Data::F64(v) => Buffer::from_vec(v[at..at + n].to_vec(), &p.shape()),
                _ => unreachable!("buckets hold f32 or f64 gradients"),
            };
            p.set_grad(Some(Tensor::from_buffer(part.cast(p.dtype()))));
        }
    }

    /// A forward must not start while a synced backward left some gradients unaveraged.
    fn check_round_finished(&self) -> Result<(), DistError> {
        let state = self.lock();
        let round = &state.round;
        if round.ready.iter().all(|r| !r) {
            return Ok(());
        }
        let missing: Vec<&str> =
            round.ready.iter().zip(&self.names).filter(|(r, _)| !**r).map(|(_, n)| n.as_str()).collect();
        Err(DistError(format!(
            "DistributedDataParallel: the previous backward produced no gradient for {missing:?}, so its gradients were never averaged; every parameter that requires grad must take part in the loss (find_unused_parameters is not built)"
        )))
    }
}

impl Round {
    fn fresh(n: usize, layout: &Layout) -> Round {
        Round {
            ready: vec![false; n],
            missing: layout.buckets.iter().map(|b| b.params.len()).collect(),
            next_launch: 0,
            in_flight: Vec::new(),
            order: Vec::new(),
        }
    }
}
