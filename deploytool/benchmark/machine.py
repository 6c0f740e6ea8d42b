"""What a benchmark ran on: numbers mean little without the CPU, the GPU and the library versions."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

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
    """CUDA device 0 as a table shows it: "NVIDIA H100 (sm_90)"; None without a GPU."""
    from deploytool.diagnostics import gpu

    device = gpu()
    return device and f"{device['name']} (sm_{device['compute_capability'].replace('.', '')})"


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
