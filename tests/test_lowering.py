"""engine/lowering.py: an fp32 model lowered to fp16/bf16 in-graph, the routing decision kept in fp32.

fp16 graphs run on ONNX Runtime's CPU provider, so the lowered model's numerics and routing are
checked against the fp32 model here; bf16 has no CPU kernels there and is checked structurally.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import write_routing_model

from deploytool.engine.lowering import bf16_bits, lower_precision
from deploytool.engine.plan import plan_engine
from deploytool.errors import BadInput


def _lowered(path, precision):
    plan = plan_engine(path, precision=precision)
    return lower_precision(onnx.load(path), precision, plan.fp32_regions), plan


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))


def _types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}


@pytest.fixture(scope="module")
def dense_onnx(trained_run, tmp_path_factory):
    """The trained run's dense export. ONNX Runtime's CPU fp16 kernels on the sparse graph's small
    gathered row blocks drift up to 3.4e-3 on this model's logits, past the fp16 default atol of 1e-3,
    where the dense graph stays within it; the sparse graph's fp16 lowering has its own test below."""
    from deploytool.export.onnx import export_onnx

    return export_onnx(trained_run.path, tmp_path_factory.mktemp("dense") / "dense.onnx", dispatch="dense").path


def test_fp16_lowering_of_the_exported_model_keeps_its_routing_and_its_fp32_interface(dense_onnx, trained_run):
    from deploytool.artifacts import open_artifact
    from deploytool.compare import compare, default_tolerance
    from deploytool.data import load_dataset

    exported_onnx = dense_onnx
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
    (router,) = open_artifact(exported_onnx).signature.routers
    comparison = compare(reference, candidate, routers=[router], atol=atol, rtol=rtol)
    assert comparison.passed, comparison.to_dict()
    assert (reference[router.index] == candidate[router.index]).mean() >= 0.99


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
    with pytest.raises(BadInput, match=r"m\.onnx: cannot lower this model to fp16 in-graph: node If holds a subgraph "
                                       r"\(control flow\); build in fp32"):
        plan_engine(path, precision="fp16")
    assert plan_engine(path).lower_to is None  # fp32 needs no lowering


# --- graphs unlike the exporter's ------------------------------------------------------------------

