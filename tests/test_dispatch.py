"""Sparse dispatch (only the chosen expert computes a row) gives exactly what dense dispatch gives."""

from __future__ import annotations

import pytest
import torch

from deploytool.models import RoutedMLP
from deploytool import nn as nn_mod
from deploytool.nn import RoutedExperts, RoutedOutput, Router, set_dispatch


def _run(model, x, dispatch):
    """(logits, index, probs) of the model's router on `x` with `dispatch`."""
    set_dispatch(model, dispatch)
    with torch.inference_mode(), nn_mod.record_routing(model) as calls:
        output = model(x)
    (decision,) = calls["routed.router"]
    return RoutedOutput(output, decision.index, decision.probs)


def _both(model, x):
    return _run(model, x, "dense"), _run(model, x, "sparse")


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


def _sparse_layer(experts, seed=0, features=6):
    torch.manual_seed(seed)
    return RoutedExperts(Router(features, len(experts)), experts, dispatch="sparse").eval()


def _expected(layer, x):
    """Each row through its chosen expert alone, as module calls."""
    index = layer.router(x).index
    return torch.stack([layer.experts[int(e)](x[i:i + 1])[0] for i, e in enumerate(index)])


def test_plain_linear_relu_experts_run_by_hand_give_what_their_modules_give():
    torch.manual_seed(4)
    shared = torch.nn.Linear(9, 9, bias=False)  # used twice in one expert, no bias
    experts = [torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(inplace=True), shared, torch.nn.ReLU(),
                                   shared, torch.nn.Linear(9, 3)),
               torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU()), torch.nn.Linear(5, 3)),
               torch.nn.Linear(6, 3)]
    layer = _sparse_layer(experts)
    x = torch.randn(64, 6)
    with torch.inference_mode():
        assert nn_mod._plain_stacks(layer.experts) is not None
        out = layer(x)
        expected = _expected(layer, x)
    assert set(out.index.tolist()) == {0, 1, 2}
    torch.testing.assert_close(out.output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["forward hook", "pre hook", "global hook", "patched forward", "other layer"])
def test_experts_that_are_not_plain_are_called_as_modules_even_without_autograd(how):
    experts = [torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)) for _ in range(3)]
    if how == "other layer":
        experts[1][1] = torch.nn.GELU()
    layer = _sparse_layer(experts, seed=5)
    seen = []
    inner = layer.experts[2][0]
    handle = None
    if how == "forward hook":
        handle = inner.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    elif how == "pre hook":
        handle = inner.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    elif how == "global hook":
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, inp, out: seen.append(inp[0].shape[0]) if m is inner else None)
    elif how == "patched forward":
        original = inner.forward
        inner.forward = lambda t: (seen.append(t.shape[0]), original(t))[1]
    x = torch.randn(48, 6)
    try:
        with torch.inference_mode():
            assert nn_mod._plain_stacks(layer.experts) is None
            out = layer(x)
            expected = _expected(layer, x)
    finally:
        if handle is not None:
            handle.remove()
    torch.testing.assert_close(out.output, expected, rtol=1e-5, atol=1e-6)
    if how != "other layer":  # the first call is sparse's, with exactly expert 2's rows
        assert seen[0] == int((out.index == 2).sum())


@pytest.mark.parametrize("experts", ["linear", "mlp"])
def test_token_level_sparse_equals_dense_and_decides_once_per_token(experts):
    """[B, T, D] in: one decision per token ([B, T]), and sparse dispatch runs each token's expert only."""
    torch.manual_seed(6)
    make = (lambda: torch.nn.Linear(6, 4)) if experts == "linear" else \
        (lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)))
    layer = RoutedExperts(Router(6, 3), [make() for _ in range(3)]).eval()
    x = torch.randn(5, 7, 6)
    with torch.inference_mode():
        dense = layer(x)
        layer.dispatch = "sparse"
        sparse = layer(x)
        by_hand = torch.stack([torch.stack([layer.experts[int(dense.index[b, t])](x[b, t]) for t in range(7)])
                               for b in range(5)])
    assert dense.index.shape == (5, 7) and dense.probs.shape == (5, 7, 3) and dense.output.shape == (5, 7, 4)
    assert set(dense.index.unique().tolist()) == {0, 1, 2}
    assert torch.equal(sparse.index, dense.index)
    torch.testing.assert_close(sparse.output, dense.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense.output, by_hand, rtol=1e-5, atol=1e-6)


def test_route_on_decides_from_other_features_than_the_experts_input():
    """Experts on a feature map [B, C, H, W], the decision from pooled features [B, F]: one per image."""
    torch.manual_seed(7)
    experts = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 3, 5)) for _ in range(2)]
    layer = RoutedExperts(Router(4, 2, kind="sigmoid"), experts).eval()
    x, pooled = torch.randn(9, 2, 3, 3), torch.randn(9, 4)
    with torch.inference_mode():
        dense = layer(x, route_on=pooled)
        layer.dispatch = "sparse"
        sparse = layer(x, route_on=pooled)
        assert torch.equal(dense.index, layer.router(pooled).index)
    assert dense.index.shape == (9,) and dense.output.shape == (9, 5)
    torch.testing.assert_close(sparse.output, dense.output, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="leading dims must be those positions"):
        layer(x, route_on=torch.randn(4, 4))
