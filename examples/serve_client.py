"""Call a model served by `deploytool serve` (or a packaged repository under tritonserver) over KServe v2.

    deploytool serve runs/my-run --port 8000 --name routed      # in one terminal
    python examples/serve_client.py runs/my-run --name routed   # in another

Sends a batch over HTTP and gRPC with the official tritonclient and checks both answers against the
local runtime (deploytool.load), routing decision included.
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import deploytool


def infer(module, url: str, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    client = module.InferenceServerClient(url)
    try:
        inp = module.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(name, [inp])
        return {key: result.as_numpy(key) for key in ("output", "index", "probs")}
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the run directory, ONNX file or engine the server was started with")
    parser.add_argument("--name", default="model")
    parser.add_argument("--http", default="127.0.0.1:8000")
    parser.add_argument("--grpc", default="127.0.0.1:8001")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    with deploytool.load(args.model) as session:
        features = session.inputs[0].shape[1]
        x = np.random.default_rng(0).random((args.batch, features), dtype=np.float32)
        local = session.run(x)
    for protocol, module, url in (("HTTP", httpclient, args.http), ("gRPC", grpcclient, args.grpc)):
        remote = infer(module, url, args.name, x)
        agree = float(np.mean(remote["index"].ravel() == local.index))
        diff = float(np.max(np.abs(remote["output"] - local.output)))
        print(f"{protocol}: experts {remote['index'].ravel().tolist()}, routing agreement {agree:.0%}, "
              f"max |output diff| {diff:.2e}")


if __name__ == "__main__":
    main()
