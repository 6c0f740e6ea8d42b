"""Triton Python-backend model that serves a deploytool artifact through the deploytool runtime.

`package(..., backend="python")` copies this file to <repository>/<name>/1/model.py beside the artifact;
config.pbtxt's parameters name the artifact and the runtime backend, so one file serves run directories,
ONNX files and engines. Each request is checked on its own: a bad one (NaN, wrong feature count) gets an
error response while the others in the same dynamic batch still run, together, as one batch; when that
batch fails inside the model (values that overflow in its arithmetic), each request runs alone, so every
request succeeds or fails on its own rows only. Models
with several inputs take them by name, as the signature names them.
Runs inside Triton's Python-backend stub, which provides `triton_python_backend_utils`.
"""

import json
from pathlib import Path

import numpy as np


def _error(pb_utils, exc):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    message = str(exc)
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        import deploytool

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        artifact = Path(args["model_repository"]) / args["model_version"] / params["deploytool_artifact"]
        self.session = deploytool.load(artifact, backend=params.get("deploytool_backend", "auto"))
        self.input_names = self.session.signature.input_names
        self.output_names = [output["name"] for output in config["output"]]
        # with batching, a [batch] output is declared as dims [1]: send it as [batch, 1]
        self.expand = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        from deploytool.errors import DeployToolError

        responses = [None] * len(requests)
        rows, feeds = [], []
        for i, request in enumerate(requests):
            try:
                feeds.append(self.session.validate(self._feed(pb_utils, request)))
                rows.append(i)
            except DeployToolError as exc:
                responses[i] = _error(pb_utils, exc)
        if not rows:
            return responses
        try:
            result = self.session.run({name: np.concatenate([f[name] for f in feeds]) for name in self.input_names})
        except DeployToolError:
            # one request's rows failed the batch (values that overflow inside the model): run each request
            # alone, so every request succeeds or fails on its own rows only
            for i, feed in zip(rows, feeds):
                try:
                    responses[i] = self._response(pb_utils, self.session.run(feed))
                except DeployToolError as exc:
                    responses[i] = _error(pb_utils, exc)
            return responses
        start = 0
        for i, feed in zip(rows, feeds):
            stop = start + len(feed[self.input_names[0]])
            responses[i] = self._response(pb_utils, {name: result[name][start:stop] for name in self.output_names})
            start = stop
        return responses

    def _feed(self, pb_utils, request):
        from deploytool.errors import BadInput

        feed = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise BadInput(f"the request has no input {name!r}; the model takes "
                               f"{self.session.signature.describe()}")
            feed[name] = tensor.as_numpy()
        return feed

    def _response(self, pb_utils, outputs):
        tensors = []
        for name in self.output_names:
            value = outputs[name]
            if self.expand and value.ndim == 1:
                value = value[:, None]
            tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self):
        self.session.close()
