"""Built-in routed architectures, built from a plain config dict (what config.json stores).

Every model takes one sample of the shape its `input_shape(in_features)` gives (a data set's flat rows
are reshaped to it) and returns the class logits; routing decisions are read from its Routers.
"""

from __future__ import annotations

import inspect
import math
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


def _square_side(in_features: int, what: str) -> int:
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ValueError(f"{what} reads each sample as a square of side sqrt(features); {in_features} features "
                         "is not a square number")
    return side


class RoutedCNN(nn.Module):
    """Images [B, 1, H, W]: a conv trunk, a router on the pooled features, E expert heads; returns the logits.

    The trunk (two 3x3 convs of `channels`, 2x2 max pool) runs on every sample; the router decides once per
    image from the feature map average-pooled to 2x2 (`route_on`: the global average alone leaves too little
    to decide on, and ~15% of images stay unconfident), and the chosen expert head (a 3x3 conv, flatten, an
    MLP of `expert_hidden`) turns the feature map into the class logits.
    """

    def __init__(self, in_features: int, n_classes: int, n_experts: int = 4, expert_hidden: int = 64,
                 channels: int = 16, router_hidden: int = 0, temperature: float = 1.0, router: str = "softmax",
                 dispatch: str = "dense", loss: RoutingLoss | None = None):
        super().__init__()
        side = _square_side(in_features, "routed-cnn")
        if side < 4:
            raise ValueError(f"routed-cnn needs images of at least 4x4, got {in_features} feature(s)")
        self.trunk = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        pooled = side // 2
        experts = [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(channels * pooled * pooled, expert_hidden), nn.ReLU(),
                                 nn.Linear(expert_hidden, n_classes))
                   for _ in range(n_experts)]
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.routed = RoutedExperts(Router(channels * 4, n_experts, temperature, router, router_hidden), experts,
                                    dispatch, loss)

    @staticmethod
    def input_shape(in_features: int) -> tuple[int, ...]:
        """One sample as a 1-channel square image: 64 features -> (1, 8, 8)."""
        side = _square_side(in_features, "routed-cnn")
        return (1, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return self.routed(features, route_on=self.pool(features).flatten(1)).output


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer whose feed-forward is a token-level mixture of experts.

    Attention is written with plain ops (Linear, matmul, softmax) so that it exports as it runs.
    """

    def __init__(self, d_model: int, heads: int, n_experts: int, expert_hidden: int, temperature: float,
                 router: str, router_hidden: int, dispatch: str, loss: RoutingLoss | None):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        experts = [_mlp([d_model, expert_hidden, d_model]) for _ in range(n_experts)]
        self.moe = RoutedExperts(Router(d_model, n_experts, temperature, router, router_hidden), experts,
                                 dispatch, loss)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.moe(self.norm2(x)).output


class MoETransformer(nn.Module):
    """Tokens [B, T, F]: a linear embedding + learned positions, `layers` encoder layers each with a token-level
    MoE feed-forward (its own Router: one decision per token), mean pooling and a linear classifier."""

    def __init__(self, in_features: int, n_classes: int, n_experts: int = 4, expert_hidden: int = 64,
                 d_model: int = 32, layers: int = 2, heads: int = 4, router_hidden: int = 0,
                 temperature: float = 1.0, router: str = "softmax", dispatch: str = "dense",
                 loss: RoutingLoss | None = None):
        super().__init__()
        tokens, features = self.input_shape(in_features)
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.randn(tokens, d_model) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, n_experts, expert_hidden, temperature, router,
                                                 router_hidden, dispatch, loss) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    @staticmethod
    def input_shape(in_features: int) -> tuple[int, ...]:
        """One sample as sqrt(features) tokens of sqrt(features) features: 64 -> (8, 8), an image's rows."""
        side = _square_side(in_features, "moe-transformer")
        return (side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h.mean(dim=1)))


MODELS = {"routed-mlp": RoutedMLP, "routed-cnn": RoutedCNN, "moe-transformer": MoETransformer}

# config.json keys that become constructor arguments (each model takes those its constructor names)
ARCH_KEYS = ("in_features", "n_classes", "n_experts", "expert_hidden", "width", "router_hidden", "trunk",
             "channels", "d_model", "layers", "heads", "temperature", "router", "dispatch")


#: the name of a built-in model's input (its forward's parameter)
INPUT_NAME = "x"


def input_shape(config: dict[str, Any]) -> tuple[int, ...]:
    """One sample's shape for the run config's model (a data set row is reshaped to it)."""
    name = config.get("model")
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")
    try:
        return MODELS[name].input_shape(int(config["in_features"]))
    except ValueError as exc:
        raise BadInput(str(exc)) from exc


def example_inputs(config: dict[str, Any], batch: int = 2) -> dict[str, np.ndarray]:
    """Zero inputs of the run config's model, keyed by input name (what a signature is traced on)."""
    return {INPUT_NAME: np.zeros((batch, *input_shape(config)), np.float32)}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its config (`config["model"]` names the architecture)."""
    name = config.get("model")
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")
    accepted = inspect.signature(MODELS[name]).parameters
    kwargs = {k: config[k] for k in ARCH_KEYS if k in config and k in accepted}
    loss = RoutingLoss(**{k: config[k] for k in ("penalty", "alpha", "balance", "beta") if k in config})
    try:
        return MODELS[name](loss=loss, **kwargs)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"cannot build {name}: {exc}") from exc
