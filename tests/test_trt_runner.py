"""TensorRTRunner: metadata from the manifest anywhere; inference against the reference with TensorRT."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from onnx_models import routing_model

from deploytool.artifacts import manifest_path
from deploytool.errors import BadInput, MissingDependency
from deploytool.runners.trt import TensorRTRunner

IO = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 16]}],
      "outputs": [{"name": "index", "dtype": "int64", "shape": [-1]}]}


def _fake_engine(tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not really an engine")
    manifest_path(engine).write_text(json.dumps({"tensorrt": "10.9.0", "compute_capability": "9.0", "io": IO,
                                                 "profile": {}}))
    return engine


def test_runner_reads_io_metadata_from_the_manifest_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    runner = TensorRTRunner(_fake_engine(tmp_path))
    assert [(t.name, t.dtype, t.shape) for t in runner.inputs] == [("x", "float32", (None, 16))]
    assert [(t.name, t.dtype, t.shape) for t in runner.outputs] == [("index", "int64", (None,))]
    with pytest.raises(MissingDependency, match="TensorRT"):
        runner.activate()
    assert not runner.is_active


@pytest.mark.parametrize("precision, compute", [("fp32", None), ("fp16", "float16"), ("bf16", "bfloat16")])
def test_runner_computes_in_the_engine_precision_whatever_its_io_types(tmp_path, precision, compute):
    engine = _fake_engine(tmp_path)
    manifest = json.loads(manifest_path(engine).read_text())
    manifest_path(engine).write_text(json.dumps({**manifest, "precision": precision}))
    assert TensorRTRunner(engine).compute_dtype == compute


def test_runner_refuses_an_engine_without_manifest(tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"x")
    with pytest.raises(BadInput, match="no manifest"):
        TensorRTRunner(engine)


@pytest.mark.tensorrt
@pytest.mark.parametrize("plugin", [True, False])
@pytest.mark.parametrize("dtype, precision, atol", [
    ("float32", "fp32", 1e-5),
    ("float16", "fp16", 2e-3),
    ("float32", "fp16", 1e-5),  # lowered in-graph: the routing stays float32
])
def test_engine_routing_matches_reference_on_both_op_paths(tmp_path, plugin, dtype, precision, atol):
    import onnx

    from deploytool.engine.build import build_engine
    from deploytool.ops import reference

    model = tmp_path / "routing.onnx"
    onnx.save(routing_model(8, 0.7, dtype=dtype), str(model))
    result = build_engine(model, tmp_path / "routing.plan", precision=precision, max_batch=256, plugin=plugin)
    assert result.op_path == ("plugin" if plugin else "local-function")
    logits = np.random.default_rng(0).normal(0, 3, size=(100, 8)).astype(dtype)
    with TensorRTRunner(result.engine) as runner:
        out = runner.infer({"logits": logits})
    ref_probs, ref_index = reference.tempered_softmax_select(logits.astype(np.float64), 0.7)
    np.testing.assert_allclose(out["probs"].astype(np.float64), ref_probs, atol=atol, rtol=0)
    clear = reference.top2_margin(ref_probs) > 2 * atol
    np.testing.assert_array_equal(out["index"][clear], ref_index[clear])
    np.testing.assert_array_equal(out["mask"].argmax(-1), out["index"])


def test_runner_signature_names_the_routers_the_manifest_copied_from_the_model(tmp_path, monkeypatch):
    from deploytool.signature import RouterMeta, from_json, to_json

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # the signature is read without TensorRT
    engine = _fake_engine(tmp_path)
    manifest = json.loads(manifest_path(engine).read_text())
    io = {"inputs": IO["inputs"], "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, 3]},
                                              {"name": "r.index", "dtype": "int64", "shape": [-1]},
                                              {"name": "r.probs", "dtype": "float32", "shape": [-1, 4]}]}
    onnx_signature = from_json({"inputs": io["inputs"], "outputs": io["outputs"], "dim_examples": {"batch": 2},
                                "routers": [RouterMeta("r", 4, 0.5, "r.index", "r.probs").to_dict()]}, "model")
    manifest_path(engine).write_text(json.dumps({**manifest, "io": io, "signature": to_json(onnx_signature)}))
    signature = TensorRTRunner(engine).signature
    assert signature.routers == onnx_signature.routers and signature.dim_examples == {"batch": 2}
    assert signature.output_names == ["output", "r.index", "r.probs"]
    assert [(t.name, t.shape) for t in signature.inputs] == [("x", (None, 16))]  # the engine's own tensors
    signature.require_router(str(engine))


def test_an_engine_whose_manifest_has_no_signature_has_no_router_to_serve(tmp_path):
    signature = TensorRTRunner(_fake_engine(tmp_path)).signature
    assert signature.routers == ()
    with pytest.raises(BadInput, match="no deploytool router"):
        signature.require_router("model.plan")
