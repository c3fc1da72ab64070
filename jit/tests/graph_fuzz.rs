//! Graph JSON against hostile input: `Graph::from_json` either refuses a graph with `Err`, or
//! returns one that the interpreter and the JIT run to `Ok` or `Err`; nothing panics. The
//! hand-made cases are the ones found by hand (each must be refused); the mutated ones are
//! real graphs (layers, layouts, convolutions and pooling with their gradients, indexing)
//! with numbers, arrays and names changed at random. Every case runs under `catch_unwind`.
//! A graph that passes validation but whose values would need more than `BYTE_BUDGET` bytes
//! runs in a child process (this test binary, filtered to [`large_graph_child`]) with
//! `TRACEGRAD_MAX_ALLOC` at the budget: storage allocation is fallible, so every oversized
//! tensor must come back as an `Err` from the run; an abort would show as the child's exit.

use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tracegrad_compiler::autodiff::append_backward_plain;
use tracegrad_compiler::graph::{GNode, Graph, GraphJson, InputRole, NodeId, NodeKind};
use tracegrad_compiler::interpret::{interpret, NoCallbacks};
use tracegrad_compiler::ops::{Op, ReduceKind, UnaryOp};
use tracegrad_compiler::{composite, Build, Emitter, TensorType};
use tracegrad_jit::{Backend, Executable};
use tracegrad_runtime::{Buffer, DType};

const BYTE_BUDGET: usize = 64 << 20;

fn input(g: &mut Graph, name: &str, dtype: DType, shape: &[usize]) -> NodeId {
    g.add_input(name, InputRole::Data, TensorType::new(dtype, shape))
}

/// Appends the gradients of `sum(out)` w.r.t. the float inputs as outputs.
fn with_gradients(mut g: Graph, out: NodeId) -> Graph {
    let total = g.sum(&out, &[], false).unwrap();
    let seed = g.full(1.0, DType::F32, &[]).unwrap();
    let wrt: Vec<NodeId> = g.inputs.iter().copied().filter(|&i| g.ty(i).dtype == DType::F32).collect();
    let grads = append_backward_plain(&mut g, &[(total, seed)], &wrt).unwrap();
    for (k, gr) in grads.into_iter().flatten().enumerate() {
        g.add_output(&format!("grad{k}"), gr);
    }
    g
}

fn mlp() -> Graph {
    let mut g = Graph::new();
    let x = input(&mut g, "x", DType::F32, &[4, 8]);
    let w = input(&mut g, "w", DType::F32, &[6, 8]);
    let b = input(&mut g, "b", DType::F32, &[6]);
    let h = composite::linear(&mut g, &x, &w, Some(&b)).unwrap();
    let r = g.unary(UnaryOp::Tanh, &h).unwrap();
    let s = composite::softmax(&mut g, &r, 1).unwrap();
    let am = g.emit(Op::ArgReduce { min: false, dim: Some(1), keepdim: false }, &[&s]).unwrap();
    g.add_output("argmax", am);
    with_gradients(g, s)
}

fn layouts() -> Graph {
    let mut g = Graph::new();
    let x = input(&mut g, "x", DType::F32, &[2, 3, 4]);
    let p = g.permute(&x, &[2, 0, 1]).unwrap();
    let r = g.reshape(&p, &[4, 6]).unwrap();
    let n = g.narrow(&r, 1, 1, 3).unwrap();
    let c = g.cat(&[&n, &n], 0).unwrap();
    let e = g.reshape(&c, &[1, 8, 3]).unwrap();
    let e = g.expand(&e, &[2, 8, 3]).unwrap();
    let m = g.reduce(ReduceKind::Max, &e, &[0, 2], true).unwrap();
    g.add_output("max", m);
    with_gradients(g, e)
}

fn conv() -> Graph {
    let mut g = Graph::new();
    let x = input(&mut g, "x", DType::F32, &[1, 2, 6, 6]);
    let w = input(&mut g, "w", DType::F32, &[3, 2, 3, 3]);
    let c = g.emit(Op::Conv2d { stride: [1, 1], padding: [1, 1] }, &[&x, &w]).unwrap();
    let m = g.emit(Op::MaxPool2d { kernel: [2, 2], stride: [2, 2], padding: [0, 0] }, &[&c]).unwrap();
    let a = g
        .emit(Op::AvgPool2d { kernel: [2, 2], stride: [1, 1], padding: [1, 1], count_include_pad: false }, &[&m])
        .unwrap();
    with_gradients(g, a)
}

