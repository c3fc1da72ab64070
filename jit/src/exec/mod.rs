//! The executor: a graph compiled to a plan of steps (JIT kernels, runtime kernels such as
//! gemm and conv, and hook callbacks), a liveness-based memory plan, and the run loop.
//!
//! Memory: every value is freed after its last use; freed storage goes to a pool that later
//! kernels draw their outputs from (same dtype and length), and a pointwise kernel writes an
//! output over an input that dies at that kernel when it owns the input's storage (in place).
//! The plan's `peak_bytes` is the high-water mark of live intermediate and output bytes.
//!
//! Building runs three phases, one module each: `plan` (dead code, fusion, group order,
//! lowering to steps), `memory` (liveness, in-place and donation choice, recycling, peak)
//! and `run` (the loop that executes the steps).

mod memory;
mod plan;
mod run;

use std::collections::HashSet;
use std::fmt::Write;
use std::time::{Duration, Instant};

use tracegrad_compiler::graph::{Graph, NodeKind};
use tracegrad_compiler::ops::OpError;
use tracegrad_runtime::Buffer;

use crate::module::{compile_kernels, CompiledKernel, JitCode};
use memory::{plan_memory, MemoryPlan};
use plan::{plan, Plan, Step};

/// How an [`Executable`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// Fused groups as Cranelift kernels (the default).
    #[default]
    Jit,
    /// The reference interpreter: one runtime kernel per node (the correctness oracle).
    Interpreter,
}

/// A graph compiled for execution.
pub struct Executable {
    graph: Graph,
    backend: Backend,
    /// The steps (empty for the interpreter, which runs the graph itself).
    plan: Plan,
    memory: MemoryPlan,
    kernels: Vec<CompiledKernel>,
    build_time: Duration,
    // Declared last: dropped after everything that holds kernel pointers.
    _code: Option<JitCode>,
}

impl std::fmt::Debug for Executable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executable")
            .field("backend", &self.backend)
            .field("steps", &self.plan.steps.len())
            .field("kernels", &self.kernels.len())
            .field("peak_bytes", &self.memory.peak_bytes)
            .finish()
    }
}

/// A failed [`Executable::run_donated`]: the error and every input, intact.
pub struct DonatedError {
    /// What failed.
    pub error: OpError,
    /// The inputs, in order, unchanged.
    pub inputs: Vec<Buffer>,
}

impl Executable {
    /// Compiles `g` for `backend`.
    pub fn new(g: &Graph, backend: Backend) -> Result<Executable, String> {
        Executable::with_donation(g, backend, &[])
    }

    /// Compiles `g` for `backend`; the inputs marked in `donated` may be overwritten in place
    /// when they are passed to [`Executable::run_donated`] as sole owners (a training step
    /// donates the parameters it replaces, as `jax.jit(donate_argnums=...)` does). An
    /// overwrite happens only after the last step that can fail.
    pub fn with_donation(g: &Graph, backend: Backend, donated: &[bool]) -> Result<Executable, String> {
        let t0 = Instant::now();
        let (mut plan, memory) = match backend {
            Backend::Jit => {
                let mut plan = plan(g)?;
                let memory = plan_memory(g, &mut plan, donated);
                (plan, memory)
            }
            Backend::Interpreter => {
                g.topo_order()?;
                (Plan::default(), MemoryPlan::default())
            }
        };
        let specs = std::mem::take(&mut plan.specs);
        let (code, kernels) = if specs.is_empty() {
            (None, Vec::new())
        } else {
            let (code, kernels) = compile_kernels(&specs)?;
            (Some(code), kernels)
        };
        Ok(Executable { graph: g.clone(), backend, plan, memory, kernels, build_time: t0.elapsed(), _code: code })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The graph this plan runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Peak bytes of intermediate and output values during one run (the memory plan's
    /// high-water mark; graph inputs are the caller's and not counted). 0 for the interpreter,
    /// which plans no memory.
    pub fn peak_bytes(&self) -> usize {
        self.memory.peak_bytes
    }

    /// Time spent compiling (fusion, lowering, code generation, memory planning).
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// Number of JIT kernel launches per run.
    pub fn kernel_steps(&self) -> usize {
        self.plan.steps.iter().filter(|s| matches!(s, Step::Kernel { .. })).count()
    }

    /// Number of distinct compiled kernels (equal kernels share one function).
    pub fn distinct_kernels(&self) -> usize {
        let mut seen = HashSet::new();
        self.kernels.iter().filter(|k| seen.insert(k.f as usize)).count()
    }

    /// The Cranelift IR of every kernel.
    pub fn clif_text(&self) -> String {
        let mut s = String::new();
        let mut seen = HashSet::new();
        for (i, k) in self.kernels.iter().enumerate() {
            if !seen.insert(k.f as usize) {
                let _ = writeln!(s, "; kernel {i}: same code as an earlier kernel (cached by signature)\n");
                continue;
            }
            let _ = writeln!(
                s,
                "; kernel {i}: {} {}×{}",
                if k.spec.row_kernel { "rows" } else { "pointwise" },
                k.spec.rows,
                k.spec.cols
            );
            let _ = writeln!(s, "{}", k.clif);
        }
        s
    }

    /// The plan: steps, buffer assignments and the peak.
    pub fn plan_text(&self) -> String {
        let p = &self.plan;
        let mut s = String::new();
        if self.backend == Backend::Interpreter {
            let _ = writeln!(s, "plan (Interpreter): every node on the reference kernels, in topological order");
            return s;
        }
        let _ = writeln!(
            s,
            "plan ({:?}): {} steps, {} values, peak {} bytes",
            self.backend,
            p.steps.len(),
            p.types.len(),
            self.memory.peak_bytes
        );
        for i in &p.inputs {
            let node = p.value.iter().find(|(_, &x)| x == *i).map(|(n, _)| n.index()).unwrap_or(0);
            let _ = writeln!(s, "  input v{i} = %{node}: {}", p.types[*i]);
        }
        for (i, step) in p.steps.iter().enumerate() {
            let _ = writeln!(s, "  {i:3}: {}", self.step_text(step));
            let _ = write!(s, "       live {} bytes", self.memory.live_at[i]);
            if !self.memory.free_after[i].is_empty() {
                let _ = write!(s, "; free {}", value_list(&self.memory.free_after[i]));
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "  outputs {}", value_list(&p.outputs));
        for f in &p.fallbacks {
            let _ = writeln!(s, "  note: {f}");
        }
        s
    }

    /// One step of [`Executable::plan_text`].
    fn step_text(&self, step: &Step) -> String {
        let types = &self.plan.types;
        match step {
            Step::Kernel { kernel, args, outs, reuse, nodes } => {
                let k = &self.kernels[*kernel].spec;
                let placed: Vec<String> = outs
                    .iter()
                    .zip(reuse)
                    .map(|(o, r)| match r {
                        Some(r) => format!("v{o}: {} (in place of v{r})", types[*o]),
                        None => format!("v{o}: {}", types[*o]),
                    })
                    .collect();
                let members: Vec<String> = nodes.iter().map(|n| format!("%{}", n.index())).collect();
                format!(
                    "kernel {kernel} ({}, {} × {}) [{}] <- {} ; nodes {}",
                    if k.row_kernel { "rows" } else { "pointwise" },
                    k.rows,
                    k.cols,
                    placed.join(", "),
                    value_list(args),
                    members.join(" ")
                )
            }
            Step::Eval { node, args, out } => {
                let name = self.graph.op(*node).map_or("?", |op| op.name());
                format!("{name} v{out}: {} <- {} ; %{}", types[*out], value_list(args), node.index())
            }
            Step::Accumulate { args, out, trans, negate, in_place, nodes } => {
                let members: Vec<String> = nodes.iter().map(|n| format!("%{}", n.index())).collect();
                format!(
                    "matmul_accumulate v{out}: {}{} = v{} {} v{}·(v{}{} · v{}{}) ; nodes {}",
                    types[*out],
                    if *in_place { format!(" (in place of v{})", args[0]) } else { String::new() },
                    args[0],
                    if *negate { "-" } else { "+" },
                    args[3],
                    args[1],
                    if trans.0 { "ᵀ" } else { "" },
                    args[2],
                    if trans.1 { "ᵀ" } else { "" },
                    members.join(" ")
                )
            }
            Step::Callback { node, args, out } => {
                let label = match self.graph.kind(*node) {
                    NodeKind::Callback { label, .. } => label.as_str(),
                    _ => "",
                };
                format!("callback !! {label} v{out} <- {}", value_list(args))
            }
        }
    }
}

fn value_list(xs: &[usize]) -> String {
    xs.iter().map(|x| format!("v{x}")).collect::<Vec<_>>().join(", ")
}
