"""Small hand-built ONNX models the tests share: routing graphs, signed as export signs them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX
from deploytool.ops.onnx_functions import DEFAULT_OPSET, attach


def write_routing_model(path, *, batch="batch", features=16, experts=4, elem=TensorProto.FLOAT,
                        functions=True, extra_dynamic=False):
    """x[batch, features] -> MatMul -> TemperedSoftmax -> HardSelect, the deploytool nodes in domain
    `deploytool` with (placeholder) function bodies, as the exporter writes them."""
    weight = helper.make_tensor("w", elem, [features, experts], [0.0] * (features * experts))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"], name="router"),
        helper.make_node("TemperedSoftmax", ["logits"], ["probs"], domain="deploytool", name="softmax",
                         temperature=0.5),
        helper.make_node("HardSelect", ["probs"], ["mask", "index"], domain="deploytool", name="select"),
    ]
    second = "feat" if extra_dynamic else features
    graph = helper.make_graph(
        nodes, "routing", [helper.make_tensor_value_info("x", elem, [batch, second])],
        [helper.make_tensor_value_info("probs", elem, [batch, experts]),
         helper.make_tensor_value_info("index", TensorProto.INT64, [batch])], initializer=[weight])
    bodies = [
        helper.make_function("deploytool", "TemperedSoftmax", ["logits"], ["probs"],
                             [helper.make_node("Softmax", ["logits"], ["probs"])], [helper.make_opsetid("", 20)],
                             attributes=["temperature"]),
        helper.make_function("deploytool", "HardSelect", ["probs"], ["mask", "index"],
                             [helper.make_node("Identity", ["probs"], ["mask"]),
                              helper.make_node("ArgMax", ["probs"], ["index"], axis=-1, keepdims=0)],
                             [helper.make_opsetid("", 20)]),
    ]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("deploytool", 1)],
                              functions=bodies if functions else [])
    onnx.save(model, str(path))
    return path


def sign(model, routers, examples=None):
    """Write the deploytool signature (the graph's own inputs and outputs, plus `routers`: (module path,
    experts) whose `<path>.index` / `.probs` outputs the graph has, and the export example's size of each
    named dim, `examples`) into a hand-built ModelProto, as export does."""
    from deploytool.artifacts import graph_signature
    from deploytool.signature import META_KEY, ModelSignature, RouterMeta, router_output_names, to_json

    inputs, outputs = graph_signature(model)
    metas = tuple(RouterMeta(path, experts, 1.0, *router_output_names(path)) for path, experts in routers)
    signature = ModelSignature(tuple(inputs), tuple(outputs), metas, examples or {"batch": 2})
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, to_json(signature)
    return model


def tiny_onnx(path, features=8, classes=3, experts=2, dtype="FLOAT", batch="batch", router="router"):
    """x [batch, features] -> output [batch, classes], `router`.index [batch] (int64), `router`.probs
    [batch, experts], with the deploytool signature export would write (one router at `router`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = getattr(TensorProto, dtype)
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(features, classes)).astype(np_dtype), "w")
    r = numpy_helper.from_array(rng.normal(size=(features, experts)).astype(np_dtype), "r")
    index, probs = f"{router}.index", f"{router}.probs"
    nodes = [helper.make_node("MatMul", ["x", "w"], ["output"]), helper.make_node("MatMul", ["x", "r"], ["logits"]),
             helper.make_node("Softmax", ["logits"], [probs], axis=-1),
             helper.make_node("ArgMax", [probs], [index], axis=-1, keepdims=0)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", elem, [batch, features])],
        [helper.make_tensor_value_info("output", elem, [batch, classes]),
         helper.make_tensor_value_info(index, TensorProto.INT64, [batch]),
         helper.make_tensor_value_info(probs, elem, [batch, experts])], [w, r])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(sign(model, [(router, experts)]), str(path))
    return path


def parse(model_dir):
    """config.pbtxt parsed with Triton's ModelConfig protobuf (tritonclient), as Triton reads it."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient is not installed (pip install deploytool[serve])")
    from google.protobuf import text_format

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


#: the two token-level routers of `token_onnx`
TOKEN_ROUTERS = ("layers.0.moe.router", "layers.1.moe.router")


def token_onnx(path, tokens="tokens"):
    """x [batch, tokens, 4] -> output [batch, 3], and two token-level routers of 2 experts (index
    [batch, tokens], probs [batch, tokens, 2]): layers.0's sends a token by the sign of its feature 0,
    layers.1's by the sign of its feature 1. Signed as export would, the example 7 tokens long."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], ["output"])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])]
    for feature, router in enumerate(TOKEN_ROUTERS):
        weight = np.zeros((4, 2), np.float32)
        weight[feature] = [-8.0, 8.0]  # expert 1 for a positive feature, expert 0 otherwise
        inits.append(numpy_helper.from_array(weight, f"w{feature}"))
        nodes += [helper.make_node("MatMul", ["x", f"w{feature}"], [f"logits{feature}"]),
                  helper.make_node("Softmax", [f"logits{feature}"], [f"{router}.probs"], axis=-1),
                  helper.make_node("ArgMax", [f"{router}.probs"], [f"{router}.index"], axis=-1, keepdims=0)]
        outputs += [helper.make_tensor_value_info(f"{router}.index", TensorProto.INT64, ["batch", tokens]),
                    helper.make_tensor_value_info(f"{router}.probs", TensorProto.FLOAT, ["batch", tokens, 2])]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                              ["batch", tokens, 4])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(sign(model, [(r, 2) for r in TOKEN_ROUTERS], {"batch": 2, "tokens": 7}), str(path))
    return path


def routing_model(n_experts: int, temperature: float, *, opset: int = DEFAULT_OPSET, dtype: str = "float32"):
    """A model of just the routing step, logits [batch, E] -> probs, mask, index, with the functions.

    The smallest graph that exercises both ops, for op-level tests of every runtime.
    """
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    nodes = [
        helper.make_node(TEMPERED_SOFTMAX, ["logits"], ["probs"], domain=DOMAIN, temperature=float(temperature)),
        helper.make_node(HARD_SELECT, ["probs"], ["mask", "index"], domain=DOMAIN),
    ]
    graph = helper.make_graph(
        nodes, "deploytool_routing", [helper.make_tensor_value_info("logits", elem, ["batch", n_experts])],
        [helper.make_tensor_value_info("probs", elem, ["batch", n_experts]),
         helper.make_tensor_value_info("mask", elem, ["batch", n_experts]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])])
    return attach(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), opset)
