"""Hugging Face transformers MoE models, converted in place into deploytool routing.

transformers 5.x builds every MoE block the same way: a router module returns `(logits, combine
weights [N, k], expert index [N, k])` and a fused experts module (`@use_experts_implementation`:
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, and flags for bias, transposition, interleaving)
takes `(hidden [N, H], index, weights)`; the block's own code adds shared experts, gates and
reshapes. `from_hf` finds such blocks by that structure, not by class name, and gives their router
and experts modules deploytool's behaviour (`deploytool.moe`) without moving a weight: the state
dict, `save_pretrained` and the block's code are unchanged. Which routing rule a router follows
(softmax or sigmoid, renormalised or not, a scale, a selection bias, group-limited picks) is read
from what the router does: each candidate rule is run against the router's own decisions on probe
inputs and the first that reproduces them is kept. Every converted block is then checked against the
original on the probe; a block that no rule reproduces is refused, naming its class, and nothing of
the model is converted.

Loading a `save_pretrained` folder is offline only (no download) and reads safetensors only.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploytool.errors import BadInput
from deploytool.moe import FusedExpertsDispatch, TopKRouting, TopKRule, tensor_at
from deploytool.nn import DISPATCHES

#: probe inputs: how many tokens and how wide their spread (logits of random routers are small)
PROBE_TOKENS = 96
#: a converted block must match its original to this (fp32, relative to the output's scale)
BLOCK_ATOL = 1e-5
#: the input names a converted causal LM takes, and the dims that vary
INPUT_IDS = "input_ids"
TOKENS = "tokens"


def is_hf_model(model: Any) -> bool:
    """A transformers PreTrainedModel (told without importing transformers)."""
    config = getattr(model, "config", None)
    return isinstance(model, nn.Module) and hasattr(config, "model_type") and hasattr(model, "can_generate")


def call_options(model: Any) -> dict[str, Any]:
    """Fixed keyword arguments for a full-sequence forward: a transformers model returns no KV cache."""
    return {"use_cache": False} if is_hf_model(model) else {}


@dataclass
class _Block:
    """One MoE block found in a model: where it is, its router and experts, and the rule found for it."""

    path: str
    block: nn.Module
    router_name: str
    experts_name: str
    parts: tuple[str, str | None, str | None] | None = None
    rule: TopKRule | None = None

    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.router_name)

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.experts_name)


def from_hf(model: nn.Module, *, top_k: int | None = None, dispatch: str = "sparse") -> nn.Module:
    """Convert every MoE block of a transformers model into deploytool routing, in place.

    The converted model computes what the original does (at its own k, fp32 logits within 1e-5), and
    its routers are deploytool routers: export, verify, bench, serve, fit and commit take it, and each
    router's decisions become outputs of their own.

    Args:
        model: a transformers model (e.g. MixtralForCausalLM) whose MoE blocks follow transformers 5.x's
            router + fused experts structure.
        top_k: experts per token after conversion (1: commit to one expert, the deployment deploytool
            makes cheap); None keeps the model's own k.
        dispatch: "sparse" (each expert runs only on its tokens) or "dense".

    Returns:
        `model`, converted.

    Raises:
        BadInput: not a module, no MoE block, a block whose routing or experts deploytool cannot express
            (named with its class and what is unsupported; nothing is converted then), or a bad top_k.
    """
    if not isinstance(model, nn.Module):
        raise BadInput(f"from_hf takes a transformers model (an nn.Module), got {type(model).__name__}")
    if dispatch not in DISPATCHES:
        raise BadInput(f"dispatch must be {' or '.join(DISPATCHES)}, got {dispatch!r}")
    blocks = list(_find_blocks(model))
    if not blocks:
        raise BadInput(f"{type(model).__name__} has no MoE block deploytool recognises (a router module beside "
                       "a fused experts module, as transformers 5.x builds them)")
    if top_k is not None:  # checked before anything changes: nothing is half-converted
        fewest = min(int(b.experts.down_proj.shape[0]) for b in blocks)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= fewest:
            raise BadInput(f"top-k must be a whole number from 1 to {fewest} (the fewest experts a block of "
                           f"{type(model).__name__} has), got {top_k!r}")
    fresh = [b for b in blocks if not isinstance(b.router, TopKRouting)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for block in fresh:
                _plan(block)
            _convert(fresh, dispatch)
    finally:
        model.train(was_training)
    for block in blocks:
        block.experts.dispatch = dispatch
    if top_k is not None:
        set_top_k(model, top_k)
    return model


def set_top_k(model: nn.Module, k: int) -> None:
    """Make every top-k router of `model` pick `k` experts per position.

    Args:
        model: a model converted by from_hf, or with TopKRouters of its own.
        k: experts per position, from 1 to the fewest experts a router chooses among.

    Raises:
        BadInput: no top-k router, or a k out of that range (no router is changed then).
    """
    routers = [m for m in model.modules() if isinstance(m, TopKRouting)]
    if not routers:
        raise BadInput(f"{type(model).__name__} has no top-k router; convert it with deploytool.from_hf first")
    fewest = min(r.n_experts for r in routers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= fewest:
        raise BadInput(f"top-k must be a whole number from 1 to {fewest} (the fewest experts a router of "
                       f"{type(model).__name__} has), got {k!r}")
    for router in routers:
        router.set_top_k(k)


# --- finding blocks --------------------------------------------------------------------------------

def _is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    up = params.get("gate_up_proj", params.get("up_proj"))
    down = params.get("down_proj")
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed") and up is not None
            and down is not None and up.dim() == 3 and down.dim() == 3)


def _find_blocks(model: nn.Module) -> Iterator[_Block]:
    """Every module with a fused experts child and a router child; refuses MoE-looking blocks it cannot take."""
    for path, module in model.named_modules():
        children = dict(module.named_children())
        experts = [n for n, c in children.items() if _is_fused_experts(c) or isinstance(c, FusedExpertsDispatch)]
        if not experts:
            if "experts" in children and any(n in children for n in ("router", "gate")):
                raise BadInput(f"{type(module).__name__} at {path}: its experts ({type(children['experts']).__name__}) "
                               "are separate modules, not fused [E, ...] weights; deploytool converts the fused "
                               "experts of transformers 5.x MoE blocks")
            continue
        name = experts[0]
        n_experts = int(getattr(children[name], "down_proj").shape[0])
        routers = [n for n, c in children.items() if n != name and _router_weight(c, n_experts)]
        if not routers:
            raise BadInput(f"{type(module).__name__} at {path}: no router module beside its experts (a module "
                           f"holding a [{n_experts}, hidden] weight)")
        preferred = [n for n in routers if n in ("gate", "router")] or routers
        yield _Block(path, module, preferred[0], name)


def _router_weight(module: nn.Module, n_experts: int) -> list[str]:
    return [n for n, p in module.named_parameters() if n.endswith("weight") and p.dim() == 2
            and p.shape[0] == n_experts]


# --- reading a router's rule from what it does --------------------------------------------------------

def _attr(block: _Block, *names: str) -> Any:
    """The first of `names` found on the router, the block or the block's config."""
    for owner in (block.router, block.block, getattr(block.block, "config", None),
                  getattr(block.experts, "config", None)):
        for name in names:
            value = getattr(owner, name, None) if owner is not None else None
            if value is not None and not isinstance(value, nn.Module):
                return value
    return None


