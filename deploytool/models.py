"""Built-in routed architectures, built from a plain config dict (what config.json stores)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from deploytool.errors import BadInput
from deploytool.nn import RoutedExperts, Router, RoutingLoss


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RoutedMLP(nn.Module):
    """[shared trunk] + router + E expert MLPs + linear head; input [B, features], returns the class logits.

    The optional trunk (a Linear + ReLU of width `trunk`) learns from every sample, so experts that each
    see a share of the data still start from good features.
    """

    def __init__(self, in_features: int, n_classes: int, n_experts: int = 4, expert_hidden: int = 64,
                 width: int = 32, router_hidden: int = 0, trunk: int = 0, temperature: float = 1.0,
                 router: str = "softmax", dispatch: str = "dense", loss: RoutingLoss | None = None):
        super().__init__()
        self.in_features = in_features
        self.trunk = nn.Sequential(nn.Linear(in_features, trunk), nn.ReLU()) if trunk else nn.Identity()
        features = trunk or in_features
        experts = [_mlp([features, expert_hidden, width]) for _ in range(n_experts)]
        self.routed = RoutedExperts(Router(features, n_experts, temperature, router, router_hidden),
                                    [nn.Sequential(e, nn.ReLU()) for e in experts], dispatch, loss)
        self.head = nn.Linear(width, n_classes)

    @staticmethod
    def input_shape(in_features: int) -> tuple[int, ...]:
        """One sample's shape, from the data set's feature count."""
        return (in_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.routed(self.trunk(x)).output)


MODELS = {"routed-mlp": RoutedMLP}

# config.json keys that become constructor arguments
ARCH_KEYS = ("in_features", "n_classes", "n_experts", "expert_hidden", "width", "router_hidden", "trunk",
             "temperature", "router", "dispatch")


#: the name of a built-in model's input (its forward's parameter)
INPUT_NAME = "x"


def input_shape(config: dict[str, Any]) -> tuple[int, ...]:
    """One sample's shape for the run config's model (a data set row is reshaped to it)."""
    name = config.get("model")
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")
    return MODELS[name].input_shape(int(config["in_features"]))


def example_inputs(config: dict[str, Any], batch: int = 2) -> dict[str, np.ndarray]:
    """Zero inputs of the run config's model, keyed by input name (what a signature is traced on)."""
    return {INPUT_NAME: np.zeros((batch, *input_shape(config)), np.float32)}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its config (`config["model"]` names the architecture)."""
    name = config.get("model")
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")
    kwargs = {k: config[k] for k in ARCH_KEYS if k in config}
    loss = RoutingLoss(**{k: config[k] for k in ("penalty", "alpha", "balance", "beta") if k in config})
    try:
        return MODELS[name](loss=loss, **kwargs)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"cannot build {name}: {exc}") from exc
