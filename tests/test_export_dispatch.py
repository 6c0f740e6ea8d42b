"""Sparse dispatch exported to ONNX (deploytool.dispatch): each expert runs on its own rows only, and
ONNX Runtime gives what PyTorch's dense dispatch gives, on the cases where row bookkeeping can slip.

Exports go through torch.onnx.export (dynamo) and deploytool.ops.onnx_functions.attach directly.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deploytool.nn import RoutedExperts, Router, dispatch_mode, routing_mode
from deploytool.ops.onnx_functions import DEFAULT_OPSET, attach

FEATURES, EXPERTS = 8, 4


def export(model: nn.Module, example: torch.Tensor, dynamic: dict, dispatch: str = "sparse"):
    """`model` in hard routing with `dispatch`, exported with the deploytool function bodies attached."""
    for name in ("torch.onnx", "torch.export", "torch.fx", "torch._export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with routing_mode(model.eval(), "hard"), dispatch_mode(model, dispatch), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(dynamic,),
                                    opset_version=DEFAULT_OPSET, optimize=True, verbose=False)
    proto = program.model_proto
    attach(proto, DEFAULT_OPSET)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_onnx(proto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def dense(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with routing_mode(model, "hard"), dispatch_mode(model, "dense"), torch.no_grad():
        return [t.numpy() for t in model(x)]


class Routed(nn.Module):
    """RoutedExperts over `x [..., FEATURES]` whose router reads the first EXPERTS features: a row
    goes to the expert of its largest one (ties to the lowest), so inputs pick the experts."""

    def __init__(self, experts: list[nn.Module]):
        super().__init__()
        self.routed = RoutedExperts(Router(FEATURES, EXPERTS), experts, dispatch="sparse")
        layer = self.routed.router.net[0]
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[:, :EXPERTS] = 4 * torch.eye(EXPERTS)

    def forward(self, x):
        out = self.routed(x)
        return out.output, out.index


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU())


def rows_to(experts: list[int], seed: int = 0) -> torch.Tensor:
    """One row per entry, routed to that expert."""
    x = torch.randn(len(experts), FEATURES, generator=torch.Generator().manual_seed(seed))
    x[:, :EXPERTS] = x[:, :EXPERTS].abs().neg()
    x[torch.arange(len(experts)), torch.tensor(experts, dtype=torch.long)] = 1.0
    return x


@pytest.fixture(scope="module")
def mlp_model():
    torch.manual_seed(0)
    model = Routed([mlp() for _ in range(EXPERTS)])
    return model, export(model, torch.randn(2, FEATURES), {0: torch.export.Dim("batch")})


def _ties() -> torch.Tensor:
    x = rows_to([3, 2, 1, 0, 2])
    x[:, :EXPERTS] = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.0], [0.0, 0.5, 0.0, 0.5],
                                   [0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.3, 0.3]])
    return x


CASES = {
    "batch 1": (lambda: rows_to([2]), None),
    "an expert with no rows": (lambda: rows_to([0, 1, 3, 0, 3, 1, 0]), [0, 1, 3, 0, 3, 1, 0]),
    "all rows to one expert": (lambda: rows_to([2] * 9), [2] * 9),
    "ties go to the lowest expert": (_ties, [2, 0, 1, 0, 2]),
    "empty batch": (lambda: torch.zeros(0, FEATURES), []),
}


@pytest.mark.parametrize("case", CASES)
def test_sparse_export_matches_pytorch_dense(mlp_model, case):
    model, proto = mlp_model
    make, expected_index = CASES[case]
    x = make()
    output, index = run_onnx(proto, x.numpy())
    want_output, want_index = dense(model, x)
    assert output.shape == want_output.shape == (len(x), 6)
    np.testing.assert_allclose(output, want_output, rtol=1e-5, atol=1e-6)
    assert index.tolist() == want_index.tolist()
    if expected_index is not None:
        assert index.tolist() == expected_index


def test_the_graph_gathers_each_experts_rows_instead_of_running_every_expert_on_the_batch(mlp_model):
    model, sparse = mlp_model
    dense_proto = export(model, torch.randn(2, FEATURES), {0: torch.export.Dim("batch")}, dispatch="dense")

    def reading_the_batch(proto) -> int:
        """Gemm/MatMul nodes that read the graph's input itself (all rows)."""
        x = proto.graph.input[0].name
        return sum(n.op_type in ("Gemm", "MatMul") and x in n.input for n in proto.graph.node)

    ops = [n.op_type for n in sparse.graph.node]
    assert reading_the_batch(dense_proto) == EXPERTS + 1  # the router and every expert
    assert reading_the_batch(sparse) == 1  # the router only
    assert ops.count("NonZero") == EXPERTS and ops.count("ScatterND") == 1
    assert not [n for n in sparse.graph.node if n.domain not in ("", "deploytool")]  # no contrib ops


