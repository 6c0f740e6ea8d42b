"""Markers and shared fixtures. gpu / tensorrt / serve tests skip with a reason where unavailable."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _has_tensorrt() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None and _has_cuda()
    except (ImportError, ValueError):
        return False


def pytest_collection_modifyitems(config, items):
    reasons = {
        "gpu": (None if _has_cuda() else "needs an NVIDIA GPU with CUDA (none on this machine)"),
        "tensorrt": (None if _has_tensorrt() else "needs TensorRT >= 10.8 and a GPU (not installable here)"),
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small digits run directory shared by the tests that need a trained model."""
    from deploytool.training import train

    out = tmp_path_factory.mktemp("run")
    return train(None, out, progress=False, epochs=8, seed=0)
