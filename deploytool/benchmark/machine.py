"""What a benchmark ran on: numbers mean little without the CPU, the GPU and the library versions."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from deploytool.deps import available

LIBRARIES = ("numpy", "torch", "onnxruntime", "onnx", "tensorrt", "triton")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The first CUDA device's name, asked through torch only when torch is installed."""
    if not available("torch"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} (sm_{props.major}{props.minor})"


def machine_info() -> dict[str, Any]:
    from deploytool import __version__

    versions = {"python": platform.python_version(), "deploytool": __version__}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    if "torch" in sys.modules:
        versions["torch_threads"] = sys.modules["torch"].get_num_threads()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(), "platform": platform.platform(),
            "versions": versions}
