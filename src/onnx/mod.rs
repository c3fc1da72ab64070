//! ONNX in and out: [`load`] turns an ONNX file into an [`OnnxModule`], an ordinary
//! [`Module`] that runs eager, compiles, and fine-tunes; [`export`] writes a module's traced
//! forward graph as ONNX.
//!
//! Parsing goes through prost with the published `onnx.proto` (vendored under `proto/`,
//! compiled by protox in `build.rs`, so no system `protoc` is needed): prost is the maintained,
//! pure-Rust protobuf implementation, and generating from the official schema keeps the types
//! exactly ONNX's.
//!
//! # The module
//! Initializers become the module's tensors under their ONNX names, which are PyTorch's
//! `state_dict` keys when the file came from PyTorch (`0.weight` is parameter `weight` of a
//! child scope `0`):
//! - floating-point initializers are parameters;
//! - BatchNormalization's running mean and variance are persistent buffers, and so are the
//!   initializers a tracegrad export lists as buffers (metadata `tracegrad.buffers`); a
//!   BatchNormalization over `P.running_mean` also gets PyTorch's `P.num_batches_tracked`
//!   (0), which the exporter drops, so the state dict has PyTorch's keys;
//! - integer initializers and the PyTorch exporter's folded constants (`onnx::…`) are constants,
//!   outside the state dict;
//! - an `Identity` of a parameter (the exporter's way of storing equal parameters once) is a
//!   parameter of its own, initialized with a copy, as it was in PyTorch.
//!
//! # Finding a tensor by name
//! One forward keeps one environment, a map from ONNX name to value. It starts with the graph
//! inputs (in order, from the call's tensors), the module's parameters and buffers and the
//! constants, each under its ONNX name; each node then adds its outputs under theirs. A name
//! is looked up there and nowhere else; [`load`] has already checked that every name a node
//! reads is defined before it. See `eval.rs` for which values are known at trace time.
//!
//! BatchNormalization runs in inference mode (running statistics), as the exported node says,
//! whatever the module's training flag.

mod eval;
mod export;
mod model;
pub mod npy;
mod proto;
mod tensor_proto;

use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

pub use export::{export, export_bytes, EXPORT_OPSET};
pub use model::{GraphInput, OPSETS};

use crate::nn::{Module, ModuleCore, ModuleExt};
use crate::tensor::Tensor;
use crate::trace_seam;
use eval::{Args, Value};
use model::{InitKind, OnnxGraph};

/// An error from loading, running or exporting an ONNX model.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxError(pub String);

impl fmt::Display for OnnxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OnnxError {}

/// A scope of dotted names (`layers` in `layers.0.weight`): holds tensors and sub-scopes, no
/// forward of its own, like a `ModuleList`.
#[derive(crate::nn::Module, Default)]
pub struct OnnxScope {
    core: ModuleCore,
}

impl Module for OnnxScope {
    #[track_caller]
    fn forward_many(&self, _xs: &[Tensor]) -> Tensor {
        panic!("OnnxScope only groups an ONNX model's tensors by name; call the OnnxModule")
    }
}

/// A module built from an ONNX graph (see the [module docs](self)).
#[derive(crate::nn::Module)]
pub struct OnnxModule {
    core: ModuleCore,
    graph: Arc<OnnxGraph>,
    /// Parameters and buffers by ONNX name: the very tensors registered in the module tree.
    tensors: Vec<(String, Tensor)>,
    constants: Vec<(String, Tensor)>,
}

/// Reads and checks an ONNX file (see [`load_bytes`]).
pub fn load(path: impl AsRef<Path>) -> Result<OnnxModule, OnnxError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| OnnxError(format!("{}: {e}", path.display())))?;
    load_bytes(&bytes).map_err(|e| OnnxError(format!("{}: {}", path.display(), e.0)))
}

/// Decodes and checks a serialized ONNX model and builds its module.
pub fn load_bytes(bytes: &[u8]) -> Result<OnnxModule, OnnxError> {
    let graph = model::parse(bytes)?;
    let m = OnnxModule { core: ModuleCore::new(), graph: Arc::new(graph), tensors: vec![], constants: vec![] };
    m.register_initializers()
}

