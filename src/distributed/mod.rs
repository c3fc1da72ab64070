//! Data-parallel training across processes: a process group (rank, world size, collectives)
//! and [`DistributedDataParallel`], PyTorch's DDP.
//!
//! Built with the cargo feature `mpi` and launched under `mpirun`, [`init`] joins the MPI job
//! (rsmpi over the system's Open MPI). Otherwise it returns a world of one, where every
//! collective is the identity, so the same program runs unchanged in one process.
//!
//! All MPI calls of a process run on one communication thread, in submission order, as
//! PyTorch's MPI backend does. So collectives match up across ranks as long as every rank
//! submits them in the same order, and a non-blocking collective progresses while the caller
//! keeps computing: DDP's gradient buckets travel while the backward still runs.
//!
//! Faults: a rank whose process group is dropped while it panics aborts the whole job
//! (`MPI_Abort`) with a message naming the rank, instead of finalizing and waiting on ranks
//! that wait on it; a rank that exits without finalizing is noticed by `mpirun`, which ends the
//! job; a collective that does not complete within the group's timeout aborts the job too.

mod ddp;
#[cfg(feature = "mpi")]
mod mpi_backend;
mod sync_batch_norm;
pub mod train;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tracegrad_runtime::{Buffer, DType, Data};

use crate::tensor::Tensor;

pub use ddp::{DdpOptions, DistributedDataParallel, NoSyncGuard};
pub use sync_batch_norm::SyncBatchNorm2d;

/// How [`ProcessGroup::all_reduce`] combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise mean over the ranks (float tensors only).
    Avg,
    /// Elementwise maximum.
    Max,
}

/// Why a collective or a distributed set-up failed.
#[derive(Clone, Debug, PartialEq)]
pub struct DistError(pub String);

impl fmt::Display for DistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DistError {}

/// What the transport runs: reductions are sums or maxima (averages divide afterwards).
/// Only MPI reads the details: in a world of one every collective is the identity.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) enum Collective {
    AllReduce(ReduceOp),
    Broadcast(usize),
    Barrier,
}

/// How long a collective may take before the job is aborted (PyTorch's process-group timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A set of cooperating processes (`torch.distributed`'s default group). Cloning shares it.
#[derive(Clone)]
pub struct ProcessGroup {
    inner: Arc<Inner>,
}

struct Inner {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    transport: Transport,
}

enum Transport {
    /// A world of one: every collective is the identity.
    Local,
    #[cfg(feature = "mpi")]
    Mpi(mpi_backend::Mpi),
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Finalizing while unwinding would wait on ranks that wait on this one: end the job.
        if std::thread::panicking() && self.world_size > 1 {
            abort_job(self.rank, self.world_size, "panicked");
        }
    }
}

/// Prints why and ends every rank of the job (`MPI_Abort`); in a world of one, the process.
fn abort_job(rank: usize, world_size: usize, why: &str) -> ! {
    eprintln!("tracegrad.distributed: rank {rank} (of {world_size}) {why}; aborting the job");
    #[cfg(feature = "mpi")]
    if world_size > 1 {
        mpi_backend::abort(1);
    }
    std::process::exit(1)
}

/// How many threads of this process are blocked on a collective's result: the
/// communication thread drives collectives without pause only while someone waits.
pub(crate) static WAITERS: AtomicUsize = AtomicUsize::new(0);

/// The live group of this process: MPI joins once, so later `init` calls share it.
static GROUP: Mutex<Option<Weak<Inner>>> = Mutex::new(None);

/// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`).
pub fn launched_under_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some())
}

/// Joins the job with the default timeout ([`DEFAULT_TIMEOUT`]); see [`init_with_timeout`].
pub fn init() -> Result<ProcessGroup, DistError> {
    init_with_timeout(DEFAULT_TIMEOUT)
}

/// Joins the job (`torch.distributed.init_process_group`). Under `mpirun` with the `mpi`
/// feature, the group is MPI's world; without the feature, or not launched by MPI, it is a
/// world of one. A second call while the group lives returns the same group. Launched under
/// `mpirun` without the feature is an error, not a silent world of one: each rank would train
/// alone.
pub fn init_with_timeout(timeout: Duration) -> Result<ProcessGroup, DistError> {
    let mut slot = GROUP.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(inner) = slot.as_ref().and_then(Weak::upgrade) {
        return Ok(ProcessGroup { inner });
    }
    let inner = Arc::new(start(timeout, slot.is_some())?);
    *slot = Some(Arc::downgrade(&inner));
    Ok(ProcessGroup { inner })
}