def _plan(block: _Block) -> None:
    """Find the router's weights and the rule that reproduces its decisions on probe inputs."""
    router, experts = block.router, block.experts
    what = f"{type(block.block).__name__} at {block.path}"
    n_experts = int(experts.down_proj.shape[0])
    hidden = int(experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1])
    generator = torch.Generator().manual_seed(0)
    dtype = next(router.parameters()).dtype
    x = torch.randn(PROBE_TOKENS, hidden, generator=generator).to(dtype)
    out = router(x)
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)
            and out[0].shape == (PROBE_TOKENS, n_experts) and out[2].dim() == 2 and out[1].shape == out[2].shape):
        raise BadInput(f"{what}: its router ({type(router).__name__}) does not return (logits [tokens, "
                       f"{n_experts}], weights [tokens, k], indices [tokens, k]); deploytool cannot express it")
    hf_logits, hf_weights, hf_index = (t.detach().float() for t in out)
    parts = _linear_parts(router, x, hf_logits, n_experts)
    if parts is None:
        raise BadInput(f"{what}: the logits of its router ({type(router).__name__}) are not a linear map of its "
                       "input; deploytool cannot express that router")
    weight, bias = parts
    logits = torch.nn.functional.linear(x.float(), router.get_parameter(weight).float(),
                                        None if bias is None else router.get_parameter(bias).float())
    k = int(hf_index.shape[1])
    for rule, selection in _candidates(block, router, k, n_experts, (weight, bias)):
        sel = None if selection is None else tensor_at(router, selection).reshape(-1).float()
        probs, index, weights = rule.choose(logits, 1.0, sel)
        if _same_choice(index, weights, hf_index.long(), hf_weights, _near_ties(probs, sel, k)):
            block.parts, block.rule = (weight, bias, selection), rule
            return
    raise BadInput(f"{what}: no routing rule deploytool expresses (softmax or sigmoid top-{k}; weight 1, the "
                   "probability or renormalised; a scale; a selection bias; group-limited picks) reproduces "
                   f"the decisions of its router ({type(router).__name__})")


