"""Top-k routing and fused experts: the blocks the MoE language models people ship are made of.

One `TopKRule` says how a router scores experts (softmax or sigmoid), which it picks (top-k, an
optional selection bias that picks without entering the weights, optionally only within the best
groups of experts) and how it weighs them (1, the probability, or the top-k renormalised
probabilities, times a scale). `TopKRouting` runs that rule over a linear router's weights and
`FusedExpertsDispatch` runs experts stored as fused 3-D weights `[E, out, in]` in place, densely or
only on the rows routed to each; both follow the call convention transformers 5.x uses between its
routers and experts, so `deploytool.hf` converts a model's blocks by giving their router and experts
modules these behaviours without touching their weights or their block's code. `TopKRouter`,
`FusedExperts` and `MoEBlock` are the same behaviours as modules of your own.

At k = 1 the pick is `HardSelect` and a softmax score is `TemperedSoftmax` (deploytool's ops, custom
nodes under export); k > 1 uses standard TopK.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from deploytool.dispatch import MoELayout, decision_logits, exported_experts, exported_sparse
from deploytool.losses import check_temperature
from deploytool.nn import DISPATCHES, RouterOutput, RoutingLoss
from deploytool.ops.functional import hard_select, tempered_softmax

SCORINGS = ("softmax", "sigmoid")
#: combine weights of the chosen experts: 1 each, their probability, or their probabilities renormalised
COMBINES = ("one", "prob", "renorm")
#: how a group of experts scores when a router picks only within the best groups
GROUP_SCORES = ("top2", "max")
#: the most experts a token may be routed to
MAX_TOP_K = 64


@dataclass(frozen=True)
class TopKRule:
    """How a top-k router turns logits into chosen experts and their combine weights.

    Attributes:
        k: experts per position (1: one decision, `HardSelect`).
        scoring: "softmax" (probabilities over experts) or "sigmoid" (an independent score each).
        combine: "one", "prob" or "renorm" (the chosen probabilities divided by their sum).
        scale: a factor on every combine weight (DeepSeek's routed_scaling_factor).
        groups: (n_group, topk_group): experts are split into n_group equal groups and picked only from
            the topk_group best groups; None picks from all.
        group_score: how a group scores: the sum of its two best ("top2", DeepSeek-V3) or its best ("max").
    """

    k: int = 1
    scoring: str = "softmax"
    combine: str = "renorm"
    scale: float = 1.0
    groups: tuple[int, int] | None = None
    group_score: str = "top2"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= MAX_TOP_K:
            raise ValueError(f"top-k must be a whole number from 1 to {MAX_TOP_K}, got {self.k!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be {' or '.join(SCORINGS)}, got {self.scoring!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        check_temperature(self.scale, "routing scale")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group score must be {' or '.join(GROUP_SCORES)}, got {self.group_score!r}")

    def with_k(self, k: int) -> TopKRule:
        """The same rule choosing `k` experts."""
        return replace(self, k=k)

    def choose(self, logits: torch.Tensor, temperature: float, selection_bias: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [N, E], index [N, k] int64, combine weights [N, k]) of `logits [N, E]`."""
        if self.scoring == "softmax":
            probs = tempered_softmax(logits, temperature)
        else:
            probs = torch.sigmoid(logits / temperature)
        choice = probs if selection_bias is None else probs + selection_bias.to(probs.dtype)
        if self.groups is not None and self.groups[1] < self.groups[0]:
            choice = _within_best_groups(choice, *self.groups, self.group_score)
        if self.k == 1:
            index = hard_select(choice)[1].unsqueeze(-1)
        else:
            index = torch.topk(choice, self.k, dim=-1).indices
        if self.combine == "one" or (self.combine == "renorm" and self.k == 1):  # at k = 1, p / p is exactly 1
            weights = torch.ones(index.shape, dtype=probs.dtype, device=probs.device)
        else:
            weights = probs.gather(-1, index)
            if self.combine == "renorm":
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scale != 1.0:
            weights = weights * self.scale
        return probs, index, weights


def _within_best_groups(choice: torch.Tensor, n_group: int, topk_group: int, how: str) -> torch.Tensor:
    """`choice` with every expert outside the `topk_group` best of `n_group` groups set to -inf."""
    n, e = choice.shape
    grouped = choice.reshape(n, n_group, e // n_group)
    score = grouped.topk(2, dim=-1).values.sum(dim=-1) if how == "top2" else grouped.amax(dim=-1)
    keep = torch.zeros_like(score).scatter(1, score.topk(topk_group, dim=-1).indices, 1.0)
    mask = keep.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
    return choice.masked_fill(mask == 0, float("-inf"))


def tensor_at(module: nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer at dotted `path` inside `module` (e.g. "wg.weight")."""
    owner, _, name = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


class TopKRouting:
    """The routing behaviour of a top-k router module (a mixin over an nn.Module).

    The module keeps its weights where they are: `routing_parts` names the router's linear weight
    `[E, H]`, its bias `[E]` and a selection bias `[E]` by their paths inside the module (None: absent).
    `forward(hidden [..., H])` returns `(logits [N, E], combine weights [N, k], index [N, k])` over the
    N flattened positions, the convention transformers' MoE blocks call their routers with, and keeps
    the decisions over the positions (`positions`, set by the block, else the input's leading dims)
    as `last_routing` for deploytool to record: index `[...]` at k = 1 (one decision per position, as
    every deploytool router), `[..., k]` above. In training it records its routing loss.
    """

    deploytool_router = True
    rule: TopKRule
    routing_parts: tuple[str, str | None, str | None]
    temperature: float
    loss: RoutingLoss | None
    routing_loss: torch.Tensor | None
    last_routing: RouterOutput | None
    positions: tuple[int, ...] | None

    def init_routing(self, rule: TopKRule, parts: tuple[str, str | None, str | None], *,
                     temperature: float = 1.0, loss: RoutingLoss | None = None) -> None:
        """Give this module its rule and where its weights are (called once, by the constructor or hf)."""
        self.rule = rule
        self.routing_parts = parts
        self.temperature = check_temperature(temperature)
        self.loss = loss
        self.routing_loss = None
        self.last_routing = None
        self.positions = None

    @property
    def n_experts(self) -> int:
        return int(self._part(self.routing_parts[0]).shape[0])

    @property
    def k(self) -> int:
        return self.rule.k

    def set_temperature(self, value: float) -> None:
        self.temperature = check_temperature(value)

    def set_top_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_experts:
            raise ValueError(f"top-k must be a whole number from 1 to the router's {self.n_experts} experts, "
                             f"got {k!r}")
        self.rule = self.rule.with_k(k)

    def _part(self, path: str | None) -> torch.Tensor | None:
        return None if path is None else tensor_at(self, path)

    def forward(self, hidden_states: torch.Tensor):
        weight, bias, selection_bias = (self._part(p) for p in self.routing_parts)
        lead = tuple(self.positions) if self.positions is not None else tuple(hidden_states.shape[:-1])
        flat = hidden_states.reshape(-1, weight.shape[1])
        # routing in fp32 whatever the model's dtype: a bf16 logit rounds ties that fp32 tells apart
        logits = F.linear(flat.float(), weight.float(), None if bias is None else bias.float())
        probs, index, weights = self.rule.choose(logits, self.temperature, selection_bias)
        n = logits.shape[-1]
        decision = index.reshape(*lead) if self.rule.k == 1 else index.reshape(*lead, self.rule.k)
        self.last_routing = RouterOutput(logits.reshape(*lead, n), probs.reshape(*lead, n), decision)
        if self.training and self.loss is not None:
            self.routing_loss = self.loss(RouterOutput(logits, probs, index), self.temperature)
        return logits.to(hidden_states.dtype), weights.to(hidden_states.dtype), index

    def extra_repr(self) -> str:
        r = self.rule
        return (f"k={r.k}, scoring={r.scoring}, combine={r.combine}, scale={r.scale:g}, groups={r.groups}, "
                f"temperature={self.temperature:g}")


class TopKRouter(TopKRouting, nn.Module):
    """A linear top-k router of your own: `TopKRouter(hidden, n_experts, rule=TopKRule(k=2))`.

    Args:
        in_features: the width of what it routes on.
        n_experts: how many experts it chooses among (>= 2).
        rule: how it scores, picks and weighs (default: top-1, softmax, weight 1).
        bias: whether its linear map has a bias.
        selection_bias: whether it has a selection bias (a buffer, zeros until set).
        temperature: the softmax (or sigmoid) temperature.
        loss: the routing losses training adds (None: none).
    """

    def __init__(self, in_features: int, n_experts: int, *, rule: TopKRule = TopKRule(), bias: bool = False,
                 selection_bias: bool = False, temperature: float = 1.0, loss: RoutingLoss | None = None):
        super().__init__()
        if n_experts < 2:
            raise ValueError(f"a router chooses among at least 2 experts, got n_experts={n_experts}")
        if rule.k > n_experts:
            raise ValueError(f"top-{rule.k} of {n_experts} experts: k must be at most the expert count")
        self.weight = nn.Parameter(torch.empty(n_experts, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_experts)) if bias else None
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(n_experts))
        self.init_routing(rule, ("weight", "bias" if bias else None, "selection_bias" if selection_bias else None),
                          temperature=temperature, loss=loss)


#: the activations fused experts of your own may use; the clamped SwiGLU is GPT-OSS's
ACTIVATIONS = ("silu", "gelu", "relu")
#: the plain activations ONNX Runtime's MoE op computes as torch does (its GELU is an approximation)
OP_ACTIVATIONS = ("silu", "relu")


class FusedExpertsDispatch:
    """The dispatch behaviour of an experts module whose weights are fused `[E, ...]` tensors (a mixin).

    It reads the attributes transformers' `@use_experts_implementation` gives such a module:
    `gate_up_proj` (or `up_proj` when `has_gate` is False) and `down_proj`, their `_bias` tensors when
    `has_bias`, `is_transposed` (`[E, in, out]` rather than `[E, out, in]`), `_apply_gate` (split,
    activate and multiply: concatenated or interleaved gate/up, GPT-OSS's clamp), `act_fn`, and an
    optional `post_expert_norm`. Each expert uses its slice of the fused weights in place (a view, no
    copy). `forward(hidden [N, H], index [N, k], weights [N, k])` returns `[N, H]`: "sparse" dispatch
    runs each expert only on its rows, "dense" runs every expert on every row and weighs by a mask.
    """

    deploytool_experts = True
    dispatch: str
    #: under export: "ort"/"auto" emit ONNX Runtime's fused MoE op with `moe_layout` (both set for the
    #: export's duration by nn.moe_op_mode); None or "deploytool" use `dispatch`
    moe_op: str | None = None
    moe_layout: MoELayout | None = None

    def ort_moe_layout(self) -> MoELayout | None:
        """These experts in the MoE op's layout (constants: copies where the layout differs), or None
        where the op cannot compute them (a post-expert norm, a gated activation other than SiLU or
        GPT-OSS's clamped SwiGLU, a plain activation other than ReLU or SiLU: the op's GELU is not torch's
        exact one)."""
        if getattr(self, "has_post_expert_norm", False):
            return None
        t = (lambda w: w.transpose(1, 2)) if self.is_transposed else (lambda w: w)
        up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
        down = t(self.down_proj)
        down_bias = self.down_proj_bias if self.has_bias else None
        if not self.has_gate:
            kind = _activation_name(self.act_fn)
            if kind not in OP_ACTIVATIONS:
                return None
            return _layout({"activation_type": kind}, t(self.up_proj), up_bias, down, down_bias)
        up = t(self.gate_up_proj)
        clamped = hasattr(self, "limit") and hasattr(self, "alpha")  # GPT-OSS: (up + 1) * g * sigmoid(alpha g)
        if clamped and not getattr(self, "is_concatenated", True):
            attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": float(self.alpha),
                     "activation_beta": 1.0, "swiglu_limit": float(self.limit)}
            return _layout(attrs, up, up_bias, down, down_bias)
        if clamped or _activation_name(getattr(self, "act_fn", None)) != "silu" or not _splits_gate_then_up(self):
            return None
        half = up.shape[1] // 2  # [gate; up] -> gate0, up0, gate1, up1, ...: the op's CPU layout
        interleave = lambda w: torch.stack((w[:, :half], w[:, half:]), dim=2).reshape(w.shape)  # noqa: E731
        attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0}
        return _layout(attrs, interleave(up), None if up_bias is None else interleave(up_bias), down, down_bias)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` on rows `x [n, H]`."""
        up = self.gate_up_proj if self.has_gate else self.up_proj
        up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
        h = _fused_linear(x, up[e], None if up_bias is None else up_bias[e], self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _fused_linear(h, self.down_proj[e], self.down_proj_bias[e] if self.has_bias else None, self.is_transposed)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        return h

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        n_experts = int(self.down_proj.shape[0])
        if self.dispatch == "dense":
            out = torch.zeros_like(hidden_states)
            for e in range(n_experts):
                w = (top_k_weights * (top_k_index == e).to(top_k_weights.dtype)).sum(dim=-1, keepdim=True)
                out = out + self.expert(e, hidden_states) * w.to(hidden_states.dtype)
            return out
        if torch.onnx.is_in_onnx_export():
            def op() -> torch.Tensor:
                logits, scale = decision_logits(top_k_index, top_k_weights.to(hidden_states.dtype), n_experts)
                return self.moe_layout.run(hidden_states, logits, top_k_index.shape[-1], scale)

            return exported_experts(hidden_states, moe_op=self.moe_op, layout=self.moe_layout, op=op,
                                    sparse=lambda: exported_sparse(hidden_states, top_k_index, self.expert,
                                                                   n_experts, top_k_weights))
        return _sparse_topk(hidden_states, top_k_index, top_k_weights, self.expert, n_experts)


def _layout(attrs: dict, fc1: torch.Tensor, fc1_bias: torch.Tensor | None, fc2: torch.Tensor,
            fc2_bias: torch.Tensor | None) -> MoELayout:
    """A MoELayout of detached contiguous copies: constants (initializers) in the traced graph, not ops
    that would copy the experts' weights again at every inference."""
    const = lambda t: None if t is None else t.detach().contiguous().clone()  # noqa: E731
    return MoELayout(attrs, const(fc1), const(fc1_bias), const(fc2), const(fc2_bias))


def _activation_name(act) -> str | None:
    """"relu", "gelu" or "silu" where `act` computes that function (told by its values, whatever its class)."""
    if not callable(act):
        return None
    known = getattr(act, "_deploytool_activation", False)
    if known is not False:  # told once, outside export (a traced allclose has no value)
        return known
    x = torch.linspace(-6, 6, 49)
    with torch.no_grad():
        y = act(x)
    name = next((name for name, fn in (("silu", F.silu), ("relu", F.relu), ("gelu", F.gelu))
                 if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y, fn(x), atol=1e-6)), None)
    try:
        act._deploytool_activation = name
    except AttributeError:
        pass
    return name


def _splits_gate_then_up(experts) -> bool:
    """Its gate is the plain split: [gate; up] -> act(gate) * up (transformers' default, or FusedExperts')."""
    gate = type(experts)._apply_gate
    return gate is FusedExperts._apply_gate or (getattr(gate, "__name__", "") == "_default_apply_gate"
                                                 and gate.__module__ == "transformers.integrations.moe")


def _fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ weight if transposed else F.linear(x, weight)
    return y if bias is None else y + bias


def _sparse_topk(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                 run_expert: Callable[[int, torch.Tensor], torch.Tensor], n_experts: int) -> torch.Tensor:
    """Eager sparse dispatch: (row, slot) pairs sorted by expert once, each expert on its contiguous slice."""
    k = index.shape[-1]
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    rows = order // k
    w = weights.reshape(-1).index_select(0, order).to(x.dtype)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n:
            r = rows[start:start + n]
            out.index_add_(0, r, run_expert(e, x.index_select(0, r)) * w[start:start + n, None])
        start += n
    return out


class FusedExperts(FusedExpertsDispatch, nn.Module):
    """Experts of your own as fused weights: E gated (SwiGLU-style) or plain two-layer MLPs.

    Args:
        n_experts: how many experts.
        hidden: their input and output width.
        intermediate: their inner width.
        activation: "silu", "gelu" or "relu".
        gated: act(x W_gate) * (x W_up), as SwiGLU; False: act(x W_up).
        bias: whether the projections have biases.
        dispatch: "sparse" or "dense".
        clamp: (alpha, limit) for GPT-OSS's clamped SwiGLU, (clamp(up, -limit, limit) + 1) * g *
            sigmoid(alpha * g) with g = min(gate, limit), gate and up interleaved; None: the plain gate.
    """

    def __init__(self, n_experts: int, hidden: int, intermediate: int, *, activation: str = "silu",
                 gated: bool = True, bias: bool = False, dispatch: str = "sparse",
                 clamp: tuple[float, float] | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be {' or '.join(DISPATCHES)}, got {dispatch!r}")
        if clamp is not None:
            if not gated:
                raise ValueError("the clamped SwiGLU is a gate: it needs gated=True")
            self.alpha, self.limit = (check_temperature(v, name) for v, name in zip(clamp, ("alpha", "limit")))
        self.is_concatenated = clamp is None  # GPT-OSS interleaves gate and up
        self.has_gate, self.has_bias, self.is_transposed = gated, bias, False
        self.act_fn = {"silu": nn.SiLU(), "gelu": nn.GELU(), "relu": nn.ReLU()}[activation]
        width = 2 * intermediate if gated else intermediate
        up = nn.Parameter(torch.randn(n_experts, width, hidden) / hidden ** 0.5)
        setattr(self, "gate_up_proj" if gated else "up_proj", up)
        self.down_proj = nn.Parameter(torch.randn(n_experts, hidden, intermediate) / intermediate ** 0.5)
        if bias:
            setattr(self, "gate_up_proj_bias" if gated else "up_proj_bias", nn.Parameter(torch.zeros(n_experts, width)))
            self.down_proj_bias = nn.Parameter(torch.zeros(n_experts, hidden))
        self.dispatch = dispatch

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        if not self.is_concatenated:
            gate, up = h[..., ::2].clamp(max=self.limit), h[..., 1::2].clamp(-self.limit, self.limit)
            return (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class MoEBlock(nn.Module):
    """A routed block of your own: `y = sum_k w_k expert_k(x) [+ gate(x) * shared(x)]` per token.

    Args:
        router: a TopKRouter.
        experts: a FusedExperts with as many experts.
        shared: an expert every token goes through (Qwen2-MoE, DeepSeek), or None.
        shared_gate: a module giving one logit per token; its sigmoid weighs `shared` (None: weight 1).
    """

    def __init__(self, router: TopKRouter, experts: FusedExperts, *, shared: nn.Module | None = None,
                 shared_gate: nn.Module | None = None):
        super().__init__()
        if router.n_experts != int(experts.down_proj.shape[0]):
            raise ValueError(f"the router chooses among {router.n_experts} experts, the experts module holds "
                             f"{int(experts.down_proj.shape[0])}")
        self.router, self.experts, self.shared, self.shared_gate = router, experts, shared, shared_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.router.positions = tuple(x.shape[:-1])
        flat = x.reshape(-1, x.shape[-1])
        _, weights, index = self.router(flat)
        y = self.experts(flat, index, weights)
        if self.shared is not None:
            s = self.shared(flat)
            y = y + (s if self.shared_gate is None else torch.sigmoid(self.shared_gate(flat)) * s)
        return y.reshape(x.shape)