#[cfg(feature = "mpi")]
fn start(timeout: Duration, was_started: bool) -> Result<Inner, DistError> {
    if !launched_under_mpi() {
        return Ok(Inner { rank: 0, world_size: 1, timeout, transport: Transport::Local });
    }
    if was_started {
        return Err(DistError(
            "distributed::init: MPI was finalized when the last process group dropped; a process joins the job once"
                .into(),
        ));
    }
    let (mpi, rank, world_size) = mpi_backend::Mpi::start()?;
    Ok(Inner { rank, world_size, timeout, transport: Transport::Mpi(mpi) })
}

#[cfg(not(feature = "mpi"))]
fn start(timeout: Duration, _was_started: bool) -> Result<Inner, DistError> {
    let size = std::env::var("OMPI_COMM_WORLD_SIZE").or_else(|_| std::env::var("PMI_SIZE"));
    if let Ok(n) = size.as_deref().map(str::parse::<usize>) {
        if n.is_ok_and(|n| n > 1) {
            return Err(DistError(
                "distributed::init: launched by mpirun with several ranks, but this tracegrad was built without MPI; rebuild with `--features mpi`".into(),
            ));
        }
    }
    Ok(Inner { rank: 0, world_size: 1, timeout, transport: Transport::Local })
}

/// A world of one, whatever the launcher: for code that wants no communication at all.
pub fn single_process() -> ProcessGroup {
    ProcessGroup {
        inner: Arc::new(Inner { rank: 0, world_size: 1, timeout: DEFAULT_TIMEOUT, transport: Transport::Local }),
    }
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProcessGroup(rank {} of {})", self.rank(), self.world_size())
    }
}

impl ProcessGroup {
    /// This process's index, `0..world_size`.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.inner.world_size
    }

    /// How long a collective may take before the job is aborted.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Prints `rank R (of N) {why}; aborting the job` and ends every rank (`MPI_Abort`). A
    /// rank that fails on its own must not finalize: the others may be waiting on it.
    pub fn abort(&self, why: &str) -> ! {
        abort_job(self.rank(), self.world_size(), why)
    }

    /// Blocks until every rank has reached the barrier.
    pub fn barrier(&self) -> Result<(), DistError> {
        let rx = self.submit(Collective::Barrier, Data::default())?;
        self.receive(rx, "barrier").map(drop)
    }

    /// Replaces `t`'s value with rank `root`'s on every rank (shape and dtype must agree).
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), DistError> {
        self.broadcast_async(t, root)?.wait()
    }

    /// [`broadcast`](Self::broadcast), returning at once; [`Work::wait`] writes the result.
    pub fn broadcast_async(&self, t: &Tensor, root: usize) -> Result<Work, DistError> {
        if root >= self.world_size() {
            return Err(DistError(format!("broadcast: root {root} is not a rank of a world of {}", self.world_size())));
        }
        let b = concrete(t, "broadcast")?;
        self.launch(t, b, Collective::Broadcast(root), "broadcast")
    }

    /// Combines `t` across the ranks with `op`, in place: afterwards every rank holds the result.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<(), DistError> {
        self.all_reduce_async(t, op)?.wait()
    }

    /// [`all_reduce`](Self::all_reduce), returning at once; [`Work::wait`] writes the result.
    pub fn all_reduce_async(&self, t: &Tensor, op: ReduceOp) -> Result<Work, DistError> {
        let b = concrete(t, "all_reduce")?;
        match (b.dtype(), op) {
            (DType::Bool, _) => return Err(DistError("all_reduce: bool tensors cannot be reduced".into())),
            (d, ReduceOp::Avg) if !d.is_float() => {
                return Err(DistError(format!("all_reduce: ReduceOp::Avg needs a float tensor, got {d}")))
            }
            _ => {}
        }
        self.launch(t, b, Collective::AllReduce(op), "all_reduce")
    }

    fn launch(&self, t: &Tensor, b: Buffer, c: Collective, what: &'static str) -> Result<Work, DistError> {
        let shape = b.shape().to_vec();
        let data = b.into_data().unwrap_or_else(|shared| shared.data().clone());
        let rx = self.submit(c, data)?;
        let avg = matches!(c, Collective::AllReduce(ReduceOp::Avg));
        Ok(Work { group: self.clone(), rx, target: t.clone(), shape, avg, what })
    }

    fn submit(&self, c: Collective, data: Data) -> Result<mpsc::Receiver<Data>, DistError> {
        let (tx, rx) = mpsc::channel();
        match &self.inner.transport {
            Transport::Local => {
                // One rank: a sum, maximum or broadcast of one value is that value.
                tx.send(data).expect("the receiver is alive");
            }
            #[cfg(feature = "mpi")]
            Transport::Mpi(m) => m.submit(c, data, tx)?,
        }
        let _ = c;
        Ok(rx)
    }

    fn receive(&self, rx: mpsc::Receiver<Data>, what: &str) -> Result<Data, DistError> {
        WAITERS.fetch_add(1, Ordering::SeqCst);
        let got = rx.recv_timeout(self.inner.timeout);
        WAITERS.fetch_sub(1, Ordering::SeqCst);
        match got {
            Ok(d) => Ok(d),
            // A collective cannot be cancelled: a rank that stopped taking part leaves the
            // others waiting forever, so end the job rather than hang.
            Err(mpsc::RecvTimeoutError::Timeout) => abort_job(
                self.rank(),
                self.world_size(),
                &format!("waited {:?} for {what} (another rank stopped or took a different path)", self.inner.timeout),
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(DistError(format!("{what}: the communication thread of rank {} stopped", self.rank())))
            }
        }
    }
}