def _linear_parts(router: nn.Module, x: torch.Tensor, logits: torch.Tensor, n_experts: int
                  ) -> tuple[str, str | None] | None:
    """(weight path, bias path or None) of the linear map that gives the router's logits."""
    for weight in _router_weight(router, n_experts):
        w = router.get_parameter(weight)
        if w.shape[1] != x.shape[1]:
            continue
        owner = weight.rpartition(".")[0]
        bias = f"{owner}.bias" if owner else "bias"
        b = getattr(router.get_submodule(owner) if owner else router, "bias", None)
        candidates = [bias] if isinstance(b, torch.Tensor) and b.shape == (n_experts,) else []
        for path in [*candidates, None]:
            mine = torch.nn.functional.linear(x.float(), w.float(),
                                              None if path is None else router.get_parameter(path).float())
            if torch.allclose(mine, logits, atol=1e-5, rtol=1e-4):
                return weight, path
    return None


def _candidates(block: _Block, router: nn.Module, k: int, n_experts: int, used: tuple[str, str | None]
                ) -> Iterator[tuple[TopKRule, str | None]]:
    selections = [n for n, t in itertools.chain(router.named_parameters(), router.named_buffers())
                  if n not in used and t.numel() == n_experts and t.dtype.is_floating_point]
    scale = _attr(block, "routed_scaling_factor", "route_scale", "scaling_factor")
    scales = [float(scale), 1.0] if isinstance(scale, (int, float)) and float(scale) not in (0.0, 1.0) else [1.0]
    n_group = _attr(block, "n_group", "num_group", "num_expert_group")
    topk_group = _attr(block, "topk_group", "num_limited_groups")
    groups: list[tuple[int, int] | None] = [None]
    if isinstance(n_group, int) and isinstance(topk_group, int) and 1 < n_group and n_experts % n_group == 0 \
            and 0 < topk_group < n_group:
        groups.insert(0, (n_group, topk_group))
    for scoring, combine, scale_, selection, group, how in itertools.product(
            ("softmax", "sigmoid"), ("renorm", "prob", "one"), scales, [*selections, None], groups, ("top2", "max")):
        if group is None and how == "max":
            continue
        yield TopKRule(k=k, scoring=scoring, combine=combine, scale=scale_, groups=group, group_score=how), selection


#: a token whose k-th and (k+1)-th scores are closer than this may pick either in another float order
TIE_GAP = 1e-5


def _near_ties(probs: torch.Tensor, selection_bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """Tokens whose k-th best score is within TIE_GAP of the next: any rule may break such a tie either way."""
    scores = probs if selection_bias is None else probs + selection_bias
    if scores.shape[-1] <= k:
        return torch.zeros(scores.shape[0], dtype=torch.bool)
    top = scores.topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k]) < TIE_GAP


def _same_choice(index: torch.Tensor, weights: torch.Tensor, hf_index: torch.Tensor, hf_weights: torch.Tensor,
                 ties: torch.Tensor) -> bool:
    """The same experts per token (in any order) with the same weights, on every token but near ties (with
    many experts and many layers a probe meets some); at least most tokens must count."""
    if index.shape != hf_index.shape:
        return False
    judged = ~ties
    if int(judged.sum()) < 0.9 * len(judged):
        return False
    mine, theirs = index[judged].sort(dim=-1), hf_index[judged].sort(dim=-1)
    if not torch.equal(mine.values, theirs.values):
        return False
    return torch.allclose(weights[judged].gather(-1, mine.indices), hf_weights[judged].gather(-1, theirs.indices),
                          atol=1e-6, rtol=1e-4)


# --- converting ------------------------------------------------------------------------------------

_CLASSES: dict[tuple[type, type], type] = {}


