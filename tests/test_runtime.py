"""The runtime API: load a run directory or an ONNX file, run it, share it between threads, refuse bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import deploytool
from deploytool.errors import BadInput

INDEX, PROBS = "routed.router.index", "routed.router.probs"


@pytest.fixture(scope="module")
def onnx_path(exported_onnx):
    return exported_onnx


@pytest.fixture(scope="module")
def session(trained_run):
    with deploytool.load(trained_run.path) as s:
        yield s


@pytest.fixture(scope="module")
def onnx_session(exported_onnx):
    with deploytool.load(exported_onnx) as s:
        yield s


def rows(n, features=64, seed=0):
    return np.random.default_rng(seed).random((n, features), dtype=np.float32) * 16


def test_run_directory_session_returns_the_torch_models_outputs_and_decisions(session, trained_run):
    import torch

    from deploytool.nn import record_routing
    from deploytool.checkpoints import load_model

    x = rows(7)
    out = session.run(x)
    assert isinstance(out, dict) and list(out) == ["output", INDEX, PROBS] and session.backend == "torch"
    model = load_model(trained_run.path)
    with torch.inference_mode(), record_routing(model) as calls:
        logits = model(torch.from_numpy(x))
    np.testing.assert_allclose(out["output"], logits.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[INDEX], calls["routed.router"][0].index.numpy())
    assert out[INDEX].dtype == np.int64 and out[PROBS].shape == (7, trained_run.config["n_experts"])
    np.testing.assert_allclose(out[PROBS].sum(axis=1), 1.0, rtol=1e-5)


def test_inputs_outputs_and_routers_describe_the_signature(session, onnx_session, trained_run):
    cfg = trained_run.config
    for s in (session, onnx_session):
        assert [(t.name, t.dtype, t.shape[1:]) for t in s.signature.inputs] == [("x", "float32", (cfg["in_features"],))]
        assert [(t.name, t.dtype, t.shape[1:]) for t in s.signature.outputs] == [
            ("output", "float32", (cfg["n_classes"],)), (INDEX, "int64", ()), (PROBS, "float32", (cfg["n_experts"],))]
        (router,) = s.signature.routers
        assert (router.path, router.index, router.probs, router.n_experts) == ("routed.router", INDEX, PROBS, 4)
    assert "inputs x: float32[batch, 64] -> outputs output: float32[batch, 10]" in repr(onnx_session)


def test_onnx_session_agrees_with_the_run_directory(session, onnx_session):
    x = rows(33, seed=1)
    assert onnx_session.backend == "onnxruntime"
    got, ref = onnx_session.run(x), session.run(x)
    np.testing.assert_array_equal(got[INDEX], ref[INDEX])
    np.testing.assert_allclose(got["output"], ref["output"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_one_session_shared_by_threads_gives_each_caller_its_own_answer(trained_run, onnx_path, backend):
    path = trained_run.path if backend == "torch" else onnx_path
    with deploytool.load(path) as shared:
        inputs = [rows(1 + i % 5, seed=i) for i in range(16)]
        expected = [shared.run(x) for x in inputs]
        results, errors = {}, []
        start = threading.Barrier(8)

        def worker(worker_id):
            start.wait()
            try:
                for rep in range(10):
                    i = (worker_id * 3 + rep) % len(inputs)
                    results[(worker_id, rep)] = (i, shared.run(inputs[i]))
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(results) == 80
    for i, out in results.values():
        np.testing.assert_array_equal(out[INDEX], expected[i][INDEX])
        np.testing.assert_array_equal(out["output"], expected[i]["output"])


def test_python_lists_take_the_models_dtype(session):
    x = rows(2)
    np.testing.assert_array_equal(session.run(x.tolist())[INDEX], session.run(x)[INDEX])


def test_a_dict_and_keywords_name_the_inputs(onnx_session):
    x = rows(3)
    by_dict, by_keyword, by_array = onnx_session.run({"x": x}), onnx_session.run(x=x), onnx_session.run(x)
    np.testing.assert_array_equal(by_dict["output"], by_array["output"])
    np.testing.assert_array_equal(by_keyword["output"], by_array["output"])


@pytest.mark.parametrize("x, match", [
    (rows(2).astype(np.float64), r"input 'x' has dtype float64, the model takes float32\[batch, 64\]: "
                                 r"convert with \.astype\(np\.float32\)"),
    (rows(1)[0], r"input 'x' has shape \[64\]; the model takes float32\[batch, 64\] "
                 r"\(for one sample add a batch dim: x\[None\]\)"),
    (rows(2)[None], r"input 'x' has shape \[1, 2, 64\]; the model takes float32\[batch, 64\]$"),
    (rows(2, features=10), r"input 'x' has shape \[2, 10\]; the model takes float32\[batch, 64\] \(dim 1 differs\)"),
    ({"y": rows(2)}, r"inputs \['y'\] do not match the model's inputs \['x'\] \(inputs x: float32\[batch, 64\] -> "
                     r"outputs output: float32\[batch, 10\], routed\.router\.index: int64\[batch\]"),
    ({"x": rows(2), "mask": rows(2)}, r"inputs \['mask', 'x'\] do not match the model's inputs \['x'\]"),
    (np.zeros((0, 64), np.float32), "empty batch"),
    (np.where(np.arange(64) == 3, np.nan, rows(3)).astype(np.float32), r"NaN or inf in sample\(s\) 0, 1, 2;"),
    (np.vstack([rows(1), np.full((1, 64), np.inf, np.float32)]), r"NaN or inf in sample\(s\) 1;"),
    ([[1.0, 2.0], [3.0]], "cannot be read as an array"),
    (np.array([["a"] * 64]), r"has dtype <U1, the model takes float32\[batch, 64\]"),
])
@pytest.mark.parametrize("which", ["torch", "onnxruntime"])
def test_bad_inputs_are_one_line_naming_what_the_model_takes(session, onnx_session, which, x, match):
    with pytest.raises(BadInput, match=match) as info:
        (session if which == "torch" else onnx_session).run(x)
    assert "\n" not in str(info.value)


def test_a_bad_input_leaves_the_session_usable(session):
    with pytest.raises(BadInput):
        session.run(rows(2, features=3))
    assert session.run(rows(2))["output"].shape[0] == 2


@pytest.mark.parametrize("which", ["torch", "onnxruntime"])
def test_finite_inputs_whose_outputs_overflow_are_refused(session, onnx_session, which):
    """3e38 is a finite float32, but the model's arithmetic overflows: no decision can be read from it."""
    x = rows(3)
    x[1] = 3e38
    with pytest.raises(BadInput, match=r"output 'output' is NaN or infinite for sample\(s\) 1: those inputs are "
                                       "beyond what the model computes"):
        (session if which == "torch" else onnx_session).run(x)


