"""A torch module as named tensors in, named tensors out, every router's decisions included.

Export, the torch runner and training's metrics all call a module through `NamedModule`, so the
names a model's outputs get (its own, flattened from a tensor, tuple, list, dict or NamedTuple) and
the `<router path>.index` / `.probs` outputs added for every deploytool Router are the same
everywhere. `module_signature` turns one call into the model signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from deploytool.errors import BadInput
from deploytool.hf import call_options as hf_call_options
from deploytool.nn import named_routers, record_routing
from deploytool.signature import BATCH, ModelSignature, RouterMeta, TensorMeta, router_output_names

#: the name of a model's output when forward returns a single tensor
SINGLE_OUTPUT = "output"


def flatten_outputs(result: Any, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """What forward returned, as {name: tensor}: a tensor is `output`, a NamedTuple or dict keeps its
    field names, a tuple or list is numbered (`output_0`, ...), nesting joins names with dots.
    `names` renames the tensors in that order (their count must match). None entries are dropped;
    other non-tensor values are refused.

    Args:
        result: what forward returned.
        names: names for the tensors, in order, or None.

    Returns:
        {name: tensor}.

    Raises:
        BadInput: a value that is not a tensor, or names whose count does not match.
    """
    flat: dict[str, torch.Tensor] = {}

    def walk(value: Any, name: str) -> None:
        if value is None:
            return
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, tuple) and hasattr(value, "_fields"):
            for field, item in zip(value._fields, value):
                walk(item, f"{name}.{field}" if name else field)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}" if name else f"{SINGLE_OUTPUT}_{i}")
        else:
            raise BadInput(f"forward returns a {type(value).__name__} at {name or 'the top'}; "
                           "return tensors (alone, or in a tuple, list, dict or NamedTuple)")

    walk(result, "" if not isinstance(result, torch.Tensor) else SINGLE_OUTPUT)
    if not flat:
        raise BadInput("forward returns no tensor")
    if names is not None:
        names = list(names)
        if len(names) != len(flat) or len(set(names)) != len(names):
            raise BadInput(f"{len(names)} output name(s) {names} for {len(flat)} output tensor(s) {list(flat)}; "
                           "give one distinct name per tensor")
        flat = dict(zip(names, flat.values()))
    return flat


def primary_output(result: Any) -> torch.Tensor:
    """The tensor training's loss reads: a lone tensor, else the first one forward returns."""
    return next(iter(flatten_outputs(result).values()))


def input_names(module: nn.Module, count: int) -> list[str]:
    """Names for `count` positional inputs: forward's own parameter names where it has them.

    Args:
        module: the model.
        count: how many positional inputs.

    Returns:
        The names, forward's own first, then `input_<i>`.
    """
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[:count]]
    return names + [f"input_{i}" for i in range(len(names), count)]


def as_named_inputs(module: nn.Module, example: Any) -> dict[str, torch.Tensor]:
    """Example inputs (a tensor, a tuple of tensors, or a dict of keyword tensors) keyed by input name.

    Args:
        module: the model (its forward names the inputs).
        example: a tensor or array, a tuple of them, or a dict of keyword tensors.

    Returns:
        {name: tensor}.

    Raises:
        BadInput: an example of another kind, or a non-tensor inside it.
    """
    if isinstance(example, (torch.Tensor, np.ndarray)):
        example = (example,)
    if isinstance(example, Mapping):
        named = dict(example)
    elif isinstance(example, (tuple, list)):
        named = dict(zip(input_names(module, len(example)), example))
    else:
        raise BadInput(f"example inputs must be a tensor, a tuple of tensors or a dict, got {type(example).__name__}")
    if not named:
        raise BadInput("give at least one example input")
    out = {}
    for name, value in named.items():
        tensor = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        if not isinstance(tensor, torch.Tensor):
            raise BadInput(f"example input {name!r} is a {type(value).__name__}, not a tensor")
        if tensor.dim() == 0:
            raise BadInput(f"example input {name!r} is a scalar; inputs need a batch dim")
        out[str(name)] = tensor
    return out


