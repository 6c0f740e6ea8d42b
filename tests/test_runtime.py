"""The runtime API: load a run directory or an ONNX file, run it, share it between threads, refuse bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import deploytool
from deploytool.errors import BadInput


@pytest.fixture(scope="module")
def onnx_path(exported_onnx):
    return exported_onnx


@pytest.fixture(scope="module")
def session(trained_run):
    with deploytool.load(trained_run.path) as s:
        yield s


def rows(n, features=64, seed=0):
    return np.random.default_rng(seed).random((n, features), dtype=np.float32) * 16


def test_run_directory_session_returns_the_torch_models_routed_output(session, trained_run):
    import torch

    from deploytool.nn import RoutedOutput
    from deploytool.training import load_model

    x = rows(7)
    out = session.run(x)
    assert isinstance(out, RoutedOutput) and session.backend == "torch"
    with torch.inference_mode():
        ref = load_model(trained_run.path)(torch.from_numpy(x))
    np.testing.assert_allclose(out.output, ref.output.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.index, ref.index.numpy())
    assert out.index.dtype == np.int64 and out.probs.shape == (7, trained_run.config["n_experts"])
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, rtol=1e-5)


def test_inputs_and_outputs_describe_names_dtypes_and_shapes(session, trained_run):
    cfg = trained_run.config
    assert [(t.name, t.dtype, t.shape[1:]) for t in session.inputs] == [("x", "float32", (cfg["in_features"],))]
    assert [(t.name, t.dtype, t.shape[1:]) for t in session.outputs] == [
        ("output", "float32", (cfg["n_classes"],)), ("index", "int64", ()), ("probs", "float32", (cfg["n_experts"],))]


def test_onnx_session_agrees_with_the_run_directory(session, onnx_path):
    x = rows(33, seed=1)
    with deploytool.load(onnx_path) as onnx_session:
        assert onnx_session.backend == "onnxruntime"
        got, ref = onnx_session.run(x), session.run(x)
    np.testing.assert_array_equal(got.index, ref.index)
    np.testing.assert_allclose(got.output, ref.output, rtol=1e-4, atol=1e-5)


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
        np.testing.assert_array_equal(out.index, expected[i].index)
        np.testing.assert_array_equal(out.output, expected[i].output)


def test_python_lists_take_the_models_dtype(session):
    x = rows(2)
    np.testing.assert_array_equal(session.run(x.tolist()).index, session.run(x).index)


@pytest.mark.parametrize("x, match", [
    (rows(2).astype(np.float64), "dtype float64, the model takes float32: convert with x.astype"),
    (rows(1)[0], r"rank 1\); the model takes rank 2 \[batch, 64\] \(for one row pass x\[None, :\]\)"),
    (rows(2, features=10), "input 'x' has 10 features but the model expects 64"),
    (np.zeros((0, 64), np.float32), "empty batch"),
    (np.where(np.arange(64) == 3, np.nan, rows(3)).astype(np.float32), r"NaN or inf in row\(s\) 0, 1, 2"),
    (np.vstack([rows(1), np.full((1, 64), np.inf, np.float32)]), r"NaN or inf in row\(s\) 1"),
    ([[1.0, 2.0], [3.0]], "cannot be read as an array"),
])
def test_bad_inputs_are_refused_with_what_to_do(session, x, match):
    with pytest.raises(BadInput, match=match):
        session.run(x)


def test_a_bad_input_leaves_the_session_usable(session):
    with pytest.raises(BadInput):
        session.run(rows(2, features=3))
    assert session.run(rows(2)).output.shape[0] == 2


def test_an_onnx_model_without_the_routed_outputs_is_refused_at_load(tmp_path):
    """Session.run would otherwise hand back RoutedOutput(None, None, None)."""
    from deploytool.ops.onnx_functions import routing_model

    plain = tmp_path / "plain.onnx"
    plain.write_bytes(routing_model(4, 0.5).SerializeToString())
    with pytest.raises(BadInput, match=r"lacks output\(s\) output "):
        deploytool.load(plain)


@pytest.mark.parametrize("x, match", [
    (np.ones((3, 4)), None),
    (np.ones(4), "must be 2-D"),
    (np.array([["a"]]), "must be numeric"),
    (np.ones((0, 4)), "empty batch"),
    (np.ones((2, 5)), "has 5 features but the model expects 4"),
    (np.array([[1.0, 2, 3, 4], [1, np.inf, 3, 4], [1, 2, 3, -np.inf]]), r"NaN or inf in row\(s\) 1, 2"),
    (np.array([[np.nan, 2, 3, 4]], np.float16), r"NaN or inf in row\(s\) 0"),
])
def test_check_rows_refuses_what_the_router_cannot_route(x, match):
    from deploytool.runtime import check_rows

    if match is None:
        assert check_rows(x, 4, what="rows").flags.c_contiguous
        return
    with pytest.raises(BadInput, match=match):
        check_rows(x, 4, what="rows")


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.onnx", "does not exist"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "neither a run directory"),
    (lambda p: p, "directory without config.json"),
])
def test_unknown_artifacts_are_refused(tmp_path, make, match):
    with pytest.raises(BadInput, match=match):
        deploytool.load(make(tmp_path))


def test_unknown_or_mismatched_backend_is_refused(trained_run):
    with pytest.raises(BadInput, match="unknown backend 'tflite'"):
        deploytool.load(trained_run.path, backend="tflite")
    with pytest.raises(BadInput, match="onnxruntime needs an ONNX model path"):
        deploytool.load(trained_run.path, backend="onnxruntime")


def test_a_closed_session_refuses_to_run(trained_run):
    s = deploytool.load(trained_run.path)
    s.close()
    with pytest.raises(BadInput, match="closed"):
        s.run(rows(1))