def test_an_onnx_model_without_routers_is_refused_at_load(tmp_path):
    """Session.run would otherwise hand back outputs without any decision."""
    from onnx_models import routing_model

    plain = tmp_path / "plain.onnx"
    plain.write_bytes(routing_model(4, 0.5).SerializeToString())
    with pytest.raises(BadInput, match="plain.onnx has no deploytool router"):
        deploytool.load(plain)


# --- models with several inputs or dynamic token dims ---------------------------------------------

def test_a_multi_input_model_takes_a_dict_and_agrees_with_torch(image_export):
    import torch

    from deploytool.feeds import random_feed

    with deploytool.load(image_export.path) as s:
        assert s.signature.input_names == ["img", "meta"]
        assert [r.path for r in s.signature.routers] == ["routed.router", "gate.router"]
        feed = random_feed(s.signature, 6, seed=5)
        out = s.run(feed)
        np.testing.assert_array_equal(s.run(**feed)["output_0"], out["output_0"])
        with pytest.raises(BadInput, match=r"the model takes 2 inputs; pass a dict keyed by \['img', 'meta'\] "
                                           r"\(inputs img: float32\[batch, 1, 8, 8\], meta: float32\[batch, 3\]"):
            s.run(feed["img"])
        with pytest.raises(BadInput, match=r"do not match the model's inputs \['img', 'meta'\]"):
            s.run({"img": feed["img"]})
        with pytest.raises(BadInput, match=r"different batch sizes \(img: 6, meta: 5\)"):
            s.run({"img": feed["img"], "meta": feed["meta"][:5]})
        with pytest.raises(BadInput, match=r"input 'img' has shape \[6, 1, 4, 4\]; the model takes "
                                           r"float32\[batch, 1, 8, 8\] \(dim 2 differs\)"):
            s.run({"img": feed["img"][:, :, :4, :4], "meta": feed["meta"]})
    with torch.inference_mode():
        want = image_export.module(*(torch.from_numpy(feed[n]) for n in ("img", "meta")))
    np.testing.assert_allclose(out["output_0"], want[0].numpy(), rtol=1e-4, atol=1e-5)
    assert out["gate.router.index"].shape == (6,) and out["gate.router.probs"].shape == (6, 2)


