"""Built-in routed architectures, built from a plain config dict (what config.json stores).

Every model takes one sample of the shape its `input_shape(in_features)` gives (a data set's flat rows
are reshaped to it) and returns the class logits; routing decisions are read from its Routers.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from deploytool.artifacts import check_run_config
from deploytool.choices import BUILTIN_MODELS
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


#: built-in model name (choices.BUILTIN_MODELS, which a run's config.json is checked against) -> its class
MODELS = dict(zip(BUILTIN_MODELS, (RoutedMLP, RoutedCNN, MoETransformer)))

# config.json keys that become constructor arguments (each model takes those its constructor names)
ARCH_KEYS = ("in_features", "n_classes", "n_experts", "expert_hidden", "width", "router_hidden", "trunk",
             "channels", "d_model", "layers", "heads", "temperature", "router", "dispatch")


#: the name of a built-in model's input (its forward's parameter)
INPUT_NAME = "x"


def input_shape(config: dict[str, Any]) -> tuple[int, ...]:
    """One sample's shape for the run config's model (a data set row is reshaped to it).

    Args:
        config: a run config (model, in_features).

    Returns:
        The shape of one sample, without the batch.

    Raises:
        BadInput: an unknown model, or features the model cannot take (not a square for images).
    """
    name = config.get("model")
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")
    try:
        return MODELS[name].input_shape(int(config["in_features"]))
    except ValueError as exc:
        raise BadInput(str(exc)) from exc


def example_inputs(config: dict[str, Any], batch: int = 2) -> dict[str, np.ndarray]:
    """Zero inputs of the run config's model, keyed by input name (what a signature is traced on).

    Args:
        config: a run config.
        batch: the batch size.

    Returns:
        {input name: float32 zeros [batch, *input_shape]}.

    Raises:
        BadInput: as input_shape.
    """
    return {INPUT_NAME: np.zeros((batch, *input_shape(config)), np.float32)}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its config (`config["model"]` names the architecture).

    Args:
        config: a run's config.json (or what train writes into it): model, in_features, n_classes,
            n_experts and the architecture sizes.

    Returns:
        The model (untrained weights), in train mode.

    Raises:
        BadInput: a config check_run_config refuses, a model that cannot be built from it, or one that
            would not fit this machine's memory.
    """

    name = config.get("model") if isinstance(config, dict) else None
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")
    defaults = {k: p.default for k, p in inspect.signature(MODELS[name]).parameters.items()
                if k in ARCH_KEYS and p.default is not inspect.Parameter.empty}
    config = {**defaults, **config}
    check_run_config(config, "config")
    check_memory(config)
    return _construct(config)


def _construct(config: dict[str, Any], **overrides: Any) -> nn.Module:
    name = config.get("model")
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; built-in models: {', '.join(MODELS)}")
    accepted = inspect.signature(MODELS[name]).parameters
    kwargs = {k: config[k] for k in ARCH_KEYS if k in config and k in accepted}
    kwargs.update({k: v for k, v in overrides.items() if k in accepted})
    try:
        loss = RoutingLoss(**{k: config[k] for k in ("penalty", "alpha", "balance", "beta") if k in config})
        return MODELS[name](loss=loss, **kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise BadInput(f"cannot build {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def parameter_count(config: dict[str, Any]) -> int:
    """How many parameters the config's model has, counted without allocating any.

    The models are built on the meta device at 2-3 experts and 1-2 layers, and the count extended to the
    config's (it is exact: a count is linear in experts and in layers).

    Args:
        config: a run config (as build_model takes).

    Returns:
        The number of parameters.

    Raises:
        BadInput: a model that cannot be built from the config.
    """
    def count(n_experts: int, layers: int) -> int:
        with torch.device("meta"):
            model = _construct(config, n_experts=n_experts, layers=layers)
        return sum(p.numel() for p in model.parameters())

    n_experts, layers = int(config["n_experts"]), int(config.get("layers", 1))
    if config.get("router") == "sigmoid":
        low, high = count(2, 1), count(2, 2)
        return low + (high - low) * (layers - 1)
    p11, p21, p12, p22 = count(2, 1), count(3, 1), count(2, 2), count(3, 2)
    per_expert, per_layer, both = p21 - p11, p12 - p11, p22 - p21 - p12 + p11
    return p11 + per_expert * (n_experts - 2) + per_layer * (layers - 1) + both * (n_experts - 2) * (layers - 1)


#: bytes per parameter: float32 weights (loading also holds the checkpoint's copy); training adds the
#: gradient and AdamW's two moments
BYTES_PER_PARAMETER = {"load": 8, "train": 16}


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or the cgroup's limit if lower; None if unknown.

    Returns:
        Bytes, or None where the host does not say.
    """
    found = []
    try:
        import psutil  # optional

        found.append(int(psutil.virtual_memory().available))
    except ImportError:
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        found.append(int(line.split()[1]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        if not found:
            try:
                found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
            except (ValueError, OSError, AttributeError):
                pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(config: dict[str, Any], *, training: bool = False, extra_bytes: int = 0) -> int:
    """Refuse a model that cannot fit this machine's memory, before anything is allocated.

    Args:
        config: a run config (as build_model takes).
        training: count the gradients and optimizer state too.
        extra_bytes: more memory the caller needs beside the model (its data).

    Returns:
        The bytes the model needs.

    Raises:
        BadInput: it needs more than the memory available, saying how much.
    """
    params = parameter_count(config)
    need = params * BYTES_PER_PARAMETER["train" if training else "load"] + extra_bytes
    have = available_memory()
    if have is not None and need > have:
        what = "train" if training else "load"
        raise BadInput(f"{config.get('model')} with {_amount(params)} parameters needs about {_gib(need)} of memory "
                       f"to {what}; this machine has {_gib(have)} available: use fewer experts or smaller widths")
    return need


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _amount(n: int) -> str:
    return f"{n:,}" if n < 10**6 else f"{n / 1e6:,.0f} million"
