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
        "tensorrt": (None if _has_tensorrt() else "needs TensorRT >= 10.9 and a GPU (not installable here)"),
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


@pytest.fixture(scope="session")
def exported_onnx(trained_run, tmp_path_factory):
    """The trained run exported to ONNX once per session (a dynamo export takes seconds)."""
    from deploytool.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "routed-mlp.onnx"
    export_onnx(trained_run.path, path)
    return path


@pytest.fixture
def cli(capsys):
    """Run the deploytool CLI in-process as a user would: returns (exit code, stdout, stderr)."""
    from deploytool.cli.app import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def assert_one_line_error(code: int, err: str, expected_code: int, match: str) -> None:
    """The contract for bad input: the exit code, one `error:` line naming the problem, no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), lines[0]