fn indexing() -> Graph {
    let mut g = Graph::new();
    let x = input(&mut g, "x", DType::F32, &[5, 4]);
    let i = input(&mut g, "i", DType::I64, &[3]);
    let j = input(&mut g, "j", DType::I64, &[5, 2]);
    let s = g.emit(Op::IndexSelect { dim: 0 }, &[&x, &i]).unwrap();
    let t = g.emit(Op::Gather { dim: 1 }, &[&x, &j]).unwrap();
    let k = g.constant(Buffer::from_vec(vec![0.5f32, -1.0, 2.0, 0.0], &[4])).unwrap();
    let y = g.mul(&s, &k).unwrap();
    let zero = g.full(0.0, DType::F32, &[]).unwrap();
    let pos = g.compare(tracegrad_compiler::ops::CompareOp::Gt, &y, &zero).unwrap();
    let w = g.where_(&pos, &y, &zero).unwrap();
    let c = g.cast(&t, DType::F64).unwrap();
    g.add_output("c", c);
    with_gradients(g, w)
}

fn seeds() -> Vec<Value> {
    [mlp(), layouts(), conv(), indexing()].iter().map(|g| serde_json::from_str(&g.to_json()).unwrap()).collect()
}

/// Deterministic inputs of the graph's input types (index inputs are 0, a valid index).
fn inputs_for(g: &Graph) -> Vec<Buffer> {
    g.inputs
        .iter()
        .map(|&i| {
            let ty = g.ty(i);
            let n = ty.numel();
            let vals: Vec<f64> =
                (0..n).map(|k| if ty.dtype.is_float() { (k % 7) as f64 * 0.25 - 0.5 } else { 0.0 }).collect();
            Buffer::from_vec(vals, &ty.shape).cast(ty.dtype)
        })
        .collect()
}

/// The bytes the graph's values would take.
fn bytes(g: &Graph) -> usize {
    g.node_ids().map(|n| g.ty(n).numel().saturating_mul(8)).fold(0usize, usize::saturating_add)
}

/// One case: parse, and when it is a graph within budget, run it on both backends. Returns
/// what happened, or the panic message.
fn run_case(text: &str) -> Result<&'static str, String> {
    catch_unwind(AssertUnwindSafe(|| {
        let Ok(g) = Graph::from_json(text) else { return "refused" };
        if bytes(&g) > BYTE_BUDGET {
            return TOO_LARGE;
        }
        let args = inputs_for(&g);
        let _ = interpret(&g, &args, &NoCallbacks);
        for backend in [Backend::Jit, Backend::Interpreter] {
            if let Ok(exe) = Executable::new(&g, backend) {
                let _ = exe.run(&args, &NoCallbacks);
            }
        }
        "ran"
    }))
    .map_err(|p| tracegrad_runtime::panic_message(&*p).unwrap_or("a panic").to_string())
}

/// The outcome of a valid graph over `BYTE_BUDGET`, which runs in the child process instead.
const TOO_LARGE: &str = "valid, too large to run";

/// The most too-large graphs one child run takes (each is refused within milliseconds at the
/// first oversized allocation, but a budget keeps the child's time bounded under load).
const MAX_LARGE_RUNS: usize = 400;

