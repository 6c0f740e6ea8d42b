"""PyTorch eager runner: the reference every exported backend is compared with."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploytool.errors import BadInput
from deploytool.runners import INPUT_NAME, OUTPUT_NAMES
from deploytool.runners.base import Runner, TensorMeta

if TYPE_CHECKING:
    from torch import nn

DISPATCHES = ("dense", "sparse")


def in_features_of(model: "nn.Module") -> int:
    """The feature count a model expects: its `in_features`, else that of its first Linear layer."""
    from torch import nn

    value = getattr(model, "in_features", None)
    if isinstance(value, int):
        return value
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return int(module.in_features)
    raise BadInput(f"cannot tell the input feature count of {type(model).__name__}; give in_features=")


def outputs_as_dict(result: Any) -> dict[str, Any]:
    """A model's forward result (RoutedOutput, tuple or a single tensor) keyed by OUTPUT_NAMES."""
    if isinstance(result, tuple):
        if len(result) > len(OUTPUT_NAMES):
            raise BadInput(f"the model returns {len(result)} outputs; expected at most {len(OUTPUT_NAMES)} "
                           f"({', '.join(OUTPUT_NAMES)})")
        return dict(zip(OUTPUT_NAMES, result))
    return {OUTPUT_NAMES[0]: result}


class TorchRunner(Runner):
    """Runs an eval-mode nn.Module, from a run directory or a module the caller built.

    While active the module is in eval mode and `dispatch` ("dense" | "sparse" | None for the model's
    own) applies to every RoutedExperts; both are restored afterwards, so a caller's module is left
    as it was given.
    """

    backend = "torch"

    def __init__(self, model: "str | Path | nn.Module", *, checkpoint: str | Path | None = None,
                 dispatch: str | None = None, device: str = "cpu", in_features: int | None = None,
                 name: str | None = None):
        super().__init__(name)
        if dispatch not in (None, *DISPATCHES):
            raise BadInput(f"unknown dispatch {dispatch!r}; choose dense or sparse")
        self.dispatch = dispatch
        self.device = device
        self.checkpoint = checkpoint
        self._module = None
        self._out_meta: list[TensorMeta] | None = None
        if isinstance(model, (str, Path)):
            from deploytool.training import load_run

            self.run_dir: Path | None = Path(model)
            config = load_run(model).config
            self._in_features = int(in_features or config["in_features"])
        else:
            self.run_dir = None
            self._module = model
            self._in_features = int(in_features or in_features_of(model))

    @property
    def model(self) -> "nn.Module":
        """The module (loaded from the run directory on first use)."""
        if self._module is None:
            from deploytool.training import load_model

            self._module = load_model(self.run_dir, self.checkpoint)
        return self._module

    def _meta(self, kind: str) -> list[TensorMeta]:
        if kind == "inputs":
            return [TensorMeta(INPUT_NAME, "float32", ("batch", self._in_features))]
        if self._out_meta is None:  # outputs: one forward of a zero row tells names, dtypes and shapes
            was_active = self.is_active
            self.activate()
            try:
                result = self._infer({INPUT_NAME: np.zeros((1, self._in_features), np.float32)})
            finally:
                if not was_active:
                    self.deactivate()
            self._out_meta = [TensorMeta(k, v.dtype.name, ("batch", *v.shape[1:])) for k, v in result.items()]
        return self._out_meta

    def _activate(self) -> None:
        import torch

        from deploytool.nn import dispatch_mode

        self._was_training = self.model.training
        model = self.model.to(self.device).eval()
        self._torch = torch
        self._restore = contextlib.ExitStack()
        self._restore.enter_context(dispatch_mode(model, self.dispatch))
        self._dtype = next(model.parameters()).dtype

    def _deactivate(self) -> None:
        self._restore.close()
        self._module.train(self._was_training)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        try:
            x = feed[INPUT_NAME]
        except KeyError:
            raise BadInput(f"feed has {sorted(feed)}; the model's input is named {INPUT_NAME!r}") from None
        with torch.inference_mode():
            result = self._module(torch.as_tensor(x, dtype=self._dtype, device=self.device))
        return {k: v.detach().cpu().numpy() for k, v in outputs_as_dict(result).items()}
