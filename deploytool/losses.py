"""Routing losses: the confidence penalty that pushes a router to one-hot, balance terms, baselines.

The confidence penalty (K. Frank): for probabilities p over n classes, q = p**(log 2 / log n)
maps 1/n to 1/2, and q - q**2 peaks there and vanishes at 0 and 1. Summed over classes it is 0 for a
one-hot row and n/4 for the uniform row.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Reduction = Literal["mean", "sum", "none"]
PENALTIES = ("frank", "entropy", "none")
# measured on digits (docs/routing.md): strong enough to make 95%+ of rows confident, balanced enough
# that no expert starves
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 2.0
BALANCES = ("entropy", "switch", "none")

ONE_CLASS_MESSAGE = (
    "a softmax over 1 output always says 'class 0' (its probability is 1 whatever the input), so "
    "there is nothing to route or penalise; use 2 outputs, or a 1-logit sigmoid router "
    "(router='sigmoid'), which is a 2-way softmax"
)


def check_temperature(value: float, what: str = "temperature") -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value}")
    return value


def check_routing_loss(penalty: str, alpha: float, balance: str, beta: float) -> None:
    """The routing-loss settings, checked in one place for nn.RoutingLoss and training recipes."""
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; choose one of {', '.join(PENALTIES)}")
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCES)}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _exponent(n: int) -> float:
    if n < 2:
        raise ValueError(ONE_CLASS_MESSAGE)
    return math.log(2.0) / math.log(n)


def _reduce(rows: "torch.Tensor", reduction: Reduction) -> "torch.Tensor":
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def _penalty_from_q(q: "torch.Tensor", alpha: float, dim: int, reduction: Reduction) -> "torch.Tensor":
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return alpha * _reduce((q - q * q).sum(dim=dim), reduction)


def confidence_penalty(probs: "torch.Tensor", alpha: float = 1.0, dim: int = -1,
                       reduction: Reduction = "mean") -> "torch.Tensor":
    """alpha * sum(q - q**2) per row, q = p**(log 2 / log n); reduced over rows.

    p**k with k < 1 has an infinite slope at p = 0, so p is clamped to the smallest normal number
    first: the gradient is finite everywhere (zero below the clamp).
    """
    import torch

    k = _exponent(probs.shape[dim])
    tiny = torch.finfo(probs.dtype).tiny
    q = torch.exp(k * torch.log(probs.clamp(min=tiny)))
    return _penalty_from_q(q, alpha, dim, reduction)


def confidence_penalty_from_logits(logits: "torch.Tensor", temperature: float = 1.0, alpha: float = 1.0,
                                   dim: int = -1, reduction: Reduction = "mean") -> "torch.Tensor":
    """The same value as `confidence_penalty(softmax(logits / T))`, computed in log space.

    q = exp(k * log_softmax(logits / T)) never takes a power of an underflowed probability, so the
    gradient stays finite and informative when probabilities are far below float precision.
    """
    import torch

    k = _exponent(logits.shape[dim])
    q = torch.exp(k * torch.log_softmax(logits / temperature, dim=dim))
    return _penalty_from_q(q, alpha, dim, reduction)


def entropy_penalty(logits: "torch.Tensor", temperature: float = 1.0, alpha: float = 1.0, dim: int = -1,
                    reduction: Reduction = "mean") -> "torch.Tensor":
    """alpha * Shannon entropy of each row, normalised by log n: the baseline users try first."""
    import torch

    n = logits.shape[dim]
    _exponent(n)
    logp = torch.log_softmax(logits / temperature, dim=dim)
    rows = -(logp.exp() * logp).sum(dim=dim) / math.log(n)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return alpha * _reduce(rows, reduction)


def routing_penalty(kind: str, logits: "torch.Tensor", temperature: float, alpha: float) -> "torch.Tensor":
    """Dispatch on a penalty name (frank | entropy | none)."""
    if kind == "frank":
        return confidence_penalty_from_logits(logits, temperature, alpha)
    if kind == "entropy":
        return entropy_penalty(logits, temperature, alpha)
    if kind == "none":
        return logits.new_zeros(())
    raise ValueError(f"unknown penalty {kind!r}; choose one of {', '.join(PENALTIES)}")


def _world() -> int:
    """The processes of an initialised torch.distributed group (1 without one)."""
    import torch

    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sum_over_ranks(tensor: "torch.Tensor") -> "torch.Tensor":
    """`tensor` summed over every process, the gradient summed over every process too (each rank's loss
    holds the same global term, and the ranks' gradients are averaged afterwards)."""
    import torch

    dist = torch.distributed

    class SumOverRanks(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            out = t.clone()
            dist.all_reduce(out)
            return out

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    return SumOverRanks.apply(tensor)


def batch_mean(probs: "torch.Tensor") -> "torch.Tensor":
    """The mean routing distribution over the whole batch: the mean of `probs` [..., n_experts] over every
    row of every process.

    Under torchrun (an initialised process group of 2 or more) the ranks' row sums and row counts are
    all-reduced, the sums with their gradient, so a balance term or the load guard sees the batch one
    process would see; on one process it is the plain mean over the rows.

    Args:
        probs: routing probabilities [..., n_experts].

    Returns:
        [n_experts].
    """
    rows = probs.reshape(-1, probs.shape[-1])
    if _world() < 2:
        return rows.mean(dim=0)
    import torch

    count = rows.new_tensor(float(len(rows)))
    torch.distributed.all_reduce(count)  # a constant: no gradient to carry
    return _sum_over_ranks(rows.sum(dim=0)) / count


def batch_share(index: "torch.Tensor", n: int, dtype: "torch.dtype") -> "torch.Tensor":
    """The share of the whole batch's rows (every process's) whose expert is `index` [rows], per expert;
    no gradient.

    Args:
        index: each row's expert.
        n: the number of experts.
        dtype: the result's dtype.

    Returns:
        [n].
    """
    import torch

    counts = torch.nn.functional.one_hot(index.reshape(-1), n).to(dtype)
    if _world() < 2:
        return counts.mean(dim=0)
    total = torch.cat([counts.sum(dim=0), counts.new_tensor([float(len(counts))])])
    torch.distributed.all_reduce(total)
    return total[:-1] / total[-1]


def batch_entropy_balance(probs: "torch.Tensor", dim: int = -1) -> "torch.Tensor":
    """log n - H(mean routing distribution over the batch): 0 when experts share traffic evenly.

    It asks the batch, not each row, to be spread out, so it does not fight the confidence penalty. Under
    torchrun the batch is every process's (batch_mean).
    """
    import torch

    n = probs.shape[dim]
    mean = batch_mean(probs.movedim(dim, -1))
    tiny = torch.finfo(probs.dtype).tiny
    return math.log(n) + (mean * torch.log(mean.clamp(min=tiny))).sum()


def switch_balance(probs: "torch.Tensor", dim: int = -1) -> "torch.Tensor":
    """Switch Transformer load balancing, E * sum_i f_i * P_i (1 when balanced).

    f_i (share of rows whose top-1 is i) carries no gradient; P_i is the mean router probability; both over
    the whole batch, every process's under torchrun (batch_share, batch_mean).
    """
    n = probs.shape[dim]
    f = batch_share(probs.argmax(dim=dim), n, probs.dtype)
    return n * (f * batch_mean(probs.movedim(dim, -1))).sum()


def load_guard(probs: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
    """KL(target || mean routing distribution over the batch): 0 when the batch's loads equal `target`.

    The balance term against given loads (those a model had before a fine-tune): an expert's term grows
    as -target_i * log(mean p_i), without bound as its load goes to 0, so an expert that carried traffic
    cannot be starved; an expert with target 0 is free. With a uniform target it is a log-barrier
    balance. Under torchrun the batch is every process's (batch_mean).

    Args:
        probs: routing probabilities [rows, n_experts].
        target: the loads to keep, [n_experts], >= 0, summing to 1.

    Returns:
        A scalar >= 0.

    Raises:
        ValueError: `target` does not have one entry per expert.
    """
    import torch

    if target.shape != probs.shape[-1:]:
        raise ValueError(f"load_guard: target has shape {list(target.shape)}, the routing has "
                         f"{probs.shape[-1]} experts")
    tiny = torch.finfo(probs.dtype).tiny
    mean = batch_mean(probs)
    target = target.to(device=probs.device, dtype=probs.dtype)
    return (target * (torch.log(target.clamp(min=tiny)) - torch.log(mean.clamp(min=tiny)))).sum()


def balance_loss(kind: str, probs: "torch.Tensor", beta: float) -> "torch.Tensor":
    """Dispatch on a balance name (entropy | switch | none)."""
    if beta < 0:
        raise ValueError(f"balance weight must be >= 0, got {beta}")
    if kind == "entropy":
        return beta * batch_entropy_balance(probs)
    if kind == "switch":
        return beta * switch_balance(probs)
    if kind == "none":
        return probs.new_zeros(())
    raise ValueError(f"unknown balance {kind!r}; choose one of {', '.join(BALANCES)}")


def gumbel_straight_through(logits: "torch.Tensor", temperature: float = 1.0,
                            generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """Hard one-hot samples (over the last axis) forward, soft Gumbel-softmax gradients backward."""
    import torch

    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
    soft = torch.softmax((logits + gumbel) / temperature, dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft
