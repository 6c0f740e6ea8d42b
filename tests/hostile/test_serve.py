"""Hostile input to `deploytool serve` (items 4, 5, 9, 21 of issue 18).

model.py (what Triton's Python backend runs) is driven here through a stand-in for Triton's
`triton_python_backend_utils`, so a dynamic batch of several clients' requests is tested without a
server; the server's own lifecycle (its log, the folders of dead serves) is tested without starting one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from deploytool.errors import CheckFailed
from deploytool.serving import server as server_module
from deploytool.serving.repository import package


class _Tensor:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def as_numpy(self):
        return self.value


class _Error:
    INVALID_ARG = 3

    def __init__(self, message, code=None):
        self.message = message

    def __str__(self):
        return self.message


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name: t.value for t in output_tensors}
        self.error = error


def _triton_model(onnx_path, tmp_path, monkeypatch):
    """model.py initialised as Triton would, over a python-backend package of `onnx_path`."""
    pb_utils = types.SimpleNamespace(
        Tensor=_Tensor, TritonError=_Error, InferenceResponse=_Response,
        get_input_tensor_by_name=lambda request, name: request.get(name))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    result = package(onnx_path, tmp_path / "repo", "m", backend="python", max_batch=8, dynamic_batching=True,
                     preferred_batch=(4,))
    sys.path.insert(0, str(result.model_dir / "1"))
    try:
        import model as triton_py
    finally:
        sys.path.pop(0)
        sys.modules.pop("model", None)
    config = {"max_batch_size": 8, "output": result.config["output"],
              "parameters": {p["key"]: {"string_value": p["value"]["string_value"]}
                             for p in result.config["parameters"]}}
    model = triton_py.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(result.model_dir),
                      "model_version": "1"})
    return model


def _request(x):
    return {"x": _Tensor("x", np.asarray(x, np.float32))}


@pytest.fixture
def triton_model(tmp_path, monkeypatch):
    """(model.py over `tiny`, x [batch, 8]; a request maker)."""
    from onnx_models import tiny_onnx

    model = _triton_model(tiny_onnx(tmp_path / "tiny.onnx"), tmp_path, monkeypatch)
    yield model, _request
    model.finalize()


@pytest.fixture
def triton_tokens(tmp_path, monkeypatch):
    """(model.py over the token model, x [batch, tokens, 4]; a request maker)."""
    from onnx_models import token_onnx

    model = _triton_model(token_onnx(tmp_path / "tokens.onnx"), tmp_path, monkeypatch)
    yield model, _request
    model.finalize()


def test_a_request_that_overflows_fails_alone_in_a_dynamic_batch(triton_model):
    model, request = triton_model
    good = np.random.default_rng(0).normal(size=(2, 8))
    responses = model.execute([request(good), request(np.full((1, 8), 3e38)), request(good[:1])])
    assert responses[0].error is None and responses[0].outputs["output"].shape == (2, 3)
    assert responses[2].error is None and responses[2].outputs["output"].shape == (1, 3)
    assert responses[1].error is not None and "NaN or infinite" in str(responses[1].error)
    alone = model.execute([request(good)])[0]
    assert np.allclose(alone.outputs["output"], responses[0].outputs["output"])


@pytest.mark.parametrize("shape", [(2, 0, 4), (0, 5, 4)])
def test_an_empty_request_is_refused_and_the_others_answered(triton_tokens, shape):
    model, request = triton_tokens
    responses = model.execute([request(np.zeros(shape)), request(np.zeros((1, 5, 4)))])
    assert responses[0].error is not None
    assert "no positions" in str(responses[0].error) or "empty batch" in str(responses[0].error)
    assert responses[1].error is None and responses[1].outputs["layers.0.moe.router.index"].shape == (1, 5)


def test_a_request_without_an_input_is_refused(triton_model):
    model, request = triton_model
    responses = model.execute([{}, request(np.zeros((1, 8)))])
    assert "has no input 'x'" in str(responses[0].error) and responses[1].error is None


# --- 21. folders of serves killed with SIGKILL ------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_folders_of_dead_serves_are_removed_and_live_ones_kept(tmp_path):
    import os

    dead = tmp_path / f"{server_module.WORKDIR_PREFIX}dead"
    live = tmp_path / f"{server_module.WORKDIR_PREFIX}live"
    unowned = tmp_path / f"{server_module.WORKDIR_PREFIX}starting"
    other = tmp_path / "someone-else"
    for folder in (dead, live, unowned, other):
        (folder / "models").mkdir(parents=True)
    (dead / server_module.OWNER_FILE).write_text(f"{_dead_pid()}")
    (live / server_module.OWNER_FILE).write_text(server_module._process_id(os.getpid()))
    (other / server_module.OWNER_FILE).write_text(f"{_dead_pid()}")
    assert server_module.clean_stale_workdirs(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and unowned.is_dir() and other.is_dir()


def test_a_recycled_pid_is_not_taken_for_the_owner(tmp_path):
    import os

    folder = tmp_path / f"{server_module.WORKDIR_PREFIX}recycled"
    folder.mkdir()
    (folder / server_module.OWNER_FILE).write_text(f"{os.getpid()} 1")  # this pid, another start time
    if server_module._process_id(os.getpid()) == f"{os.getpid()}":
        pytest.skip("no /proc start times here")
    assert server_module.clean_stale_workdirs(tmp_path) == [folder]


def test_serve_cleans_what_a_dead_serve_left_before_it_starts(tmp_path, monkeypatch):
    from onnx_models import tiny_onnx

    pytest.importorskip("pytriton.triton")
    monkeypatch.setattr(server_module.tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"{server_module.WORKDIR_PREFIX}dead"
    dead.mkdir()
    (dead / server_module.OWNER_FILE).write_text(f"{_dead_pid()}")

    def stop_here(*args, **kwargs):
        raise CheckFailed("stopped before the server starts")

    monkeypatch.setattr("deploytool.serving.repository.package", stop_here)
    with pytest.raises(CheckFailed, match="stopped before"):
        server_module.serve(tiny_onnx(tmp_path / "tiny.onnx"), port=_free_port(), block=False)
    assert not dead.exists()
    assert not list(tmp_path.glob(server_module.WORKDIR_PREFIX + "*"))  # its own folder removed too


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- 4. a server that dies keeps its log -------------------------------------------------------------------

class _DeadTriton:
    def is_alive(self):
        return False

    def stop(self):
        pass


def test_a_server_that_dies_keeps_its_log_and_says_where(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "tritonserver.log").write_text("E1206 01:00:00.000 1 http_server.cc:1] std::bad_alloc\n")
    server = server_module.Server("m", "127.0.0.1", 1, 2, workdir, _DeadTriton())
    with pytest.raises(CheckFailed, match="its log: ") as info:
        server.wait()
    server.stop()
    kept = str(info.value).split("its log: ")[1].rstrip(")")
    assert not workdir.exists()
    assert "bad_alloc" in open(kept).read() and "bad_alloc" in str(info.value)
    import os

    os.unlink(kept)


# --- one real server: what the unit tests above promise, end to end -------------------------------------

@pytest.mark.serve
def test_a_real_server_survives_hostile_requests(tmp_path):
    """Concurrent requests share a dynamic batch (20 ms queue delay): the one of 3e38 (finite in float32,
    infinite inside the model) gets the error, the others their answers; [2, 0, 4] is refused; declared
    shapes of 2**40 elements with a few values are refused before tritonserver allocates for them (it
    died of std::bad_alloc), and the server still answers."""
    import threading
    import urllib.error
    import urllib.request

    from onnx_models import token_onnx

    pytest.importorskip("pytriton.triton")
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    import deploytool

    model = token_onnx(tmp_path / "tokens.onnx")
    server = deploytool.serve(model, port=_free_port(), grpc_port=_free_port(), name="tok", block=False,
                              dynamic_batching=True, preferred_batch=(4,), max_queue_delay_us=20_000)
    try:
        rng = np.random.default_rng(0)
        inputs = [rng.normal(size=(1 + i, 3, 4)).astype(np.float32) for i in range(3)]
        inputs.append(np.full((1, 3, 4), 3e38, np.float32))
        results: dict[int, object] = {}
        barrier = threading.Barrier(len(inputs))

        def send(i):
            client = httpclient.InferenceServerClient(server.http_url)
            request = httpclient.InferInput("x", list(inputs[i].shape), "FP32")
            request.set_data_from_numpy(inputs[i])
            barrier.wait()
            try:
                results[i] = client.infer("tok", [request]).as_numpy("output")
            except InferenceServerException as exc:
                results[i] = exc
            finally:
                client.close()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert isinstance(results[3], InferenceServerException) and "NaN or infinite" in str(results[3])
        with deploytool.load(model) as local:
            for i in range(3):
                np.testing.assert_allclose(results[i], local.run(inputs[i])["output"], rtol=1e-5, atol=1e-5)
        body = json.dumps({"inputs": [{"name": "x", "shape": [2, 0, 4], "datatype": "FP32", "data": []}]})
        request = urllib.request.Request(f"http://{server.http_url}/v2/models/tok/infer", data=body.encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400 and server.is_alive()
        url = f"http://{server.http_url}/v2/models/tok/infer"
        for shape, values in (([1099511627776, 3, 4], 12), ([1, 1 << 40, 4], 4), ([64, 3, 4], 12),
                              ([2, 1 << 29, 4], 8)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url, data=_json_request(shape, values)), timeout=30)
            assert refused.value.code == 400 and "declare" in refused.value.read().decode()
        assert server.is_alive()
        answered = json.loads(urllib.request.urlopen(urllib.request.Request(url, data=_json_request([1, 3, 4], 12)),
                                                     timeout=30).read())
        assert {o["name"] for o in answered["outputs"]} >= {"output", "layers.0.moe.router.index"}
    finally:
        server.stop()


# --- 4. the HTTP front's check of declared shapes (serving.front), without a server ------------------------

LIMITS = {"x": __import__("deploytool.serving.front", fromlist=["InputLimits"]).InputLimits((-1, 4), 64)}


def _json_request(shape, values, **extra):
    return json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": [0.5] * values,
                                   **extra}]}).encode()


@pytest.mark.parametrize("shape, values, match", [
    ([1099511627776, 3, 4], 12, "batch of 1099511627776"),
    ([2, 1 << 40, 4], 8, "declares 8796093022208 elements"),
    ([2, 3, 4], 5, r"\(24 values\) but carries 5"),
    ([2, -3, 4], 0, "whole numbers >= 0"),
    ([2, 3.5, 4], 0, "whole numbers >= 0"),
])
def test_the_front_refuses_declared_shapes_that_do_not_fit(shape, values, match):
    from deploytool.serving.front import check_infer_request

    problem = check_infer_request("/v2/models/m/infer", {}, _json_request(shape, values), LIMITS)
    assert problem is not None and __import__("re").search(match, problem), problem


def test_the_front_checks_binary_data_sizes_and_passes_good_requests():
    from deploytool.serving.front import check_infer_request

    header = json.dumps({"inputs": [{"name": "x", "shape": [2, 3, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 96}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    assert check_infer_request("/v2/models/m/versions/1/infer", headers, header + bytes(96), LIMITS) is None
    assert "shorter" in check_infer_request("/v2/models/m/infer", headers, header + bytes(10), LIMITS)
    big = header.replace(b"[2, 3, 4]", b"[2, 3000000000, 4]")
    assert "elements" in check_infer_request("/v2/models/m/infer", {"Inference-Header-Content-Length": str(len(big))},
                                             big + bytes(96), LIMITS)
    assert check_infer_request("/v2/models/m/infer", {}, _json_request([2, 3, 4], 24), LIMITS) is None
    assert check_infer_request("/v2/models/m/ready", {}, b"anything", LIMITS) is None
    nested = b'{"inputs": ' + b"[" * 100_000 + b"}"
    assert "cannot be read" in check_infer_request("/v2/models/m/infer", {}, nested, LIMITS)
