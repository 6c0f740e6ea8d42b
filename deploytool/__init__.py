"""deploytool: make routed PyTorch models commit to one expert, then ship them fast and verified.

The public API is re-exported lazily so `import deploytool` (and the CLI's --help) stays light.
No submodule shares a name with an API function (training.py holds `train`), so importing a submodule
never shadows a function on the package.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "TrainConfig": "deploytool.recipes",
    "LoopSettings": "deploytool.recipes",
    "LMSettings": "deploytool.lm",
    "CommitSettings": "deploytool.finetune",
    "LMCommitSettings": "deploytool.lm",
    "load_recipe": "deploytool.recipes",
    "train": "deploytool.training",
    "load_run": "deploytool.artifacts",
    "load_model": "deploytool.checkpoints",
    "fit": "deploytool.lm",
    "load_weights_into": "deploytool.checkpoints",
    "commit": "deploytool.finetune",
    "report": "deploytool.metrics",
    "study": "deploytool.penalty_study",
    "study_lm": "deploytool.lm_study",
    "demo": "deploytool.pipeline",
    "confidence_penalty": "deploytool.losses",
    "confidence_penalty_from_logits": "deploytool.losses",
    "export_onnx": "deploytool.export.onnx",
    "verify": "deploytool.parity",
    "build_engine": "deploytool.engine.build",
    "tempered_softmax_select": "deploytool.kernels",
    "doctor": "deploytool.diagnostics",
    "bench": "deploytool.benchmark.run",
    "load": "deploytool.runtime",
    "package": "deploytool.serving.repository",
    "serve": "deploytool.serving.server",
    "Router": "deploytool.nn",
    "RoutedExperts": "deploytool.nn",
    "from_hf": "deploytool.hf",
    "TopKRouter": "deploytool.moe",
    "TopKRule": "deploytool.moe",
    "FusedExperts": "deploytool.moe",
    "MoEBlock": "deploytool.moe",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'deploytool' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
