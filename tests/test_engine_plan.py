"""EngineBuildPlan from real (small) ONNX files, without TensorRT."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx_models import write_routing_model
from onnx import TensorProto, helper

from deploytool.engine.build import _model_bytes
from deploytool.engine.lowering import layers_between
from deploytool.engine.plan import plan_engine
from deploytool.errors import BadInput
from deploytool.io import sha256_file


@pytest.fixture
def model(tmp_path):
    return write_routing_model(tmp_path / "model.onnx")


def test_fp32_plan_is_strongly_typed_with_dynamic_batch_profile_and_plugins(model):
    plan = plan_engine(model, min_batch=2, opt_batch=32, max_batch=512, workspace_mib=256)
    assert plan.lower_to is None and plan.network_flags == ["STRONGLY_TYPED"] and plan.fp32_regions == []
    assert plan.cleared_builder_flags == ["TF32"]
    assert plan.profile == {"x": {"min": [2, 16], "opt": [32, 16], "max": [512, 16]}}
    assert plan.op_path == "plugin"
    assert plan.plugin_ids == ["deploytool::HardSelect", "deploytool::TemperedSoftmax"]
    assert plan.deploytool_nodes == ["softmax", "select"]
    assert plan.onnx_sha256 == sha256_file(model)
    assert plan.workspace_mib == 256 and plan.timing_cache is None
    json.dumps(plan.to_dict())  # the --dry-run output


def test_no_plugin_plans_the_local_function_path(model):
    plan = plan_engine(model, plugin=False)
    assert plan.op_path == "local-function" and plan.plugin_ids == [] and not plan.plugin_requested


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_an_fp32_model_is_lowered_in_graph_with_the_routing_region_kept_fp32(model, precision):
    plan = plan_engine(model, precision=precision)
    assert plan.lower_to == precision and plan.network_flags == ["STRONGLY_TYPED"]
    assert plan.fp32_regions == [{"from": ["logits"], "to": ["index", "mask", "probs"]}]
    assert plan.cleared_builder_flags == [] and plan.requires_tensorrt == ">=10.9"  # TensorRT 10.9 and 11 alike


def test_fp16_model_builds_strongly_typed_as_fp16_and_refuses_fp32(tmp_path):
    path = write_routing_model(tmp_path / "half.onnx", elem=TensorProto.FLOAT16)
    assert plan_engine(path, precision="fp16").lower_to is None  # its own types
    with pytest.raises(BadInput, match="model is fp16"):
        plan_engine(path, precision="fp32")


@pytest.mark.parametrize("batches", [(8, 4, 16), (1, 64, 32), (0, 1, 2), (1, 1, -3)])
def test_batch_profile_out_of_order_or_below_one_is_bad_input(model, batches):
    lo, opt, hi = batches
    with pytest.raises(BadInput, match="batch"):
        plan_engine(model, min_batch=lo, opt_batch=opt, max_batch=hi)


def test_static_batch_model_needs_that_batch_everywhere(tmp_path):
    path = write_routing_model(tmp_path / "static.onnx", batch=8)
    with pytest.raises(BadInput, match="static batch of 8"):
        plan_engine(path)
    assert plan_engine(path, min_batch=8, opt_batch=8, max_batch=8).profile["x"]["max"] == [8, 16]


def test_dynamic_axis_besides_batch_without_a_range_or_an_example_is_bad_input(tmp_path):
    model = write_routing_model(tmp_path / "m.onnx", extra_dynamic=True)  # no signature: no example size
    with pytest.raises(BadInput, match=r"input x axis 1 is dynamic \(feat\) with no range"):
        plan_engine(model)
    plan = plan_engine(model, min_batch=1, opt_batch=8, max_batch=64, dims={"feat": (16, 16, 32)})
    assert plan.profile == {"x": {"min": [1, 16], "opt": [8, 16], "max": [64, 32]}}


def test_named_dims_take_their_range_or_the_export_examples_size_and_unknown_names_are_refused(tmp_path):
    from onnx_models import token_onnx

    model = token_onnx(tmp_path / "tokens.onnx", tokens="tokens")  # x [batch, tokens, 4], example 7 tokens
    ranged = plan_engine(model, opt_batch=8, max_batch=32, dims={"tokens": (1, 8, 64)})
    assert ranged.profile == {"x": {"min": [1, 1, 4], "opt": [8, 8, 4], "max": [32, 64, 4]}}
    fixed = plan_engine(model, opt_batch=8, max_batch=32)
    assert fixed.profile == {"x": {"min": [1, 7, 4], "opt": [8, 7, 4], "max": [32, 7, 4]}}
    with pytest.raises(BadInput, match="no dynamic dim 'seq'"):
        plan_engine(model, dims={"seq": (1, 8, 64)})
    for bad in [(1, 8), (8, 1, 64), (0, 1, 2), (1.5, 2, 3)]:
        with pytest.raises(BadInput, match="min <= opt <= max"):
            plan_engine(model, dims={"tokens": bad})


def test_the_plan_carries_the_models_signature_and_metadata_for_the_manifest(tmp_path):
    import onnx
    from onnx_models import tiny_onnx

    from deploytool.signature import META_KEY, from_json

    path = tiny_onnx(tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "deploytool.source": "/somewhere/run"})
    onnx.save(model, str(path))
    plan = plan_engine(path, max_batch=64)
    stored = {p.key: p.value for p in model.metadata_props}
    assert plan.signature == stored[META_KEY]
    assert [r.path for r in from_json(plan.signature, "plan").routers] == ["router"]
    assert plan.metadata == {"deploytool.source": "/somewhere/run"}
    assert plan.to_dict()["signature"] == plan.signature  # what build_manifest copies


def test_unknown_precision_missing_file_and_garbage_are_bad_input(model, tmp_path):
    with pytest.raises(BadInput, match="unknown precision"):
        plan_engine(model, precision="int8")
    with pytest.raises(BadInput, match="does not exist"):
        plan_engine(tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(BadInput, match=r"not an ONNX model \(or is truncated\)"):
        plan_engine(garbage)


def test_empty_onnx_file_is_not_an_onnx_model_rather_than_a_model_without_inputs(tmp_path):
    """protobuf parses zero bytes as an empty ModelProto: the check must say the file is not a model."""
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match=r"not an ONNX model \(or is truncated\)"):
        plan_engine(empty)


def test_ops_without_function_bodies_need_the_plugin(tmp_path):
    path = write_routing_model(tmp_path / "bare.onnx", functions=False)
    assert plan_engine(path).op_path == "plugin"
    with pytest.raises(BadInput, match="no ONNX function body"):
        plan_engine(path, plugin=False)


def test_parser_input_names_the_plugin_only_on_the_plugin_path(model):
    """TensorRT's parser takes a node to a plugin when it carries plugin_namespace; else it inlines the function."""
    plugged = onnx.load_from_string(_model_bytes(plan_engine(model)))
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in plugged.graph.node}
    assert attrs["softmax"] == {"temperature": pytest.approx(0.5), "plugin_namespace": b"deploytool", "aot": 1}
    assert attrs["select"] == {"plugin_namespace": b"deploytool", "aot": 1}
    assert "plugin_namespace" not in attrs["router"]
    plain = onnx.load_from_string(_model_bytes(plan_engine(model, plugin=False)))
    assert all(a.name != "plugin_namespace" for n in plain.graph.node for a in n.attribute)