class NamedModule(nn.Module):
    """Wraps a routed model: forward(*inputs) -> tuple of tensors in `output_names` order.

    The model's own outputs come first, then `index` and `probs` of every router in module order.
    A router must run exactly once per forward: one that never runs or runs twice (a shared router
    called in a loop) has no single decision to export.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, output_names: Sequence[str] | None = None,
                 keyword: bool = False, call_options: Mapping[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.keyword = keyword
        #: fixed keyword arguments of every call (a transformers model's use_cache=False)
        self.call_options = dict(hf_call_options(model) if call_options is None else call_options)
        self.user_output_names = output_names
        self.routers = named_routers(model)
        if not self.routers:
            raise BadInput(f"{type(model).__name__} has no deploytool router: there is no routing to deploy (a "
                           "transformers MoE model converts with deploytool.from_hf)")
        self.output_names: list[str] = []

    def named(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        with record_routing(self.model) as calls:
            result = (self.model(**dict(zip(self.names, inputs)), **self.call_options) if self.keyword
                      else self.model(*inputs, **self.call_options))
        outputs = flatten_outputs(result, self.user_output_names)
        for path, _router in self.routers:
            if len(calls[path]) != 1:
                raise BadInput(f"router {path!r} ran {len(calls[path])} times in one forward; every router must "
                               "decide exactly once (give each layer its own Router)")
            index_name, probs_name = router_output_names(path)
            clash = [n for n in (index_name, probs_name) if n in outputs]
            if clash:
                raise BadInput(f"the model's output {clash[0]!r} has the name of a router decision; rename it")
            outputs[index_name] = calls[path][0].index
            outputs[probs_name] = calls[path][0].probs
        self.output_names = list(outputs)
        return outputs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.named(*inputs).values())

    def router_metas(self) -> tuple[RouterMeta, ...]:
        return tuple(RouterMeta(path, r.n_experts, float(r.temperature), *router_output_names(path),
                                k=int(getattr(r, "k", 1)))
                     for path, r in self.routers)


def module_signature(named: NamedModule, example: Mapping[str, torch.Tensor], *,
                     dynamic: Mapping[str, Mapping[int, str]] | None = None) -> ModelSignature:
    """The signature of `named` from one forward on `example` inputs.

    Args:
        named: the wrapped model.
        example: example inputs by name, batch first.
        dynamic: every dynamic dim per input, {input: {axis: name}}; default: axis 0 is `batch`.

    Returns:
        The ModelSignature; outputs' dims take their inputs' names where they match in size (one
        forward cannot tell more), and every named dim's example size is recorded.

    Raises:
        BadInput: a router that does not run exactly once, outputs that are not tensors.
    """
    with torch.no_grad():
        outputs = named.named(*example.values())
    sizes: dict[int, str] = {}
    examples: dict[str, int] = {}
    inputs = []
    for name, tensor in example.items():
        axes = dynamic.get(name, {0: BATCH}) if dynamic is not None else {0: BATCH}
        shape = tuple(axes.get(i, int(d)) for i, d in enumerate(tensor.shape))
        for axis, dim_name in axes.items():
            sizes.setdefault(int(tensor.shape[axis]), dim_name)
            examples.setdefault(dim_name, int(tensor.shape[axis]))
        inputs.append(TensorMeta(name, dtype_name(tensor.dtype), shape))
    batch_size = int(next(iter(example.values())).shape[0])
    others = {size: dim for size, dim in sizes.items() if dim != BATCH}
    outs = [TensorMeta(name, dtype_name(tensor.dtype),
                       tuple(BATCH if i == 0 and int(d) == batch_size else others.get(int(d), int(d)) if i else int(d)
                             for i, d in enumerate(tensor.shape)))
            for name, tensor in outputs.items()]
    return ModelSignature(tuple(inputs), tuple(outs), named.router_metas(), examples)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype's NumPy-style name ("float32").

    Args:
        dtype: a torch.dtype.

    Returns:
        Its name.
    """
    return str(dtype).removeprefix("torch.")
