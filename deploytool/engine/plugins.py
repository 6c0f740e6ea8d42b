"""Find and register deploytool's TensorRT plugins, and fingerprint the kernel they embed.

The plugin module lives in plugins/ in the source tree and in deploytool/_data/plugins/ in the wheel;
it is loaded by path (it is not a package module) and registered once per process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from deploytool.deps import require
from deploytool.errors import MissingDependency
from deploytool.io import sha256_file

PLUGIN_MODULE = "deploytool_trt_plugin"
_PACKAGE = Path(__file__).resolve().parent.parent
_CANDIDATES = (_PACKAGE / "_data" / "plugins" / f"{PLUGIN_MODULE}.py",
               _PACKAGE.parent / "plugins" / f"{PLUGIN_MODULE}.py")


def plugin_file() -> Path:
    """The Python module, installed with deploytool, that registers its TensorRT plugins (see load_plugins).

    Returns:
        Its path.

    Raises:
        MissingDependency: it is not installed.
    """
    for path in _CANDIDATES:
        if path.is_file():
            return path
    raise MissingDependency(f"the deploytool TensorRT plugin ({PLUGIN_MODULE}.py) is not installed with this "
                            "deploytool; reinstall deploytool, or build without the plugin")


def load_plugins() -> ModuleType:
    """Register the plugins with TensorRT (once); needs tensorrt >= 10.9 and triton."""
    if PLUGIN_MODULE in sys.modules:
        return sys.modules[PLUGIN_MODULE]
    require("tensorrt.plugin", "the deploytool TensorRT plugin (TensorRT >= 10.9)")
    require("triton", "compiling the plugin kernel")
    spec = importlib.util.spec_from_file_location(PLUGIN_MODULE, plugin_file())
    module = importlib.util.module_from_spec(spec)
    sys.modules[PLUGIN_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PLUGIN_MODULE]
        raise
    return module


def kernel_source_sha256() -> str:
    """sha256 of the Triton kernel source the plugins compile (read as a file: no triton import)."""

    return sha256_file(_PACKAGE / "kernels" / "triton_kernel.py")
