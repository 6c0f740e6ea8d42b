"""One Runner per backend (Polygraphy-style); parity, bench, demo and serve loop over runners."""

from deploytool.runners.base import Runner, TensorMeta

__all__ = ["Runner", "TensorMeta"]
