"""The Runner interface: `with runner: outputs = runner.infer(feed)`.

Every backend (torch, onnxruntime, tensorrt) implements it, so callers never name a backend. Feeds and
outputs are dicts of NumPy arrays keyed by tensor name, as the model's signature names them; the
runner's `signature` says which those are and which outputs are which router's decisions. Backends
import their libraries in `activate`, never at module import.
"""

from __future__ import annotations

import abc

import numpy as np

from deploytool.signature import ModelSignature, TensorMeta


class Runner(abc.ABC):
    """Base of every backend runner.

    Subclasses implement `_activate`, `_deactivate`, `_infer` and `_signature` (available before
    activation where the backend allows). `activate` loads the model (session, engine); `infer` may
    only be called while active.
    """

    #: backend name as the CLI spells it ("torch", "onnxruntime", "tensorrt", ...)
    backend: str = ""
    #: the dtype the model computes in when it is coarser than its outputs' (an fp32-interface
    #: engine lowered to fp16); parity checks take their default tolerance from it
    compute_dtype: str | None = None

    def __init__(self, name: str | None = None):
        self.name = name or self.backend
        self.is_active = False
        self._cached_signature: ModelSignature | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def activate(self) -> None:
        """Load the model (session, engine, module on its device); a no-op when active."""
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        """Release what `activate` loaded; a no-op when inactive."""
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # --- inference ---------------------------------------------------------------------------
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one feed.

        Args:
            feed: arrays keyed by input name.

        Returns:
            {output name: array}, every router's index and probs included.

        Raises:
            RuntimeError: the runner is not active.
        """
        if not self.is_active:
            raise RuntimeError(f"{self.name} runner is not active; use `with runner:` or call activate()")
        return self._infer(feed)

    @property
    def signature(self) -> ModelSignature:
        """Inputs, outputs and routers of the model this runner runs (read once)."""
        if self._cached_signature is None:
            self._cached_signature = self._signature()
        return self._cached_signature

    @property
    def input_bounds(self) -> dict[str, int]:
        """{integer input: how many ids it takes} where the model says: the vocabulary its signature records
        (a Hugging Face model's token ids), {} when it records none."""
        return dict(self.signature.vocab)

    @property
    def inputs(self) -> list[TensorMeta]:
        """The model's inputs (from its signature)."""
        return list(self.signature.inputs)

    @property
    def outputs(self) -> list[TensorMeta]:
        """The model's outputs (from its signature)."""
        return list(self.signature.outputs)

    @abc.abstractmethod
    def _signature(self) -> ModelSignature:
        """The model's signature, available before activation where possible."""

    @abc.abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        """Release sessions and buffers; the default holds nothing."""

    @abc.abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
