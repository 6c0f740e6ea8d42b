"""Batch-size lists as users give them ("1,8,64" or a sequence): one parser for bench and serving."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deploytool.errors import BadInput


def check_batch_sizes(value: str | Sequence[Any], what: str = "batch sizes", *,
                      allow_empty: bool = False) -> list[int]:
    """Positive integers, each once, in the order given; anything else is BadInput naming `what`.

    Args:
        value: "1,8,64" or a sequence of sizes.
        what: how messages name them.
        allow_empty: accept no size at all.

    Returns:
        The sizes, each once (a repeat dropped), in the order given.

    Raises:
        BadInput: a size that is not a whole number >= 1, or none (unless allow_empty).
    """
    values = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in values:
        text = str(item).strip()
        if not text:
            continue
        if isinstance(item, bool) or not text.lstrip("+").isdigit() or int(text) < 1:
            raise BadInput(f"{what}: batch size must be a positive integer, got {text!r} (give e.g. 8,32)")
        out.append(int(text))
    if not out and not allow_empty:
        raise BadInput(f"{what}: give at least one batch size")
    return list(dict.fromkeys(out))
