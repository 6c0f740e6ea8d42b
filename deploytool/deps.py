"""Optional imports: heavy or optional packages are imported where used, through `require`."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from deploytool.errors import MissingDependency

# module -> what to install when it is missing
_INSTALL_HINTS = {
    "torch": 'pip install "deploytool[train]" (training, export and the torch backends)',
    "safetensors": 'pip install "deploytool[train]"',
    "sklearn": 'pip install "deploytool[train]"',
    "onnxscript": 'pip install "deploytool[train]"',
    "onnx": 'pip install onnx',
    "onnxruntime": 'pip install onnxruntime (or "deploytool[gpu]" for CUDA)',
    "tensorrt": 'pip install "deploytool[tensorrt]" (needs an NVIDIA GPU and driver)',
    "triton": 'pip install "deploytool[gpu]" (Triton compiler)',
    "pytriton": 'pip install "deploytool[serve]"',
    "tritonclient": 'pip install "tritonclient[grpc]"',
    "google": "pip install protobuf",
    "matplotlib": 'pip install "deploytool[train]" (or matplotlib alone, for plots)',
    "transformers": 'pip install "deploytool[hf]" (Hugging Face MoE models)',
}


def install_hint(module: str) -> str:
    """How to install what provides `module`: the extra that brings it, else pip install of its package.

    Args:
        module: an importable name (its top-level package decides).

    Returns:
        The hint, one line.
    """
    root = module.split(".")[0]
    return _INSTALL_HINTS.get(root, f"pip install {root}")


def require(module: str, why: str | None = None) -> ModuleType:
    """Import `module` or raise MissingDependency with one line saying what to install.

    Args:
        module: the module to import.
        why: what needs it (named in the message).

    Returns:
        The module.

    Raises:
        MissingDependency: it cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        purpose = f" (needed for {why})" if why else ""
        raise MissingDependency(
            f"{module.split('.')[0]} is not available{purpose}: {install_hint(module)} [{exc}]"
        ) from exc


def available(module: str) -> bool:
    """True when `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
