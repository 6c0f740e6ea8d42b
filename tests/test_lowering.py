"""engine/lowering.py: an fp32 model lowered to fp16/bf16 in-graph, the routing decision kept in fp32.

fp16 graphs run on ONNX Runtime's CPU provider, so the lowered model's numerics and routing are
checked against the fp32 model here; bf16 has no CPU kernels there and is checked structurally.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_engine_plan import write_routing_model

from deploytool.engine.lowering import bf16_bits, lower_precision
from deploytool.engine.plan import plan_engine
from deploytool.errors import BadInput


def _lowered(path, precision):
    plan = plan_engine(path, precision=precision)
    return lower_precision(onnx.load(path), precision, plan.fp32_region), plan


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))


def _types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}


def test_fp16_lowering_of_the_exported_model_keeps_its_routing_and_its_fp32_interface(exported_onnx, trained_run):
    from deploytool.compare import compare, default_tolerance
    from deploytool.data import load_dataset

    lowered, plan = _lowered(exported_onnx, "fp16")
    source = onnx.load(exported_onnx)
    assert [(v.name, v.type.tensor_type.elem_type) for v in lowered.graph.output] == \
        [(v.name, v.type.tensor_type.elem_type) for v in source.graph.output]  # same names, same fp32/int64 types
    assert lowered.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    types = _types(lowered)
    for node in lowered.graph.node:
        if node.domain == "deploytool":  # the routing decision reads and writes float32
            assert all(types[t] in (TensorProto.FLOAT, TensorProto.INT64) for t in [*node.input, *node.output] if t)
    weights = {t.name: t.data_type for t in lowered.graph.initializer}
    assert not [n for n, t in weights.items() if t == TensorProto.FLOAT]  # every float weight converted
    assert {m.key: m.value for m in lowered.metadata_props}["deploytool.lowered_to"] == "fp16"

    x = load_dataset(trained_run.config["dataset"], seed=0).x_test.astype(np.float32)
    reference, candidate = _run(source, x), _run(lowered, x)
    atol, rtol = default_tolerance("float16")
    comparison = compare(reference, candidate, atol=atol, rtol=rtol)
    assert comparison.passed, comparison.to_dict()
    assert (reference["index"] == candidate["index"]).mean() >= 0.99


def test_bf16_lowering_converts_weights_by_round_to_nearest_even_and_passes_the_checker(exported_onnx):
    import torch

    lowered, _ = _lowered(exported_onnx, "bf16")  # the checker (full_check) ran inside
    source = {t.name: numpy_helper.to_array(t) for t in onnx.load(exported_onnx).graph.initializer}
    for tensor in lowered.graph.initializer:
        if tensor.data_type == TensorProto.BFLOAT16:
            original = source[tensor.name.removesuffix("__bf16")]
            expected = torch.tensor(original).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            assert np.frombuffer(tensor.raw_data, "<u2").reshape(original.shape).tolist() == expected.tolist()


def test_bf16_bits_round_to_nearest_even_and_keep_nan_and_inf():
    import torch

    values = np.array([1.0, 1.00390625, 1.01171875, -3.3e38, np.inf, -np.inf, 1e-40, 65504.0], np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert bf16_bits(values).tolist() == expected.tolist()
    assert bf16_bits(np.array([np.nan], np.float32))[0] & 0x7F80 == 0x7F80 and bf16_bits(np.array([np.nan]))[0] & 0x7F


def test_a_graph_output_computed_in_fp16_is_cast_back_under_its_own_name(tmp_path):
    lowered, _ = _lowered(write_routing_model(tmp_path / "m.onnx"), "fp16")
    producers = {o: n for n in lowered.graph.node for o in n.output}
    # probs and index come out of the fp32 routing nodes; the router's MatMul runs in fp16
    assert producers["probs"].op_type == "TemperedSoftmax" and producers["index"].op_type == "HardSelect"
    assert producers["logits"].op_type == "MatMul"
    assert _types(lowered)["logits"] == TensorProto.FLOAT16
    assert producers[producers["probs"].input[0]].op_type == "Cast"  # fp16 logits -> fp32 for the routing


def test_weights_beyond_the_fp16_range_are_refused_with_the_way_out(tmp_path):
    path = write_routing_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    w = model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(w).shape, 1e6, np.float32), w.name))
    onnx.save(model, path)
    with pytest.raises(BadInput, match="beyond the fp16 range.*bf16 or fp32"):
        _lowered(path, "fp16")
    lowered, _ = _lowered(path, "bf16")  # bf16 has fp32's range
    assert lowered.graph.initializer[0].data_type == TensorProto.BFLOAT16


def test_a_model_with_control_flow_cannot_be_planned_for_lowering(tmp_path):
    path = write_routing_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    model.graph.initializer.append(cond)
    model.graph.node.insert(0, helper.make_node("If", ["cond"], ["x_if"], then_branch=branch, else_branch=branch))
    onnx.save(model, path)
    with pytest.raises(BadInput, match="cannot be lowered to fp16 in-graph: node If holds a subgraph.*--precision fp32"):
        plan_engine(path, precision="fp16")
    assert plan_engine(path).lower_to is None  # fp32 needs no lowering