def test_a_token_model_runs_at_any_token_count_but_not_at_another_width(token_export):
    with deploytool.load(token_export.path) as s:
        for tokens in (1, 3, 9):
            out = s.run(np.random.default_rng(tokens).standard_normal((2, tokens, 6)).astype(np.float32))
            assert out["first.router.index"].shape == (2, tokens) and out["tokens"].shape == (2, tokens, 8)
        with pytest.raises(BadInput, match=r"input 'x' has shape \[2, 3, 5\]; the model takes "
                                           r"float32\[batch, tokens, 6\] \(dim 2 differs\)"):
            s.run(np.zeros((2, 3, 5), np.float32))


# --- the signature's feed check, without a backend ------------------------------------------------

def _signature_4():
    from deploytool.signature import ModelSignature, TensorMeta

    return ModelSignature((TensorMeta("x", "float32", ("batch", 4)),), (TensorMeta("y", "float32", ("batch", 2)),))


@pytest.mark.parametrize("x, match", [
    (np.ones((3, 4), np.float32), None),
    ([[1, 2, 3, 4]], None),                  # a list takes the model's dtype
    (np.ones(4, np.float32), r"has shape \[4\]; the model takes float32\[batch, 4\] \(for one sample"),
    (np.array([["a"] * 4]), "has dtype <U1"),
    (np.ones((3, 4)), "has dtype float64"),
    (np.ones((0, 4), np.float32), "empty batch"),
    (np.ones((2, 5), np.float32), r"has shape \[2, 5\]; the model takes float32\[batch, 4\] \(dim 1 differs\)"),
    (np.array([[1.0, 2, 3, 4], [1, np.inf, 3, 4], [1, 2, 3, -np.inf]], np.float32), r"NaN or inf in sample\(s\) 1, 2;"),
    (np.array([[np.nan, 2, 3, 4]], np.float32), r"NaN or inf in sample\(s\) 0;"),
    ("x", "must be a dict of arrays keyed by input name"),
])
def test_check_feed_refuses_what_the_router_cannot_route(x, match):
    signature = _signature_4()
    feed = x if isinstance(x, str) else {"x": x}
    if match is None:
        checked = signature.check_feed(feed)["x"]
        assert checked.flags.c_contiguous and checked.dtype == np.float32
        return
    with pytest.raises(BadInput, match=match):
        signature.check_feed(feed)


def test_check_feed_makes_a_strided_view_contiguous():
    checked = _signature_4().check_feed({"x": np.ones((4, 8), np.float32)[:, ::2]})["x"]
    assert checked.flags.c_contiguous and checked.shape == (4, 4)


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.onnx", "does not exist"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "neither a run directory"),
    (lambda p: p, "directory without config.json"),
])
def test_unknown_artifacts_are_refused(tmp_path, make, match):
    with pytest.raises(BadInput, match=match):
        deploytool.load(make(tmp_path))


def test_unknown_or_mismatched_backend_is_refused(trained_run, onnx_path):
    with pytest.raises(BadInput, match="unknown backend 'tflite'"):
        deploytool.load(trained_run.path, backend="tflite")
    with pytest.raises(BadInput, match=r"backend onnxruntime does not read .* \(a run\); use torch, torch-dense, "
                                       "torch-sparse"):
        deploytool.load(trained_run.path, backend="onnxruntime")
    with pytest.raises(BadInput, match=r"backend torch does not read .* \(a onnx\); use onnxruntime"):
        deploytool.load(onnx_path, backend="torch")


def test_a_closed_session_refuses_to_run(trained_run):
    s = deploytool.load(trained_run.path)
    s.close()
    with pytest.raises(BadInput, match="closed"):
        s.run(rows(1))