/// The value of a tensor a collective may read: concrete (never a traced symbol).
fn concrete(t: &Tensor, what: &str) -> Result<Buffer, DistError> {
    if t.is_symbolic() {
        return Err(DistError(format!(
            "{what}: a collective needs a value, but this tensor is being traced; compiled graphs cannot contain collectives"
        )));
    }
    Ok(t.buffer())
}

/// A collective in flight (`torch.distributed`'s `Work`): [`wait`](Self::wait) blocks until it
/// completed and writes the result into the tensor it was started on.
#[must_use = "a collective's result arrives only through wait()"]
pub struct Work {
    group: ProcessGroup,
    rx: mpsc::Receiver<Data>,
    target: Tensor,
    shape: Vec<usize>,
    avg: bool,
    what: &'static str,
}

impl Work {
    /// Waits for the collective and writes its result into the tensor.
    pub fn wait(self) -> Result<(), DistError> {
        let target = self.target.clone();
        let b = self.wait_buffer()?;
        target.set_buffer(b);
        Ok(())
    }

    /// Waits and returns the result without writing it anywhere.
    pub(crate) fn wait_buffer(self) -> Result<Buffer, DistError> {
        let data = self.group.receive(self.rx, self.what)?;
        let b = Buffer::new(data, &self.shape);
        if !self.avg {
            return Ok(b);
        }
        let n = self.group.world_size() as f64;
        Ok(match b.data() {
            Data::F32(v) => {
                Buffer::from_vec(v.iter().map(|x| (*x as f64 / n) as f32).collect::<Vec<f32>>(), &self.shape)
            }
            Data::F64(v) => Buffer::from_vec(v.iter().map(|x| x / n).collect::<Vec<f64>>(), &self.shape),
            other => unreachable!("Avg was checked to be float, got {}", other.dtype()),
        })
    }
}

impl ProcessGroup {
    /// This rank's [`DistributedSampler`](crate::data::DistributedSampler) over `n` samples
    /// (shuffled, seed 0; call `set_epoch` every epoch).
    pub fn sampler(&self, n: usize) -> Result<crate::data::DistributedSampler, DistError> {
        crate::data::DistributedSampler::new(n, self.world_size(), self.rank() as i64)
            .map_err(|e| DistError(e.to_string()))
    }

    /// Checks that `sampler` splits the data over this group as this rank: a sampler built
    /// for another world size or rank would make ranks skip or repeat samples silently.
    pub fn check_sampler(&self, sampler: &crate::data::DistributedSampler) -> Result<(), DistError> {
        if sampler.num_replicas() != self.world_size() || sampler.rank() != self.rank() {
            return Err(DistError(format!(
                "DistributedSampler is for rank {} of {} replicas, but this process is rank {} of a world of {}",
                sampler.rank(),
                sampler.num_replicas(),
                self.rank(),
                self.world_size()
            )));
        }
        Ok(())
    }
}
