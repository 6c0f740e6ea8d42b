"""The confidence penalty against hand-computed values, its gradients, and the balance terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deploytool import losses


def frank_by_hand(p: list[float]) -> float:
    k = math.log(2) / math.log(len(p))
    return sum(x**k - x ** (2 * k) for x in p)


@pytest.mark.parametrize("n", [2, 3, 4, 10])
def test_penalty_is_n_over_4_at_uniform_and_0_at_one_hot(n):
    uniform = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(torch.tensor([n - 1]), n).double()
    assert losses.confidence_penalty(uniform).item() == pytest.approx(n / 4, rel=1e-12)
    assert losses.confidence_penalty(one_hot).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("p", [[0.7, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.9] + [0.1 / 9] * 9])
def test_penalty_matches_hand_computed_values(p):
    value = losses.confidence_penalty(torch.tensor([p], dtype=torch.float64), alpha=0.3)
    assert value.item() == pytest.approx(0.3 * frank_by_hand(p), rel=1e-12)


def test_two_classes_equals_2p_1_minus_p():
    p = torch.rand(64, dtype=torch.float64)
    rows = losses.confidence_penalty(torch.stack([p, 1 - p], dim=1), reduction="none")
    torch.testing.assert_close(rows, 2 * p * (1 - p))


def test_peak_is_at_uniform_for_three_classes():
    grid = np.linspace(0.01, 0.98, 60)
    best = max(((a, b) for a in grid for b in grid if a + b < 0.99),
               key=lambda ab: frank_by_hand([ab[0], ab[1], 1 - ab[0] - ab[1]]))
    assert best == pytest.approx((1 / 3, 1 / 3), abs=0.02)


def test_reductions_mean_sum_none():
    probs = torch.softmax(torch.randn(5, 4, dtype=torch.float64), dim=1)
    rows = losses.confidence_penalty(probs, reduction="none")
    assert rows.shape == (5,)
    assert losses.confidence_penalty(probs, reduction="sum").item() == pytest.approx(rows.sum().item())
    assert losses.confidence_penalty(probs).item() == pytest.approx(rows.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        losses.confidence_penalty(probs, reduction="max")


def test_dim_argument_reduces_over_the_class_axis():
    probs = torch.softmax(torch.randn(3, 6, dtype=torch.float64), dim=1)
    torch.testing.assert_close(losses.confidence_penalty(probs.T, dim=0, reduction="none"),
                               losses.confidence_penalty(probs, reduction="none"))


def test_one_class_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="always says 'class 0'"):
        losses.confidence_penalty(torch.ones(4, 1))
    with pytest.raises(ValueError, match="always says 'class 0'"):
        losses.confidence_penalty_from_logits(torch.zeros(4, 1))


def test_negative_alpha_is_refused():
    with pytest.raises(ValueError, match="alpha"):
        losses.confidence_penalty(torch.full((1, 3), 1 / 3), alpha=-1)


def test_gradient_is_finite_at_exact_zeros_and_ones():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], requires_grad=True)
    losses.confidence_penalty(probs).backward()
    assert torch.isfinite(probs.grad).all()


def test_gradcheck_away_from_the_boundary():
    logits = torch.randn(4, 5, dtype=torch.float64)
    probs = torch.softmax(logits, dim=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: losses.confidence_penalty(p, alpha=0.7), (probs,))
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: losses.confidence_penalty_from_logits(z, 0.3), (logits,))


@pytest.mark.parametrize("temperature", [0.05, 1.0, 7.0])
def test_logits_form_equals_probs_form(temperature):
    logits = torch.randn(32, 6, dtype=torch.float64) * 3
    expected = losses.confidence_penalty(torch.softmax(logits / temperature, dim=1), alpha=0.4)
    got = losses.confidence_penalty_from_logits(logits, temperature, alpha=0.4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)


def test_logits_form_gradient_is_finite_when_probabilities_underflow():
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], requires_grad=True)
    value = losses.confidence_penalty_from_logits(logits, temperature=0.01)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_sigmoid_is_a_two_way_softmax():
    z = torch.randn(100, dtype=torch.float64) * 5
    two_way = torch.softmax(torch.stack([z, torch.zeros_like(z)], dim=1), dim=1)[:, 0]
    torch.testing.assert_close(torch.sigmoid(z), two_way)


def test_batch_entropy_balance_is_zero_when_balanced_and_positive_when_not():
    balanced = torch.eye(4, dtype=torch.float64).repeat(3, 1)
    starved = torch.nn.functional.one_hot(torch.zeros(12, dtype=torch.long), 4).double()
    assert losses.batch_entropy_balance(balanced).item() == pytest.approx(0.0, abs=1e-12)
    assert losses.batch_entropy_balance(starved).item() == pytest.approx(math.log(4))


def test_batch_mean_on_one_process_is_the_plain_mean_over_rows_bit_for_bit():
    probs = torch.softmax(torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(losses.batch_mean(probs), probs.reshape(-1, 4).mean(dim=0))
    index = probs.argmax(dim=-1)
    share = torch.nn.functional.one_hot(index.reshape(-1), 4).float().mean(dim=0)
    assert torch.equal(losses.batch_share(index, 4, torch.float32), share)


def test_switch_balance_is_one_when_balanced():
    balanced = torch.eye(4, dtype=torch.float64).repeat(2, 1)
    assert losses.switch_balance(balanced).item() == pytest.approx(1.0)
    starved = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 4).double()
    assert losses.switch_balance(starved).item() == pytest.approx(4.0)


def test_entropy_penalty_is_one_at_uniform_and_zero_when_confident():
    assert losses.entropy_penalty(torch.zeros(2, 5)).item() == pytest.approx(1.0)
    assert losses.entropy_penalty(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_gumbel_straight_through_is_one_hot_forward_with_soft_gradients():
    logits = torch.randn(16, 4, requires_grad=True)
    sample = losses.gumbel_straight_through(logits, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample.detach().sum(1), torch.ones(16))
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    (sample * torch.arange(4.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_unknown_penalty_and_balance_names_are_refused():
    with pytest.raises(ValueError, match="unknown penalty"):
        losses.routing_penalty("l2", torch.zeros(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown balance"):
        losses.balance_loss("aux", torch.full((2, 3), 1 / 3), 1.0)


def test_load_guard_is_zero_at_its_target_and_grows_without_bound_as_a_carrying_expert_starves():
    target = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    at_target = target.expand(8, 4)
    assert losses.load_guard(at_target, target).item() == pytest.approx(0.0, abs=1e-12)
    values = [losses.load_guard(torch.tensor([[0.5, 0.5 - s, s, 0.0]], dtype=torch.float64), target).item()
              for s in (0.2, 1e-2, 1e-4, 1e-8)]
    assert values == sorted(values) and values[-1] > 3
    # an expert that carried no traffic is free: sending it some costs no more than the KL of the rest
    free = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    assert losses.load_guard(free, target).item() == pytest.approx(0.5 * math.log(0.5 / 0.4))


def test_load_guard_refuses_a_target_of_another_size():
    with pytest.raises(ValueError, match="target has shape \\[3\\], the routing has 4 experts"):
        losses.load_guard(torch.full((2, 4), 0.25), torch.full((3,), 1 / 3))