def test_token_level_experts_route_every_token_on_its_own():
    torch.manual_seed(1)
    model = Routed([mlp() for _ in range(EXPERTS)])
    proto = export(model, torch.randn(2, 3, FEATURES),
                   {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens")})
    x = torch.randn(3, 11, FEATURES)
    output, index = run_onnx(proto, x.numpy())
    want_output, want_index = dense(model, x)
    assert output.shape == (3, 11, 6) and index.shape == (3, 11)
    assert index.tolist() == want_index.tolist() and len(np.unique(index)) == EXPERTS
    np.testing.assert_allclose(output, want_output, rtol=1e-5, atol=1e-6)


class FeatureMaps(nn.Module):
    """Experts of different kinds (convolutions, LayerNorm) on [rows, 2, 4, 4] feature maps, routed on
    the flattened map."""

    def __init__(self):
        super().__init__()
        experts = [nn.Conv2d(2, 2, 3, padding=1), nn.LayerNorm([2, 4, 4]),
                   nn.Sequential(nn.Conv2d(2, 2, 1), nn.GELU()), nn.Identity()]
        self.routed = RoutedExperts(Router(32, EXPERTS), experts, dispatch="sparse")

    def forward(self, x):
        out = self.routed(x, route_on=x.flatten(1))
        return out.output, out.index


def test_experts_that_are_not_mlps_and_return_feature_maps():
    torch.manual_seed(2)
    model = FeatureMaps()
    proto = export(model, torch.randn(2, 2, 4, 4), {0: torch.export.Dim("batch")})
    x = torch.randn(64, 2, 4, 4)
    output, index = run_onnx(proto, x.numpy())
    want_output, want_index = dense(model, x)
    assert output.shape == (64, 2, 4, 4) and index.tolist() == want_index.tolist()
    assert len(np.unique(index)) > 1
    np.testing.assert_allclose(output, want_output, rtol=1e-5, atol=1e-5)


def test_polygraphy_runs_the_sparse_graph_on_onnx_runtime(mlp_model, tmp_path):
    polygraphy = shutil.which("polygraphy")
    if polygraphy is None:
        pytest.skip("polygraphy is not installed (pip install polygraphy)")
    path = tmp_path / "sparse.onnx"
    onnx.save(mlp_model[1], path)
    done = subprocess.run([polygraphy, "run", str(path), "--onnxrt", "--input-shapes", f"x:[37,{FEATURES}]"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout + done.stderr


def test_verify_judges_the_sparse_export_against_pytorch_and_the_dense_export(trained_run, exported_onnx, tmp_path,
                                                                             cli):
    from deploytool.artifacts import open_artifact
    from deploytool.export.onnx import export_onnx
    from deploytool.parity import verify

    dense = export_onnx(trained_run.path, tmp_path / "dense model.onnx", dispatch="dense", validate=False).path
    assert open_artifact(exported_onnx).metadata["deploytool.dispatch"] == "sparse"
    report = verify([exported_onnx, dense], checkpoint=trained_run.path, backends=("torch", "onnxruntime"), samples=64)
    pairs = {(c.reference, c.candidate) for c in report.comparisons}
    assert pairs == {("torch", f"onnxruntime {exported_onnx.name}"), ("torch", "onnxruntime dense model.onnx"),
                     (f"onnxruntime {exported_onnx.name}", "onnxruntime dense model.onnx")}
    assert report.passed and all(c.routing and c.routing[0].agreement == 100.0 for c in report.comparisons)
    code, out, err = cli("verify", exported_onnx, dense, "--backends", "onnxruntime", "--samples", "32")
    assert code == 0 and "parity: PASS" in out, err