def _model(nodes, initializers=(), outputs=("out",), extra_inputs=(), functions=()):
    """x[batch, 4] -> nodes -> outputs (float32), deploytool ops registered in their domain."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]), *extra_inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", 4]) for o in outputs], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("deploytool", 1)],
                             functions=list(functions))


def _weight(name, shape, value=0.5):
    return numpy_helper.from_array(np.full(shape, value, np.float32), name)


def _lower(model, precision="fp16"):
    from deploytool.engine.lowering import routing_regions

    regions = routing_regions(list(model.graph.node))
    return lower_precision(model, precision, regions)


def _ort_matches(model, lowered, atol=2e-2):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    ref, got = _run(model, x), _run(lowered, x)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=atol, rtol=2e-2)
        assert got[name].dtype == ref[name].dtype


def test_float_constants_in_every_spelling_are_lowered_with_their_readers():
    model = _model([
        helper.make_node("Constant", [], ["a"], value_float=2.0),
        helper.make_node("Constant", [], ["b"], value_floats=[1.0, 2.0, 3.0, 4.0]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),  # no value: float32 zeros
        helper.make_node("Mul", ["x", "a"], ["xa"]),
        helper.make_node("Add", ["xa", "b"], ["xab"]),
        helper.make_node("Add", ["xab", "zeros"], ["out"]),
    ])
    lowered = _lower(model)
    assert _types(lowered)["xab"] == TensorProto.FLOAT16
    _ort_matches(model, lowered)


def test_an_input_that_must_stay_fp32_is_cast_back_even_from_a_lowered_constant():
    model = _model([
        helper.make_node("Constant", [], ["scales"], value_floats=[1.0, 2.0]),
        helper.make_node("Resize", ["x", "", "scales"], ["out"], mode="nearest"),
    ])
    _ort_matches(model, _lower(model))


def test_a_weight_that_is_also_a_graph_input_stays_an_optional_fp32_input():
    w = _weight("w", [4, 4])
    model = _model([helper.make_node("MatMul", ["x", "w"], ["out"])], [w],
                   extra_inputs=[helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])])
    lowered = _lower(model)
    assert [(v.name, v.type.tensor_type.elem_type) for v in lowered.graph.input] == \
        [("x", TensorProto.FLOAT), ("w", TensorProto.FLOAT)]
    _ort_matches(model, lowered)  # fed x only: w still defaults to its initializer


def test_an_op_without_a_lower_precision_kernel_is_a_clear_refusal_not_a_crash():
    model = _model([helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0, axes=[0, 1]) if False else
                    helper.make_node("Constant", [], ["start"], value_float=0.0),
                    helper.make_node("Constant", [], ["delta"], value_float=0.5),
                    helper.make_node("ReduceMax", ["x"], ["limit"], keepdims=0),
                    helper.make_node("Range", ["start", "limit", "delta"], ["out"])])
    with pytest.raises(BadInput, match="lower this model to fp16 in-graph: the lowered graph does not check .*"
                                       "build in fp32"):
        _lower(model)


def _routed_layer(k: int, x: str, with_mask_product=True):
    """Router k on `x`: logits -> TemperedSoftmax -> HardSelect, then mask * (x @ expert weights)."""
    nodes = [helper.make_node("MatMul", [x, f"router{k}"], [f"logits{k}"], name=f"router{k}"),
             helper.make_node("TemperedSoftmax", [f"logits{k}"], [f"probs{k}"], domain="deploytool",
                              name=f"softmax{k}", temperature=0.5),
             helper.make_node("HardSelect", [f"probs{k}"], [f"mask{k}", f"index{k}"], domain="deploytool",
                              name=f"select{k}"),
             helper.make_node("MatMul", [x, f"expert{k}"], [f"e{k}"], name=f"expert{k}"),
             helper.make_node("Mul", [f"mask{k}", f"e{k}"], [f"h{k}"], name=f"combine{k}")]
    return nodes, [_weight(f"router{k}", [4, 4]), _weight(f"expert{k}", [4, 4])]


def test_deploytool_nodes_without_function_bodies_are_typed_by_their_definition():
    nodes, weights = _routed_layer(1, "x")
    lowered = _lower(_model(nodes, weights, outputs=("h1",)))  # no function bodies: inference cannot type mask1
    producers = {o: n for n in lowered.graph.node for o in n.output}
    combine = next(n for n in lowered.graph.node if n.name == "combine1")
    assert producers[combine.input[0]].op_type == "Cast"  # fp32 mask -> fp16 before the fp16 product
    assert _types(lowered)["e1"] == TensorProto.FLOAT16


def test_each_router_keeps_only_its_own_decision_in_fp32():
    first, w1 = _routed_layer(1, "x")
    second, w2 = _routed_layer(2, "h1")
    lowered = _lower(_model(first + second, w1 + w2, outputs=("h2",)))
    kept_fp32 = {n.name for n in lowered.graph.node if n.domain == "deploytool"}
    assert kept_fp32 == {"softmax1", "select1", "softmax2", "select2"}
    types = _types(lowered)
    for lowered_tensor in ("logits1", "e1", "h1", "logits2", "e2"):  # the layers between the routers
        assert types[lowered_tensor] == TensorProto.FLOAT16, lowered_tensor
    assert {t.name: t.data_type for t in lowered.graph.initializer}["expert1__fp16"] == TensorProto.FLOAT16


def test_nodes_between_softmax_and_select_and_the_constants_they_read_stay_exact_in_fp32():
    nodes, weights = _routed_layer(1, "x")
    nodes[2].input[0] = "scaled"  # TemperedSoftmax -> Mul(probs, pi) -> HardSelect
    nodes[2:2] = [helper.make_node("Constant", [], ["pi"], value=helper.make_tensor("pi", TensorProto.FLOAT, [], [3.14159])),
                  helper.make_node("Mul", ["probs1", "pi"], ["scaled"], name="scale")]
    lowered = _lower(_model(nodes, weights, outputs=("h1",)))
    scale = next(n for n in lowered.graph.node if n.name == "scale")
    assert list(scale.input) == ["probs1", "pi"]  # no Cast to fp16 on the way: the Mul runs in fp32
    pi = next(n for n in lowered.graph.node if n.output[0] == "pi")
    assert pi.attribute[0].t.data_type == TensorProto.FLOAT and numpy_helper.to_array(pi.attribute[0].t) == np.float32(3.14159)


def test_a_later_hardselect_without_a_softmax_is_a_router_of_its_own():
    first, w1 = _routed_layer(1, "x")
    second, w2 = _routed_layer(2, "h1")
    del second[1]  # router 2: logits -> HardSelect directly
    second[1].input[0] = "logits2"
    from deploytool.engine.lowering import routing_regions

    model = _model(first + second, w1 + w2, outputs=("h2",))
    assert routing_regions(list(model.graph.node)) == [
        {"from": ["logits1"], "to": ["index1", "mask1", "probs1"]},
        {"from": ["logits2"], "to": ["index2", "mask2"]}]
    assert _types(_lower(model))["e1"] == TensorProto.FLOAT16  # the layers between stay lowered


def test_names_the_lowering_would_generate_are_kept_unique():
    model = _model([helper.make_node("Relu", ["x"], ["x__fp16"], name="cast_x__fp16"),
                    helper.make_node("Add", ["x", "x__fp16"], ["out__fp16"]),
                    helper.make_node("Mul", ["out__fp16", "x"], ["out"])])
    _ort_matches(model, _lower(model))


def test_a_weight_that_is_a_graph_output_and_an_op_that_makes_fp32_by_itself_still_lower():
    scale, bias = _weight("scale", [4], 1.0), _weight("bias", [4], 0.0)
    model = _model([
        # LayerNormalization's Mean is float32 whatever it reads (stash_type=1): cast where it is made
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y", "mean", "inv_std"], axis=-1),
        helper.make_node("Add", ["y", "mean"], ["out"]),
    ], [scale, bias], outputs=("out", "scale"))
    model.graph.output[1].type.tensor_type.shape.ClearField("dim")
    model.graph.output[1].type.tensor_type.shape.dim.add().dim_value = 4
    lowered = _lower(model)
    assert _types(lowered)["mean"] == TensorProto.FLOAT16
    _ort_matches(model, lowered)


def test_missing_external_weights_are_bad_input_naming_the_model(tmp_path):
    path = write_routing_model(tmp_path / "m.onnx")
    model = onnx.load(path)
    for t in model.graph.initializer:  # raw data, which is what goes to an external file
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=0)
    assert plan_engine(path, precision="fp16").lower_to == "fp16"  # external weights are read in
    (tmp_path / "m.weights").unlink()
    with pytest.raises(BadInput, match=r"m\.onnx: its external weights cannot be read"):
        plan_engine(path, precision="fp16")


def test_an_fp32_making_op_whose_sibling_output_is_a_graph_output_is_repaired():
    scale, bias = _weight("scale", [4], 1.0), _weight("bias", [4], 0.0)
    model = _model([helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y", "mean", "inv_std"]),
                    helper.make_node("Add", ["y", "mean"], ["out"])], [scale, bias], outputs=("out", "y"))
    lowered = _lower(model)
    _ort_matches(model, lowered)
    # the graph outputs come back to fp32 through one Cast each, from tensors that hold fp16
    assert sum(n.op_type == "Cast" and n.output[0] in ("out", "y") for n in lowered.graph.node) == 2


def test_small_float_weights_that_inference_reads_keep_their_values_for_it():
    depth = numpy_helper.from_array(np.array(4.0, np.float32), "depth")
    values = numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "values")
    indices = numpy_helper.from_array(np.array([[0, 1, 2, 3]], np.int64), "indices")
    model = _model([helper.make_node("OneHot", ["indices", "depth", "values"], ["oh"], axis=-1),
                    helper.make_node("MatMul", ["x", "oh"], ["mm"]),
                    helper.make_node("Squeeze", ["mm"], ["out"], )], [depth, values, indices])
    model.graph.node[2].input.append("axes")
    model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
    _ort_matches(model, _lower(model))


def test_fp16_lowering_of_a_sparse_export_routes_identically_and_keeps_its_index_arithmetic_integer(tmp_path):
    """The sparse graph (NonZero, Gather, ScatterND, data-dependent row counts) lowers, runs in fp16
    and routes as fp32 does; its row indices are never cast to a float type."""
    import fake_tensorrt
    import torch
    from test_export_dispatch import FEATURES, Routed, export, mlp

    torch.manual_seed(0)
    path = tmp_path / "sparse.onnx"
    onnx.save(export(Routed([mlp() for _ in range(4)]), torch.randn(2, FEATURES), {0: torch.export.Dim("batch")}), path)
    lowered, _ = _lowered(path, "fp16")
    assert {"NonZero", "ScatterND", "Gather"} <= {n.op_type for n in lowered.graph.node}
    types = _types(lowered)
    integers = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}
    for node in lowered.graph.node:
        if node.op_type == "Cast":
            assert types[node.input[0]] not in integers, f"{node.name} casts integer {node.input[0]}"
        if node.op_type in ("NonZero", "ScatterND", "Gather"):  # indices in, indices out: integer
            index_tensors = {"NonZero": node.output[:1], "ScatterND": node.input[1:2], "Gather": node.input[1:2]}
            assert all(types[t] == TensorProto.INT64 for t in index_tensors[node.op_type]), node.name

    x = np.random.default_rng(0).standard_normal((512, FEATURES)).astype(np.float32)
    reference, candidate = _run(onnx.load(path), x), _run(lowered, x)
    names = [o.name for o in lowered.graph.output]
    output, index = names
    assert candidate[index].tolist() == reference[index].tolist() and len(np.unique(reference[index])) == 4
    np.testing.assert_allclose(candidate[output], reference[output], rtol=1e-2, atol=1e-2)
    if fake_tensorrt.BINDINGS is not None:  # the stand-in parser takes it, scatters typed consistently
        with fake_tensorrt.installed() as trt:
            parser = trt.OnnxParser(trt.Builder(None).create_network(0), None)
            assert parser.parse(lowered.SerializeToString()), parser.errors
