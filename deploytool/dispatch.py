"""Sparse dispatch as a traceable graph: what an exported model runs so only the chosen expert computes.

`exported_sparse` is called by RoutedExperts under torch.onnx export with dispatch="sparse". It
lowers to standard ONNX ops only (Equal, NonZero, Gather, Concat, ScatterND: no contrib ops), so
every runtime runs it, and an expert with no rows costs one NonZero and a few empty ops.
`MoELayout` is the other lowering, ONNX Runtime's fused `com.microsoft::MoE` (export's moe_op="ort"), and
`exported_by_rows` joins the two for moe_op="auto".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deploytool.choices import MOE_OP_NODES
from deploytool.ops import BY_ROWS, DOMAIN, ORT_DOMAIN, ORT_MOE_OP, VERSION


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


#: ONNX Runtime's fused MoE contrib op (CPU and CUDA)
ORT_MOE = f"{ORT_DOMAIN}::{ORT_MOE_OP}"
#: an `auto` export runs the MoE op below this many rows and deploytool's sparse graph from it on: on ONNX
#: Runtime CPU the op wins on small batches (fewer nodes) and loses on large ones (docs/benchmarks.md)
AUTO_MIN_ROWS = 128


@dataclass(frozen=True)
class MoELayout:
    """What `com.microsoft::MoE` needs to compute a set of experts, as constants made before tracing.

    Attributes:
        attrs: the op's activation attributes (activation_type, swiglu_fusion, activation_alpha, ...).
        fc1: `[E, I, H]` (or `[E, 2I, H]` gate and up interleaved), ONNX Runtime's layout.
        fc1_bias: `[E, I]` / `[E, 2I]`, or None.
        fc2: `[E, H, I]`.
        fc2_bias: `[E, H]`, or None.
        width: the experts' own input width when narrower than H (the rows are zero-padded to H), else None.
        out: the experts' own output width when narrower than H (the op's output is cut), else None.
        tail: elementwise modules the experts end with, run on the op's output (None: none).
    """

    attrs: dict
    fc1: torch.Tensor
    fc1_bias: torch.Tensor | None
    fc2: torch.Tensor
    fc2_bias: torch.Tensor | None
    width: int | None = None
    out: int | None = None
    tail: Callable[[torch.Tensor], torch.Tensor] | None = None

    def run(self, x: torch.Tensor, logits: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The chosen experts of `x [rows, width]` as one MoE node; `logits [rows, E]` are -inf but at the
        chosen experts (whose softmax is then the combine weights over `scale`).

        Args:
            x: the rows.
            logits: the routing logits the op softmaxes over its top `k`.
            k: experts per row.
            scale: `[rows, 1]` the output is multiplied by (the combine weights' sum), or None.

        Returns:
            `[rows, experts' output width]`.
        """
        hidden = int(self.fc1.shape[-1])
        if self.width is not None:
            x = torch.nn.functional.pad(x, (0, hidden - self.width))
        y = torch.onnx.ops.symbolic(ORT_MOE, (x, logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias),
                                    {"k": int(k), "normalize_routing_weights": 1, **self.attrs},
                                    dtype=x.dtype, shape=x.shape, version=1)
        if scale is not None:
            y = y * scale
        if self.out is not None:
            y = y[:, :self.out]
        return y if self.tail is None else self.tail(y)


def decision_logits(index: torch.Tensor, weights: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, scale) that make the MoE op compute a decision already made: `log w` at the chosen experts
    and -inf elsewhere, whose renormalised softmax is `w / sum(w)`; times `scale = sum(w)` the op's output
    is exactly `sum_j w_j expert_j(x)`, whatever the router's combine weights and scale.

    Args:
        index: `[rows, k]` chosen experts.
        weights: `[rows, k]` their combine weights (> 0).
        n_experts: how many experts.

    Returns:
        `[rows, E]` logits and `[rows, 1]` scale.
    """
    logits = torch.full((index.shape[0], n_experts), float("-inf"), dtype=weights.dtype, device=weights.device)
    logits = logits.scatter(1, index, torch.log(weights.clamp_min(1e-30)))
    return logits, weights.sum(dim=-1, keepdim=True)


def exported_by_rows(x: torch.Tensor, few: torch.Tensor, many: torch.Tensor, *, rows: int = AUTO_MIN_ROWS
                     ) -> torch.Tensor:
    """`few` where `x` has fewer than `rows` rows, else `many`: a deploytool::ByRows marker that export
    turns into an ONNX If (deploytool.export.by_rows), each lowering's own nodes moved into its branch.

    Args:
        x: the rows both lowerings compute on.
        few: the result of the lowering for small batches.
        many: the result of the lowering for large ones (same dtype and shape).
        rows: the first row count that takes `many`.

    Returns:
        A tensor like `few`.
    """
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{BY_ROWS}", (x, few, many), {"rows": int(rows)},
                                   dtype=few.dtype, shape=few.shape, version=VERSION)


def exported_experts(x: torch.Tensor, *, moe_op: str | None, layout: MoELayout | None,
                     op: Callable[[], torch.Tensor], sparse: Callable[[], torch.Tensor]) -> torch.Tensor:
    """An experts module's lowering under export, as its `moe_op` says.

    Args:
        x: the rows.
        moe_op: "ort" (the MoE op), "auto" (the MoE op below AUTO_MIN_ROWS rows, deploytool's sparse graph
            from there on), or anything else (deploytool's sparse graph).
        layout: the experts as the MoE op takes them, or None where it cannot compute them (sparse then).
        op: traces the MoE-op lowering.
        sparse: traces deploytool's sparse lowering.

    Returns:
        The experts' output.
    """
    if layout is None or moe_op not in MOE_OP_NODES:
        return sparse()
    y = op()
    return exported_by_rows(x, y, sparse()) if moe_op == "auto" else y
