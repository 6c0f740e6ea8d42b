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
    assert [o.name for o in proto.graph.output] == ["output", "routed.router.index", "routed.router.probs"]


def test_metadata_records_version_dispatch_checkpoint_and_the_signature(proto, trained_run):
    from deploytool import __version__
    from deploytool.io import sha256_file
    from deploytool.signature import META_KEY, from_json

    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["deploytool.version"] == __version__
    assert meta["deploytool.dispatch"] == "sparse"
    assert meta["deploytool.checkpoint_sha256"] == sha256_file(trained_run.weights)
    signature = from_json(meta[META_KEY], "test")
    (router,) = signature.routers
    assert (router.path, router.n_experts, router.index, router.probs) == (
        "routed.router", 4, "routed.router.index", "routed.router.probs")
    assert router.temperature == pytest.approx(trained_run.config["temperature"])
    assert signature.input_names == ["x"] and signature.inputs[0].shape == ("batch", 64)


def test_onnx_runtime_matches_pytorch_on_digits(exported_onnx, trained_run):
    import torch

    from deploytool.nn import record_routing
    from deploytool.checkpoints import load_model

    x = _digits_test(trained_run)
    model = load_model(trained_run.path)
    with torch.no_grad(), record_routing(model) as calls:
        logits = model(torch.from_numpy(x))
    (want,) = calls["routed.router"]
    output, index, probs = _ort(str(exported_onnx)).run(None, {"x": x})
    assert np.abs(output - logits.numpy()).max() < 1e-5
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
    result = export_onnx(model, tmp_path / "mine.onnx", example_inputs=torch.randn(3, 12), static_batch=8)
    # batches other than 8 reach the static graph as padded chunks of 8
    assert result.passed and result.validation.inputs == {"random batch 1": 1, "random batch 256": 256}
    assert model.training and model.routed.dispatch == "sparse"
    assert model.routed.router.temperature == 0.5
    proto = onnx.load(str(tmp_path / "mine.onnx"))
    (x,) = proto.graph.input
    assert [d.dim_value for d in x.type.tensor_type.shape.dim] == [8, 12]
    assert result.metadata["deploytool.source"] == "module:Mine"
    # its own tuple is numbered; the router's decisions come beside it, under the router's path
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1", "output_2", "routed.router.index",
                                                     "routed.router.probs"]
    assert result.static_batch == 8 and result.signature.static_batch == 8


