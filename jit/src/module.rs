//! The JIT module of one compiled artifact: its kernels are defined, finalized once, and the
//! code memory is freed when the artifact drops.

use std::collections::HashMap;
use std::sync::OnceLock;

use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::FunctionBuilderContext;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};

use crate::codegen;
use crate::kernel::KernelSpec;
use crate::math::MathCtx;

/// A kernel's entry point: `(inputs, outputs, start, end)`.
pub type KernelFn = unsafe extern "C" fn(*const *const u8, *const *mut u8, i64, i64);

/// One compiled kernel.
#[derive(Clone)]
pub struct CompiledKernel {
    /// Entry point (valid while the owning [`JitCode`] lives).
    pub f: KernelFn,
    /// The function's Cranelift IR, as generated (before Cranelift's own optimizations).
    pub clif: String,
    /// The kernel it implements.
    pub spec: KernelSpec,
}

/// The code memory of one artifact.
pub struct JitCode {
    module: Option<JITModule>,
}

// SAFETY: after `finalize_definitions` the module is never used again except by `Drop`,
// which has exclusive access; the code it owns is immutable and the function pointers handed
// out are plain `fn` pointers, callable from any thread.
unsafe impl Send for JitCode {}
// SAFETY: no method reads the module through a shared reference.
unsafe impl Sync for JitCode {}

impl Drop for JitCode {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: the artifact that owns this code is being dropped, and with it every
            // `CompiledKernel` copy reachable from safe code (executables keep their kernels
            // next to their `JitCode` and drop them together), so no pointer into it is
            // called afterwards.
            unsafe { m.free_memory() };
        }
    }
}

fn isa() -> Result<cranelift_codegen::isa::OwnedTargetIsa, String> {
    let mut fb = settings::builder();
    fb.set("opt_level", "speed").map_err(|e| e.to_string())?;
    fb.set("use_colocated_libcalls", "false").map_err(|e| e.to_string())?;
    fb.set("is_pic", "false").map_err(|e| e.to_string())?;
    let mut ib = cranelift_native::builder().map_err(|e| format!("host machine is not supported by Cranelift: {e}"))?;
    if crate::lanes::Width::cap() < crate::lanes::Width::Avx512 && cfg!(target_arch = "x86_64") {
        // TRACEGRAD_ISA=avx2: no EVEX encodings, as on a machine without AVX-512.
        for flag in
            ["has_avx512f", "has_avx512vl", "has_avx512dq", "has_avx512bitalg", "has_avx512vbmi", "has_avx512vnni"]
        {
            ib.set(flag, "false").map_err(|e| format!("{flag}: {e}"))?;
        }
    }
    ib.finish(settings::Flags::new(fb)).map_err(|e| e.to_string())
}

/// Whether the host ISA has FMA (cached).
pub fn math_ctx() -> MathCtx {
    static CTX: OnceLock<MathCtx> = OnceLock::new();
    *CTX.get_or_init(MathCtx::native)
}

/// Compiles `specs` into one JIT module. Equal kernels (`KernelSpec: Eq`) share one function:
/// the returned list has one entry per spec, in order.
pub fn compile_kernels(specs: &[KernelSpec]) -> Result<(JitCode, Vec<CompiledKernel>), String> {
    let mut module = JITModule::new(JITBuilder::with_isa(isa()?, default_libcall_names()));
    let mut ctx = Context::new();
    let mut fctx = FunctionBuilderContext::new();
    let sig = codegen::signature(module.isa().default_call_conv());
    let mut by_spec: HashMap<&KernelSpec, usize> = HashMap::new();
    let mut unique: Vec<(cranelift_module::FuncId, String, KernelSpec)> = Vec::new();
    let mut index = Vec::with_capacity(specs.len());
    for spec in specs {
        if let Some(&i) = by_spec.get(spec) {
            index.push(i);
            continue;
        }
        let name = format!("kernel{}", unique.len());
        let id = module.declare_function(&name, Linkage::Local, &sig).map_err(|e| e.to_string())?;
        ctx.func.signature = sig.clone();
        codegen::emit(spec, &mut ctx.func, &mut fctx, math_ctx(), module.isa().frontend_config());
        let clif = ctx.func.display().to_string();
        module.define_function(id, &mut ctx).map_err(|e| format!("{name}: {e:?}\n{clif}"))?;
        let relocs = ctx.compiled_code().map_or(0, |c| c.buffer.relocs().len());
        if relocs != 0 {
            // Kernels are straight-line arithmetic; a relocation means Cranelift lowered some
            // instruction to a library call, which the hot loops must never make.
            return Err(format!("{name} would call out to a library ({relocs} relocations)\n{clif}"));
        }
        module.clear_context(&mut ctx);
        by_spec.insert(spec, unique.len());
        index.push(unique.len());
        unique.push((id, clif, spec.clone()));
    }
    module.finalize_definitions().map_err(|e| e.to_string())?;
    let compiled: Vec<CompiledKernel> = unique
        .into_iter()
        .map(|(id, clif, spec)| {
            let ptr = module.get_finalized_function(id);
            // SAFETY: `ptr` is a function defined above with `codegen::signature`, i.e.
            // `extern "C" fn(i64, i64, i64, i64)` on the host call convention.
            let f = unsafe { std::mem::transmute::<*const u8, KernelFn>(ptr) };
            CompiledKernel { f, clif, spec }
        })
        .collect();
    let kernels = index.into_iter().map(|i| compiled[i].clone()).collect();
    Ok((JitCode { module: Some(module) }, kernels))
}
