"""What this host has: the CPU, the GPU, TensorRT and CUDA, library versions.

Engines record `describe_machine()` (they load only where it matches), benchmarks `machine_info()`
(numbers mean little without the machine), doctor reports both. Every probe imports its library
lazily and never raises: a missing or broken package reads as None.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from importlib import metadata
from typing import Any

from deploytool import __version__

LIBRARIES = ("numpy", "torch", "onnxruntime", "onnx", "tensorrt", "triton")


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo or the platform; "" when unknown."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def try_import(module: str):
    """(module, None) or (None, why it failed to import)."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # ImportError, or a broken install raising anything on import
        return None, f"{type(exc).__name__}: {exc}"


def gpu() -> dict | None:
    """Name and compute capability ("9.0") of CUDA device 0 as torch sees it, or None."""
    torch, _ = try_import("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def describe_machine() -> dict:
    """The facts an engine depends on: TensorRT and CUDA versions, GPU name and compute capability."""
    trt, _ = try_import("tensorrt")
    torch, _ = try_import("torch")
    device = gpu()
    return {
        "tensorrt": getattr(trt, "__version__", None),
        "cuda": getattr(getattr(torch, "version", None), "cuda", None),
        "gpu": device and device["name"],
        "compute_capability": device and device["compute_capability"],
    }


def gpu_name() -> str | None:
    """CUDA device 0 as a table shows it: "NVIDIA H100 (sm_90)"; None without a GPU.

    Asks torch when something already imported it, else nvidia-smi: a benchmark of an ONNX model on
    ONNX Runtime has no reason to load torch just to name the machine.
    """
    if "torch" in sys.modules:
        device = gpu()
    else:
        device = _nvidia_smi_gpu()
    return device and f"{device['name']} (sm_{device['compute_capability'].replace('.', '')})"


def _nvidia_smi_gpu() -> dict | None:
    """Device 0's name and compute capability from nvidia-smi, or None (no driver, no GPU, an old driver)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        name, capability = (part.strip() for part in out.strip().split(","))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {"name": name, "compute_capability": capability}


def machine_info() -> dict[str, Any]:
    """What a benchmark records of the machine it ran on.

    Returns:
        {"cpu", "cores", "gpu", "platform", "versions"}: versions of Python, deploytool and the libraries
        installed, and torch's thread count when torch is loaded.
    """
    versions = {"python": platform.python_version(), "deploytool": __version__}
    versions.update({lib: v for lib in LIBRARIES if (v := version(lib))})
    if "torch" in sys.modules:
        versions["torch_threads"] = sys.modules["torch"].get_num_threads()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(), "platform": platform.platform(),
            "versions": versions}
