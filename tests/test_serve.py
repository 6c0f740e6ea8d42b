"""`serve`: a real tritonserver answers KServe v2 over HTTP and gRPC like the local runtime, survives bad
requests, refuses a port in use, and shuts down on Ctrl-C with no server process left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import deploytool
from conftest import assert_one_line_error
from deploytool.errors import BadInput

NAME = "routed"
#: the routed-mlp's outputs: its logits and its one router's decisions
OUTPUTS = ("output", "routed.router.index", "routed.router.probs")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_server():
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install deploytool[serve])")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install deploytool[serve])")


@pytest.fixture(scope="module")
def server(trained_run):
    """One server for the module: dynamic batching with a queue delay, so concurrent requests share a batch."""
    require_server()
    srv = deploytool.serve(trained_run.path, port=free_port(), grpc_port=free_port(), name=NAME, block=False,
                           dynamic_batching=True, preferred_batch=(4,), max_queue_delay_us=20_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(trained_run):
    with deploytool.load(trained_run.path) as session:
        yield session


def rows(n, seed=0):
    return np.random.default_rng(seed).random((n, 64), dtype=np.float32) * 16


def triton_infer(server, x, datatype="FP32", protocol="http", outputs=OUTPUTS):
    """One request with the official client over HTTP or gRPC (`x`: the array of input `x`, or a dict of
    arrays by input name); the outputs by name."""
    import importlib

    from tritonclient.utils import np_to_triton_dtype

    client_module = importlib.import_module(f"tritonclient.{protocol}")
    client = client_module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    feed = x if isinstance(x, dict) else {"x": x}
    try:
        inputs = []
        for name, value in feed.items():
            inputs.append(client_module.InferInput(name, list(value.shape), datatype if name == "x" else
                                                   np_to_triton_dtype(value.dtype)))
            inputs[-1].set_data_from_numpy(value)
        result = client.infer(server.name, inputs)
        return {name: result.as_numpy(name) for name in outputs}
    finally:
        client.close()


def assert_matches(got, ref, routers=("routed.router",)):
    """Same routing for every router, and fp32 outputs equal up to the rounding a different batch
    composition brings."""
    for router in routers:
        # Triton sends a [batch] index as [batch, 1]
        np.testing.assert_array_equal(got[f"{router}.index"].ravel(), ref[f"{router}.index"])
        np.testing.assert_allclose(got[f"{router}.probs"], ref[f"{router}.probs"], rtol=1e-5, atol=1e-6)
    for name in set(got) - {f"{r}.{k}" for r in routers for k in ("index", "probs")}:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)


@pytest.mark.serve
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_answers_like_the_local_runtime(server, local, protocol):
    x = rows(5, seed=3)
    got = triton_infer(server, x, protocol=protocol)
    assert got["routed.router.index"].shape == (5, 1) and got["routed.router.index"].dtype == np.int64
    assert_matches(got, local.run(x))


@pytest.mark.serve
def test_the_client_example_finds_every_routers_decisions_the_same_as_the_local_runtime(server, trained_run):
    example = Path(__file__).resolve().parents[1] / "examples" / "serve_client.py"
    result = subprocess.run([sys.executable, str(example), str(trained_run.path), "--name", NAME, "--http",
                             server.http_url, "--grpc", server.grpc_url, "--batch", "5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for protocol in ("HTTP", "gRPC"):
        assert f"{protocol}: router routed.router: experts " in result.stdout
        assert f"{protocol}: output output: max |diff|" in result.stdout
    assert result.stdout.count("agreement with the local runtime 100%") == 2


@pytest.mark.serve
@pytest.mark.parametrize("x, datatype, match", [
    (rows(2)[:, :10].copy(), "FP32", "unexpected shape for input 'x'"),
    (rows(2).astype(np.float64), "FP64", "data-type is 'FP64', but model 'routed' expects 'FP32'"),
    (np.full((1, 64), np.nan, np.float32), "FP32", r"NaN or inf in sample\(s\) 0"),
])
def test_bad_request_gets_an_error_and_the_server_keeps_serving(server, local, x, datatype, match):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=match) as err:
        triton_infer(server, x, datatype)
    assert err.value.status() == "400"
    assert server.is_alive()
    good = rows(2, seed=9)
    assert_matches(triton_infer(server, good), local.run(good))


@pytest.mark.serve
def test_a_nan_request_batched_with_good_ones_fails_alone(server, local):
    """Concurrent requests land in one dynamic batch (20 ms queue delay); only the bad one gets the error."""
    from tritonclient.utils import InferenceServerException

    inputs = [rows(1 + i, seed=20 + i) for i in range(3)] + [np.full((2, 64), np.nan, np.float32)]
    results: dict[int, object] = {}
    start = threading.Barrier(len(inputs))

    def send(i):
        start.wait()
        try:
            results[i] = triton_infer(server, inputs[i])
        except InferenceServerException as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[3], InferenceServerException) and "NaN" in str(results[3])
    for i in range(3):
        assert_matches(results[i], local.run(inputs[i]))


def two_input_onnx(path):
    """A model of two inputs (an image [B, 1, 8, 8] and a vector [B, 4]) and two routers (`image.router` on
    the image's conv features, `meta.router` on the vector), exported as a user would."""
    import torch
    from torch import nn

    from deploytool.nn import RoutedExperts, Router

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
            self.image = RoutedExperts(Router(16, 3), [nn.Linear(16, 8) for _ in range(3)], dispatch="sparse")
            self.meta = RoutedExperts(Router(4, 2), [nn.Linear(4, 8) for _ in range(2)], dispatch="sparse")
            self.head = nn.Linear(16, 5)
            with torch.no_grad():  # decisive routers: untrained, they would send almost every sample alike
                self.image.router.net[0].weight.mul_(30)
                self.meta.router.net[0].weight.mul_(10)

        def forward(self, image, meta):
            return self.head(torch.cat([self.image(self.conv(image)).output, self.meta(meta).output], dim=1))

    torch.manual_seed(0)
    example = {"image": torch.zeros(2, 1, 8, 8), "meta": torch.zeros(2, 4)}
    return deploytool.export_onnx(TwoInputs().eval(), path, example_inputs=example).path


@pytest.mark.serve
def test_onnx_file_of_two_inputs_and_two_routers_is_served_with_every_routers_decisions(tmp_path):
    """package (config.pbtxt from the signature) + serve through onnxruntime: over HTTP and gRPC, tritonclient
    gets the same decisions of EVERY router as local ONNX Runtime."""
    require_server()
    model = two_input_onnx(tmp_path / "two.onnx")
    routers = ("image.router", "meta.router")
    outputs = ("output", *(f"{r}.{k}" for r in routers for k in ("index", "probs")))
    rng = np.random.default_rng(5)
    feed = {"image": rng.normal(size=(16, 1, 8, 8)).astype(np.float32),
            "meta": rng.normal(size=(16, 4)).astype(np.float32)}
    srv = deploytool.serve(model, port=free_port(), grpc_port=free_port(), name="two", block=False)
    try:
        config = (srv.workdir / "models" / "two" / "config.pbtxt").read_text()
        assert all(f'name: "{name}"' in config for name in ("image", "meta", *outputs))
        with deploytool.load(model) as local_onnx:
            assert local_onnx.backend == "onnxruntime"
            ref = local_onnx.run(feed)
            for protocol in ("http", "grpc"):
                got = triton_infer(srv, feed, protocol=protocol, outputs=outputs)
                assert sorted(got) == sorted(ref)
                assert_matches(got, ref, routers)
    finally:
        srv.stop()
    assert not srv.workdir.exists()
    # the inputs reach both routers: neither decides the same for every sample
    assert all(len(np.unique(ref[f"{r}.index"])) > 1 for r in routers)


@pytest.mark.serve
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_python_backend_stub_loads_this_interpreters_libpython(server):
    """Not the system's libpython of another patch release (the '_recursion_count' failure)."""
    import sysconfig

    loaded = set()
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"triton_python_backend_stub") and str(server.workdir).encode() in argv[0]:
                loaded |= {line.split()[-1] for line in (proc / "maps").read_text().splitlines() if "libpython" in line}
        except OSError:
            continue
    expected = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("INSTSONAME")
    assert loaded == {str(expected)}


def test_port_in_use_is_refused_naming_the_port(trained_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BadInput, match=f"HTTP port {port} on 127.0.0.1 is in use"):
            deploytool.serve(trained_run.path, port=port, block=False)
        with pytest.raises(BadInput, match=f"gRPC port {port} on 127.0.0.1 is in use"):
            deploytool.serve(trained_run.path, port=free_port(), grpc_port=port, block=False)


def test_cli_serve_refuses_a_zero_preferred_batch_before_starting_anything(cli, trained_run):
    code, _, err = cli("serve", trained_run.path, "--port", free_port(), "--preferred-batch", "8,0")
    assert_one_line_error(code, err, 2, "preferred batch sizes: batch size must be a positive integer, got '0'")


def test_cli_serve_on_a_port_in_use_is_one_line_exit_2(cli, trained_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = cli("serve", trained_run.path, "--port", port)
    assert_one_line_error(code, err, 2, f"port {port} on 127.0.0.1 is in use")


@pytest.mark.parametrize("files, match", [
    ({"empty.onnx": ""}, "not an ONNX model (or is truncated)"),
    ({"text.onnx": "hello, not a model"}, "not an ONNX model (or is truncated)"),
    ({"fake4.plan": "engine bytes", "fake4.plan.json": '{"tensorrt": "10.8"}'}, "not a deploytool engine manifest"),
], ids=["empty-onnx", "text-onnx", "manifest-without-io"])
def test_cli_serve_of_a_broken_model_file_is_one_line_exit_2(cli, tmp_path, files, match):
    require_server()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, _, err = cli("serve", tmp_path / next(iter(files)), "--port", free_port(), "--grpc-port", free_port())
    assert_one_line_error(code, err, 2, match)


def test_pytritons_exit_failure_warning_is_silenced_and_its_other_warnings_are_not(caplog):
    """pytriton warns "exited with failure. Please wait." when tritonserver exits non-zero, Ctrl-C'd or not."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install deploytool[serve])")
    import types

    from pytriton.server.triton_server import LOGGER, TritonServer

    from deploytool.serving.server import quiet_pytriton_exit_warning

    quiet_pytriton_exit_warning()
    exiting = types.SimpleNamespace(_on_exit_lock=threading.Lock(), _on_exit=[])
    with caplog.at_level("WARNING"):
        TritonServer._handle_exit(exiting, None, False, 1)  # pytriton's own exit callback, as on a stop
        LOGGER.warning("another pytriton warning")
    assert [r.getMessage() for r in caplog.records] == ["another pytriton warning"]


def tritonserver_pids(port: int) -> list[int]:
    """tritonserver processes listening on `port` (their command line names it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"tritonserver") and any(f"{port}".encode() in a for a in cmdline):
            pids.append(int(proc.name))
    return pids


@pytest.mark.serve
def test_ctrl_c_stops_the_cli_server_cleanly_with_no_tritonserver_left(trained_run):
    require_server()
    port = free_port()  # tritonserver's command line names its gRPC port (its HTTP one is internal)
    proc = subprocess.Popen([sys.executable, "-m", "deploytool.cli.app", "serve", str(trained_run.path),
                             "--port", str(free_port()), "--grpc-port", str(port), "--name", NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "serving" in line or not line:
                break
        assert "Ctrl-C to stop" in lines[-1], "".join(lines)
        assert tritonserver_pids(port), "the server is not running"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "server stopped" in err and "Traceback" not in err
    assert "failure" not in err, err  # pytriton's "exited with failure. Please wait." misreads a clean stop
    assert tritonserver_pids(port) == []
