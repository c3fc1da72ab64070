//! The run phase: executing a plan's steps on real buffers, with the memory plan's frees,
//! in-place outputs and storage pool, and large kernels split across threads.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tracegrad_compiler::interpret::{eval_node, interpret, CallbackResults, CallbackRunner};
use tracegrad_compiler::ops::{OpError, OpResult, TensorType};
use tracegrad_runtime::kernels::matmul::matmul_accumulate;
use tracegrad_runtime::{panic_message, Buffer, DType, Data};

use super::plan::Step;
use super::{Backend, DonatedError, Executable};

/// Work items (elements × program size) below which a kernel runs on the calling thread:
/// small graphs must not pay for thread hand-off.
const PARALLEL_WORK: usize = 1 << 16;

/// Freed storage, by dtype and length, for later kernel outputs.
type Pool = HashMap<(DType, usize), Vec<Data>>;

impl Executable {
    /// Runs the plan on `inputs` (one per graph input, in order); returns the outputs.
    pub fn run(&self, inputs: &[Buffer], callbacks: &dyn CallbackRunner) -> OpResult<Vec<Buffer>> {
        self.run_donated(inputs.to_vec(), callbacks).map_err(|e| e.error)
    }

    /// [`Executable::run`], taking the inputs by value: a donated input (see
    /// [`Executable::with_donation`]) that is passed as its storage's only owner may be
    /// overwritten by an output. On an error every input comes back unchanged.
    pub fn run_donated(
        &self,
        inputs: Vec<Buffer>,
        callbacks: &dyn CallbackRunner,
    ) -> Result<Vec<Buffer>, DonatedError> {
        if self.backend == Backend::Interpreter {
            return interpret(&self.graph, &inputs, &CatchingRunner(callbacks))
                .map_err(|error| DonatedError { error, inputs });
        }
        let p = &self.plan;
        if inputs.len() != p.inputs.len() {
            let error = OpError::new("run", format!("the graph takes {} inputs, got {}", p.inputs.len(), inputs.len()));
            return Err(DonatedError { error, inputs });
        }
        for (&v, b) in p.inputs.iter().zip(&inputs) {
            if TensorType::of(b) != p.types[v] {
                let error =
                    OpError::new("run", format!("input v{v} should be {} but got {}", p.types[v], TensorType::of(b)));
                return Err(DonatedError { error, inputs });
            }
        }
        let mut vals: Vec<Option<Buffer>> = vec![None; p.types.len()];
        for (&v, b) in p.inputs.iter().zip(inputs) {
            vals[v] = Some(b);
        }
        match tracegrad_runtime::team::scope(|| self.execute(&mut vals, callbacks)) {
            Ok(()) => Ok(p.outputs.iter().map(|&v| vals[v].clone().expect("output computed")).collect()),
            Err(error) => {
                let inputs = p.inputs.iter().map(|&v| vals[v].take().expect("inputs are kept until the end")).collect();
                Err(DonatedError { error, inputs })
            }
        }
    }

