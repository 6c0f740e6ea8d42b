"""Sparse dispatch as a traceable graph: what an exported model runs so only the chosen expert computes.

`exported_sparse` is called by RoutedExperts under torch.onnx export with dispatch="sparse".
"""

from __future__ import annotations

import torch
from torch import nn


def exported_sparse(x: torch.Tensor, index: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Each row of `x [rows, ...]` through expert `index[row]` only, written with ops ONNX export keeps.

    Placeholder: every expert runs and a one-hot mask selects (the dense graph) until the sparse
    lowering lands.
    """
    mask = torch.nn.functional.one_hot(index, len(experts)).to(x.dtype)
    out = None
    for e, expert in enumerate(experts):
        y = expert(x)
        term = mask[:, e].reshape(-1, *([1] * (y.dim() - 1))) * y
        out = term if out is None else out + term
    return out
