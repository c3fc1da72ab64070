//! Decoding an ONNX file into the checked graph [`OnnxGraph`] that [`super::OnnxModule`] runs.
//!
//! Everything that can be checked without input shapes is checked here, once: the opset, that
//! every operator is one tracegrad maps, that every node input names a graph input, an
//! initializer or an earlier node's output (ONNX requires topological order), that every
//! initializer's data matches its declared dims, and that graph outputs are produced.

use std::collections::{HashMap, HashSet};

use prost::Message;
use tracegrad_runtime::{Buffer, DType};

use super::eval::SUPPORTED_OPS;
use super::proto::{attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, ValueInfoProto};
use super::tensor_proto::{dtype_of, to_buffer};
use super::OnnxError;

/// The default-domain opsets whose operator semantics this importer implements.
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=18;

/// The `metadata_props` key under which [`super::export`] lists the initializers that are
/// buffers (a JSON array of names); [`parse`] makes those buffers too.
pub(crate) const BUFFERS_KEY: &str = "tracegrad.buffers";

/// One ONNX node, attributes kept as decoded protobuf.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub name: String,
    pub op_type: String,
    /// Input names; `None` for an omitted optional input (the empty name).
    pub inputs: Vec<Option<String>>,
    pub outputs: Vec<String>,
    pub attrs: Vec<AttributeProto>,
}

/// A graph input: name, element type and dims (`None` for a symbolic dim such as `batch`).
#[derive(Clone, Debug)]
pub struct GraphInput {
    /// The input's name.
    pub name: String,
    /// Its element type.
    pub dtype: DType,
    /// Its dims; `None` where the file names a symbolic dim.
    pub dims: Vec<Option<usize>>,
}

/// How an initializer enters the module.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum InitKind {
    /// A trainable parameter (floating point).
    Parameter,
    /// A persistent buffer (BatchNormalization's running statistics).
    Buffer,
    /// A constant: integer data, or a float the PyTorch exporter folded (`onnx::…`).
    Constant,
}

/// The decoded, checked model.
pub(crate) struct OnnxGraph {
    pub opset: i64,
    pub inputs: Vec<GraphInput>,
    pub outputs: Vec<String>,
    pub nodes: Vec<Node>,
    /// Initializers in file order, with their role.
    pub initializers: Vec<(String, Buffer, InitKind)>,
}

fn err(msg: impl Into<String>) -> OnnxError {
    OnnxError(msg.into())
}

fn input_of(v: &ValueInfoProto) -> Result<GraphInput, OnnxError> {
    let name = v.name().to_string();
    let ty = v.r#type.as_ref().and_then(|t| match &t.value {
        Some(super::proto::type_proto::Value::TensorType(tt)) => Some(tt),
        _ => None,
    });
    let ty = ty.ok_or_else(|| err(format!("graph input {name:?} is not a tensor")))?;
    let dtype = dtype_of(ty.elem_type()).map_err(|e| err(format!("graph input {name:?}: {e}")))?;
    let dims = ty.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or_default();
    let dims = dims
        .iter()
        .map(|d| match d.value {
            Some(super::proto::tensor_shape_proto::dimension::Value::DimValue(v)) => usize::try_from(v).ok(),
            _ => None,
        })
        .collect();
    Ok(GraphInput { name, dtype, dims })
}