impl OnnxModule {
    fn register_initializers(mut self) -> Result<OnnxModule, OnnxError> {
        let mut scopes: HashMap<String, Arc<OnnxScope>> = HashMap::new();
        for (name, buf, kind) in &self.graph.initializers {
            let t = Tensor::from_buffer(buf.clone());
            if *kind == InitKind::Constant {
                self.constants.push((name.clone(), t));
                continue;
            }
            let t = if *kind == InitKind::Parameter { t.requires_grad_(true) } else { t };
            let (path, leaf) = name.rsplit_once('.').unwrap_or(("", name));
            let bad =
                |e: crate::nn::ModuleError| OnnxError(format!("initializer {name:?} cannot be a state_dict key: {e}"));
            let owner: &dyn Module =
                if path.is_empty() { &self } else { &**scope(&self, &mut scopes, path).map_err(bad)? };
            match kind {
                InitKind::Parameter => owner.register_parameter(leaf, Some(t.clone())),
                _ => owner.register_buffer(leaf, Some(t.clone()), true),
            }
            .map_err(bad)?;
            self.tensors.push((name.clone(), t));
        }
        self.register_batch_counts(&mut scopes)?;
        Ok(self)
    }

    /// PyTorch's BatchNorm also keeps `num_batches_tracked`, which the exporter drops (no
    /// inference node reads it). A BatchNormalization whose running mean is `P.running_mean`
    /// gets the buffer `P.num_batches_tracked` (0, a fresh module's count, i64 as in PyTorch),
    /// so the state dict has PyTorch's keys and a PyTorch checkpoint loads into it whole.
    fn register_batch_counts(&mut self, scopes: &mut HashMap<String, Arc<OnnxScope>>) -> Result<(), OnnxError> {
        let graph = self.graph.clone();
        for node in graph.nodes.iter().filter(|n| n.op_type == "BatchNormalization") {
            let Some(Some(mean)) = node.inputs.get(3) else { continue };
            let Some(prefix) = mean.strip_suffix(".running_mean") else { continue };
            let name = format!("{prefix}.num_batches_tracked");
            let taken = |k: &str| self.tensors.iter().chain(&self.constants).any(|(n, _)| n == k);
            if taken(&name) {
                continue;
            }
            let t = Tensor::from_vec(vec![0i64], &[]);
            let bad = |e: crate::nn::ModuleError| OnnxError(format!("buffer {name:?}: {e}"));
            let owner: &dyn Module =
                if prefix.is_empty() { &*self } else { &**scope(self, scopes, prefix).map_err(bad)? };
            owner.register_buffer("num_batches_tracked", Some(t.clone()), true).map_err(bad)?;
            self.tensors.push((name, t));
        }
        Ok(())
    }

    /// The graph inputs (name, dtype, dims; `None` for a symbolic dim such as `batch`).
    pub fn inputs(&self) -> &[GraphInput] {
        &self.graph.inputs
    }

    /// The graph outputs' names.
    pub fn output_names(&self) -> &[String] {
        &self.graph.outputs
    }

    /// The model's default-domain opset.
    pub fn opset(&self) -> i64 {
        self.graph.opset
    }

    /// Runs the graph on `inputs` (one per graph input, in order) and returns every graph
    /// output. Errors name the failing node; nothing panics. Eager unless called inside a
    /// trace (which is how `forward` is compiled).
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, OnnxError> {
        let g = &self.graph;
        self.check_inputs(inputs)?;
        let mut env: HashMap<&str, Value> = HashMap::new();
        for (i, t) in g.inputs.iter().zip(inputs) {
            env.insert(&i.name, Value::Live(t.clone()));
        }
        for (n, t) in &self.tensors {
            env.insert(n, Value::Live(t.clone()));
        }
        for (n, t) in &self.constants {
            env.insert(n, Value::Known(t.clone()));
        }
        for node in &g.nodes {
            let values = node.inputs.iter().map(|i| i.as_ref().and_then(|i| env.get(i.as_str()).cloned())).collect();
            let outs = run_node(&Args { node, values })
                .map_err(|e| OnnxError(format!("ONNX node {:?} ({}): {e}", node.name, node.op_type)))?;
            for (name, v) in node.outputs.iter().zip(outs) {
                if !name.is_empty() {
                    env.insert(name, v);
                }
            }
        }
        Ok(g.outputs.iter().map(|o| env[o.as_str()].tensor().clone()).collect())
    }
}

