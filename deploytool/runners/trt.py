"""TensorRT runner: a deserialized engine behind the Runner interface, buffers as torch CUDA tensors.

Uses TensorRT 10's name-based I/O API (set_input_shape, set_tensor_address, execute_async_v3) on a
torch CUDA stream; no pycuda. Metadata comes from the engine's manifest until the engine is loaded, so
`inputs`/`outputs` work on machines that cannot run it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploytool import machine
from deploytool.artifacts import manifest_signature, read_manifest
from deploytool.dtypes import LOWER_PRECISIONS, PRECISION_DTYPES
from deploytool.engine.build import dtype_name, require_tensorrt_and_gpu
from deploytool.engine.manifest import load_problems
from deploytool.errors import BadInput, CheckFailed, MissingDependency
from deploytool.runners.base import Runner
from deploytool.signature import ModelSignature


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, *, name: str | None = None):
        super().__init__(name)
        self.engine_path = Path(engine_path)
        self.manifest = read_manifest(self.engine_path)
        precision = self.manifest.get("precision")
        self.compute_dtype = PRECISION_DTYPES[precision] if precision in LOWER_PRECISIONS else None
        self.engine = self.context = self.stream = None

    def _activate(self) -> None:
        import torch


        trt = self._trt = require_tensorrt_and_gpu("the tensorrt backend")
        problems = load_problems(self.manifest, machine.describe_machine())
        if problems:
            raise MissingDependency(f"engine {self.engine_path} will not load here: {'; '.join(problems)}")
        # the logger and runtime must outlive the engine deserialized from them
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise CheckFailed(f"TensorRT could not deserialize {self.engine_path}; rebuild it with build-engine")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]

    def _deactivate(self) -> None:
        self.context = self.stream = None  # context before engine before runtime
        self.engine = None
        self._runtime = self._logger = None

    def _signature(self) -> ModelSignature:
        return manifest_signature(self.manifest, self.engine_path)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [n for n in self._inputs if n not in feed]
        if missing:
            raise BadInput(f"feed lacks input(s) {', '.join(missing)} of engine {self.engine_path.name}")
        keep = []  # device buffers must outlive the asynchronous launch
        with torch.cuda.stream(self.stream):
            for name in self._inputs:
                dtype = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
                tensor = torch.as_tensor(np.ascontiguousarray(feed[name])).to("cuda", dtype, non_blocking=True)
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise BadInput(f"input {name} shape {tuple(tensor.shape)} is outside the engine's profile "
                                   f"{self.manifest['profile'].get(name)}")
                self.context.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
            outputs = {}
            for name in self._outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=_torch_dtype(self._trt, self.engine.get_tensor_dtype(name)),
                                  device="cuda")
                self.context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise CheckFailed(f"TensorRT failed to run {self.engine_path.name}")
        self.stream.synchronize()
        # NumPy has no bfloat16: such outputs come back as float32 (exact)
        return {name: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for name, t in outputs.items()}


def _torch_dtype(trt, dtype):
    import torch


    return getattr(torch, dtype_name(trt, dtype))