    fn execute(&self, vals: &mut [Option<Buffer>], callbacks: &dyn CallbackRunner) -> OpResult<()> {
        let (p, m) = (&self.plan, &self.memory);
        for (v, b) in &p.constants {
            vals[*v] = Some(b.clone());
        }
        let mut pool = Pool::new();
        let mut results = CallbackResults::default();
        let callbacks = CatchingRunner(callbacks);
        for (si, step) in p.steps.iter().enumerate() {
            match step {
                Step::Kernel { kernel, args, outs, reuse, .. } => {
                    self.run_kernel(*kernel, args, outs, reuse, vals, &mut pool);
                }
                Step::Accumulate { args, out, trans, negate, in_place, .. } => {
                    let taken = if *in_place { vals[args[0]].take() } else { vals[args[0]].clone() };
                    let mut dst = taken.expect("live argument");
                    let arg = |i: usize| vals[args[i]].as_ref().expect("live argument");
                    let s = arg(3).item();
                    // A shared `p` (the caller still holds it) is copied by `make_mut` first.
                    matmul_accumulate(dst.make_mut(), arg(1), arg(2), trans.0, trans.1, if *negate { -s } else { s });
                    vals[*out] = Some(dst);
                }
                Step::Eval { node, args, out } | Step::Callback { node, args, out } => {
                    let a: Vec<&Buffer> = args.iter().map(|&x| vals[x].as_ref().expect("live argument")).collect();
                    let r = eval_node(&self.graph, *node, &a, &callbacks, &mut results)?;
                    vals[*out] = Some(r);
                }
            }
            for &v in &m.free_after[si] {
                if let Some(b) = vals[v].take() {
                    if m.recycle[v] {
                        if let Ok(d) = b.into_data() {
                            pool.entry((d.dtype(), d.len())).or_default().push(d);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Output storage for a kernel: an argument's (in place), pooled, or fresh. Returns the
    /// storage and the arguments taken over, as (argument value, output index).
    fn kernel_outputs(
        &self,
        outs: &[usize],
        reuse: &[Option<usize>],
        vals: &mut [Option<Buffer>],
        pool: &mut Pool,
    ) -> (Vec<Data>, Vec<(usize, usize)>) {
        let mut out_data: Vec<Data> = Vec::with_capacity(outs.len());
        let mut taken: Vec<(usize, usize)> = Vec::new();
        for (o, (&out, r)) in outs.iter().zip(reuse).enumerate() {
            let ty = &self.plan.types[out];
            let mut data = None;
            if let Some(a) = r {
                if let Some(b) = vals[*a].take() {
                    match b.into_data() {
                        Ok(d) => {
                            taken.push((*a, o));
                            data = Some(d);
                        }
                        Err(b) => vals[*a] = Some(b),
                    }
                }
            }
            let data = data.unwrap_or_else(|| {
                pool.get_mut(&(ty.dtype, ty.numel()))
                    .and_then(|p| p.pop())
                    .unwrap_or_else(|| fresh(ty.dtype, ty.numel()))
            });
            out_data.push(data);
        }
        (out_data, taken)
    }

    fn run_kernel(
        &self,
        kernel: usize,
        args: &[usize],
        outs: &[usize],
        reuse: &[Option<usize>],
        vals: &mut [Option<Buffer>],
        pool: &mut Pool,
    ) {
        let k = &self.kernels[kernel];
        let (mut out_data, taken) = self.kernel_outputs(outs, reuse, vals, pool);
        let out_ptrs: Vec<*mut u8> = out_data.iter_mut().map(|d| d.as_mut_ptr()).collect();
        let arg_ptrs: Vec<*const u8> = args
            .iter()
            .map(|a| match taken.iter().find(|(t, _)| t == a) {
                Some(&(_, o)) => out_ptrs[o] as *const u8,
                None => vals[*a].as_ref().expect("live argument").data().as_ptr(),
            })
            .collect();
        let items = k.spec.items();
        let work = k.spec.rows * k.spec.cols * k.spec.nodes.len().max(1);
        let threads = rayon::current_num_threads();
        let ptrs = KernelArgs { args: arg_ptrs, outs: out_ptrs };
        if work < PARALLEL_WORK || threads == 1 || items < 2 {
            // SAFETY: the pointers address live storage of the types and lengths the kernel was
            // generated for (checked when the plan was built), outputs do not overlap inputs
            // except an in-place output over an argument it reads elementwise.
            unsafe { (k.f)(ptrs.args.as_ptr(), ptrs.outs.as_ptr(), 0, items as i64) };
        } else {
            let chunks = (threads * 4).min(items);
            let per = items.div_ceil(chunks);
            let per = if k.spec.row_kernel { per } else { per.next_multiple_of(16) };
            let f = k.f;
            tracegrad_runtime::team::for_each(items.div_ceil(per), &|c| {
                let (s, e) = (c * per, ((c + 1) * per).min(items));
                let p = &ptrs;
                // SAFETY: as above; chunks write disjoint ranges of the outputs.
                unsafe { f(p.args.as_ptr(), p.outs.as_ptr(), s as i64, e as i64) };
            });
        }
        for (&out, mut d) in outs.iter().zip(out_data) {
            let ty = &self.plan.types[out];
            let n = ty.numel();
            if d.len() != n {
                // SAFETY: a fresh output (capacity n, see `fresh`); the kernel has written all
                // n elements (its ranges cover [0, items), and every item writes its elements).
                unsafe { d.set_len(n) };
            }
            vals[out] = Some(Buffer::new(d, &ty.shape));
        }
    }
}

/// Fresh storage for a kernel output, not initialized (no memset: the kernel writes every
/// element; the caller sets the length after it ran). A large buffer comes straight from
/// `mmap` untouched; asking for transparent huge pages before the kernel's first write turns
/// thousands of 4 KiB page faults into a few 2 MiB ones (a fresh 64 MiB output: ~15 ms less on
/// the pointwise chain).
fn fresh(dtype: DType, n: usize) -> Data {
    let mut d = Data::with_capacity(dtype, n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n * dtype.size();
        if bytes >= 4 * HUGE {
            let start = d.as_mut_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            let end = (start + bytes) / HUGE * HUGE;
            if end > aligned {
                // SAFETY: [aligned, end) lies inside this allocation, which we own; MADV_HUGEPAGE
                // only changes how the kernel backs the pages, never their contents (fresh
                // pages read as zero either way). A failure is harmless and ignored.
                unsafe { libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE) };
            }
        }
    }
    d
}

struct KernelArgs {
    args: Vec<*const u8>,
    outs: Vec<*mut u8>,
}

// SAFETY: the pointers are only dereferenced by kernels, which read inputs and write
// disjoint ranges of outputs; the storage outlives the parallel section.
unsafe impl Sync for KernelArgs {}

/// Runs callbacks, turning a panicking hook into an error (the caller stays usable).
struct CatchingRunner<'a>(&'a dyn CallbackRunner);

impl CallbackRunner for CatchingRunner<'_> {
    fn run(&self, id: usize, args: &[Buffer]) -> Result<Vec<Buffer>, String> {
        match catch_unwind(AssertUnwindSafe(|| self.0.run(id, args))) {
            Ok(r) => r,
            Err(p) => Err(format!("hook panicked: {}", panic_message(&*p).unwrap_or("unknown panic"))),
        }
    }
}