/// Writes `texts` to a file and runs [`large_graph_child`] on them in a child process with
/// the allocation ceiling at `BYTE_BUDGET`; the child must exit 0 (no escaped panic, no abort).
fn run_large_graphs_in_child(texts: &[String]) {
    let path = std::env::temp_dir().join(format!("graph_fuzz_large_{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_string(texts).unwrap()).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["large_graph_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("GRAPH_FUZZ_LARGE_FILE", &path)
        .env("TRACEGRAD_MAX_ALLOC", BYTE_BUDGET.to_string())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 101 is a failed child test (an escaped panic); no code at all is a signal (SIGABRT).
    assert_eq!(out.status.code(), Some(0), "the too-large graphs' child run failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("large graphs: {} run", texts.len())), "{stdout}");
}

/// One too-large graph in the child: inputs over the ceiling are refused before anything
/// runs; otherwise the interpreter and both backends must return `Ok` or `Err`.
fn run_large_case(text: &str) -> Result<&'static str, String> {
    catch_unwind(AssertUnwindSafe(|| {
        let g = Graph::from_json(text).expect("the parent saw this graph validate");
        let mut args = Vec::new();
        for &i in &g.inputs {
            let ty = g.ty(i);
            match Buffer::try_full(0.5, ty.dtype, &ty.shape) {
                Ok(b) => args.push(b),
                Err(_) => return "inputs over the ceiling",
            }
        }
        let mut errs = 0;
        errs += usize::from(interpret(&g, &args, &NoCallbacks).is_err());
        for backend in [Backend::Jit, Backend::Interpreter] {
            match Executable::new(&g, backend) {
                Ok(exe) => errs += usize::from(exe.run(&args, &NoCallbacks).is_err()),
                Err(_) => errs += 1,
            }
        }
        if errs == 0 {
            "ran"
        } else {
            "errors"
        }
    }))
    .map_err(|p| tracegrad_runtime::panic_message(&*p).unwrap_or("a panic").to_string())
}

/// The child side of [`run_large_graphs_in_child`] (reads `GRAPH_FUZZ_LARGE_FILE`).
#[test]
#[ignore = "child-process entry, run by mutated_graphs_are_refused_or_run_without_panicking"]
fn large_graph_child() {
    let Ok(path) = std::env::var("GRAPH_FUZZ_LARGE_FILE") else {
        // Run by hand (`--ignored`) without its parent: there are no graphs to run.
        eprintln!("large_graph_child runs only as the child of mutated_graphs_are_refused_or_run_without_panicking");
        return;
    };
    let texts: Vec<String> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for (k, text) in texts.iter().enumerate() {
        match run_large_case(text) {
            Ok(what) => *counts.entry(what).or_insert(0usize) += 1,
            Err(why) => panic!("too-large graph {k} panicked: {why}\n{text}"),
        }
    }
    println!("large graphs: {} run: {counts:?}", texts.len());
}

const HOSTILE_NUMBERS: [u64; 12] = [0, 1, 2, 3, 7, 9, 255, 1 << 31, 1 << 32, u64::MAX, (1 << 63) + 3, 10_000_000_000];

/// Every number in `v`, as a path of keys and indices.
fn number_paths(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Number(_) => out.push(path.clone()),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(json!(i));
                number_paths(x, path, out);
                path.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                path.push(json!(k));
                number_paths(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match k {
        Value::String(s) => &mut v[s.as_str()],
        k => &mut v[k.as_u64().unwrap() as usize],
    })
}

/// Every array in `v`, as paths.
fn array_paths(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Array(a) => {
            out.push(path.clone());
            for (i, x) in a.iter().enumerate() {
                path.push(json!(i));
                array_paths(x, path, out);
                path.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                path.push(json!(k));
                array_paths(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn mutate(rng: &mut ChaCha8Rng, v: &mut Value) {
    let mut numbers = Vec::new();
    number_paths(v, &mut Vec::new(), &mut numbers);
    let mut arrays = Vec::new();
    array_paths(v, &mut Vec::new(), &mut arrays);
    match rng.random_range(0..10) {
        0..=4 => {
            let p = &numbers[rng.random_range(0..numbers.len())];
            let x = if rng.random_bool(0.5) {
                json!(HOSTILE_NUMBERS[rng.random_range(0..HOSTILE_NUMBERS.len())])
            } else {
                json!(rng.random_range(0..12u64))
            };
            *at(v, p) = x;
        }
        5 | 6 => {
            let p = &arrays[rng.random_range(0..arrays.len())];
            let a = at(v, p).as_array_mut().unwrap();
            if !a.is_empty() {
                let i = rng.random_range(0..a.len());
                if rng.random_bool(0.5) {
                    a.remove(i);
                } else {
                    let x = a[i].clone();
                    a.push(x);
                }
            }
        }
        7 => {
            // Another dtype somewhere.
            let text = v.to_string();
            let from = ["\"F32\"", "\"I64\"", "\"Bool\"", "\"F64\"", "\"U8\""];
            let to = from[rng.random_range(0..from.len())];
            let f = from[rng.random_range(0..from.len())];
            if let Ok(w) = serde_json::from_str(&text.replacen(f, to, 1 + rng.random_range(0..3))) {
                *v = w;
            }
        }
        8 => {
            // A node's operands rewired.
            let nodes = v["nodes"].as_array_mut().unwrap();
            let n = nodes.len();
            let k = rng.random_range(0..n);
            if let Some(ops) = nodes[k]["operands"].as_array_mut() {
                if !ops.is_empty() {
                    let i = rng.random_range(0..ops.len());
                    ops[i] = json!(rng.random_range(0..n + 2));
                }
            }
        }
        _ => {
            // An input dropped from the list or listed twice; an output pointing elsewhere.
            let n = v["nodes"].as_array().unwrap().len();
            match rng.random_range(0..3) {
                0 => {
                    v["inputs"].as_array_mut().unwrap().pop();
                }
                1 => {
                    let first = v["inputs"][0].clone();
                    v["inputs"].as_array_mut().unwrap().push(first);
                }
                _ => {
                    let o = v["outputs"].as_array_mut().unwrap();
                    let i = rng.random_range(0..o.len());
                    if let Some(id) = o[i].get_mut(1) {
                        *id = json!(rng.random_range(0..n));
                    }
                }
            }
        }
    }
}

/// Re-derives every op node's stored type from its shape rule, in id order, where the rule
/// accepts: a mutated attribute then reaches the validator's later checks and the kernels
/// instead of stopping at a type mismatch.
fn retyped(v: &Value) -> Option<Value> {
    let mut j: GraphJson = serde_json::from_value(v.clone()).ok()?;
    j.nodes.sort_by_key(|n| n.id);
    let mut types: std::collections::HashMap<usize, TensorType> = std::collections::HashMap::new();
    for n in &mut j.nodes {
        if let NodeKind::Op(op) = &n.node.kind {
            let operands: Option<Vec<TensorType>> = n.operands.iter().map(|o| types.get(o).cloned()).collect();
            if let Some(Ok(ty)) = operands.map(|t| op.infer(&t)) {
                n.node.ty = ty;
            }
        }
        types.insert(n.id, n.node.ty.clone());
    }
    serde_json::to_value(&j).ok()
}

#[test]
fn mutated_graphs_are_refused_or_run_without_panicking() {
    let seeds = seeds();
    for s in &seeds {
        assert_eq!(run_case(&s.to_string()), Ok("ran"), "a seed graph must run");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let cases: usize = std::env::var("GRAPH_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(12_000);
    let (mut panics, mut counts) = (Vec::new(), std::collections::BTreeMap::new());
    let mut large = Vec::new();
    for case in 0..cases {
        let mut v = seeds[case % seeds.len()].clone();
        for _ in 0..rng.random_range(1..4) {
            mutate(&mut rng, &mut v);
        }
        // Half the cases keep their types consistent, so that they get past the type check.
        if case % 2 == 1 {
            if let Some(w) = catch_unwind(AssertUnwindSafe(|| retyped(&v))).unwrap_or_else(|p| {
                panic!("case {case}: a shape rule panicked: {:?}\n{v}", tracegrad_runtime::panic_message(&*p))
            }) {
                v = w;
            }
        }
        let text = v.to_string();
        match run_case(&text) {
            Ok(what) => {
                if what == TOO_LARGE && large.len() < MAX_LARGE_RUNS {
                    large.push(text);
                }
                *counts.entry(what).or_insert(0usize) += 1
            }
            Err(why) => panics.push((case, why, text)),
        }
    }
    eprintln!("graph fuzz: {cases} cases: {counts:?}; {} too-large graphs run in a child process", large.len());
    run_large_graphs_in_child(&large);
    // Every kind of outcome is exercised: the mutations are neither all fatal nor all harmless.
    assert!(counts.get("refused").copied().unwrap_or(0) > cases / 10, "{counts:?}");
    assert!(counts.get("ran").copied().unwrap_or(0) > cases / 20, "{counts:?}");
    if let Some((case, why, text)) = panics.first() {
        panic!("{} of {cases} cases panicked; the first, case {case}: {why}\n{text}", panics.len());
    }
}

/// Sets `field` of the first `op` node's attributes (or the node's own `field`).
fn patched(g: &Graph, op: &str, patch: impl Fn(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(&g.to_json()).unwrap();
    let node = v["nodes"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|n| n["node"]["kind"]["Op"].get(op).is_some() || n["node"]["kind"]["Op"] == json!(op))
        .unwrap_or_else(|| panic!("no {op} node"));
    patch(node);
    v.to_string()
}

fn refused(what: &str, text: &str) {
    let r = catch_unwind(AssertUnwindSafe(|| Graph::from_json(text)));
    match r {
        Ok(Err(e)) => assert!(e.starts_with("graph JSON: "), "{what}: {e}"),
        Ok(Ok(_)) => panic!("{what}: accepted"),
        Err(p) => panic!("{what}: panicked: {:?}", tracegrad_runtime::panic_message(&*p)),
    }
}

#[test]
fn the_hostile_graphs_found_by_hand_are_refused() {
    let (mlp, layouts, conv) = (mlp(), layouts(), conv());
    let base: Value = serde_json::from_str(&layouts.to_json()).unwrap();
    for id in [json!(u64::MAX), json!(10_000_000_000u64), json!(1e10)] {
        let mut v = base.clone();
        v["nodes"][0]["id"] = id.clone();
        refused(&format!("node id {id}"), &v.to_string());
    }
    refused("cat dim 7", &patched(&layouts, "Cat", |n| n["node"]["kind"]["Op"]["Cat"]["dim"] = json!(7)));
    refused("argmax dim 9", &patched(&mlp, "ArgReduce", |n| n["node"]["kind"]["Op"]["ArgReduce"]["dim"] = json!(9)));
    refused(
        "reduce dims [1, 1]",
        &patched(&layouts, "Reduce", |n| n["node"]["kind"]["Op"]["Reduce"]["dims"] = json!([1, 1])),
    );
    refused(
        "reduce dims [2, 0]",
        &patched(&layouts, "Reduce", |n| n["node"]["kind"]["Op"]["Reduce"]["dims"] = json!([2, 0])),
    );
    refused(
        "reshape overflow",
        &patched(&layouts, "Reshape", |n| {
            n["node"]["kind"]["Op"]["Reshape"] = json!([(1u64 << 63) + 3, 2]);
            n["node"]["ty"]["shape"] = json!([(1u64 << 63) + 3, 2]);
        }),
    );
    refused(
        "narrow start usize::MAX",
        &patched(&layouts, "Narrow", |n| n["node"]["kind"]["Op"]["Narrow"]["start"] = json!(u64::MAX)),
    );
    refused(
        "avg_pool2d_grad stride 0",
        &patched(&conv, "AvgPool2dGrad", |n| n["node"]["kind"]["Op"]["AvgPool2dGrad"]["stride"] = json!([0, 1])),
    );
    refused(
        "avg_pool2d_grad input_shape",
        &patched(&conv, "AvgPool2dGrad", |n| {
            n["node"]["kind"]["Op"]["AvgPool2dGrad"]["input_shape"] = json!([1, 3, 9, 9]);
            n["node"]["ty"]["shape"] = json!([1, 3, 9, 9]);
        }),
    );
    refused(
        "max_pool2d_grad gradient shape",
        &patched(&conv, "MaxPool2dGrad", |n| {
            n["node"]["kind"]["Op"]["MaxPool2dGrad"]["kernel"] = json!([3, 3]);
        }),
    );
    let ind = indexing();
    refused(
        "constant shape and data",
        &patched(&ind, "Constant", |n| n["node"]["kind"]["Op"]["Constant"]["shape"] = json!([5])),
    );
    refused(
        "constant shape overflow",
        &patched(&ind, "Constant", |n| {
            n["node"]["kind"]["Op"]["Constant"]["shape"] = json!([(1u64 << 63) + 2, 2, 1]);
        }),
    );
    let mut v: Value = serde_json::from_str(&mlp.to_json()).unwrap();
    v["inputs"].as_array_mut().unwrap().pop();
    refused("an input missing from inputs", &v.to_string());
}

#[test]
fn a_kernel_panic_is_an_error_naming_the_op_and_the_node() {
    // A graph built without its shape rules (as a buggy pass could): the gradient operand of
    // max_pool2d_grad has the wrong shape, and the kernel's assertion fires. Both backends
    // return it as the node's error; nothing unwinds out of `run`.
    let mut g = Graph::new();
    let x = input(&mut g, "x", DType::F32, &[1, 1, 4, 4]);
    let gr = input(&mut g, "g", DType::F32, &[1, 1, 3, 3]);
    let op = Op::MaxPool2dGrad { kernel: [2, 2], stride: [2, 2], padding: [0, 0] };
    let node = GNode {
        kind: NodeKind::Op(op),
        ty: TensorType::new(DType::F32, &[1, 1, 4, 4]),
        path: String::new(),
        module_type: String::new(),
    };
    let n = g.add_node_unchecked(node, &[x, gr]);
    g.add_output("dx", n);
    assert!(g.validate().is_err(), "the validator refuses this graph");
    let args = inputs_for(&g);
    let want = format!("(node %{})", n.index());
    let r = catch_unwind(AssertUnwindSafe(|| interpret(&g, &args, &NoCallbacks)));
    let e = r.expect("no panic escapes interpret").expect_err("a mismatched gradient").to_string();
    assert!(e.contains("max_pool2d_grad") && e.contains(&want) && e.contains("kernel panicked"), "{e}");
    for backend in [Backend::Jit, Backend::Interpreter] {
        let Ok(exe) = Executable::new(&g, backend) else { continue };
        let r = catch_unwind(AssertUnwindSafe(|| exe.run(&args, &NoCallbacks)));
        let e = r.expect("no panic escapes run").expect_err("a mismatched gradient").to_string();
        assert!(e.contains("max_pool2d_grad") && e.contains(&want), "{backend:?}: {e}");
    }
}
