"""ONNX export: graph contract, parity with PyTorch, function bodies, validation and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_one_line_error
from deploytool.errors import BadInput, CheckFailed
from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX


@pytest.fixture(scope="module")
def proto(exported_onnx):
    import onnx

    return onnx.load(str(exported_onnx))


def _ort(path_or_proto):
    import onnxruntime as ort

    data = path_or_proto if isinstance(path_or_proto, (str, bytes)) else path_or_proto.SerializeToString()
    return ort.InferenceSession(str(data) if isinstance(data, str) else data, providers=["CPUExecutionProvider"])


def _digits_test(trained_run):
    from deploytool.data import load_dataset

    return load_dataset("digits", trained_run.config["seed"]).x_test


def test_exported_graph_passes_full_checker_with_the_deploytool_ops(proto, trained_run):
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    assert ("deploytool", 1) in {(o.domain, o.version) for o in proto.opset_import}
    ops = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in ops] == [TEMPERED_SOFTMAX, HARD_SELECT]
    temperature = next(a.f for a in ops[0].attribute if a.name == "temperature")
    assert temperature == pytest.approx(trained_run.config["temperature"], rel=1e-6)
    assert {(f.domain, f.name) for f in proto.functions} == {(DOMAIN, TEMPERED_SOFTMAX), (DOMAIN, HARD_SELECT)}


def test_input_has_a_dynamic_batch_and_outputs_are_named(proto):
    (x,) = proto.graph.input
    dims = x.type.tensor_type.shape.dim
    assert x.name == "x" and dims[0].dim_param and dims[1].dim_value == 64
    assert [o.name for o in proto.graph.output] == ["output", "index", "probs"]


def test_metadata_records_version_temperature_experts_and_checkpoint(proto, trained_run):
    from deploytool import __version__
    from deploytool.io import sha256_file

    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["deploytool.version"] == __version__
    assert float(meta["deploytool.temperature"]) == pytest.approx(trained_run.config["temperature"])
    assert meta["deploytool.experts"] == "4"
    assert meta["deploytool.checkpoint_sha256"] == sha256_file(trained_run.weights)


def test_onnx_runtime_matches_pytorch_on_digits(exported_onnx, trained_run):
    from deploytool.training import load_model

    import torch

    x = _digits_test(trained_run)
    with torch.no_grad():
        want = load_model(trained_run.path)(torch.from_numpy(x))
    output, index, probs = _ort(str(exported_onnx)).run(None, {"x": x})
    assert np.abs(output - want.output.numpy()).max() < 1e-5
    assert np.abs(probs - want.probs.numpy()).max() < 1e-5
    assert (index == want.index.numpy()).mean() == 1.0


def test_function_bodies_are_what_onnx_runtime_executes(proto, trained_run):
    """Inlining the functions by hand gives bit-identical outputs: ORT ran exactly those bodies."""
    from onnx import inliner

    inlined = inliner.inline_local_functions(proto)
    assert not inlined.functions and not any(n.domain == DOMAIN for n in inlined.graph.node)
    x = _digits_test(trained_run)
    for got, want in zip(_ort(inlined).run(None, {"x": x}), _ort(proto).run(None, {"x": x})):
        np.testing.assert_array_equal(got, want)


def test_onnx_reference_evaluator_runs_the_exported_model(proto, trained_run):
    from onnx.reference import ReferenceEvaluator

    x = _digits_test(trained_run)[:32]
    got = ReferenceEvaluator(proto).run(None, {"x": x})
    want = _ort(proto).run(None, {"x": x})
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])


def test_users_own_module_with_a_router_exports_static_batch_and_is_left_unchanged(tmp_path):
    """A module of the user's (returns a plain tuple), exported_onnx at a fixed batch; its state is restored."""
    import onnx
    import torch
    from torch import nn

    from deploytool import export_onnx
    from deploytool.nn import RoutedExperts, Router

    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.routed = RoutedExperts(Router(12, 3, temperature=0.5), [nn.Linear(12, 5) for _ in range(3)],
                                        dispatch="sparse")

        def forward(self, x):
            out = self.routed(x)
            return torch.tanh(out.output), out.index, out.probs

    torch.manual_seed(0)
    model = Mine().train()
    result = export_onnx(model, tmp_path / "mine.onnx", static_batch=8)
    # batches other than 8 reach the static graph as padded chunks of 8
    assert result.passed and result.validation.inputs == {"random batch 1": 1, "random batch 256": 256}
    assert model.training and model.routed.dispatch == "sparse"
    assert model.routed.router.temperature == 0.5
    (x,) = onnx.load(str(tmp_path / "mine.onnx")).graph.input
    assert [d.dim_value for d in x.type.tensor_type.shape.dim] == [8, 12]
    assert result.metadata["deploytool.source"] == "module:Mine"