def _with_behaviour(module: nn.Module, mixin: type) -> type:
    """`type(module)` with `mixin`'s behaviour first: same name, same weights, same state dict keys."""
    base = type(module)
    if (base, mixin) not in _CLASSES:
        _CLASSES[base, mixin] = type(base.__name__, (mixin, base), {"__module__": base.__module__,
                                                                    "__qualname__": base.__qualname__})
    return _CLASSES[base, mixin]


def _positions_hook(router: TopKRouting):
    def hook(_module, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        router.positions = tuple(hidden.shape[:-1])
    return hook


def _convert(blocks: list[_Block], dispatch: str) -> None:
    """Swap every block's router and experts to deploytool's behaviour, each checked against its original
    on a probe; on any failure every block is put back as it was."""
    done: list[tuple[_Block, type, type, Any]] = []
    try:
        for block in blocks:
            router, experts = block.router, block.experts
            hidden = int(experts.down_proj.shape[2] if experts.is_transposed else experts.down_proj.shape[1])
            dtype = experts.down_proj.dtype
            x = torch.randn(2, PROBE_TOKENS // 2, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
            expected = block.block(x)
            old = (type(router), type(experts))
            router.__class__ = _with_behaviour(router, TopKRouting)
            experts.__class__ = _with_behaviour(experts, FusedExpertsDispatch)
            router.init_routing(block.rule, block.parts)
            handle = block.block.register_forward_pre_hook(_positions_hook(router), with_kwargs=True)
            done.append((block, *old, handle))
            for mode in DISPATCHES:
                experts.dispatch = mode
                _check_same(block, expected, block.block(x))
            experts.dispatch = dispatch
    except BaseException:
        for block, router_cls, experts_cls, handle in done:
            block.router.__class__, block.experts.__class__ = router_cls, experts_cls
            handle.remove()
        raise


def _check_same(block: _Block, expected: Any, got: Any) -> None:
    first = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731 (a block may return (hidden, scores))
    a, b = first(expected).float(), first(got).float()
    scale = max(1.0, float(a.abs().max()))
    err = float((a - b).abs().max())
    if not err <= BLOCK_ATOL * scale:
        raise BadInput(f"{type(block.block).__name__} at {block.path}: converted, it differs from the original by "
                       f"{err:.2e} (over {BLOCK_ATOL * scale:.1e}); deploytool cannot express this block exactly")


# --- save_pretrained folders ---------------------------------------------------------------------------

def load_folder(path: str | Path, *, top_k: int | None = None, dispatch: str = "sparse") -> nn.Module:
    """A `save_pretrained` folder as a converted causal LM (offline, safetensors only, fp32, eval mode).

    Args:
        path: the folder (config.json and *.safetensors).
        top_k: experts per token after conversion (None: the model's own).
        dispatch: "sparse" or "dense".

    Returns:
        The converted model, in eval mode.

    Raises:
        BadInput: not such a folder, no safetensors weights, or a model from_hf cannot convert.
        MissingDependency: transformers is not installed.
    """
    from deploytool.deps import require

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} is not a save_pretrained folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise BadInput(f"{path} holds no .safetensors weights (deploytool never unpickles .bin files; "
                       "save with save_pretrained(..., safe_serialization=True))")
    require("transformers", "a Hugging Face model folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch.float32)
    except Exception as exc:  # a corrupt or foreign file: transformers and safetensors raise many kinds
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{path}: transformers cannot load it: {text[:300]}") from exc
    return from_hf(model.eval(), top_k=top_k, dispatch=dispatch)


def example_inputs(model: nn.Module, *, batch: int = 2, tokens: int = 16) -> dict[str, torch.Tensor]:
    """Token ids spanning the model's vocabulary, `{input_ids: [batch, tokens]}` (seeded)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise BadInput(f"{type(model).__name__}'s config has no vocab_size to make token ids from")
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return {INPUT_IDS: ids}


def dynamic_dims(example: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """The tokens dim dynamic on every [batch, tokens] input (the batch always is)."""
    return {name: {1: TOKENS} for name, t in example.items() if t.dim() == 2}


def input_vocab(model: Any) -> dict[str, int]:
    """{input_ids: vocabulary size} for a transformers model, {} for anything else."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) if is_hf_model(model) else None
    return {INPUT_IDS: int(vocab)} if isinstance(vocab, int) and vocab > 0 else {}
