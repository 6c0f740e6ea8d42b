"""Sparse dispatch (only the chosen expert computes a row) gives exactly what dense dispatch gives."""

from __future__ import annotations

import pytest
import torch

from deploytool.models import RoutedMLP
from deploytool.nn import RoutedExperts, Router, set_dispatch


def _both(model, x):
    with torch.inference_mode():
        set_dispatch(model, "dense")
        dense = model(x)
        set_dispatch(model, "sparse")
        sparse = model(x)
    return dense, sparse


@pytest.mark.parametrize("batch", [1, 2, 7, 4096])
def test_sparse_equals_dense_on_any_batch(batch):
    torch.manual_seed(batch)
    model = RoutedMLP(64, 8, n_experts=8, expert_hidden=256).eval()
    dense, sparse = _both(model, torch.randn(batch, 64))
    torch.testing.assert_close(sparse.output, dense.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse.index, dense.index) and torch.equal(sparse.probs, dense.probs)


def test_sparse_equals_dense_when_every_row_goes_to_one_expert_and_others_are_idle():
    torch.manual_seed(0)
    model = RoutedMLP(16, 3, n_experts=4).eval()
    with torch.no_grad():  # a router that always picks expert 2
        model.routed.router.net[-1].weight.zero_()
        model.routed.router.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    dense, sparse = _both(model, torch.randn(50, 16))
    assert (dense.index == 2).all()
    torch.testing.assert_close(sparse.output, dense.output, rtol=1e-5, atol=1e-6)


def test_sparse_keeps_row_order_and_dtype_for_double_precision_experts():
    torch.manual_seed(3)
    router = Router(5, 3).double()
    experts = [torch.nn.Linear(5, 2).double() for _ in range(3)]
    layer = RoutedExperts(router, experts, dispatch="sparse").eval()
    x = torch.randn(31, 5, dtype=torch.float64)
    out = layer(x)
    expected = torch.stack([experts[int(e)](x[i]) for i, e in enumerate(out.index)])
    assert out.output.dtype == torch.float64
    torch.testing.assert_close(out.output, expected)


def test_sparse_on_an_empty_batch_returns_an_empty_output_of_the_right_width():
    model = RoutedMLP(8, 2, n_experts=4, width=12, dispatch="sparse").eval()
    with torch.inference_mode():
        out = model.routed(torch.zeros(0, 8))
    assert out.output.shape == (0, 12)
