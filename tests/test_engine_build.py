"""engine/build.py applying plans through TensorRT's API, on tests/fake_tensorrt.py.

The builder, network and parser are stand-ins that record what build.py asks of them; plugin layers
go through NVIDIA's real tensorrt.plugin and deploytool's plugin module, so a plugin build compiles
and embeds the real kernels. What is checked: the flags, profile, workspace and timing cache the
plan asks for reach TensorRT; which path the parser took is reported as it happened; the engine and
manifest are written whole or not at all.
"""

from __future__ import annotations

import json

import fake_tensorrt
import pytest
from onnx_models import write_routing_model

from deploytool.engine.build import build_engine
from deploytool.artifacts import read_manifest
from deploytool.errors import CheckFailed

pytestmark = pytest.mark.skipif(fake_tensorrt.BINDINGS is None, reason=fake_tensorrt.SKIP_REASON)


@pytest.fixture
def trt():
    """TensorRT 11.4 (stand-in core, real tensorrt.plugin) on a machine that reports an H100."""
    with fake_tensorrt.on_h100() as trt:
        yield trt


@pytest.fixture
def model(tmp_path):
    return write_routing_model(tmp_path / "model.onnx")


def _engine_record(path) -> dict:
    return json.loads(path.read_bytes())


def test_plugin_build_embeds_both_kernels_and_the_manifest_says_which(exported_onnx, trt, tmp_path):
    import onnx

    from deploytool.engine import plugins

    out = tmp_path / "model.plan"
    result = build_engine(exported_onnx, out, max_batch=256)
    model = onnx.load(exported_onnx, load_external_data=False)
    ours = [n for n in model.graph.node if n.domain == "deploytool"]
    assert result.op_path == "plugin" and sorted(result.plugin_layers) == sorted(n.name for n in ours)

    layers = {layer.name: layer for layer in trt.last_build.network.layers}
    softmax = next(n for n in ours if n.op_type == "TemperedSoftmax")
    temperature = next(a.f for a in softmax.attribute if a.name == "temperature")
    assert [(f.name, float(f.data[0])) for f in layers[softmax.name].plugin.fields] == [("temperature", temperature)]
    record = _engine_record(out)
    assert set(record["kernels"]) == set(result.plugin_layers)
    assert "TF32" not in record["flags"] and record["pools"] == {"WORKSPACE": 1024 << 20}
    assert record["profiles"] == [result.plan.profile] and result.plan.profile["x"]["max"][0] == 256
    assert trt.last_build.network.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))

    manifest = read_manifest(out)
    assert manifest["op_path"] == "plugin" and manifest["plugin_layers"] == result.plugin_layers
    assert manifest["embedded_ptx_sha256"].keys() == {"deploytool::TemperedSoftmax", "deploytool::HardSelect"}
    assert set(manifest["embedded_ptx_sha256"]["deploytool::HardSelect"]) == {"float32->float32,int64"}
    assert manifest["kernel_source_sha256"] == plugins.kernel_source_sha256()
    assert (manifest["tensorrt"], manifest["gpu"], manifest["compute_capability"]) == (
        "11.4.0.106", fake_tensorrt.H100["name"], "9.0")
    assert {t["name"]: t["dtype"] for t in manifest["io"]["outputs"]}["routed.router.index"] == "int64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan", "model.plan.json"]

    # the engine reads like the model: its signature names the same routers, its metadata the same source
    from deploytool.artifacts import open_artifact

    engine, onnx_model = open_artifact(out), open_artifact(exported_onnx)
    assert engine.kind == "engine" and engine.signature.routers == onnx_model.signature.routers
    assert [r.path for r in engine.signature.routers] == ["routed.router"]
    assert engine.signature.output_names == onnx_model.signature.output_names
    assert engine.metadata == {k: v for k, v in onnx_model.metadata.items() if k != "deploytool.signature"}
    assert engine.source_run == onnx_model.source_run