def test_module_without_a_router_is_bad_input(tmp_path):
    from torch import nn

    from deploytool.export.onnx import export_onnx

    import torch

    with pytest.raises(BadInput, match="has no deploytool router"):
        export_onnx(nn.Linear(4, 2), tmp_path / "m.onnx", example_inputs=torch.zeros(2, 4))
    with pytest.raises(BadInput, match="needs example_inputs="):
        export_onnx(nn.Linear(4, 2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _cached(proto, exported_onnx, trained_run):
    """What to_onnx returns for the session's exported_onnx: (proto, metadata, signature, named module,
    MoE-op notes)."""
    from deploytool.artifacts import open_artifact
    from deploytool.model_io import NamedModule
    from deploytool.checkpoints import load_model

    metadata = {p.key: p.value for p in proto.metadata_props if p.key != "deploytool.signature"}
    return (proto, metadata, open_artifact(exported_onnx).signature, NamedModule(load_model(trained_run.path), ["x"]),
            [])


@pytest.fixture
def cached_export(monkeypatch, proto, exported_onnx, trained_run):
    """Skip the dynamo export: to_onnx hands back the session's exported_onnx graph."""
    import deploytool.export.onnx as export_module

    cached = _cached(proto, exported_onnx, trained_run)
    monkeypatch.setattr(export_module, "to_onnx", lambda *a, **k: cached)


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
    routing = [r for c in result["validation"]["comparisons"] for r in c["routing"]]
    assert [r["router"] for r in routing] == ["routed.router"] * 3
    assert all(r["agreement"] == 100.0 for r in routing)
    assert [r["path"] for r in result["signature"]["routers"]] == ["routed.router"]


def test_cli_export_failing_validation_prints_the_report_and_exits_1(cli, cached_export, trained_run, tmp_path):
    code, out, err = cli("export", trained_run.path, "--out", tmp_path / "m.onnx", "--atol", "0", "--rtol", "0")
    assert_one_line_error(code, err, 1, "failed validation")
    assert "validation: FAIL" in out and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("args, match", [
    (["{missing}", "--out", "{tmp}/m.onnx"], "does not exist"),
    (["{run}", "--out", "{tmp}/no/such/dir/m.onnx"], "does not exist"),
    (["{run}", "--out", "{tmp}/m.onnx", "--opset", "9"], "opset 9"),
    (["{run}", "--out", "{tmp}/m.onnx", "--static-batch", "0"], "static batch"),
    (["{run}", "--out", "{tmp}/m.onnx", "--static-batch", "1000000000"], "static batch must be between 1 and 65536"),
    (["{run}", "--out", "{tmp}/m.onnx", "--atol", "-1"], "atol must be a finite number >= 0"),
    (["{run}", "--out", "{tmp}/m.onnx", "--atol", "nan"], "atol must be a finite number >= 0"),
    (["{run}", "--out", "{tmp}/m.onnx", "--rtol", "-1"], "rtol must be a finite number >= 0"),
    (["{run}", "--out", "{tmp}/m.onnx", "--rtol", "nan"], "rtol must be a finite number >= 0"),
    (["{run}", "--out", "{tmp}/m.onnx", "--dispatch", "gather"], "unknown dispatch 'gather'"),
    (["{run}", "--out", "{tmp}/m.onnx", "--dynamic", "x1=tokens"], "give INPUT:AXIS=NAME"),
    (["{run}", "--out", "{tmp}/m.onnx", "--dynamic", "y:1=tokens"], "dynamic dims name input(s) ['y']"),
    (["{run}", "--out", "{tmp}/m.onnx", "--dynamic", "x:0=rows"], "dynamic axis 0 must be 1..1"),
    (["{run}", "--out", "{tmp}/m.txt"], "must end in .onnx"),
])
def test_cli_export_bad_input_is_one_line_exit_2(cli, trained_run, tmp_path, args, match):
    fill = {"missing": tmp_path / "nope", "tmp": tmp_path, "run": trained_run.path}
    code, _, err = cli("export", *(a.format(**fill) for a in args))
    assert_one_line_error(code, err, 2, match)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.txt").exists()


def test_a_relative_run_directory_is_recorded_as_an_absolute_source(monkeypatch, proto, exported_onnx, trained_run,
                                                                     tmp_path):
    """bench reads the source back from its own working directory: a relative one names another model."""
    from pathlib import Path

    import deploytool.export.onnx as export_module

    seen = {}
    cached = _cached(proto, exported_onnx, trained_run)
    monkeypatch.setattr(export_module, "to_onnx", lambda *a, **k: (seen.update(k), cached)[1])
    monkeypatch.chdir(trained_run.path.parent)
    export_module.export_onnx(Path(trained_run.path.name), tmp_path / "m.onnx", validate=False)
    assert Path(seen["source"]).is_absolute()
    assert Path(seen["source"]) == Path(trained_run.path).resolve()


def test_graph_signature_lists_inputs_without_initializers_and_names_dtypes(exported_onnx):
    from deploytool.artifacts import graph_signature, load_onnx

    inputs, outputs = graph_signature(load_onnx(exported_onnx))
    assert [(m.name, m.dtype, m.shape) for m in inputs] == [("x", "float32", ("batch", 64))]
    assert [(m.name, m.dtype) for m in outputs] == [("output", "float32"), ("routed.router.index", "int64"),
                                                     ("routed.router.probs", "float32")]


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.onnx", "does not exist"),
    (lambda p: p, "is a directory; give an ONNX file"),
    (lambda p: (p / "empty.onnx").write_bytes(b"") and None or p / "empty.onnx", "it has no graph"),
    (lambda p: (p / "notes.onnx").write_text("notes, not a model\n" * 20) and p / "notes.onnx", "not an ONNX model"),
])
def test_load_onnx_refuses_what_is_not_an_onnx_model(tmp_path, make, match):
    from deploytool.artifacts import load_onnx

    with pytest.raises(BadInput, match=match):
        load_onnx(make(tmp_path))


def test_load_onnx_refuses_a_run_directory_saying_export_it_first(trained_run):
    from deploytool.artifacts import load_onnx

    with pytest.raises(BadInput, match="export it first"):
        load_onnx(trained_run.path)


@pytest.mark.parametrize("reader", ["deploytool.engine.plan:plan_engine", "deploytool.artifacts:open_artifact"])
def test_onnx_readers_parse_the_file_once(exported_onnx, monkeypatch, reader):
    import importlib

    import onnx

    calls = []
    real = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    module, name = reader.split(":")
    getattr(importlib.import_module(module), name)(exported_onnx)
    assert len(calls) == 1


# --- any routed model: tokens, several inputs, several routers, dict and tuple outputs ------------

def _compare_with_torch(exported, feed):
    """One comparison of ONNX Runtime against the exported module (dense dispatch) on `feed`."""
    from deploytool.comparator import compare_runners
    from deploytool.runners import make_runner

    (comparison,) = compare_runners([make_runner("torch-dense", exported.module, example_inputs=exported.example),
                                     make_runner("onnxruntime", exported.path)], {"feed": feed})
    return comparison