fn node_of(n: &super::proto::NodeProto, opset: i64) -> Result<Node, OnnxError> {
    let op_type = n.op_type().to_string();
    let name = n.name().to_string();
    let domain = n.domain();
    if !(domain.is_empty() || domain == "ai.onnx") || !SUPPORTED_OPS.contains(&op_type.as_str()) {
        let dom = if domain.is_empty() { "ai.onnx".to_string() } else { domain.to_string() };
        return Err(err(format!(
            "unsupported ONNX operator {op_type:?} (domain {dom}, opset {opset}) at node {name:?}; supported: {}",
            SUPPORTED_OPS.join(", ")
        )));
    }
    if let Some(a) = n.attribute.iter().find(|a| matches!(a.r#type(), AttributeType::Graph | AttributeType::Graphs)) {
        return Err(err(format!("node {name:?} ({op_type}): subgraph attribute {:?} is not supported", a.name())));
    }
    Ok(Node {
        name,
        op_type,
        inputs: n.input.iter().map(|i| (!i.is_empty()).then(|| i.clone())).collect(),
        outputs: n.output.clone(),
        attrs: n.attribute.clone(),
    })
}

fn default_opset(m: &ModelProto) -> Result<i64, OnnxError> {
    let opset = m.opset_import.iter().find(|o| o.domain().is_empty() || o.domain() == "ai.onnx").map(|o| o.version());
    let opset = opset.ok_or_else(|| err("the model imports no ai.onnx opset"))?;
    if !OPSETS.contains(&opset) {
        return Err(err(format!("opset {opset} is not supported (supported: {}..={})", OPSETS.start(), OPSETS.end())));
    }
    Ok(opset)
}

/// Decodes and checks a serialized `ModelProto`.
pub(crate) fn parse(bytes: &[u8]) -> Result<OnnxGraph, OnnxError> {
    let m = ModelProto::decode(bytes).map_err(|e| err(format!("not a valid ONNX model (protobuf: {e})")))?;
    let opset = default_opset(&m)?;
    let g = m.graph.as_ref().ok_or_else(|| err("the model has no graph"))?;
    let mut nodes = g.node.iter().map(|n| node_of(n, opset)).collect::<Result<Vec<_>, _>>()?;
    let mut initializers = decode_initializers(g, &nodes, &listed_buffers(&m)?)?;
    unshare_initializers(&mut nodes, &mut initializers);
    let init_names: HashSet<&str> = initializers.iter().map(|(n, _, _)| n.as_str()).collect();
    let inputs =
        g.input.iter().filter(|v| !init_names.contains(v.name())).map(input_of).collect::<Result<Vec<_>, _>>()?;
    let outputs: Vec<String> = g.output.iter().map(|o| o.name().to_string()).collect();
    check_names(&inputs, &initializers, &nodes, &outputs)?;
    Ok(OnnxGraph { opset, inputs, outputs, nodes, initializers })
}

fn listed_buffers(m: &ModelProto) -> Result<Vec<String>, OnnxError> {
    match m.metadata_props.iter().find(|p| p.key() == BUFFERS_KEY) {
        Some(p) => serde_json::from_str(p.value()).map_err(|e| err(format!("metadata {BUFFERS_KEY}: {e}"))),
        None => Ok(vec![]),
    }
}

fn decode_initializers(
    g: &GraphProto,
    nodes: &[Node],
    listed: &[String],
) -> Result<Vec<(String, Buffer, InitKind)>, OnnxError> {
    // BatchNormalization's inputs 3 and 4 are running statistics: buffers, as in PyTorch.
    let mut buffers: HashSet<&str> = nodes
        .iter()
        .filter(|n| n.op_type == "BatchNormalization")
        .flat_map(|n| n.inputs.iter().skip(3).take(2).flatten().map(String::as_str))
        .collect();
    buffers.extend(listed.iter().map(String::as_str));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for t in &g.initializer {
        let name = t.name().to_string();
        if !seen.insert(name.clone()) {
            return Err(err(format!("initializer {name:?} is defined twice")));
        }
        let buf = to_buffer(t).map_err(|e| err(format!("initializer {name:?}: {e}")))?;
        let kind = if !buf.dtype().is_float() || name.starts_with("onnx::") {
            InitKind::Constant
        } else if buffers.contains(name.as_str()) {
            InitKind::Buffer
        } else {
            InitKind::Parameter
        };
        out.push((name, buf, kind));
    }
    if !g.sparse_initializer.is_empty() {
        return Err(err("sparse initializers are not supported"));
    }
    Ok(out)
}

fn check_names(
    inputs: &[GraphInput],
    inits: &[(String, Buffer, InitKind)],
    nodes: &[Node],
    outputs: &[String],
) -> Result<(), OnnxError> {
    let mut known: HashMap<&str, &str> = HashMap::new();
    for i in inputs {
        known.insert(&i.name, "graph input");
    }
    for (n, _, _) in inits {
        known.insert(n, "initializer");
    }
    for node in nodes {
        for i in node.inputs.iter().flatten() {
            if !known.contains_key(i.as_str()) {
                return Err(err(format!(
                    "node {:?} ({}) reads {i:?}, which is no graph input, initializer or earlier node's output",
                    node.name, node.op_type
                )));
            }
        }
        for o in node.outputs.iter().filter(|o| !o.is_empty()) {
            if let Some(was) = known.insert(o, "node output") {
                return Err(err(format!("node {:?} ({}) redefines {o:?} (already a {was})", node.name, node.op_type)));
            }
        }
    }
    match outputs.iter().find(|o| !known.contains_key(o.as_str())) {
        Some(o) => Err(err(format!("graph output {o:?} is never produced"))),
        None if outputs.is_empty() => Err(err("the graph has no outputs")),
        None => Ok(()),
    }
}

/// PyTorch's exporter stores parameters with equal values once and recreates the others with
/// `Identity` (LayerNorm weights that are all ones, say). In PyTorch they are distinct
/// parameters with their own gradients, so each such output becomes its own initializer (a
/// copy, same role) and the `Identity` node goes away.
fn unshare_initializers(nodes: &mut Vec<Node>, inits: &mut Vec<(String, Buffer, InitKind)>) {
    nodes.retain(|n| {
        let (Some(Some(src)), [out]) = (n.inputs.first(), n.outputs.as_slice()) else { return true };
        if n.op_type != "Identity" || out.is_empty() {
            return true;
        }
        let Some((_, buf, kind)) = inits.iter().find(|(name, _, k)| name == src && *k != InitKind::Constant) else {
            return true;
        };
        let copy = (out.clone(), buf.clone(), *kind);
        inits.push(copy);
        false
    });
}
