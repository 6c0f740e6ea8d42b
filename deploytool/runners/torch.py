"""PyTorch eager runner: the reference every exported backend is compared with."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool.artifacts import HFFolder, RunDir
from deploytool.checkpoints import open_module
from deploytool.choices import DISPATCHES
from deploytool.errors import BadInput
from deploytool.runners.base import Runner
from deploytool.signature import BATCH, ModelSignature

if TYPE_CHECKING:
    from torch import nn



class TorchRunner(Runner):
    """Runs an eval-mode nn.Module, from a run directory, a Hugging Face folder or a module the caller built.

    Outputs are the model's own (named as export names them) plus every router's index and probs.
    While active the module is in eval mode and `dispatch` ("dense" | "sparse" | None for the model's
    own) applies to every RoutedExperts; both are restored afterwards, so a caller's module is left
    as it was given. A module needs `example_inputs` (a run directory knows its own).
    """

    backend = "torch"

    def __init__(self, model: "str | Path | nn.Module", *, checkpoint: str | Path | None = None,
                 dispatch: str | None = None, device: str = "cpu", example_inputs: Any = None,
                 output_names: Sequence[str] | None = None,
                 dynamic_dims: Mapping[str, Mapping[int, str]] | None = None, name: str | None = None,
                 top_k: int | None = None):
        super().__init__(name)
        if dispatch not in (None, *DISPATCHES):
            raise BadInput(f"unknown dispatch {dispatch!r}; choose {' or '.join(DISPATCHES)}")
        self.dispatch = dispatch
        self.device = device
        self.checkpoint = checkpoint
        self.output_names = output_names
        self.dynamic_dims = dynamic_dims
        self._module = None
        self._named = None
        if isinstance(model, (str, Path, RunDir, HFFolder)):  # a path, or a run or folder already read
            source = open_module(model, checkpoint=checkpoint, top_k=top_k)
            self.run_dir: Path | None = source.path
            self._module = source.module
            self._example = example_inputs if example_inputs is not None else source.example_inputs
            if dynamic_dims is None and source.dynamic_dims:
                self.dynamic_dims = {n: {0: BATCH, **axes} for n, axes in source.dynamic_dims.items()}
        else:
            if example_inputs is None:
                raise BadInput(f"a {type(model).__name__} module needs example inputs (example_inputs=) to tell "
                               "its input names and shapes")
            self.run_dir = None
            self._module = model
            self._example = example_inputs

    @property
    def model(self) -> "nn.Module":
        """The module (rebuilt from the run directory or Hugging Face folder when the runner was made)."""
        return self._module

    @property
    def named(self):
        """The module wrapped as named inputs -> named outputs (deploytool.model_io.NamedModule)."""
        if self._named is None:
            from deploytool.model_io import NamedModule, as_named_inputs

            example = as_named_inputs(self.model, self._example)
            self._named = NamedModule(self.model, list(example), output_names=self.output_names,
                                      keyword=isinstance(self._example, Mapping))
            self._example_tensors = example
        return self._named

    def _signature(self) -> ModelSignature:
        from deploytool.model_io import module_signature
        from deploytool.nn import dispatch_mode, routing_mode

        named = self.named
        was_training = self.model.training
        try:
            self.model.eval()
            with routing_mode(self.model, "hard"), dispatch_mode(self.model, self.dispatch):
                return module_signature(named, self._example_tensors, dynamic=self.dynamic_dims)
        finally:
            self.model.train(was_training)

    def _activate(self) -> None:
        import torch

        from deploytool.nn import dispatch_mode

        self._was_training = self.model.training
        model = self.model.to(self.device).eval()
        self._torch = torch
        self._restore = contextlib.ExitStack()
        self._restore.enter_context(dispatch_mode(model, self.dispatch))
        self._names = list(self.signature.input_names)

    def _deactivate(self) -> None:
        self._restore.close()
        self._module.train(self._was_training)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        missing = [n for n in self._names if n not in feed]
        if missing:
            raise BadInput(f"feed has {sorted(feed)}; the model's inputs are {self._names}")
        with torch.inference_mode():
            result = self._named.named(*(torch.as_tensor(feed[n], device=self.device) for n in self._names))
        return {k: v.detach().cpu().numpy() for k, v in result.items()}
