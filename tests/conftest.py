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
def one_torch_thread():
    """torch on one thread for the test (these 2-core machines run other jobs beside the suite)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# --- small models of the shapes deploytool supports beyond the built-in routed-mlp ------------------
# (built inside functions: the base install, and tests that need no model, import no torch)

def token_moe():
    """Tokens [B, T, 6] through two token-level MoE layers (routers `first.router`, 3 experts, and
    `second.router`, 2 experts at temperature 0.5); returns a dict {"logits": [B, 3], "tokens": [B, T, 8]}."""
    import torch
    from torch import nn

    from deploytool.nn import RoutedExperts, Router

    class TokenMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.first = RoutedExperts(Router(8, 3), [nn.Linear(8, 8) for _ in range(3)])
            self.second = RoutedExperts(Router(8, 2, temperature=0.5),
                                        [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.embed(x))
            h = h + self.first(h).output
            h = h + self.second(h).output
            return {"logits": self.head(h.mean(dim=1)), "tokens": h}

    torch.manual_seed(0)
    return TokenMoE().eval()


def two_input_cnn():
    """Images img [B, 1, 8, 8] plus a second input meta [B, 3]: a softmax router (`routed.router`, 3
    experts, deciding on pooled conv features) over conv-map experts, and a binary sigmoid router
    (`gate.router`) on meta; returns a tuple (logits [B, 5], gate [B, 5])."""
    import torch
    from torch import nn

    from deploytool.nn import RoutedExperts, Router

    class TwoInputCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.routed = RoutedExperts(Router(16, 3), [nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
                                                        for _ in range(3)])
            self.gate = RoutedExperts(Router(3, 2, kind="sigmoid"), [nn.Linear(3, 5) for _ in range(2)])

        def forward(self, img, meta):
            features = torch.relu(self.conv(img))
            a = self.routed(features, route_on=self.pool(features).flatten(1)).output
            b = self.gate(meta).output
            return a + b, torch.sigmoid(b)

    torch.manual_seed(0)
    return TwoInputCNN().eval()


class Exported:
    """A module, the example inputs it was exported with, and the ExportResult."""

    def __init__(self, module, example, result):
        self.module, self.example, self.result = module, example, result
        self.path = result.path


@pytest.fixture(scope="session")
def token_export(tmp_path_factory):
    """token_moe() exported with a dynamic `tokens` dim (validated against torch by export)."""
    import torch

    from deploytool.export.onnx import export_onnx

    model = token_moe()
    example = torch.randn(4, 5, 6)
    path = tmp_path_factory.mktemp("token") / "token.onnx"
    return Exported(model, example, export_onnx(model, path, example_inputs=example,
                                                dynamic_dims={"x": {1: "tokens"}}))


@pytest.fixture(scope="session")
def image_export(tmp_path_factory):
    """two_input_cnn() exported from a tuple of example inputs (validated against torch by export)."""
    import torch

    from deploytool.export.onnx import export_onnx

    model = two_input_cnn()
    example = (torch.rand(4, 1, 8, 8) * 16, torch.randn(4, 3))
    path = tmp_path_factory.mktemp("image") / "image.onnx"
    return Exported(model, example, export_onnx(model, path, example_inputs=example))


@pytest.fixture(scope="session")
def transformer_run(tmp_path_factory):
    """A tiny moe-transformer run on digits (8 tokens of 8 features, 2 layers: 2 token-level routers)."""
    from deploytool.training import train

    out = tmp_path_factory.mktemp("transformer")
    return train(None, out, progress=False, model="moe-transformer", experts=3, d_model=8, heads=2,
                 expert_hidden=8, epochs=2, seed=0)


@pytest.fixture(scope="session")
def transformer_onnx(transformer_run, tmp_path_factory):
    """transformer_run exported (sparse dispatch, validated)."""
    from deploytool.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("transformer-onnx") / "transformer.onnx"
    export_onnx(transformer_run.path, path)
    return path