def test_doctor_says_the_engine_loads_on_the_machine_that_built_it_and_not_on_another(exported_onnx, trt, tmp_path,
                                                                                   monkeypatch):
    from deploytool import diagnostics

    build_engine(exported_onnx, tmp_path / "model.plan")
    report = diagnostics.check_engine(tmp_path / "model.plan")
    assert report["will_load"] and report["problems"] == []
    assert "no plugin library or Python needed" in report["plugin"]
    # the same engine read on an L4 with another TensorRT: both reasons named, neither guessed
    monkeypatch.setattr(diagnostics, "describe_machine", lambda: {"tensorrt": "10.13.0", "cuda": "12.8",
                                                                 "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    report = diagnostics.check_engine(tmp_path / "model.plan")
    assert not report["will_load"] and len(report["problems"]) == 2
    assert "built with TensorRT 11.4.0.106" in report["problems"][0] and "8.9" in report["problems"][1]


def test_no_plugin_inlines_the_function_bodies_and_embeds_nothing(model, trt, tmp_path):
    result = build_engine(model, tmp_path / "model.plan", plugin=False)
    assert result.op_path == "local-function" and result.plugin_layers == []
    names = [layer.name for layer in trt.last_build.network.layers]
    assert names == ["router", "softmax/Softmax_0", "select/Identity_0", "select/ArgMax_1"]
    manifest = read_manifest(tmp_path / "model.plan")
    assert manifest["embedded_ptx_sha256"] == {} and manifest["kernel_source_sha256"] is None
    assert _engine_record(tmp_path / "model.plan")["kernels"] == {}


def test_a_plugin_the_parser_cannot_find_is_reported_as_the_function_path(model, trt, tmp_path, cli):
    from deploytool.engine.plugins import load_plugins

    load_plugins()
    trt.get_plugin_registry().creators.clear()  # e.g. registered under another namespace
    code, out, _ = cli("build-engine", str(model), "--out", str(tmp_path / "model.plan"))
    assert code == 0
    assert "local-function path: the parser found no registered deploytool plugin" in " ".join(out.split())
    assert read_manifest(tmp_path / "model.plan")["op_path"] == "local-function"


def test_cli_build_says_it_took_the_plugin_path(model, trt, tmp_path, cli):
    code, out, _ = cli("build-engine", str(model), "--out", str(tmp_path / "model.plan"), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["op_path"] == "plugin" and data["plugin_layers"] == ["softmax", "select"]


def test_an_fp16_build_of_an_fp32_model_parses_a_lowered_graph_with_fp32_routing(exported_onnx, trt, tmp_path):
    result = build_engine(exported_onnx, tmp_path / "model.plan", precision="fp16")
    network = trt.last_build.network
    assert [t.dtype for t in network.inputs] == [trt.float32]  # the interface keeps fp32
    assert {t.name: t.dtype for t in network.outputs} == {"output": trt.float32, "routed.router.index": trt.int64,
                                                          "routed.router.probs": trt.float32}
    layers = {layer.name: layer for layer in network.layers}
    expert = layers["node_linear_1"]  # an expert's first Gemm: fp16 in, fp16 out
    assert expert.inputs[0].dtype == trt.float16 and expert.outputs[0].dtype == trt.float16
    router = layers["node_linear"]  # the router runs in fp16 up to its logits
    assert router.outputs[0].dtype == trt.float16
    for name in result.plugin_layers:  # the routing decision is made in fp32
        assert layers[name].inputs[0].dtype == trt.float32
    manifest = read_manifest(tmp_path / "model.plan")
    assert manifest["precision"] == "fp16" and manifest["lowered_to"] == "fp16"
    assert set(manifest["embedded_ptx_sha256"]["deploytool::TemperedSoftmax"]) == {"float32->float32"}
    assert {t["name"]: t["dtype"] for t in manifest["io"]["inputs"]} == {"x": "float32"}


def test_a_failed_build_leaves_the_previous_engine_and_manifest_untouched(model, trt, tmp_path):
    out = tmp_path / "model.plan"
    build_engine(model, out)
    before = (out.read_bytes(), (tmp_path / "model.plan.json").read_bytes())
    trt.Builder.fail_with = "insufficient workspace for the tactic"
    with pytest.raises(CheckFailed, match="could not build the engine: insufficient workspace"):
        build_engine(model, out, workspace_mib=1)
    assert (out.read_bytes(), (tmp_path / "model.plan.json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.plan", "model.plan.json"]


def test_parser_errors_become_one_check_failure_naming_the_model(model, trt, tmp_path, monkeypatch):
    from deploytool.engine import build

    monkeypatch.setattr(build, "_model_bytes", lambda plan: b"not a protobuf")
    with pytest.raises(CheckFailed, match=r"TensorRT could not parse .*model\.onnx: could not read the model"):
        build_engine(model, tmp_path / "model.plan")
    assert not (tmp_path / "model.plan").exists()


def test_timing_cache_is_read_before_and_written_back_after_the_build(model, trt, tmp_path):
    cache = tmp_path / "timing.cache"
    build_engine(model, tmp_path / "a.plan", timing_cache=cache)
    assert cache.read_bytes() == b"+timings"  # created
    build_engine(model, tmp_path / "b.plan", timing_cache=cache)
    assert cache.read_bytes() == b"+timings+timings"  # read, extended, written back


def test_an_engine_built_here_packages_as_a_triton_tensorrt_plan_model(exported_onnx, trt, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from onnx_models import parse

    from deploytool.serving.repository import package

    build_engine(exported_onnx, tmp_path / "model.plan", max_batch=128)
    result = package(tmp_path / "model.plan", tmp_path / "repo", "router", max_batch=128)
    config = parse(result.model_dir)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 128
    assert [t.name for t in config.output] == ["output", "routed.router.index", "routed.router.probs"]
    assert "TensorRT 11.4.0.106" in result.readme.read_text()


def test_a_build_lowers_the_model_once_and_a_dry_run_lowers_it_as_a_check(model, trt, tmp_path, monkeypatch):
    from deploytool.engine import lowering

    calls = []
    real = lowering.lower_precision
    monkeypatch.setattr(lowering, "lower_precision", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    build_engine(model, tmp_path / "model.plan", precision="bf16")
    assert calls == ["bf16"]
    build_engine(model, tmp_path / "other.plan", precision="fp16", dry_run=True)
    assert calls == ["bf16", "fp16"] and not (tmp_path / "other.plan").exists()


def test_the_stand_in_parser_refuses_mixed_types_as_strongly_typed_tensorrt_does(trt, tmp_path):
    """The guard behind the fp16 test above: a lowering that forgot a Cast would fail here."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"], name="mixed")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.ones(4, np.float16), "w")])
    path = tmp_path / "mixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    with pytest.raises(CheckFailed, match="could not parse .*mixed: inputs of mixed types"):
        build_engine(path, tmp_path / "mixed.plan")