impl OnnxModule {
    /// Checks `inputs` against the graph inputs' count, dtypes and fixed dims.
    pub fn check_inputs(&self, inputs: &[Tensor]) -> Result<(), OnnxError> {
        let g = &self.graph;
        if inputs.len() != g.inputs.len() {
            return Err(OnnxError(format!("the model takes {} inputs, got {}", g.inputs.len(), inputs.len())));
        }
        g.inputs.iter().zip(inputs).try_for_each(|(i, t)| check_input(i, t))
    }
}

fn scope<'a>(
    root: &OnnxModule,
    scopes: &'a mut HashMap<String, Arc<OnnxScope>>,
    path: &str,
) -> Result<&'a Arc<OnnxScope>, crate::nn::ModuleError> {
    if !scopes.contains_key(path) {
        let s = Arc::new(OnnxScope::default());
        let (parent, leaf) = path.rsplit_once('.').unwrap_or(("", path));
        if parent.is_empty() {
            root.register_module(leaf, s.clone())?;
        } else {
            scope(root, scopes, parent)?.register_module(leaf, s.clone())?;
        }
        scopes.insert(path.to_string(), s);
    }
    Ok(&scopes[path])
}

fn check_input(i: &GraphInput, t: &Tensor) -> Result<(), OnnxError> {
    let s = t.shape();
    let fits = s.len() == i.dims.len() && s.iter().zip(&i.dims).all(|(a, b)| b.is_none_or(|b| b == *a));
    if t.dtype() != i.dtype || !fits {
        let dims: Vec<String> = i.dims.iter().map(|d| d.map_or("?".into(), |d| d.to_string())).collect();
        return Err(OnnxError(format!(
            "input {:?} expects {:?}[{}], got {:?}{:?}",
            i.name,
            i.dtype,
            dims.join(", "),
            t.dtype(),
            s
        )));
    }
    Ok(())
}

/// Runs a node: with tracing suspended and grad mode off when every input is known. A panic
/// of an eager op (a shape mismatch the file did not declare) becomes this node's error.
fn run_node(a: &Args) -> Result<Vec<Value>, String> {
    // A shape is concrete even while tracing, so `Shape` of anything is known.
    let known = a.node.op_type == "Shape" || a.values.iter().flatten().all(|v| matches!(v, Value::Known(_)));
    let go = || catch_unwind(AssertUnwindSafe(|| eval::apply(a)));
    let res = if known {
        let saved = trace_seam::tracer();
        trace_seam::set_tracer(None);
        let r = crate::no_grad(go);
        trace_seam::set_tracer(saved);
        r
    } else {
        go()
    };
    let outs = match res {
        Ok(r) => r?,
        Err(p) => return Err(tracegrad_runtime::panic::panic_message(&*p).unwrap_or("panicked").to_string()),
    };
    Ok(outs.into_iter().map(|t| if known { Value::Known(t) } else { Value::Live(t) }).collect())
}

impl Module for OnnxModule {
    /// The first graph output. Panics with the node's error on failure, which `compile`
    /// reports as a `CompileError`; [`OnnxModule::run`] returns it instead.
    fn forward_many(&self, xs: &[Tensor]) -> Tensor {
        match self.run(xs) {
            Ok(mut outs) => outs.swap_remove(0),
            Err(e) => panic!("{e}"),
        }
    }

    fn extra_repr(&self) -> String {
        format!("opset={}, nodes={}", self.graph.opset, self.graph.nodes.len())
    }
}
