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
    with dnn.record_routing(model) as calls:
        hard = model(x)
    index = calls["routed.router"][0].index
    experts = model.routed.experts
    chosen = torch.stack([experts[int(e)](x[i:i + 1])[0] for i, e in enumerate(index)])
    torch.testing.assert_close(hard, model.head(chosen))
    assert not torch.allclose(soft, hard)


def test_dense_and_sparse_dispatch_give_the_same_outputs():
    torch.manual_seed(1)
    model = RoutedMLP(16, 5, n_experts=8, expert_hidden=32).eval()
    x = torch.randn(333, 16)
    dense = model.routed(x)
    dnn.set_dispatch(model, "sparse")
    sparse = model.routed(x)
    torch.testing.assert_close(sparse.output, dense.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse.index, dense.index)


def test_sparse_dispatch_runs_only_the_chosen_experts():
    torch.manual_seed(2)
    model = RoutedMLP(6, 2, n_experts=4, dispatch="sparse").eval()
    calls = []
    for e, expert in enumerate(model.routed.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    x = torch.randn(40, 6)
    index = model.routed(x).index
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


def _token_moe(dispatch: str = "dense") -> dnn.RoutedExperts:
    torch.manual_seed(4)
    return dnn.RoutedExperts(dnn.Router(6, 3), [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU())
                                                 for _ in range(3)], dispatch=dispatch)


@pytest.mark.parametrize("mode", ["soft", "hard", "gumbel"])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_token_level_routing_decides_once_per_token(mode, dispatch):
    routed = _token_moe(dispatch).train(mode != "hard")
    x = torch.randn(4, 7, 6)
    with dnn.routing_mode(routed, mode):
        out = routed(x)
    assert out.output.shape == (4, 7, 5) and out.index.shape == (4, 7) and out.probs.shape == (4, 7, 3)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(4, 7))
    if mode == "soft":
        expected = sum(out.probs[..., e:e + 1] * expert(x) for e, expert in enumerate(routed.experts))
        torch.testing.assert_close(out.output, expected)


def test_token_level_sparse_equals_dense_in_hard_mode_and_uses_the_chosen_expert():
    dense = _token_moe("dense").eval()
    sparse = _token_moe("sparse").eval()
    x = torch.randn(5, 9, 6)
    a, b = dense(x), sparse(x)
    torch.testing.assert_close(a.output, b.output, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.index, b.index) and len(a.index.unique()) > 1
    token = (3, 4)
    chosen = dense.experts[int(a.index[token])](x[token])
    torch.testing.assert_close(a.output[token], chosen)


class _ConvExpert(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        return self.conv(x) * self.scale


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_feature_map_experts_are_weighted_per_sample_routed_on_pooled_features(dispatch):
    torch.manual_seed(5)
    routed = dnn.RoutedExperts(dnn.Router(2, 3), [_ConvExpert(s) for s in (1.0, -2.0, 3.0)], dispatch=dispatch)
    x = torch.randn(6, 2, 4, 4)
    pooled = x.mean(dim=(2, 3))
    routed.train()
    soft = routed(x, route_on=pooled)
    expected = sum(soft.probs[:, e].reshape(6, 1, 1, 1) * expert(x) for e, expert in enumerate(routed.experts))
    assert soft.output.shape == (6, 3, 4, 4) and soft.index.shape == (6,)
    torch.testing.assert_close(soft.output, expected)
    routed.eval()
    hard = routed(x, route_on=pooled)
    for i in range(6):
        torch.testing.assert_close(hard.output[i], routed.experts[int(hard.index[i])](x[i:i + 1])[0])


def test_router_positions_must_lead_the_experts_input():
    routed = dnn.RoutedExperts(dnn.Router(2, 2), [torch.nn.Identity(), torch.nn.Identity()])
    with pytest.raises(ValueError, match="leading dims"):
        routed(torch.randn(6, 2, 4, 4), route_on=torch.randn(5, 2))


def test_routing_loss_averages_over_positions():
    """A token-level routing loss is the row loss of the same tokens flattened: a mean over every position."""
    routed = _token_moe().train()
    routed.loss = dnn.RoutingLoss(penalty="frank", alpha=1.0, balance="entropy", beta=2.0)
    x = torch.randn(4, 7, 6)
    routed(x)
    per_token = routed.routing_loss
    routed(x.reshape(28, 6))
    torch.testing.assert_close(per_token, routed.routing_loss)
    routed(x[:1].expand(4, 7, 6))  # the same sample four times: the same mean as once
    repeated = routed.routing_loss
    routed(x[:1])
    torch.testing.assert_close(repeated, routed.routing_loss)
