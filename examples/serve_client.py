"""Call a model served by `deploytool serve` (or a packaged repository under tritonserver) over KServe v2.

    deploytool serve runs/my-run --port 8000 --name routed      # in one terminal
    python examples/serve_client.py runs/my-run --name routed   # in another

Sends a batch over HTTP and gRPC with the official tritonclient and checks both answers against the
local runtime (deploytool.load): every router's decisions (`<router path>.index`) and the model's own
outputs. The model's signature says which inputs to send and which outputs to ask for, so any model
deploytool exports works, several inputs and several routers included. Exits 1 when a decision differs.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import np_to_triton_dtype

import deploytool
from deploytool.feeds import random_feed


def infer(module, url: str, name: str, feed: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One request with every input of `feed`; the named outputs as arrays."""
    client = module.InferenceServerClient(url)
    try:
        inputs = []
        for input_name, value in feed.items():
            inputs.append(module.InferInput(input_name, list(value.shape), np_to_triton_dtype(value.dtype)))
            inputs[-1].set_data_from_numpy(value)
        result = client.infer(name, inputs)
        return {key: result.as_numpy(key) for key in outputs}
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the run directory, ONNX file or engine the server was started with")
    parser.add_argument("--name", default="model")
    parser.add_argument("--http", default="127.0.0.1:8000")
    parser.add_argument("--grpc", default="127.0.0.1:8001")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    with deploytool.load(args.model) as session:
        signature = session.signature
        feed = random_feed(signature, args.batch, seed=0)  # made-up samples of every input
        local = session.run(feed)
    agreed = True
    for protocol, module, url in (("HTTP", httpclient, args.http), ("gRPC", grpcclient, args.grpc)):
        remote = infer(module, url, args.name, feed, signature.output_names)
        for router in signature.routers:
            # Triton sends a [batch] index as [batch, 1]: compare the decisions, not the layout
            got, want = remote[router.index].reshape(local[router.index].shape), local[router.index]
            agree = float(np.mean(got == want))
            agreed &= agree == 1.0
            print(f"{protocol}: router {router.path}: experts {got.reshape(len(got), -1)[:, 0].tolist()}, "
                  f"agreement with the local runtime {agree:.0%}")
        decisions = {name for router in signature.routers for name in (router.index, router.probs)}
        for name in signature.output_names:
            if name not in decisions and remote[name].dtype.kind == "f":  # the model's own outputs
                diff = float(np.max(np.abs(remote[name].astype(np.float64) - local[name])))
                print(f"{protocol}: output {name}: max |diff| {diff:.2e}")
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())
