//! [`export`]: a module's traced forward graph as an ONNX model (opset 17).
//!
//! The graph is the `traced` stage of the compile pipeline for the example inputs' types, so
//! the file is what `compile` would run, with the example's shapes fixed. Parameters and
//! buffers become initializers under their `state_dict` names; other constants become
//! `Constant` nodes. Each tracegrad op maps to one ONNX node, or a few where ONNX has no
//! single equivalent (`rsqrt` is `Reciprocal(Sqrt)`, the GELUs are written out). An op with no
//! mapping, a hook callback, or a buffer update (training-mode BatchNorm) is an error.
//! ONNX does not tell parameters from buffers, so the buffers' names go in the model's
//! `metadata_props` under `tracegrad.buffers` (a JSON list), which [`super::load`] reads.

use std::path::Path;

use prost::Message;
use tracegrad_compiler::graph::{Graph, InputRole, NodeId, NodeKind};
use tracegrad_compiler::ops::{BinaryOp, CompareOp, ReduceKind, UnaryOp};
use tracegrad_compiler::{Op, TensorType};
use tracegrad_runtime::{Buffer, DType};

use super::proto::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use super::tensor_proto::{from_buffer, onnx_type};
use super::OnnxError;
use crate::compile::dump::{stage_graph, Stage};
use crate::nn::{Module, ModuleExt};
use crate::tensor::Tensor;

/// The opset [`export`] writes.
pub const EXPORT_OPSET: i64 = 17;

/// Writes `module`'s forward for inputs shaped like `example_inputs` to `path` as ONNX.
pub fn export(module: &dyn Module, example_inputs: &[Tensor], path: impl AsRef<Path>) -> Result<(), OnnxError> {
    let path = path.as_ref();
    let bytes = export_bytes(module, example_inputs)?;
    std::fs::write(path, bytes).map_err(|e| OnnxError(format!("{}: {e}", path.display())))
}

