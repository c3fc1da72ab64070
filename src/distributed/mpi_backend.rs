//! The MPI transport (feature `mpi`): one communication thread that initializes MPI, runs
//! every collective of this process in submission order and finalizes MPI when the process
//! group drops.
//!
//! MPI is initialized with `MPI_THREAD_MULTIPLE` only so that [`abort`] may be called from
//! whichever thread gives up; every other call is made on the communication thread.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::request::{scope, Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use tracegrad_runtime::Data;

use super::{Collective, DistError, ReduceOp};

struct Job {
    collective: Collective,
    data: Data,
    reply: mpsc::Sender<Data>,
}

/// The communication thread and its queue.
pub(super) struct Mpi {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Mpi {
    /// Starts the communication thread, which joins the job; returns it with (rank, size).
    pub(super) fn start() -> Result<(Mpi, usize, usize), DistError> {
        // Open MPI busy-polls while it waits; a rank whose compute threads share its cores
        // must yield instead (unless the user chose otherwise). Read by MPI_Init.
        if std::env::var_os("OMPI_MCA_mpi_yield_when_idle").is_none() {
            std::env::set_var("OMPI_MCA_mpi_yield_when_idle", "1");
        }
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel::<Result<(usize, usize), DistError>>();
        let worker = std::thread::Builder::new()
            .name("tracegrad-mpi".into())
            .spawn(move || {
                let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
                    let _ = ready_tx.send(Err(DistError("distributed::init: MPI was already initialized in this process".into())));
                    return;
                };
                if threading != Threading::Multiple {
                    eprintln!("tracegrad.distributed: this MPI provides {threading:?} threading, not Multiple; aborting from a non-communication thread may misbehave");
                }
                let world = universe.world();
                let _ = ready_tx.send(Ok((world.rank() as usize, world.size() as usize)));
                for job in queue {
                    let out = run(&world, job.collective, job.data);
                    // The waiter may have given up (its process is aborting); nothing to do.
                    let _ = job.reply.send(out);
                }
                // Dropping the universe finalizes MPI, on the thread that initialized it.
                drop(universe);
            })
            .map_err(|e| DistError(format!("distributed::init: cannot start the communication thread: {e}")))?;
        let (rank, size) = ready.recv().map_err(|_| {
            DistError("distributed::init: the communication thread stopped while joining the job".into())
        })??;
        Ok((Mpi { jobs: Mutex::new(Some(jobs)), worker: Mutex::new(Some(worker)) }, rank, size))
    }

    /// Queues a collective; its result arrives on `reply`.
    pub(super) fn submit(
        &self,
        collective: Collective,
        data: Data,
        reply: mpsc::Sender<Data>,
    ) -> Result<(), DistError> {
        if data.len() > i32::MAX as usize {
            return Err(DistError(format!(
                "a collective over {} elements exceeds MPI's count limit ({})",
                data.len(),
                i32::MAX
            )));
        }
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let sender = jobs.as_ref().ok_or_else(|| DistError("the process group was shut down".into()))?;
        sender
            .send(Job { collective, data, reply })
            .map_err(|_| DistError("the communication thread of this rank stopped".into()))
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the collectives already queued.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

/// Ends every process of the job.
pub(super) fn abort(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

fn system_op(op: ReduceOp) -> SystemOperation {
    match op {
        // Averages are sums divided afterwards.
        ReduceOp::Sum | ReduceOp::Avg => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
    }
}

/// Between two tests of a collective nobody is blocked on yet.
const POLL: Duration = Duration::from_micros(50);

/// How long a collective someone is blocked on is tested without pause.
const MAX_SPIN: Duration = Duration::from_millis(2);

/// Drives a non-blocking collective to completion. While a caller of this process is blocked
/// on a result its core is free, so the thread tests without pause (for up to [`MAX_SPIN`]);
/// otherwise (the collective
/// overlaps the backward) it tests every [`POLL`], so that waiting for a peer that has not
/// arrived yet does not take a core from the computation. (Open MPI makes progress only
/// inside MPI calls, and its blocking calls spin.)
fn complete<'a, D: ?Sized, S: Scope<'a>>(mut request: Request<'a, D, S>) {
    let mut spinning_since: Option<Instant> = None;
    loop {
        match request.test() {
            Ok(_) => return,
            Err(r) => request = r,
        }
        if super::WAITERS.load(Ordering::SeqCst) == 0 {
            spinning_since = None;
            std::thread::sleep(POLL);
            continue;
        }
        // A long wait (a peer far behind, a barrier) goes back to polling: spinning there
        // would only slow the ranks being waited for, which may share this core.
        let since = *spinning_since.get_or_insert_with(Instant::now);
        if since.elapsed() < MAX_SPIN {
            std::thread::yield_now();
        } else {
            std::thread::sleep(POLL);
        }
    }
}

/// Runs one collective on the communication thread.
fn run(world: &SimpleCommunicator, collective: Collective, mut data: Data) -> Data {
    macro_rules! each {
        ($data:expr, $v:ident => $body:expr) => {
            match $data {
                Data::Bool($v) => $body,
                Data::U8($v) => $body,
                Data::I64($v) => $body,
                Data::F32($v) => $body,
                Data::F64($v) => $body,
            }
        };
    }
    match collective {
        Collective::Barrier => complete(world.immediate_barrier()),
        Collective::Broadcast(root) => {
            let root = world.process_at_rank(root as i32);
            each!(&mut data, v => scope(|sc| complete(root.immediate_broadcast_into(sc, &mut v[..]))));
        }
        Collective::AllReduce(op) => {
            let op = system_op(op);
            // Bool was refused before submission; MPI's sum and max are undefined on C bools.
            data = match &data {
                Data::Bool(_) => data,
                Data::U8(v) => Data::U8(reduce(world, v, op)),
                Data::I64(v) => Data::I64(reduce(world, v, op)),
                Data::F32(v) => Data::F32(reduce(world, v, op)),
                Data::F64(v) => Data::F64(reduce(world, v, op)),
            };
        }
    }
    data
}

fn reduce<T: Equivalence + Copy + Default>(world: &SimpleCommunicator, v: &[T], op: SystemOperation) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    scope(|sc| complete(world.immediate_all_reduce_into(sc, v, &mut out[..], op)));
    out
}
