"""The whole chain on the image model and the token-level transformer: train, export (sparse), verify
every router, bench, package, serve and load, as the routed MLP goes through it."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import deploytool
from deploytool.artifacts import open_artifact

RECIPES = {"digits-cnn": ["routed.router"], "digits-transformer": ["layers.0.moe.router", "layers.1.moe.router"]}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def chain(request, tmp_path_factory):
    """(recipe, run, exported ONNX) trained for a few epochs: the chain, not the accuracy, is under test."""
    out = tmp_path_factory.mktemp(request.param)
    run = deploytool.train(request.param, out / "run", progress=False, epochs=2)
    result = deploytool.export_onnx(run.path, out / "model.onnx")
    return request.param, run, result


def test_export_names_every_router_and_validates_against_pytorch(chain):
    recipe, run, result = chain
    assert result.passed and result.dispatch == "sparse"
    signature = open_artifact(result.path).signature
    assert [r.path for r in signature.routers] == RECIPES[recipe]
    x = signature.inputs[0]
    assert x.shape == (("batch", 1, 8, 8) if recipe == "digits-cnn" else ("batch", 8, 8))
    shapes = {m.name: m.shape for m in signature.outputs}
    for router in signature.routers:  # one decision per image, one per token
        assert shapes[router.index] == (("batch",) if recipe == "digits-cnn" else ("batch", 8))
    assert set(run.metrics["routers"]) == set(RECIPES[recipe])


def test_verify_and_bench_judge_every_router(chain):
    recipe, run, result = chain
    report = deploytool.verify(result.path, checkpoint=run.path, samples=64)
    assert report.passed
    assert [r.router for r in report.comparisons[0].routing] == RECIPES[recipe]
    bench = deploytool.bench(result.path, checkpoint=run.path, backends=("torch", "onnxruntime"), batch_sizes=(8,),
                             duration_s=0.05, warmup_ms=0, progress=False)
    assert {ln.backend for ln in bench.lines} == {"torch", "onnxruntime"}
    assert all(set(ln.histograms) == set(RECIPES[recipe]) for ln in bench.lines)
    assert all(sum(ln.histograms[RECIPES[recipe][-1]]) > 0 for ln in bench.lines)


def test_load_and_package_take_the_signature(chain, tmp_path):
    recipe, run, result = chain
    with deploytool.load(result.path) as session:
        x = np.random.default_rng(0).random((3, *session.signature.inputs[0].shape[1:]), dtype=np.float32)
        outputs = session.run(x)
    for router in RECIPES[recipe]:
        assert outputs[f"{router}.index"].shape[0] == 3 and outputs[f"{router}.probs"].shape[-1] == 4
    pkg = deploytool.package(result.path, tmp_path / "repo", "model")
    assert pkg.validated
    names = [o["name"] for o in pkg.config["output"]]
    assert [n for n in names if n.endswith(".index")] == [f"{r}.index" for r in RECIPES[recipe]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.serve
def test_serve_answers_every_router_as_the_local_session(chain):
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install deploytool[serve])")
    import tritonclient.http as httpclient

    recipe, run, result = chain
    with deploytool.load(result.path) as session:
        x = np.random.default_rng(1).random((5, *session.signature.inputs[0].shape[1:]), dtype=np.float32)
        local = session.run(x)
    server = deploytool.serve(result.path, port=_free_port(), grpc_port=_free_port(), block=False)
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        answer = client.infer(server.name, [inp])
        for router in RECIPES[recipe]:
            remote = answer.as_numpy(f"{router}.index")  # Triton's [batch] outputs come as [batch, 1]
            np.testing.assert_array_equal(remote.reshape(local[f"{router}.index"].shape), local[f"{router}.index"])
    finally:
        server.stop()
