"""Router and RoutedExperts: modules a user drops into their own model.

Training blends experts with the router's soft weights and records the routing losses (confidence
penalty, balance) on the module; `collect_routing_loss(model)` sums them. Evaluation commits to one
expert per row (hard top-1): dense dispatch runs every expert and masks, sparse dispatch runs only
the chosen expert on its rows. Both give the same output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from deploytool import losses
from deploytool.choices import DISPATCHES, MOE_OP_NODES, ROUTER_KINDS
from deploytool.dispatch import MoELayout, exported_experts, exported_sparse
from deploytool.losses import check_temperature
from deploytool.ops.functional import hard_select, tempered_softmax

RouterKind = Literal["softmax", "sigmoid"]
Dispatch = Literal["dense", "sparse"]
#: the dispatch names: every expert on every row and a mask, or each expert on its rows only
RoutingMode = Literal["auto", "soft", "hard", "gumbel"]


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # [..., E] before the temperature
    probs: torch.Tensor   # [..., E] tempered softmax
    index: torch.Tensor   # [...] int64 top-1, one decision per position


class RoutedOutput(NamedTuple):
    output: torch.Tensor
    index: torch.Tensor
    probs: torch.Tensor


class Router(nn.Module):
    """Linear (or small MLP) router: logits -> tempered softmax -> top-1.

    `kind="sigmoid"` is the binary router: one logit z, read as the 2-way softmax over [z, 0]
    (sigmoid(z) = softmax([z, 0])[0]), so everything downstream sees two experts.
    """

    def __init__(self, in_features: int, n_experts: int, temperature: float = 1.0,
                 kind: RouterKind = "softmax", hidden: int = 0):
        super().__init__()
        if kind == "softmax" and n_experts < 2:
            raise ValueError(f"n_experts={n_experts}: {losses.ONE_CLASS_MESSAGE}")
        if kind == "sigmoid" and n_experts != 2:
            raise ValueError(f"a sigmoid router chooses between exactly 2 experts, got n_experts={n_experts}")
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router kind must be softmax or sigmoid, got {kind!r}")
        self.kind = kind
        self.n_experts = n_experts
        n_logits = 1 if kind == "sigmoid" else n_experts
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden or in_features, n_logits))
        self.net = nn.Sequential(*layers)
        # a plain float, not a buffer: run dirs keep it in config.json, and ONNX export records it as the
        # TemperedSoftmax node's attribute (a traced tensor's float() would be data-dependent)
        self.temperature = check_temperature(temperature)

    def set_temperature(self, value: float) -> None:
        self.temperature = check_temperature(value)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n_experts={self.n_experts}, temperature={self.temperature:g}"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        if self.kind == "sigmoid":
            z = torch.cat([z, torch.zeros_like(z)], dim=-1)
        return z

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = self.logits(x)
        probs = tempered_softmax(logits, self.temperature)
        _, index = hard_select(probs)
        return RouterOutput(logits, probs, index)


@dataclass(frozen=True)
class RoutingLoss:
    """Which routing losses training adds, and how strongly."""

    penalty: str = "frank"     # frank | entropy | none
    alpha: float = losses.DEFAULT_ALPHA
    balance: str = "entropy"   # entropy | switch | none
    beta: float = losses.DEFAULT_BETA

    def __post_init__(self):
        losses.check_routing_loss(self.penalty, self.alpha, self.balance, self.beta)

    def __call__(self, routing: RouterOutput, temperature: float) -> torch.Tensor:
        """The penalty and balance terms, averaged over every routed position (rows, tokens, pixels)."""
        n = routing.logits.shape[-1]
        return (losses.routing_penalty(self.penalty, routing.logits.reshape(-1, n), temperature, self.alpha)
                + losses.balance_loss(self.balance, routing.probs.reshape(-1, n), self.beta))


class RoutedExperts(nn.Module):
    """Routes each position to experts: soft blend in training, one expert per position in evaluation.

    The router sees `x [..., features]` (or `route_on`, when the decision should come from other
    features than the experts' input, e.g. pooled features for experts that take a feature map) and
    decides once per position of its leading dims: per row for [B, D], per token for [B, T, D]. Every
    expert takes `x` and returns a tensor whose leading dims are those positions; its trailing dims
    may be anything (a vector, a feature map).
    """

    #: under export: "ort"/"auto" run the experts as ONNX Runtime's MoE op with `moe_layout` where
    #: `routed_moe_layout` can express them (set for the export's duration by moe_op_mode)
    moe_op: str | None = None
    moe_layout: MoELayout | None = None

    def __init__(self, router: Router, experts: Sequence[nn.Module], dispatch: Dispatch = "dense",
                 loss: RoutingLoss | None = None):
        super().__init__()
        if len(experts) != router.n_experts:
            raise ValueError(f"router has {router.n_experts} experts, got {len(experts)} expert modules")
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be {' or '.join(DISPATCHES)}, got {dispatch!r}")
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.dispatch = dispatch
        self.loss = loss or RoutingLoss()
        self.mode: RoutingMode = "auto"
        self.routing_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, route_on: torch.Tensor | None = None) -> RoutedOutput:
        routing = self.router(x if route_on is None else route_on)
        lead = routing.index.shape
        if tuple(x.shape[:len(lead)]) != tuple(lead):
            raise ValueError(f"the router decides over positions {list(lead)} but the experts' input has shape "
                             f"{list(x.shape)}: its leading dims must be those positions")
        mode = self.mode if self.mode != "auto" else ("soft" if self.training else "hard")
        if self.training:
            self.routing_loss = self.loss(routing, self.router.temperature)
        if mode == "soft":
            weights = routing.probs
        elif mode == "gumbel":
            weights = losses.gumbel_straight_through(routing.logits, self.router.temperature)
        elif mode == "hard":
            if self.dispatch == "sparse":
                flat = x.reshape(-1, *x.shape[len(lead):])
                rows = routing.index.reshape(-1)
                y = (self._exported(flat, rows, routing.probs) if torch.onnx.is_in_onnx_export()
                     else self.sparse(flat, rows))
                return RoutedOutput(y.reshape(*lead, *y.shape[1:]), routing.index, routing.probs)
            weights, _ = hard_select(routing.probs)
        else:
            raise ValueError(f"unknown routing mode {mode!r}")
        output = None
        for e, expert in enumerate(self.experts):
            y = expert(x)
            # the weight of each position, broadcast over whatever trailing dims the expert returns
            term = weights[..., e].reshape(*lead, *([1] * (y.dim() - len(lead)))) * y
            output = term if output is None else output + term
        index = weights.argmax(dim=-1) if mode == "gumbel" else routing.index
        return RoutedOutput(output, index, routing.probs)

    def _exported(self, x: torch.Tensor, index: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Sparse dispatch under export: deploytool's graph, or the MoE op routed by the router's own
        one-hot decision (log of HardSelect's mask: 0 at the chosen expert, -inf elsewhere)."""
        layout = self.moe_layout if x.dim() == 2 else None
        if self.moe_layout is not None and layout is None:
            self.moe_layout_unused = f"its rows are {x.dim()}-D, the MoE op takes [rows, features]"
        decision = lambda: torch.log(hard_select(probs.reshape(-1, probs.shape[-1]))[0])  # noqa: E731
        return exported_experts(x, moe_op=self.moe_op, layout=layout, op=lambda: layout.run(x, decision(), 1),
                                sparse=lambda: exported_sparse(x, index, lambda e, xs: self.experts[e](xs),
                                                               len(self.experts)))

    def sparse(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Only the chosen expert computes each row of `x [rows, ...]` (`index [rows]`).

        Rows are sorted by expert once, so each expert runs on a contiguous slice (a view, no copy);
        an expert with no rows is never called. Experts are module calls (their hooks fire) unless all
        of them are plain hook-free Linear/ReLU stacks outside autograd: then `_plain_experts` runs
        their layers itself into shared buffers. With 2 threads the module calls and per-layer
        allocations cost more than the small GEMMs lose (see docs/benchmarks.md).
        """
        if x.shape[0] == 0:
            return self.experts[0](x)
        order = torch.argsort(index)  # rows are independent: their order within an expert is free
        counts = torch.bincount(index, minlength=len(self.experts)).tolist()
        xs = x.index_select(0, order)
        plain = _plain_stacks(self.experts) if x.dim() == 2 else None
        if plain is not None:
            ys = _plain_experts(plain, xs, counts)
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
            return ys.index_select(0, inverse)  # a gather: faster than index_copy_ on CPU
        out = None
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                y = expert(xs[start:start + n])
                if out is None:
                    out = y.new_empty((x.shape[0], *y.shape[1:]))
                out.index_copy_(0, order[start:start + n], y)
            start += n
        return out


#: a plain expert: each Linear's (weight, bias) followed by whether a ReLU comes after it
_PlainStack = list[tuple[torch.Tensor, torch.Tensor | None, bool]]


def _plain_stacks(experts: nn.ModuleList) -> list[_PlainStack] | None:
    """Each expert as Linear(+ReLU) layers, or None where running them by hand could differ from
    calling the modules: autograd on, tracing or compiling, a hook anywhere, any other module."""
    if (torch.is_grad_enabled() or torch._C._get_tracing_state() or torch.compiler.is_compiling()
            or getattr(nn.modules.module, "_has_any_global_hook", lambda: True)()):
        return None
    stacks = []
    for expert in experts:
        stack: _PlainStack = []
        if not _flatten(expert, stack) or not stack:
            return None
        stacks.append(stack)
    if len({stack[-1][0].shape[0] for stack in stacks}) > 1:
        return None
    return stacks


def _flatten(module: nn.Module, stack: _PlainStack) -> bool:
    """Appends what `module` computes, in Sequential's order; False if that is not Linear/ReLU only."""
    if _hooked(module):
        return False
    kind = type(module)
    if kind is nn.Sequential:
        for child in module._modules.values():
            if not _flatten(child, stack):
                return False
    elif kind is nn.Linear:
        params = module._parameters  # what Linear.forward reads, without Module.__getattr__'s cost
        if "weight" not in params or "bias" not in params:
            return False
        stack.append((params["weight"], params["bias"], False))
    elif kind is nn.ReLU and stack:
        stack[-1] = (*stack[-1][:2], True)
    else:
        return False
    return True


def _hooked(module: nn.Module) -> bool:
    """A hook on the module, or a forward patched on the instance (as accelerate does): calling it may
    differ from running its layers."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _layers(module: nn.Module, out: list[nn.Module]) -> bool:
    """Appends the modules `module` runs, Sequentials flattened; False where a hook could change that."""
    if _hooked(module):
        return False
    if type(module) is nn.Sequential:
        return all(_layers(child, out) for child in module._modules.values())
    out.append(module)
    return True


#: an expert's inner activation the MoE op computes as torch does, and its name there
_OP_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu"}
#: elementwise modules an expert may end with: they run on the op's output
_TAIL = (nn.ReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Identity)


def routed_moe_layout(experts: Sequence[nn.Module]) -> tuple[MoELayout | None, str]:
    """RoutedExperts' experts as ONNX Runtime's MoE op takes them, or why it cannot.

    Each expert must run exactly `nn.Linear -> nn.ReLU | nn.SiLU -> nn.Linear` (Sequentials flattened, no
    hooks), optionally followed by the same elementwise modules in every expert (run after the op), with
    the same input and output widths. Inner widths may differ (zero-padded to the widest); experts whose
    output is narrower or wider than their input run zero-padded, and the output is cut back.

    Args:
        experts: the expert modules.

    Returns:
        (the layout, "") or (None, the reason in a few words).
    """
    stacks = []
    for expert in experts:
        layers: list[nn.Module] = []
        if not _layers(expert, layers):
            return None, "an expert has a hook or a patched forward"
        if (len(layers) < 3 or type(layers[0]) is not nn.Linear or type(layers[2]) is not nn.Linear
                or not all(isinstance(m, _TAIL) and not list(m.parameters()) for m in layers[3:])):
            return None, "its experts are not Linear -> ReLU/SiLU -> Linear (+ elementwise activations)"
        if type(layers[1]) not in _OP_ACTIVATIONS:
            return None, (f"the experts' {type(layers[1]).__name__} is not one the op computes exactly "
                          "(ReLU, SiLU; its GELU is an approximation)")
        stacks.append(layers)
    first = stacks[0]
    if any([repr(m) for m in s[1:2] + s[3:]] != [repr(m) for m in first[1:2] + first[3:]] for s in stacks):
        return None, "its experts differ in their activations"
    if len({(s[0].in_features, s[2].out_features) for s in stacks}) > 1:
        return None, "its experts differ in their input or output widths"
    width, out = first[0].in_features, first[2].out_features
    hidden, inner = max(width, out), max(s[0].out_features for s in stacks)
    with torch.no_grad():
        def stacked(tensors, shape):  # zero-padded to `shape`, stacked over experts: constants
            block = torch.zeros(len(tensors), *shape, dtype=first[0].weight.dtype)
            for e, t in enumerate(tensors):
                if t is not None:
                    block[(e, *(slice(0, n) for n in t.shape))] = t.detach()
            return block
        fc1 = stacked([s[0].weight for s in stacks], (inner, hidden))
        fc2 = stacked([s[2].weight for s in stacks], (hidden, inner))
        biased = lambda i: any(s[i].bias is not None for s in stacks)  # noqa: E731
        fc1_bias = stacked([s[0].bias for s in stacks], (inner,)) if biased(0) else None
        fc2_bias = stacked([s[2].bias for s in stacks], (hidden,)) if biased(2) else None
    tail = nn.Sequential(*first[3:]) if first[3:] else None
    return MoELayout({"activation_type": _OP_ACTIVATIONS[type(first[1])]}, fc1, fc1_bias, fc2, fc2_bias,
                     width=width if width < hidden else None, out=out if out < hidden else None, tail=tail), ""


def _plain_experts(stacks: list[_PlainStack], xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows sorted by expert -> outputs in the same order. Each layer writes its rows (addmm with
    out=, ReLU in place) into a buffer shared by all experts: one per depth and width, and one for
    the outputs, so that no layer reads the buffer it writes."""
    final = xs.new_empty((xs.shape[0], stacks[0][-1][0].shape[0]))
    buffers: dict[tuple[int, int], torch.Tensor] = {}
    start = 0
    for stack, n in zip(stacks, counts):
        if n:
            h = xs[start:start + n]
            for depth, (weight, bias, relu) in enumerate(stack):
                if depth == len(stack) - 1:
                    buffer = final
                elif (buffer := buffers.get((depth, weight.shape[0]))) is None:
                    buffer = buffers[depth, weight.shape[0]] = xs.new_empty((xs.shape[0], weight.shape[0]))
                out = buffer[start:start + n]
                h = (torch.mm(h, weight.t(), out=out) if bias is None
                     else torch.addmm(bias, h, weight.t(), out=out))
                if relu:
                    h.relu_()
        start += n
    return final


def routed_modules(model: nn.Module) -> list[RoutedExperts]:
    """Every RoutedExperts in `model`.

    Args:
        model: the model.

    Returns:
        The modules, in `named_modules` order.
    """
    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


def is_router(module: nn.Module) -> bool:
    """A deploytool Router, or a module with top-k routing (deploytool.moe.TopKRouting)."""
    return isinstance(module, Router) or getattr(type(module), "deploytool_router", False)


def dispatching_modules(model: nn.Module) -> list[nn.Module]:
    """Every module whose `dispatch` ("dense" | "sparse") says how its experts run."""
    return [m for m in model.modules() if _dispatches(m)]


def _dispatches(module: nn.Module) -> bool:
    return isinstance(module, RoutedExperts) or getattr(type(module), "deploytool_experts", False)


def named_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every router in `model` (a Router or a top-k router) with its module path (what names its outputs
    in an export)."""
    return [(path or "router", m) for path, m in model.named_modules() if is_router(m)]


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[dict[str, list[RouterOutput]]]:
    """Collect what every router in `model` decides during the forwards run inside the block.

    Yields {module path: [RouterOutput of each call]}; the caller clears the lists between forwards.
    A forward hook reads each router's decisions (a Router's output; a top-k router's `last_routing`),
    so nothing about the model changes.
    """
    def hook(module, _inputs, out, path):
        calls[path].append(out if isinstance(module, Router) else module.last_routing)

    routers = named_routers(model)
    calls: dict[str, list[RouterOutput]] = {path: [] for path, _ in routers}
    handles = [router.register_forward_hook(lambda m, i, out, path=path: hook(m, i, out, path))
               for path, router in routers]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def mean_routing_probs(model: nn.Module, forwards) -> dict[str, torch.Tensor]:
    """Each router's routing probabilities averaged over every position of the forwards run, in eval mode.

    Args:
        model: a module with deploytool routers.
        forwards: callables, each running one forward of `model` (a batch).

    Returns:
        {router path: float64 tensor [n_experts]}, for the routers that made decisions.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, tuple] = {}
    try:
        with torch.no_grad(), record_routing(model) as calls:
            for forward in forwards:
                forward()
                for path, outs in calls.items():
                    for routing in outs:
                        probs = routing.probs.reshape(-1, routing.probs.shape[-1]).double()
                        total, count = sums.get(path, (0.0, 0))
                        sums[path] = (total + probs.sum(dim=0), count + len(probs))
                    outs.clear()
    finally:
        model.train(was_training)
    return {path: total / count for path, (total, count) in sums.items() if count}


def collect_routing_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the routing losses recorded by every RoutedExperts in the last training forward."""
    owners = [*routed_modules(model), *(m for _, m in named_routers(model) if not isinstance(m, Router))]
    terms = [m.routing_loss for m in owners if m.routing_loss is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


@contextlib.contextmanager
def _override(model: nn.Module, attribute: str, value: str | None) -> Iterator[None]:
    """Set `attribute` on every module of `model` that has it (RoutedExperts; fused experts for "dispatch")
    for the duration (None: leave it), then restore."""
    modules = [m for m in (routed_modules(model) if attribute == "mode" else dispatching_modules(model))
               if hasattr(m, attribute)]
    saved = [getattr(m, attribute) for m in modules]
    if value is not None:
        for m in modules:
            setattr(m, attribute, value)
    try:
        yield
    finally:
        for m, old in zip(modules, saved):
            setattr(m, attribute, old)


def routing_mode(model: nn.Module, mode: RoutingMode):
    """Temporarily force every RoutedExperts in `model` to soft, hard or gumbel routing.

    Args:
        model: the model.
        mode: "soft", "hard" or "gumbel".

    Returns:
        A context manager that restores every module's own mode.
    """
    return _override(model, "mode", mode)


def dispatch_mode(model: nn.Module, dispatch: Dispatch | None):
    """Temporarily set dense or sparse dispatch on every RoutedExperts in `model` (None: leave as is).

    Args:
        model: the model.
        dispatch: "dense", "sparse" or None.

    Returns:
        A context manager that restores every module's own dispatch.
    """
    return _override(model, "dispatch", dispatch)


@contextlib.contextmanager
def moe_op_mode(model: nn.Module, moe_op: str) -> Iterator[list[str]]:
    """For the block, make every experts module of `model` export as `moe_op` says: "ort" (ONNX Runtime's
    fused MoE op wherever it can compute the experts), "auto" (the op on small batches, deploytool's sparse
    graph on large ones) or "deploytool" (the module's own dispatch); then restore each module's own.

    The MoE op's weights are laid out here, before tracing, as constants, so the graph holds them as
    initializers rather than ops that would copy the experts at every inference.

    Args:
        model: the model.
        moe_op: "deploytool", "ort" or "auto".

    Yields:
        One line per experts module that keeps deploytool's dispatch although the op was asked for (its
        path, class and why); complete when the block ends.
    """
    modules = [(path, m) for path, m in model.named_modules() if _dispatches(m)]
    saved = [(m.__dict__.get("moe_op"), m.__dict__.get("moe_layout")) for _, m in modules]
    notes: list[str] = []
    if moe_op in MOE_OP_NODES and not modules:
        notes.append("no experts module: the MoE op was not used")
    try:
        for path, m in modules:
            m.moe_op, m.moe_layout = moe_op, None
            if moe_op in MOE_OP_NODES:
                if isinstance(m, RoutedExperts):
                    m.moe_layout, why = routed_moe_layout(m.experts)
                else:
                    m.moe_layout, why = m.ort_moe_layout(), "ONNX Runtime's MoE op cannot compute these experts"
                if m.moe_layout is None:
                    notes.append(f"{path or 'model'} ({type(m).__name__}): {why}; sparse dispatch instead")
        yield notes
    finally:
        for (path, m), (op, layout) in zip(modules, saved):
            unused = m.__dict__.pop("moe_layout_unused", None)
            if unused:
                notes.append(f"{path or 'model'} ({type(m).__name__}): {unused}; sparse dispatch instead")
            for name, value in (("moe_op", op), ("moe_layout", layout)):
                if value is None:
                    m.__dict__.pop(name, None)  # back to the class's None
                else:
                    setattr(m, name, value)


def set_dispatch(model: nn.Module, dispatch: Dispatch) -> None:
    """Set dense or sparse dispatch on every module of `model` that dispatches to experts.

    Args:
        model: the model.
        dispatch: "dense" or "sparse".
    """
    for m in dispatching_modules(model):
        m.dispatch = dispatch


def set_temperature(model: nn.Module, value: float) -> None:
    """Set the temperature of every Router in `model` (inside a RoutedExperts or not).

    Args:
        model: the model.
        value: the temperature, > 0.
    """
    for _, router in named_routers(model):
        router.set_temperature(value)
