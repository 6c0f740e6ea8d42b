"""The torch implementations of the ops; under `torch.onnx.export` they become custom nodes.

Outside export they are plain, differentiable torch. During export each call is recorded as one node
in domain `deploytool` (the export step attaches the ONNX function bodies afterwards), so the graph
shows the routing step as the ops the rest of the toolchain knows.

torch.onnx's dynamo export first captures with non-strict torch.export, which runs this Python and
sees `is_in_onnx_export()` as True. Its strict (TorchDynamo) fallback traces the check as False and
records plain softmax/argmax instead; deploytool.export.onnx refuses such a graph. The temperature is
a Python float (Router keeps it so), which becomes the node's attribute.
"""

from __future__ import annotations

import torch

from deploytool.ops import DOMAIN, HARD_SELECT, TEMPERED_SOFTMAX, VERSION


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) over the last axis, the max subtracted before the division.

    Args:
        logits: [..., E].
        temperature: > 0.

    Returns:
        The probs, in the dtype of logits.
    """
    if _exporting():
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{TEMPERED_SOFTMAX}", (logits,), {"temperature": float(temperature)},
            dtype=logits.dtype, shape=logits.shape, version=VERSION,
        )
    # written out: torch's CPU softmax over a short last axis measured 390 us at [4096, 8] against
    # 83 us for these four ops. The max goes first: the shifted logits are <= 0, so dividing them by a
    # small temperature cannot overflow (fp16 1400 / 0.02 would be inf, and inf - inf NaN)
    shifted = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    e = shifted.exp()
    return e / e.sum(dim=-1, keepdim=True)


def hard_select(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-hot mask in probs' dtype, int64 index of the top-1); ties go to the lowest index."""
    if _exporting():
        mask, index = torch.onnx.ops.symbolic_multi_out(
            f"{DOMAIN}::{HARD_SELECT}", (probs,), {},
            dtypes=(probs.dtype, torch.int64), shapes=(probs.shape, probs.shape[:-1]), version=VERSION,
        )
        return mask, index
    index = probs.argmax(dim=-1)
    mask = torch.nn.functional.one_hot(index, probs.shape[-1]).to(probs.dtype)
    return mask, index
