"""Generates tests/onnx_ops_reference.json: one-node ONNX models (opset 17) for the operators
the PyTorch reference models do not exercise, with inputs and the outputs of ONNX's own
reference evaluator (onnx.reference). Run: python3 tests/onnx_ops_reference.py"""
import base64, json
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto
from onnx.reference import ReferenceEvaluator

rng = np.random.default_rng(0)
cases = []

def case(name, op, inputs, consts=None, attrs=None, n_out=1):
    """inputs: list of (name, array) fed at run time; consts: list of (name, array) initializers
    that are constants (integers)."""
    consts = consts or []
    attrs = attrs or {}
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, [n for n, _ in inputs] + [n for n, _ in consts], outs, name=f"/{name}", **attrs)
    def vi(n, a):
        return helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
    graph = helper.make_graph([node], name, [vi(n, a) for n, a in inputs], [helper.make_tensor_value_info(o, 0, None) for o in outs],
                              initializer=[numpy_helper.from_array(a, n) for n, a in consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ys = ReferenceEvaluator(model).run(None, {n: a for n, a in inputs})
    cases.append({
        "name": name,
        "model": base64.b64encode(model.SerializeToString()).decode(),
        "inputs": [{"shape": list(a.shape), "data": a.astype(np.float64).ravel().tolist()} for _, a in inputs],
        "outputs": [{"shape": list(y.shape), "data": np.asarray(y).astype(np.float64).ravel().tolist()} for y in ys],
    })

f = lambda *s: rng.standard_normal(s).astype(np.float32)
i64 = lambda *v: np.array(v, dtype=np.int64)
case("sigmoid", "Sigmoid", [("x", f(2, 3))])
case("exp", "Exp", [("x", f(2, 3))])
case("log", "Log", [("x", np.abs(f(2, 3)) + 0.1)])
case("neg", "Neg", [("x", f(2, 3))])
case("sqrt", "Sqrt", [("x", np.abs(f(2, 3)))])
case("sub_broadcast", "Sub", [("a", f(2, 3)), ("b", f(3))])
case("div", "Div", [("a", f(2, 3)), ("b", np.abs(f(2, 1)) + 0.5)])
case("pow", "Pow", [("a", np.abs(f(2, 3)) + 0.1), ("b", f(2, 3))])
case("clip", "Clip", [("x", f(3, 4))], [("lo", np.array(-0.5, np.float32)), ("hi", np.array(0.7, np.float32))])
case("log_softmax_axis0", "LogSoftmax", [("x", f(3, 4))], attrs={"axis": 0})
case("matmul_batched", "MatMul", [("a", f(2, 3, 4)), ("b", f(4, 5))])
case("gemm_alpha_beta_transA", "Gemm", [("a", f(4, 3)), ("b", f(4, 5)), ("c", f(5))], attrs={"alpha": 0.5, "beta": 2.0, "transA": 1})
case("conv_stride_pad", "Conv", [("x", f(2, 3, 7, 6)), ("w", f(4, 3, 3, 2)), ("b", f(4))], attrs={"strides": [2, 1], "pads": [1, 0, 1, 0]})
case("avgpool_pad_exclude", "AveragePool", [("x", f(1, 2, 5, 5))], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
case("avgpool_pad_include", "AveragePool", [("x", f(1, 2, 5, 5))], attrs={"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1})
case("global_avgpool", "GlobalAveragePool", [("x", f(2, 3, 4, 5))])
case("batchnorm", "BatchNormalization", [("x", f(2, 3, 2, 2)), ("s", f(3)), ("b", f(3)), ("m", f(3)), ("v", np.abs(f(3)) + 0.5)], attrs={"epsilon": 1e-3})
case("layernorm_axis1", "LayerNormalization", [("x", f(2, 3, 4)), ("s", f(3, 4)), ("b", f(3, 4))], attrs={"axis": 1})
case("flatten_axis2", "Flatten", [("x", f(2, 3, 4, 5))], attrs={"axis": 2})
case("flatten_axis0", "Flatten", [("x", f(2, 3))], attrs={"axis": 0})
case("reshape_zero_minus1", "Reshape", [("x", f(2, 3, 4))], [("s", i64(0, -1, 2))])
case("transpose_default", "Transpose", [("x", f(2, 3, 4))])
case("split_attr_free", "Split", [("x", f(2, 7))], attrs={"axis": 1}, n_out=3)
case("split_sizes", "Split", [("x", f(5, 2))], [("s", i64(2, 3))], n_out=2)
case("concat_neg_axis", "Concat", [("a", f(2, 3)), ("b", f(2, 1))], attrs={"axis": -1})
case("slice_steps", "Slice", [("x", f(5, 6))], [("st", i64(4, 1)), ("en", i64(-10, 100)), ("ax", i64(0, 1)), ("sp", i64(-2, 2))])
case("slice_plain", "Slice", [("x", f(5, 6))], [("st", i64(1)), ("en", i64(-1)), ("ax", i64(-1))])
case("gather_matrix_idx", "Gather", [("x", f(4, 3))], [("i", np.array([[0, -1], [2, 1]], np.int64))], attrs={"axis": 0})
case("gather_axis1_scalar", "Gather", [("x", f(2, 4, 3))], [("i", np.array(2, np.int64))], attrs={"axis": 1})
case("unsqueeze", "Unsqueeze", [("x", f(2, 3))], [("a", i64(0, -1))])
case("squeeze_axes", "Squeeze", [("x", f(1, 3, 1, 2))], [("a", i64(0, 2))])
case("squeeze_all", "Squeeze", [("x", f(1, 3, 1, 2))])
case("expand_bidirectional", "Expand", [("x", f(3, 1))], [("s", i64(2, 1, 4))])
case("where_broadcast", "Where", [("c", rng.standard_normal((2, 3)) > 0), ("a", f(2, 3)), ("b", f(3))])
case("trilu_lower_k", "Trilu", [("x", f(2, 3, 4))], [("k", np.array(-1, np.int64))], attrs={"upper": 0})
case("reduce_mean", "ReduceMean", [("x", f(2, 3, 4))], attrs={"axes": [1, -1], "keepdims": 0})
case("reduce_sum_input_axes", "ReduceSum", [("x", f(2, 3, 4))], [("a", i64(0))])
case("reduce_sum_all", "ReduceSum", [("x", f(2, 3, 4))], attrs={"keepdims": 0})
case("reduce_max", "ReduceMax", [("x", f(2, 3, 4))], attrs={"axes": [2]})
case("maxpool_pad", "MaxPool", [("x", f(1, 2, 5, 5))], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
case("dropout", "Dropout", [("x", f(2, 3))])
case("cast_int", "Cast", [("x", f(2, 3) * 3)], attrs={"to": TensorProto.INT64})
case("equal", "Equal", [("a", np.array([1, 2, 3], np.float32)), ("b", np.array([1, 0, 3], np.float32))])
json.dump(cases, open(__file__.replace(".py", ".json"), "w"))
print(len(cases), "cases")