def test_a_token_level_model_exports_with_a_dynamic_token_dim_and_dict_outputs(token_export):
    from deploytool.artifacts import open_artifact

    art = open_artifact(token_export.path)
    sig = art.signature
    assert art.kind == "onnx" and sig.describe() == token_export.result.signature.describe()
    assert [(m.name, m.dtype, m.shape) for m in sig.inputs] == [("x", "float32", ("batch", "tokens", 6))]
    assert [(m.name, m.shape) for m in sig.outputs] == [
        ("logits", ("batch", 3)), ("tokens", ("batch", "tokens", 8)),
        ("first.router.index", ("batch", "tokens")), ("first.router.probs", ("batch", "tokens", 3)),
        ("second.router.index", ("batch", "tokens")), ("second.router.probs", ("batch", "tokens", 2))]
    assert [(r.path, r.n_experts, r.temperature) for r in sig.routers] == [("first.router", 3, 1.0),
                                                                           ("second.router", 2, 0.5)]
    assert sig.dim_examples == {"batch": 4, "tokens": 5}
    assert art.metadata["deploytool.dispatch"] == "sparse" and token_export.result.dispatch == "sparse"
    # export's own validation judged both routers, per token
    for c in token_export.result.validation.comparisons:
        assert [r.router for r in c.routing] == ["first.router", "second.router"] and c.passed
    big = next(c for c in token_export.result.validation.comparisons if c.inputs == "random batch 256")
    assert all(r.rows == 256 * 5 for r in big.routing)


def test_a_token_level_export_runs_at_other_token_counts_as_torch_does(token_export):
    feed = {"x": np.random.default_rng(2).standard_normal((3, 11, 6)).astype(np.float32)}  # exported at 5 tokens
    c = _compare_with_torch(token_export, feed)
    assert c.passed, c.summary()
    assert [(r.router, r.rows) for r in c.routing] == [("first.router", 33), ("second.router", 33)]
    assert {o.name for o in c.outputs} == {"logits", "tokens", "first.router.probs", "second.router.probs"}


def test_an_image_model_with_two_inputs_two_routers_and_tuple_outputs_exports(image_export):
    from deploytool.artifacts import open_artifact
    from deploytool.feeds import random_feed

    sig = open_artifact(image_export.path).signature
    assert [(m.name, m.shape) for m in sig.inputs] == [("img", ("batch", 1, 8, 8)), ("meta", ("batch", 3))]
    assert sig.output_names == ["output_0", "output_1", "routed.router.index", "routed.router.probs",
                                "gate.router.index", "gate.router.probs"]
    # the sigmoid router is a 2-expert router downstream: index [B], probs [B, 2]
    assert [(r.path, r.n_experts) for r in sig.routers] == [("routed.router", 3), ("gate.router", 2)]
    outputs = {m.name: m for m in sig.outputs}
    assert outputs["gate.router.probs"].shape == ("batch", 2) and outputs["gate.router.index"].dtype == "int64"
    assert sig.routers == image_export.result.signature.routers
    for c in image_export.result.validation.comparisons:
        assert [r.router for r in c.routing] == ["routed.router", "gate.router"] and c.passed
    feed = random_feed(sig, 64, seed=3)
    c = _compare_with_torch(image_export, feed)
    assert c.passed, c.summary()
    assert [r.router for r in c.routing] == ["routed.router", "gate.router"]
    out = _ort(str(image_export.path)).run(["gate.router.index", "routed.router.index"], feed)
    assert set(np.unique(out[0])) <= {0, 1} and set(np.unique(out[1])) <= {0, 1, 2}


@pytest.mark.parametrize("dims, match", [
    ({"y": {1: "tokens"}}, r"dynamic dims name input\(s\) \['y'\]"),
    ({"x": {0: "rows"}}, "dynamic axis 0 must be 1..2"),
    ({"x": {3: "wide"}}, "dynamic axis 3 must be 1..2"),
    ({"x": {1: "two words"}}, "must be an identifier"),
])
def test_bad_dynamic_dims_are_refused_before_exporting(tmp_path, dims, match):
    import torch

    from conftest import token_moe
    from deploytool.export.onnx import export_onnx

    with pytest.raises(BadInput, match=match):
        export_onnx(token_moe(), tmp_path / "t.onnx", example_inputs=torch.randn(2, 5, 6), dynamic_dims=dims)
    assert not (tmp_path / "t.onnx").exists()


def test_a_dynamic_dim_of_example_size_1_is_refused(tmp_path):
    import torch

    from conftest import token_moe
    from deploytool.export.onnx import export_onnx

    with pytest.raises(BadInput, match="axis 1 has size 1 in the example"):
        export_onnx(token_moe(), tmp_path / "t.onnx", example_inputs=torch.randn(2, 1, 6),
                    dynamic_dims={"x": {1: "tokens"}})