/// [`export`] into memory: the serialized `ModelProto`.
pub fn export_bytes(module: &dyn Module, example_inputs: &[Tensor]) -> Result<Vec<u8>, OnnxError> {
    let types: Vec<(TensorType, bool)> = example_inputs.iter().map(|t| (t.tensor_type(), false)).collect();
    let (g, _) = crate::no_grad(|| stage_graph(module, &types, Stage::Traced)).map_err(|e| OnnxError(e.to_string()))?;
    if g.outputs.len() != 1 {
        return Err(OnnxError(format!(
            "the traced forward has {} outputs (buffer updates of training mode?); call eval() before export",
            g.outputs.len()
        )));
    }
    let mut w = Writer { nodes: vec![], initializers: vec![], inputs: vec![], buffers: vec![], counter: 0 };
    let named: Vec<(String, Tensor)> = module.named_parameters().into_iter().chain(module.named_buffers()).collect();
    for id in g.topo_order().map_err(OnnxError)? {
        w.node(&g, id, &named)?;
    }
    let out = g.outputs[0].1;
    w.nodes.push(node("Identity", "/output", vec![value_of(&g, out)], vec!["output".into()], vec![]));
    let graph = GraphProto {
        name: Some(module.type_name()),
        node: w.nodes,
        initializer: w.initializers,
        input: w.inputs,
        output: vec![value_info("output", g.ty(out))],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(8),
        producer_name: Some("tracegrad".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(EXPORT_OPSET) }],
        graph: Some(graph),
        metadata_props: vec![StringStringEntryProto {
            key: Some(super::model::BUFFERS_KEY.into()),
            value: Some(serde_json::to_string(&w.buffers).expect("names serialize")),
        }],
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// The ONNX name of a node's value: an input's own name (so parameters are initializers under
/// their `state_dict` names), else `v<id>`.
fn value_of(g: &Graph, id: NodeId) -> String {
    match &g.node(id).kind {
        NodeKind::Input { name, .. } => name.clone(),
        _ => format!("v{}", id.index()),
    }
}

fn value_info(name: &str, ty: &TensorType) -> ValueInfoProto {
    let dim = ty
        .shape
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    let tensor =
        type_proto::Tensor { elem_type: Some(onnx_type(ty.dtype) as i32), shape: Some(TensorShapeProto { dim }) };
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() }),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: Vec<String>, outputs: Vec<String>, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs,
        output: outputs,
        attribute: attrs,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.iter().map(|&x| x as i64).collect(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn tensor_attr(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

struct Writer {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    /// Initializers that are buffers, not parameters (see `model::BUFFERS_KEY`).
    buffers: Vec<String>,
    counter: usize,
}

impl Writer {
    /// A fresh value name for an intermediate of a multi-node mapping.
    fn fresh(&mut self, base: &str) -> String {
        self.counter += 1;
        format!("{base}_{}", self.counter)
    }

    /// A `Constant` node holding `b` (into `out`, or a fresh value); returns its value name.
    fn constant_into(&mut self, scope: &str, b: &Buffer, out: Option<String>) -> String {
        let out = match out {
            Some(o) => {
                self.counter += 1;
                o
            }
            None => self.fresh("const"),
        };
        let attr = tensor_attr("value", from_buffer("", b));
        self.nodes.push(node(
            "Constant",
            &format!("{scope}/Constant_{}", self.counter),
            vec![],
            vec![out.clone()],
            vec![attr],
        ));
        out
    }

    fn constant(&mut self, scope: &str, b: &Buffer) -> String {
        self.constant_into(scope, b, None)
    }

    fn ints_const(&mut self, scope: &str, v: &[usize]) -> String {
        let b = Buffer::from_vec(v.iter().map(|&x| x as i64).collect::<Vec<i64>>(), &[v.len()]);
        self.constant(scope, &b)
    }

    fn scalar(&mut self, scope: &str, v: f64, d: DType) -> String {
        self.constant(scope, &Buffer::scalar(v, d))
    }

    /// Emits `op` over `inputs` into a fresh value (or `out`), returning the value name.
    fn emit(
        &mut self,
        op: &str,
        scope: &str,
        inputs: Vec<String>,
        out: Option<String>,
        attrs: Vec<AttributeProto>,
    ) -> String {
        let out = match out {
            Some(o) => {
                self.counter += 1;
                o
            }
            None => self.fresh(op),
        };
        self.nodes.push(node(op, &format!("{scope}/{op}_{}", self.counter), inputs, vec![out.clone()], attrs));
        out
    }

    fn node(&mut self, g: &Graph, id: NodeId, named: &[(String, Tensor)]) -> Result<(), OnnxError> {
        let n = g.node(id);
        let scope = format!("/{}", n.path.replace('.', "/"));
        match &n.kind {
            NodeKind::Input { name, role } => self.input(name, role, &n.ty, named),
            NodeKind::Callback { label, .. } => Err(OnnxError(format!("{label}: hooks cannot be exported to ONNX"))),
            NodeKind::Op(op) => {
                let args: Vec<String> = g.operands(id).into_iter().map(|a| value_of(g, a)).collect();
                let arg_types: Vec<TensorType> = g.operands(id).into_iter().map(|a| g.ty(a).clone()).collect();
                self.op(op, &scope, args, &arg_types, &n.ty, value_of(g, id))
                    .map_err(|e| OnnxError(format!("exporting {} at {scope}: {e}", op.name())))
            }
        }
    }

    fn input(
        &mut self,
        name: &str,
        role: &InputRole,
        ty: &TensorType,
        named: &[(String, Tensor)],
    ) -> Result<(), OnnxError> {
        match role {
            InputRole::Data => {
                self.inputs.push(value_info(name, ty));
            }
            InputRole::Parameter | InputRole::Buffer => {
                let t = named.iter().find(|(n, _)| n == name).map(|(_, t)| t);
                let t = t.ok_or_else(|| OnnxError(format!("graph input {name:?} is no parameter or buffer")))?;
                self.initializers.push(from_buffer(name, &t.buffer()));
                if *role == InputRole::Buffer {
                    self.buffers.push(name.into());
                }
            }
            other => return Err(OnnxError(format!("graph input {name:?} has role {other:?}, not exportable"))),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn op(
        &mut self,
        op: &Op,
        s: &str,
        a: Vec<String>,
        at: &[TensorType],
        ty: &TensorType,
        out: String,
    ) -> Result<(), String> {
        let o = Some(out);
        match op {
            Op::Full { value, dtype, shape } => {
                if shape.is_empty() {
                    self.constant_into(s, &Buffer::scalar(*value, *dtype), o);
                } else {
                    let shape = self.ints_const(s, shape);
                    let one = from_buffer("", &Buffer::scalar(*value, *dtype));
                    self.emit("ConstantOfShape", s, vec![shape], o, vec![tensor_attr("value", one)]);
                }
            }
            Op::Constant(b) => {
                self.constant_into(s, b, o);
            }
            Op::Unary(u) => self.unary(*u, s, a, ty.dtype, o)?,
            Op::Binary(b) => {
                let name = match b {
                    BinaryOp::Add => "Add",
                    BinaryOp::Sub => "Sub",
                    BinaryOp::Mul => "Mul",
                    BinaryOp::Div => "Div",
                    BinaryOp::Maximum => "Max",
                    BinaryOp::Minimum => "Min",
                    BinaryOp::Pow => "Pow",
                };
                self.emit(name, s, a, o, vec![]);
            }
            Op::Compare(c) => {
                let name = match c {
                    CompareOp::Eq | CompareOp::Ne => "Equal",
                    CompareOp::Lt => "Less",
                    CompareOp::Le => "LessOrEqual",
                    CompareOp::Gt => "Greater",
                    CompareOp::Ge => "GreaterOrEqual",
                };
                if *c == CompareOp::Ne {
                    let eq = self.emit(name, s, a, None, vec![]);
                    self.emit("Not", s, vec![eq], o, vec![]);
                } else {
                    self.emit(name, s, a, o, vec![]);
                }
            }
            Op::Where => {
                self.emit("Where", s, a, o, vec![]);
            }
            Op::Clamp { min, max } => {
                let d = at[0].dtype;
                let lo = min.map(|v| self.scalar(s, v, d)).unwrap_or_default();
                let hi = max.map(|v| self.scalar(s, v, d)).unwrap_or_default();
                self.emit("Clip", s, vec![a[0].clone(), lo, hi], o, vec![]);
            }
            Op::Cast(d) => {
                self.emit("Cast", s, a, o, vec![int("to", onnx_type(*d) as i64)]);
            }
            Op::StopGradient => {
                self.emit("Identity", s, a, o, vec![]);
            }
            _ => self.layout_op(op, s, a, at, o)?,
        }
        Ok(())
    }

    fn unary(&mut self, u: UnaryOp, s: &str, a: Vec<String>, d: DType, o: Option<String>) -> Result<(), String> {
        let simple = match u {
            UnaryOp::Neg => Some("Neg"),
            UnaryOp::Abs => Some("Abs"),
            UnaryOp::Sign => Some("Sign"),
            UnaryOp::Exp => Some("Exp"),
            UnaryOp::Log => Some("Log"),
            UnaryOp::Sqrt => Some("Sqrt"),
            UnaryOp::Sin => Some("Sin"),
            UnaryOp::Cos => Some("Cos"),
            UnaryOp::Tanh => Some("Tanh"),
            UnaryOp::Sigmoid => Some("Sigmoid"),
            UnaryOp::Relu => Some("Relu"),
            UnaryOp::Erf => Some("Erf"),
            UnaryOp::Reciprocal => Some("Reciprocal"),
            _ => None,
        };
        if let Some(name) = simple {
            self.emit(name, s, a, o, vec![]);
            return Ok(());
        }
        let x = a[0].clone();
        match u {
            UnaryOp::Rsqrt => {
                let r = self.emit("Sqrt", s, a, None, vec![]);
                self.emit("Reciprocal", s, vec![r], o, vec![]);
            }
            UnaryOp::Square => {
                self.emit("Mul", s, vec![x.clone(), x], o, vec![]);
            }
            UnaryOp::PowScalar(p) => {
                let p = self.scalar(s, p, d);
                self.emit("Pow", s, vec![x, p], o, vec![]);
            }
            UnaryOp::Silu => {
                let sg = self.emit("Sigmoid", s, a, None, vec![]);
                self.emit("Mul", s, vec![x, sg], o, vec![]);
            }
            UnaryOp::Gelu => {
                // x·½(1 + erf(x/√2)), PyTorch's exporter's form.
                let c = self.scalar(s, std::f64::consts::SQRT_2, d);
                let t = self.emit("Div", s, vec![x.clone(), c], None, vec![]);
                let t = self.emit("Erf", s, vec![t], None, vec![]);
                self.half_one_plus(s, x, t, d, o);
            }
            UnaryOp::GeluTanh => {
                // x·½(1 + tanh(√(2/π)(x + 0.044715x³))).
                let x3 = self.emit("Mul", s, vec![x.clone(), x.clone()], None, vec![]);
                let x3 = self.emit("Mul", s, vec![x3, x.clone()], None, vec![]);
                let c = self.scalar(s, 0.044715, d);
                let t = self.emit("Mul", s, vec![x3, c], None, vec![]);
                let t = self.emit("Add", s, vec![x.clone(), t], None, vec![]);
                let k = self.scalar(s, (2.0 / std::f64::consts::PI).sqrt(), d);
                let t = self.emit("Mul", s, vec![t, k], None, vec![]);
                let t = self.emit("Tanh", s, vec![t], None, vec![]);
                self.half_one_plus(s, x, t, d, o);
            }
            other => return Err(format!("{other:?} has no ONNX mapping")),
        }
        Ok(())
    }

    /// `x·½(1 + t)`.
    fn half_one_plus(&mut self, s: &str, x: String, t: String, d: DType, o: Option<String>) {
        let one = self.scalar(s, 1.0, d);
        let t = self.emit("Add", s, vec![t, one], None, vec![]);
        let t = self.emit("Mul", s, vec![x, t], None, vec![]);
        let half = self.scalar(s, 0.5, d);
        self.emit("Mul", s, vec![t, half], o, vec![]);
    }

    fn layout_op(
        &mut self,
        op: &Op,
        s: &str,
        a: Vec<String>,
        at: &[TensorType],
        o: Option<String>,
    ) -> Result<(), String> {
        match op {
            Op::Reduce { kind, dims, keepdim } => {
                let keep = int("keepdims", *keepdim as i64);
                match kind {
                    ReduceKind::Sum => {
                        let axes = self.ints_const(s, dims);
                        self.emit("ReduceSum", s, vec![a[0].clone(), axes], o, vec![keep]);
                    }
                    ReduceKind::Max | ReduceKind::Min => {
                        let name = if *kind == ReduceKind::Max { "ReduceMax" } else { "ReduceMin" };
                        self.emit(name, s, a, o, vec![ints("axes", dims), keep]);
                    }
                    other => return Err(format!("reduction {other:?} has no ONNX mapping")),
                }
            }
            Op::Softmax { dim, log } => {
                self.emit(if *log { "LogSoftmax" } else { "Softmax" }, s, a, o, vec![int("axis", *dim as i64)]);
            }
            Op::MatMul { trans_a, trans_b } => {
                let mut args = a;
                for (i, t) in [*trans_a, *trans_b].into_iter().enumerate() {
                    if t {
                        let r = at[i].shape.len();
                        let mut perm: Vec<usize> = (0..r).collect();
                        perm.swap(r - 2, r - 1);
                        args[i] = self.emit("Transpose", s, vec![args[i].clone()], None, vec![ints("perm", &perm)]);
                    }
                }
                self.emit("MatMul", s, args, o, vec![]);
            }
            Op::Reshape(dims) | Op::Expand(dims) => {
                let shape = self.ints_const(s, dims);
                let name = if matches!(op, Op::Reshape(_)) { "Reshape" } else { "Expand" };
                self.emit(name, s, vec![a[0].clone(), shape], o, vec![]);
            }
            Op::Permute(perm) => {
                self.emit("Transpose", s, a, o, vec![ints("perm", perm)]);
            }
            Op::Narrow { dim, start, len } => {
                let (st, en, ax) =
                    (self.ints_const(s, &[*start]), self.ints_const(s, &[start + len]), self.ints_const(s, &[*dim]));
                self.emit("Slice", s, vec![a[0].clone(), st, en, ax], o, vec![]);
            }
            Op::Cat { dim } => {
                self.emit("Concat", s, a, o, vec![int("axis", *dim as i64)]);
            }
            Op::IndexSelect { dim } => {
                self.emit("Gather", s, a, o, vec![int("axis", *dim as i64)]);
            }
            Op::Conv2d { stride, padding } => {
                let k = &at[1].shape[2..];
                let attrs = vec![
                    ints("kernel_shape", k),
                    ints("strides", stride),
                    ints("pads", &[padding[0], padding[1], padding[0], padding[1]]),
                ];
                self.emit("Conv", s, a, o, attrs);
            }
            Op::MaxPool2d { kernel, stride, padding } | Op::AvgPool2d { kernel, stride, padding, .. } => {
                let mut attrs = vec![
                    ints("kernel_shape", kernel),
                    ints("strides", stride),
                    ints("pads", &[padding[0], padding[1], padding[0], padding[1]]),
                ];
                let name = match op {
                    Op::AvgPool2d { count_include_pad, .. } => {
                        attrs.push(int("count_include_pad", *count_include_pad as i64));
                        "AveragePool"
                    }
                    _ => "MaxPool",
                };
                self.emit(name, s, a, o, attrs);
            }
            other => return Err(format!("op {} has no ONNX mapping", other.name())),
        }
        Ok(())
    }
}