def test_module_without_a_router_is_bad_input(tmp_path):
    from torch import nn

    from deploytool.export.onnx import export_onnx

    with pytest.raises(BadInput, match="no deploytool.nn.Router"):
        export_onnx(nn.Linear(4, 2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture
def cached_export(monkeypatch, proto):
    """Skip the dynamo export: to_onnx hands back the session's exported_onnx graph."""
    import deploytool.export.onnx as export_module

    metadata = {p.key: p.value for p in proto.metadata_props}
    monkeypatch.setattr(export_module, "to_onnx", lambda *a, **k: (proto, metadata))


def test_failed_validation_leaves_no_file_and_keeps_a_good_one(cached_export, trained_run, tmp_path):
    from deploytool.export.onnx import export_onnx

    target = tmp_path / "model.onnx"
    with pytest.raises(CheckFailed, match="failed validation") as info:
        export_onnx(trained_run.path, target, atol=0.0, rtol=0.0)
    assert not target.exists() and not list(tmp_path.iterdir())
    assert not info.value.report.passed and info.value.report.validation.failures()
    target.write_bytes(b"a good model")
    with pytest.raises(CheckFailed):
        export_onnx(trained_run.path, target, atol=0.0, rtol=0.0)
    assert target.read_bytes() == b"a good model"


def test_keep_invalid_keeps_the_failed_model(cached_export, trained_run, tmp_path):
    from deploytool.export.onnx import export_onnx

    target = tmp_path / "model.onnx"
    with pytest.raises(CheckFailed, match="kept"):
        export_onnx(trained_run.path, target, atol=0.0, rtol=0.0, keep_invalid=True)
    assert target.stat().st_size > 1000


def test_cli_export_json_reports_validation(cli, cached_export, trained_run, tmp_path):
    code, out, err = cli("export", trained_run.path, "--out", tmp_path / "m.onnx", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["passed"] and (tmp_path / "m.onnx").exists()
    inputs = [c["inputs"] for c in result["validation"]["comparisons"]]
    assert inputs == ["digits held-out", "random batch 1", "random batch 256"]
    assert all(c["routing"]["agreement"] == 100.0 for c in result["validation"]["comparisons"])


def test_cli_export_failing_validation_prints_the_report_and_exits_1(cli, cached_export, trained_run, tmp_path):
    code, out, err = cli("export", trained_run.path, "--out", tmp_path / "m.onnx", "--atol", "0", "--rtol", "0")
    assert_one_line_error(code, err, 1, "failed validation")
    assert "validation: FAIL" in out and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("args, match", [
    (["{missing}", "--out", "{tmp}/m.onnx"], "does not exist"),
    (["{run}", "--out", "{tmp}/no/such/dir/m.onnx"], "does not exist"),
    (["{run}", "--out", "{tmp}/m.onnx", "--opset", "9"], "opset 9"),
    (["{run}", "--out", "{tmp}/m.onnx", "--static-batch", "0"], "static batch"),
    (["{run}", "--out", "{tmp}/m.onnx", "--atol", "-1"], "--atol must be a finite number >= 0"),
    (["{run}", "--out", "{tmp}/m.onnx", "--atol", "nan"], "--atol must be a finite number >= 0"),
    (["{run}", "--out", "{tmp}/m.onnx", "--rtol", "-1"], "--rtol must be a finite number >= 0"),
    (["{run}", "--out", "{tmp}/m.onnx", "--rtol", "nan"], "--rtol must be a finite number >= 0"),
    (["{run}", "--out", "{tmp}/m.txt"], "must end in .onnx"),
])
def test_cli_export_bad_input_is_one_line_exit_2(cli, trained_run, tmp_path, args, match):
    fill = {"missing": tmp_path / "nope", "tmp": tmp_path, "run": trained_run.path}
    code, _, err = cli("export", *(a.format(**fill) for a in args))
    assert_one_line_error(code, err, 2, match)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.txt").exists()


def test_a_relative_run_directory_is_recorded_as_an_absolute_source(monkeypatch, proto, trained_run, tmp_path):
    """bench reads the source back from its own working directory: a relative one names another model."""
    from pathlib import Path

    import deploytool.export.onnx as export_module

    seen = {}
    monkeypatch.setattr(export_module, "to_onnx", lambda *a, **k: (seen.update(k), (proto, {}))[1])
    monkeypatch.chdir(trained_run.path.parent)
    export_module.export_onnx(Path(trained_run.path.name), tmp_path / "m.onnx", validate=False)
    assert Path(seen["source"]).is_absolute()
    assert Path(seen["source"]) == Path(trained_run.path).resolve()


def test_graph_signature_lists_inputs_without_initializers_and_names_dtypes(exported_onnx):
    from deploytool.export.onnx import graph_signature, load_onnx

    inputs, outputs = graph_signature(load_onnx(exported_onnx))
    assert [(m.name, m.dtype, m.shape) for m in inputs] == [("x", "float32", ("batch", 64))]
    assert [(m.name, m.dtype) for m in outputs] == [("output", "float32"), ("index", "int64"),
                                                     ("probs", "float32")]


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.onnx", "does not exist"),
    (lambda p: p, "is a directory; give an ONNX file"),
    (lambda p: (p / "empty.onnx").write_bytes(b"") and None or p / "empty.onnx", "it has no graph"),
    (lambda p: (p / "notes.onnx").write_text("notes, not a model\n" * 20) and p / "notes.onnx", "not an ONNX model"),
])
def test_load_onnx_refuses_what_is_not_an_onnx_model(tmp_path, make, match):
    from deploytool.export.onnx import load_onnx

    with pytest.raises(BadInput, match=match):
        load_onnx(make(tmp_path))


def test_load_onnx_refuses_a_run_directory_saying_export_it_first(trained_run):
    from deploytool.export.onnx import load_onnx

    with pytest.raises(BadInput, match="export it first"):
        load_onnx(trained_run.path)


@pytest.mark.parametrize("reader", ["deploytool.engine.plan:plan_engine", "deploytool.serving.config:onnx_signature"])
def test_onnx_readers_parse_the_file_once(exported_onnx, monkeypatch, reader):
    import importlib

    import onnx

    calls = []
    real = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    module, name = reader.split(":")
    getattr(importlib.import_module(module), name)(exported_onnx)
    assert len(calls) == 1
