"""Router and RoutedExperts: refusal of 1-way softmax, sigmoid router, soft/hard routing, dispatch."""

from __future__ import annotations

import pytest
import torch

from deploytool import nn as dnn
from deploytool.models import RoutedMLP, build_model


def test_one_expert_softmax_router_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="always says 'class 0'.*sigmoid"):
        dnn.Router(8, 1)


def test_sigmoid_router_equals_a_two_way_softmax():
    torch.manual_seed(0)
    router = dnn.Router(5, 2, temperature=0.7, kind="sigmoid")
    x = torch.randn(50, 5)
    out = router(x)
    z = router.net(x)[:, 0]
    torch.testing.assert_close(out.probs[:, 0], torch.sigmoid(z / 0.7))
    torch.testing.assert_close(out.index, (z < 0).long())
    assert router.net[-1].out_features == 1


def test_sigmoid_router_needs_exactly_two_experts():
    with pytest.raises(ValueError, match="exactly 2"):
        dnn.Router(4, 3, kind="sigmoid")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_refused(bad):
    with pytest.raises(ValueError, match="temperature"):
        dnn.Router(4, 3, temperature=bad)


def test_training_blends_and_records_a_routing_loss_eval_commits_to_one_expert():
    torch.manual_seed(0)
    model = RoutedMLP(10, 3, n_experts=4)
    x = torch.randn(32, 10)
    model.train()
    soft = model(x)
    assert dnn.collect_routing_loss(model).requires_grad
    model.eval()
    hard = model(x)
    experts = model.routed.experts
    chosen = torch.stack([experts[int(e)](x[i:i + 1])[0] for i, e in enumerate(hard.index)])
    torch.testing.assert_close(hard.output, model.head(chosen))
    assert not torch.allclose(soft.output, hard.output)


def test_dense_and_sparse_dispatch_give_the_same_outputs():
    torch.manual_seed(1)
    model = RoutedMLP(16, 5, n_experts=8, expert_hidden=32).eval()
    x = torch.randn(333, 16)
    dense = model(x)
    dnn.set_dispatch(model, "sparse")
    sparse = model(x)
    torch.testing.assert_close(sparse.output, dense.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse.index, dense.index)


def test_sparse_dispatch_runs_only_the_chosen_experts():
    torch.manual_seed(2)
    model = RoutedMLP(6, 2, n_experts=4, dispatch="sparse").eval()
    calls = []
    for e, expert in enumerate(model.routed.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    x = torch.randn(40, 6)
    index = model(x).index
    counts = torch.bincount(index, minlength=4)
    assert sorted(calls) == sorted((e, int(n)) for e, n in enumerate(counts) if n > 0)


def test_routing_mode_context_restores_the_previous_mode():
    model = RoutedMLP(4, 2, n_experts=2)
    with dnn.routing_mode(model, "soft"):
        assert model.routed.mode == "soft"
    assert model.routed.mode == "auto"


def test_routing_loss_rejects_unknown_names_and_negative_weights():
    with pytest.raises(ValueError, match="penalty"):
        dnn.RoutingLoss(penalty="l1")
    with pytest.raises(ValueError, match="beta"):
        dnn.RoutingLoss(beta=-0.1)


def test_routed_experts_needs_one_module_per_expert():
    with pytest.raises(ValueError, match="3 experts"):
        dnn.RoutedExperts(dnn.Router(4, 3), [torch.nn.Linear(4, 4)] * 2)


def test_build_model_refuses_an_unknown_architecture():
    from deploytool.errors import BadInput

    with pytest.raises(BadInput, match="unknown model"):
        build_model({"model": "transformer"})


def test_user_model_with_router_trains_its_router_through_the_penalty():
    """A user's own module: the penalty gradient reaches the router's weights."""
    torch.manual_seed(3)
    routed = dnn.RoutedExperts(dnn.Router(4, 3), [torch.nn.Linear(4, 2) for _ in range(3)],
                               loss=dnn.RoutingLoss(alpha=1.0, balance="none"))
    routed.train()
    routed(torch.randn(8, 4))
    dnn.collect_routing_loss(routed).backward()
    assert routed.router.net[0].weight.grad.abs().sum() > 0
