"""Float64 NumPy semantics of TemperedSoftmax and HardSelect: the single source of truth."""

from __future__ import annotations

import numpy as np


def tempered_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, max-subtracted, in float64.

    Args:
        logits: [..., E].
        temperature: > 0.

    Returns:
        The probs, float64.

    Raises:
        ValueError: a temperature that is not > 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    with np.errstate(invalid="ignore", over="ignore"):
        z = z - np.max(z, axis=-1, keepdims=True)
        e = np.exp(z)
        return e / np.sum(e, axis=-1, keepdims=True)


def hard_select(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(one-hot mask in the dtype of probs, int64 index); ties go to the lowest index."""
    probs = np.asarray(probs)
    index = np.argmax(probs, axis=-1).astype(np.int64)
    mask = np.zeros_like(probs)
    np.put_along_axis(mask, index[..., None], 1, axis=-1)
    return mask, index


def tempered_softmax_select(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The fused op: (probs float64, index int64).

    Args:
        logits: [..., E].
        temperature: > 0.

    Returns:
        (probs, index).
    """
    probs = tempered_softmax(logits, temperature)
    return probs, hard_select(probs)[1]


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row: how far a row is from a routing tie."""
    top = np.sort(np.asarray(probs, dtype=np.float64), axis=-1)
    return top[..., -1] - top[..., -2]
