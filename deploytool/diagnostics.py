"""`doctor`: what this machine can do, and whether a given engine will load here.

Each probe is independent and never raises: a missing or broken package shows up as `None` plus the
reason, so doctor works on the machines that most need it (no GPU, no TensorRT).
"""

from __future__ import annotations

import platform
from pathlib import Path

from deploytool.artifacts import read_manifest
from deploytool.deps import install_hint
from deploytool.engine.manifest import load_problems
from deploytool.engine.plan import PLUGIN_OPS
from deploytool.engine.plugins import load_plugins
from deploytool.machine import describe_machine, gpu
from deploytool.machine import try_import as _import
from deploytool.machine import version as _version
from deploytool.ops import DOMAIN
from deploytool.runners import BACKENDS


def doctor(engine: str | Path | None = None) -> dict:
    """Report Python, torch/CUDA, GPU, onnxruntime, TensorRT (+ deploytool plugins), triton, and which
    commands will work; with `engine`, whether that engine will load here and why not."""
    report = {"python": platform.python_version(), "platform": platform.platform(),
              "torch": _torch(), "gpu": gpu(), "onnxruntime": _onnxruntime(), "tensorrt": _tensorrt(),
              "triton": {"version": _version("triton")} if _version("triton") else None}
    report["commands"] = _commands(report)
    if engine is not None:
        report["engine"] = check_engine(engine)
    return report


def _torch() -> dict:
    torch, error = _import("torch")
    if torch is None:
        return {"version": None, "error": error}
    return {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}


def _onnxruntime() -> dict:
    ort, error = _import("onnxruntime")
    if ort is None:
        return {"version": None, "error": error}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}


def _tensorrt() -> dict:
    trt, error = _import("tensorrt")
    if trt is None:
        return {"version": None, "error": error, "plugins": None}

    try:
        load_plugins()
        plugins = {"registered": True, "ids": [f"{DOMAIN}::{op}" for op in PLUGIN_OPS]}
    except Exception as exc:  # MissingDependency (no triton, TRT < 10.9) or a registration failure
        plugins = {"registered": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"version": trt.__version__, "plugins": plugins}


def _commands(report: dict) -> dict:
    """command -> {"works": bool, "missing": [...], "hint": how to fix it}."""
    have = {
        "torch": bool(report["torch"].get("version")),
        "onnx": _version("onnx") is not None,
        "onnxscript": _version("onnxscript") is not None,
        "onnxruntime": bool(report["onnxruntime"].get("version")),
        "onnxruntime-cuda": "CUDAExecutionProvider" in (report["onnxruntime"].get("providers") or []),
        "tensorrt": bool(report["tensorrt"].get("version")),
        "gpu": report["gpu"] is not None,
        "triton": report["triton"] is not None,
        "deploytool plugins": bool((report["tensorrt"].get("plugins") or {}).get("registered")),
        "pytriton": _version("nvidia-pytriton") is not None,
        "tritonclient": _version("tritonclient") is not None,
        "transformers": _version("transformers") is not None,
    }
    needs = {
        "train": ["torch"],
        "export": ["torch", "onnx", "onnxscript"],
        "build-engine --dry-run": ["onnx"],
        "build-engine --no-plugin": ["onnx", "tensorrt", "gpu"],
        "build-engine (plugin path)": ["onnx", "tensorrt", "gpu", "triton", "deploytool plugins"],
        "fused kernel on GPU (tempered_softmax_select)": ["torch", "triton", "gpu"],
        "package": ["onnx", "tritonclient"],  # config.pbtxt is checked against Triton's schema
        "serve": ["pytriton", "tritonclient"],
        "demo": ["torch", "onnx", "onnxscript", "onnxruntime"],
        "Hugging Face MoE models (from_hf, save_pretrained folders)": ["torch", "transformers"],
    }
    hints = {"gpu": "an NVIDIA GPU with its driver", "tensorrt": 'pip install "deploytool[tensorrt]"',
             "onnxruntime-cuda": 'pip install "deploytool[gpu]" (onnxruntime-gpu) on a GPU machine',
             "deploytool plugins": "TensorRT >= 10.9 and triton"}
    for name, backend in BACKENDS.items():
        needs[f"--backends {name} ({backend.summary})"] = backend.needs
    commands = {}
    for command, required in needs.items():
        missing = [r for r in required if not have[r]]
        commands[command] = {"works": not missing, "missing": missing,
                             "hint": "; ".join(hints.get(m) or install_hint(m) for m in missing)}
    return commands


def check_engine(engine: str | Path) -> dict:
    """Compare an engine's manifest with this machine: will it load, and if not, why."""
    manifest = read_manifest(engine)
    here = describe_machine()
    problems = load_problems(manifest, here)
    plugin = ("kernels embedded as PTX (AOT plugin): no plugin library or Python needed to load"
              if manifest.get("op_path") == "plugin" else "standard TensorRT layers (ONNX local functions)")
    return {"path": str(engine), "will_load": not problems, "problems": problems,
            "built": {k: manifest.get(k) for k in ("tensorrt", "cuda", "gpu", "compute_capability", "precision",
                                                   "op_path", "plugin_ids", "deploytool")},
            "here": here, "plugin": plugin}