def test_function_path_strips_plugin_attributes_left_by_another_tool(tmp_path):
    """The parser prefers a registered plugin named by plugin_namespace over the local function, so
    --no-plugin must not leave one in place."""
    path = write_routing_model(tmp_path / "tagged.onnx")
    model = onnx.load(str(path))
    model.graph.node[1].attribute.extend([helper.make_attribute("plugin_namespace", "deploytool"),
                                          helper.make_attribute("aot", 1)])
    onnx.save(model, str(path))
    plain = onnx.load_from_string(_model_bytes(plan_engine(path, plugin=False)))
    assert not {"plugin_namespace", "aot"} & {a.name for n in plain.graph.node for a in n.attribute}
    assert helper.get_attribute_value(plain.graph.node[1].attribute[0]) == pytest.approx(0.5)  # temperature kept


def test_layers_between_finds_function_layers_whatever_their_names():
    """The routing nodes are found by dataflow, whatever their names: after the router's logits,
    up to the routing outputs, not the experts downstream."""
    layers = [
        (["x"], ["logits"]),                 # 0 router MatMul: feeds logits, not routing
        ([], ["t_float"]),                   # 1 Constant inside the function
        (["t_float", "logits"], ["t"]),      # 2 CastLike
        (["logits", "t"], ["z"]),            # 3 Div
        (["z"], ["z_max"]),                  # 4 ReduceMax
        (["z", "z_max"], ["probs"]),         # 5 ... softmax
        (["probs"], ["index"]),              # 6 ArgMax (HardSelect)
        (["probs", "index"], ["mask"]),      # 7 one-hot
        (["x", "mask"], ["expert_out"]),     # 8 experts: downstream, not routing
        (["logits"], ["aux"]),               # 9 reads logits but feeds no routing output
    ]
    assert layers_between(layers, {"from": ["logits"], "to": ["index", "mask", "probs"]}) == [2, 3, 4, 5, 6, 7]
    assert layers_between(layers, {}) == []
