"""The fused routing op: tempered softmax and top-1 in one pass, as one torch op.

`tempered_softmax_select(logits, T)` equals `TemperedSoftmax` followed by `HardSelect`
(deploytool.ops). It is registered as the custom op `deploytool::tempered_softmax_select`, so
torch.compile and torch.export see a single node. CUDA tensors run the Triton kernel
(deploytool.kernels.triton_kernel); CPU tensors run plain torch, or the kernel in Triton's interpreter
when the process was started with TRITON_INTERPRET=1. Triton is imported only on those paths.
"""

from __future__ import annotations

import os

import torch

from deploytool.deps import require
from deploytool.errors import BadInput

OP_NAME = "deploytool::tempered_softmax_select"
INDEX_DTYPES = (torch.int32, torch.int64)


def torch_tempered_softmax_select(logits: torch.Tensor, temperature: float,
                                  index_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch with the kernel's numerics: float32 softmax, top-1 of the probs as stored.

    Args:
        logits: [..., E] float32, float16 or bfloat16.
        temperature: the softmax temperature, > 0.
        index_dtype: torch.int64 or torch.int32.

    Returns:
        (probs in the dtype of logits, index).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1).to(logits.dtype)
    return probs, probs.argmax(dim=-1).to(index_dtype)


def _uses_kernel(logits: torch.Tensor) -> bool:
    return logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _kernel(logits: torch.Tensor, temperature: float, index_dtype: torch.dtype):
    require("triton", "the fused tempered-softmax kernel")
    from deploytool.kernels import triton_kernel

    rows = logits.reshape(-1, logits.shape[-1])
    probs, index = triton_kernel.launch(rows, temperature, index_dtype)
    return probs.reshape(logits.shape), index.reshape(logits.shape[:-1])


@torch.library.custom_op(OP_NAME, mutates_args=())
def _op(logits: torch.Tensor, temperature: float, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if _uses_kernel(logits):
        return _kernel(logits, temperature, index_dtype)
    return torch_tempered_softmax_select(logits, temperature, index_dtype)


@_op.register_fake
def _(logits: torch.Tensor, temperature: float, index_dtype: torch.dtype):
    return torch.empty_like(logits), logits.new_empty(logits.shape[:-1], dtype=index_dtype)


def tempered_softmax_select(logits: torch.Tensor, temperature: float,
                            index_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [..., E] in the dtype of logits, index [...] int64 or int32) in one pass over each row.

    Args:
        logits: [..., E] float32, float16 or bfloat16, E >= 2.
        temperature: the softmax temperature, > 0.
        index_dtype: torch.int64 or torch.int32.

    Returns:
        (probs, index).

    Raises:
        BadInput: a dtype, shape, temperature or index dtype the kernel does not take.
    """

    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise BadInput(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise BadInput(f"logits need a last axis of at least 2 experts, got shape {tuple(logits.shape)}")
    if index_dtype not in INDEX_DTYPES:
        raise BadInput(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    temperature = float(temperature)
    if not 0 < temperature < float("inf"):
        raise BadInput(f"temperature must be a finite number > 0, got {temperature}")
    return _op(logits, temperature, index_dtype)
