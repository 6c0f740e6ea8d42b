"""Sparse dispatch as a traceable graph: what an exported model runs so only the chosen expert computes.

`exported_sparse` is called by RoutedExperts under torch.onnx export with dispatch="sparse". It
lowers to standard ONNX ops only (Equal, NonZero, Gather, Concat, ScatterND: no contrib ops), so
every runtime runs it, and an expert with no rows costs one NonZero and a few empty ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def exported_sparse(x: torch.Tensor, index: torch.Tensor, run_expert: Callable[[int, torch.Tensor], torch.Tensor],
                    n_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each row of `x [rows, ...]` through its chosen experts only; returns `[rows, ...expert output]`.

    Args:
        x: the rows.
        index: `[rows]` (one expert per row) or `[rows, k]` (k experts per row, a top-k router).
        run_expert: `run_expert(e, rows_of_x)` -> expert e's output on those rows.
        n_experts: how many experts there are.
        weights: `[rows, k]` combine weights of a top-k router (None: each row takes its expert's output
            as it is).

    Returns:
        The outputs, each row the weighted sum of its experts' outputs.

    Each expert finds its (row, slot) pairs with its own NonZero, gathers its rows and runs on them; the
    outputs are concatenated and scattered back to their (row, slot) places by one ScatterND, and a
    row's k slots summed. Of
    the lowerings measured on ONNX Runtime CPU (docs/benchmarks.md: one argsort or one NonZero over
    [E, rows] with data-dependent slices, a counting sort by CumSum, a ScatterND per expert), this one is
    as fast as any at 4096 rows and the fastest at 64 (fewest nodes), and it needs no unbacked-size
    slicing: every size comes from a NonZero's output shape.
    """
    k = 1 if index.dim() == 1 else int(index.shape[-1])
    slots = [torch.nonzero(index.reshape(-1) == e).squeeze(1) for e in range(n_experts)]
    rows = slots if k == 1 else [s // k for s in slots]
    ys = [run_expert(e, x.index_select(0, r)) for e, r in enumerate(rows)]
    if weights is not None:
        flat = weights.reshape(-1)
        ys = [y * flat.index_select(0, s).reshape(-1, *([1] * (y.dim() - 1))).to(y.dtype) for y, s in zip(ys, slots)]
    y = torch.cat(ys)
    # every (row, slot) pair is written exactly once, then a row's k slots are summed: a scatter that
    # adds into repeated rows races in ONNX Runtime's parallel ScatterND (47 of 4096 tokens wrong, measured)
    out = y.new_empty((x.shape[0] * k, *y.shape[1:])).index_put((torch.cat(slots),), y)
    return out if k == 1 else out.reshape(x.shape[0], k, *y.shape[1:]).sum(dim=1)


#: ONNX Runtime's fused MoE contrib op (com.microsoft::MoE, CPU and CUDA)
ORT_MOE = "com.microsoft::MoE"


def exported_ort_moe(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, n_experts: int,
                     fc1: torch.Tensor, fc1_bias: torch.Tensor | None, fc2: torch.Tensor,
                     fc2_bias: torch.Tensor | None, attrs: dict) -> torch.Tensor:
    """The chosen experts of `x [rows, H]` as one `com.microsoft::MoE` node of ONNX Runtime.

    The op routes by itself (softmax, top-k, renormalise), so it is handed the decision already made:
    routing logits `log w` at the chosen experts and -inf elsewhere, whose renormalised softmax is
    `w / sum(w)`; the output times `sum(w)` is then exactly `sum_j w_j expert_j(x)`, whatever the router's
    combine weights and scale.

    Args:
        x: the rows.
        index: `[rows, k]` chosen experts.
        weights: `[rows, k]` their combine weights (> 0).
        n_experts: how many experts.
        fc1: `[E, 2I, H]` (gate and up interleaved) or `[E, I, H]`, ONNX Runtime's layout.
        fc1_bias: `[E, 2I]` or None.
        fc2: `[E, H, I]`.
        fc2_bias: `[E, H]` or None.
        attrs: the op's activation attributes (activation_type, swiglu_fusion, alpha, beta, limit).

    Returns:
        `[rows, H]`.
    """
    logits = torch.full((x.shape[0], n_experts), float("-inf"), dtype=x.dtype, device=x.device)
    logits = logits.scatter(1, index, torch.log(weights.to(x.dtype).clamp_min(1e-30)))
    y = torch.onnx.ops.symbolic(ORT_MOE, (x, logits, fc1, fc1_bias, fc2, fc2_bias),
                                {"k": int(index.shape[-1]), "normalize_routing_weights": 1, **attrs},
                                dtype=x.dtype, shape=x.shape, version=1)
    return y * weights.sum(dim=-1, keepdim=True).to(x.dtype)
