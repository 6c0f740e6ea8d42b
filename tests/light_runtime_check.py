"""CI's check of the light install (`pip install deploytool[serve]`, no torch): run by .ci/run, not pytest.

    python tests/light_runtime_check.py MODEL.onnx

Loads the exported model with deploytool.load and runs it, then serves it with a real Triton Inference
Server and checks that the server answers with the same decisions, for every router, as the local
session. Fails if torch is importable or gets imported.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np


def main(model: str) -> None:
    assert importlib.util.find_spec("torch") is None, "the light install must not have torch"
    import deploytool
    from deploytool.feeds import random_feed

    session = deploytool.load(model)
    feed = random_feed(session.signature, 16, seed=0)
    local = session.run(feed)
    print(f"load: {session.signature.describe()}")
    server = deploytool.serve(model, port=_free_port(), grpc_port=_free_port(), block=False)
    try:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(server.http_url)
        inputs = []
        for name, value in feed.items():
            inputs.append(httpclient.InferInput(name, list(value.shape), "FP32"))
            inputs[-1].set_data_from_numpy(value)
        result = client.infer(server.name, inputs)
        for router in session.signature.routers:
            remote = result.as_numpy(router.index).reshape(local[router.index].shape)
            assert np.array_equal(remote, local[router.index]), f"router {router.path}: decisions differ"
            print(f"serve: router {router.path}: {remote.size} decisions equal to the local session's")
    finally:
        server.stop()
    assert "torch" not in sys.modules, "torch was imported"
    print("light install: load and serve work without torch")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main(sys.argv[1])
