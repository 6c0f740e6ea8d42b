"""Feeds: the named input arrays a model takes, from a data set, a file, arrays, or made up.

The one loader of input rows for verify, export's validation and bench: a data set's flat rows are
reshaped to the model's input shape (digits' 64 pixels become [1, 8, 8] for an image model), a .npz
with one array per input name feeds a multi-input model, and `random_feed` makes inputs from the
signature alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.data import load_dataset
from deploytool.errors import BadInput
from deploytool.signature import BATCH, ModelSignature, is_static, numpy_dtype

Feed = dict[str, np.ndarray]
#: the size given to a dynamic non-batch dim the signature has no example size for
DEFAULT_DIM = 8


def load_feed(data: str | Path | np.ndarray | Mapping[str, Any], signature: ModelSignature, *,
              samples: int | None = None, seed: int = 0, data_options: Mapping[str, Any] | None = None,
              tokenizer: str | Path | None = None) -> tuple[str, Feed]:
    """(label, feed) for `signature` from `data`, checked against the signature.

    Arrays a user gives (an array, a dict of arrays, a .npz of one array per input name) are checked as
    strictly as `Session.run` checks them (`check_feed`): the model's dtype, no extra names. Flat rows
    are reshaped to the model's sample shape; only a data set's rows, deploytool's own, are cast to the
    model's dtype.

    Args:
        data: a data set name or .npz path (see deploytool.data; its held-out rows, then training rows
            when more `samples` are asked for), a .npz of one array per input name, an array (a
            single-input model), or a dict of arrays keyed by input name.
        signature: the model's signature.
        samples: how many samples to take (None: all held-out rows).
        seed: the data split's seed.
        data_options: options of a built-in data set (e.g. n_features for blobs).
        tokenizer: for a token model (one integer input [batch, tokens]), the model folder whose tokenizer
            tokenises a text file (None or no tokenizer there: bytes); a .npy, .bin or text file is then
            read as a token stream (deploytool.tokens) and cut into windows of the model's token count.

    Returns:
        A label saying where the rows came from, and the feed.

    Raises:
        BadInput: data that cannot feed this model (wrong names, sizes, dtypes; NaN).
    """
    if samples is not None and (not _is_int(samples) or samples < 1):
        raise BadInput(f"samples must be a whole number >= 1, got {samples!r}")
    if data_options is not None and not isinstance(data_options, Mapping):
        raise BadInput(f"data_options must be a table of options, got {data_options!r}")
    label, named, rows = _read(data, signature, samples, seed, dict(data_options or {}), tokenizer)
    missing = [n for n in signature.input_names if n not in named]
    if missing:
        raise BadInput(f"{label} has no input(s) {missing}; the model takes {signature.describe()}")
    feed = {}
    for meta in signature.inputs:
        arr = named[meta.name]
        if not isinstance(arr, np.ndarray):  # a list: read as check_feed reads it, without a silent cast
            arr = np.asarray(_from_list(arr, meta, f"{label} input"))
        arr = arr[:samples] if arr.ndim else arr
        sample_shape = tuple(d if is_static(d) else -1 for d in meta.shape[1:])
        if arr.ndim != len(meta.shape) and -1 not in sample_shape and arr.size:
            if arr.reshape(len(arr), -1).shape[1] != int(np.prod(sample_shape)):
                raise BadInput(f"{label}: input {meta.name!r} samples have shape {list(arr.shape[1:])}, the model "
                               f"takes {meta.text()}")
            arr = arr.reshape(len(arr), *sample_shape)
        want = numpy_dtype(meta.dtype)
        # only a data set's rows (deploytool's own) are cast; the user's arrays keep their dtype, as in load
        if rows and want is not None and arr.dtype != want and np.can_cast(arr.dtype, want, "same_kind"):
            arr = arr.astype(want)
        feed[meta.name] = arr
    return label, check_feed(any_batch(signature), feed, what=f"{label} input")


#: the largest value an integer input may hold when the model says nothing narrower (int64's range
#: halved: ids beyond it are garbage, not tokens)
_MAX_ID = 2**62


def check_feed(signature: ModelSignature, feed: Any, *, what: str = "input",
               bounds: Mapping[str, int] | None = None) -> Feed:
    """The one check of a feed, for every command (load, verify, bench, serve): the feed as contiguous
    arrays the model takes, or BadInput naming what is wrong and what the model takes.

    On top of `ModelSignature.check_feed` (names, dtype, rank, static dims, one batch, NaN/inf): lists
    are read without a silent cast (1.9 for an integer input is refused, not truncated), every dim of
    every input holds at least one position (a model run on nothing decides nothing), and integer
    inputs (token ids) are >= 0 and below their bound when the model knows it (an embedding's size).

    Args:
        signature: the model's signature.
        feed: {input name: array or nested list}.
        what: what the feed is, for messages.
        bounds: {integer input name: the number of ids it takes}, where the model knows it.

    Returns:
        The checked feed.

    Raises:
        BadInput: naming the input and the problem.
    """
    if isinstance(feed, Mapping):
        metas = {m.name: m for m in signature.inputs}
        feed = {name: _from_list(value, metas[name], what) if name in metas else value
                for name, value in feed.items()}
    out = signature.check_feed(feed, what=what)
    for meta in signature.inputs:
        arr = out[meta.name]
        if 0 in arr.shape:
            raise BadInput(f"{what} {meta.name!r} has shape {list(arr.shape)}, with no positions along a dim; "
                           f"the model takes {meta.text()} with every dim >= 1")
        if arr.dtype.kind in "iu":
            bound = (bounds or {}).get(meta.name)
            low, high = int(arr.min()), int(arr.max())
            if low < 0:
                raise BadInput(f"{what} {meta.name!r} holds the negative id {low}; integer inputs (token ids) "
                               "must be >= 0")
            if bound is not None and high >= bound:
                raise BadInput(f"{what} {meta.name!r} holds the id {high}; the model takes ids 0..{bound - 1}")
            if high > _MAX_ID:
                raise BadInput(f"{what} {meta.name!r} holds the id {high}, beyond any vocabulary")
    return out


def _from_list(value: Any, meta: Any, what: str) -> Any:
    """A nested list (or tuple) as an array of the input's dtype, refusing what a cast would change:
    a fraction for an integer input, a number beyond the dtype's range, a non-number."""
    if not isinstance(value, (list, tuple)):
        return value
    label = f"{what} {meta.name!r}"
    want = numpy_dtype(meta.dtype)
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInput(f"{label} cannot be read as an array: {str(exc)[:200]}") from exc
    if arr.dtype.kind not in "biuf":
        raise BadInput(f"{label} holds {arr.dtype.name} values, not numbers; the model takes {meta.text()}")
    if want is None or arr.dtype == want:
        return arr
    if want.kind in "iu":
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            raise BadInput(f"{label} holds non-integral values; the model takes {meta.text()}: give whole numbers")
        info = np.iinfo(want)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BadInput(f"{label} holds values beyond {want.name}'s range; the model takes {meta.text()}")
    elif want.kind == "b" and arr.dtype.kind != "b":
        raise BadInput(f"{label} holds {arr.dtype.name} values; the model takes {meta.text()}: give True/False")
    with np.errstate(over="raise", invalid="raise"):
        try:
            return arr.astype(want)
        except FloatingPointError as exc:
            raise BadInput(f"{label} holds values beyond {want.name}'s range") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def any_batch(signature: ModelSignature) -> ModelSignature:
    """`signature` with every input's batch dim dynamic: a feed may hold any number of samples, since
    a static-batch runner takes them in padded chunks of its batch (parity.run_batched)."""
    if signature.static_batch is None:
        return signature
    inputs = tuple(replace(m, shape=(BATCH, *m.shape[1:])) for m in signature.inputs)
    return replace(signature, inputs=inputs)


def sample_feed(signature: ModelSignature, *, data: Any = None, run_config: Mapping[str, Any] | None = None,
                samples: int | None = None, seed: int = 0, made_up: int = 512,
                tokenizer: str | Path | None = None) -> tuple[str, Feed]:
    """The samples a command runs on: `data` when given, else the data set the run was trained on (when
    it has one), else `made_up` made-up samples from the signature.

    Args:
        signature: the model's signature.
        data: anything `load_feed` takes, or None.
        run_config: the config.json of the model's run, if known.
        samples: how many samples (None: all held-out ones).
        seed: the data split's seed (a run's own seed for its data set).
        made_up: how many made-up samples at most, when nothing else is known.
        tokenizer: the model folder whose tokenizer reads a text file for a token model (load_feed).

    Returns:
        (label, feed).

    Raises:
        BadInput: data that cannot feed this model.
    """
    if data is not None:
        return load_feed(data, signature, samples=samples, seed=seed, tokenizer=tokenizer)
    if run_config and run_config.get("dataset"):
        dataset, run_seed = run_config["dataset"], run_config.get("seed", seed)
        options = run_config.get("data_options", {})
        if not isinstance(dataset, str) or not _is_int(run_seed) or not isinstance(options, Mapping):
            raise BadInput("the run's config.json is not a deploytool run's: dataset must be a name, seed a whole "
                           f"number and data_options a table (got {dataset!r}, {run_seed!r}, {options!r})")
        return load_feed(dataset, signature, samples=samples, seed=run_seed, data_options=options)
    count = made_up if samples is None else min(samples, made_up)
    if count > MAX_MADE_UP:
        raise BadInput(f"{count} made-up samples asked for; at most {MAX_MADE_UP} are made up: "
                       "ask for fewer samples, or give data")
    return "made-up samples", random_feed(signature, count, seed=seed)


#: the most made-up samples one command makes, and the most bytes they may take
MAX_MADE_UP = 100_000
MAX_MADE_UP_BYTES = 1 << 30


def _read(data: Any, signature: ModelSignature, samples: int | None, seed: int,
          data_options: Mapping[str, Any], tokenizer: str | Path | None = None) -> tuple[str, dict[str, Any], bool]:
    """(label, arrays by input name, whether they are a data set's rows)."""
    names = signature.input_names
    token_input = _token_input(signature)
    if token_input is not None and isinstance(data, (str, Path)) and Path(data).is_file() \
            and not str(data).endswith(".npz"):
        return _token_windows(Path(data), signature, token_input, samples, tokenizer)
    if isinstance(data, Mapping):
        return "arrays", dict(data), False
    if isinstance(data, np.ndarray):
        return "array", _single(names, data, "an array"), False
    if not isinstance(data, (str, Path)):
        raise BadInput(f"data must be a data set name, an .npz path, an array or a dict of arrays, "
                       f"got {type(data).__name__}")
    if str(data).endswith(".npz") and Path(data).is_file():
        arrays = _npz(Path(data))
        extra = set(arrays) - set(names)
        if set(names) <= set(arrays) and extra <= {"y"}:  # a data set's labels beside its inputs are no input
            return Path(data).name, {n: arrays[n] for n in names}, False
        if not {"x", "y"} <= set(arrays):
            raise BadInput(f"{Path(data).name} holds the arrays {sorted(arrays)}; give one array per model input "
                           f"({signature.describe()}), or a data set with arrays 'x' and 'y'")
    ds = load_dataset(str(data), seed, **data_options)
    rows = ds.x_test if samples is None or samples <= len(ds.x_test) else np.concatenate([ds.x_test, ds.x_train])
    label = f"{ds.name} held-out" + ("" if rows is ds.x_test else " + train")
    return label, _single(names, rows, f"data set {ds.name}"), True


#: windows a token file gives when no sample count is asked for
DEFAULT_TOKEN_WINDOWS = 64


def _token_input(signature: ModelSignature) -> str | None:
    """The input of a token model: its only input, integer, [batch, tokens]."""
    if len(signature.inputs) != 1:
        return None
    meta = signature.inputs[0]
    return meta.name if len(meta.shape) == 2 and meta.dtype.startswith(("int", "uint")) else None


def _token_windows(path: Path, signature: ModelSignature, name: str, samples: int | None,
                   tokenizer: str | Path | None) -> tuple[str, dict[str, Any], bool]:
    """Evenly spaced windows of a token file, as long as the model's tokens dim (its export example)."""
    from deploytool.tokens import eval_starts, load_tokens, window_batch

    stream = load_tokens(path, tokenizer=tokenizer)
    dim = signature.inputs[0].shape[1]
    length = dim if is_static(dim) else signature.dim_examples.get(str(dim), DEFAULT_DIM)
    count = min(samples or DEFAULT_TOKEN_WINDOWS, MAX_MADE_UP)
    ids, _ = window_batch(stream, eval_starts(stream, length, count * length), length, signature.vocab.get(name))
    return f"{path.name} ({len(ids)} windows of {length} tokens)", {name: ids[:count]}, False


def _single(names: list[str], rows: np.ndarray, what: str) -> dict[str, np.ndarray]:
    if len(names) != 1:
        raise BadInput(f"{what} gives one array but the model takes {len(names)} inputs {names}: give a .npz "
                       "with one array per input name")
    return {names[0]: rows}


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BadInput(f"{path} is not a readable .npz ({type(exc).__name__}: {str(exc)[:120]})") from exc


def random_feed(signature: ModelSignature, batch: int, *, seed: int = 0, like: Feed | None = None) -> Feed:
    """`batch` made-up samples per input, the same for the same seed.

    Args:
        signature: the model's signature.
        batch: samples per input.
        seed: the random seed.
        like: real samples whose mean and spread float inputs take (standard normal without them).

    Returns:
        The feed: float inputs normal, integer inputs over the signature's vocabulary for them (0 or
        1, valid for any embedding, where it names none), bool inputs random; dynamic non-batch dims at
        the size of the signature's export example.
    """
    if not signature.inputs:
        raise BadInput("the model has no inputs to make samples for")
    shapes = {meta.name: [batch] + [d if is_static(d) else signature.dim_examples.get(str(d), DEFAULT_DIM)
                                    for d in meta.shape[1:]] for meta in signature.inputs}
    size = sum(math.prod(int(d) for d in shape) * 8 for shape in shapes.values())  # made as float64 first
    if size > MAX_MADE_UP_BYTES:
        raise BadInput(f"{batch} made-up samples of {signature.describe()} would take {size / 2**30:.1f} GiB; "
                       f"at most {MAX_MADE_UP_BYTES / 2**30:.0f} GiB are made up: ask for fewer samples")
    rng = np.random.default_rng(seed)
    feed = {}
    for meta in signature.inputs:
        shape = shapes[meta.name]
        dtype = numpy_dtype(meta.dtype) or np.dtype(np.float32)
        if dtype.kind == "f":
            mean, std = 0.0, 1.0
            if like is not None and meta.name in like and len(like[meta.name]):
                ref = like[meta.name].astype(np.float64)
                mean, std = ref.mean(0), ref.std(0) + 1e-3
                if np.shape(mean) != tuple(shape[1:]):
                    mean, std = float(np.mean(mean)), float(np.mean(std))
            feed[meta.name] = (mean + std * rng.standard_normal(shape)).astype(dtype)
        elif dtype.kind == "b":
            feed[meta.name] = rng.random(shape) < 0.5
        else:
            feed[meta.name] = rng.integers(0, signature.vocab.get(meta.name, 2), size=shape).astype(dtype)
    return feed


def batch_of(feed: Feed) -> int:
    """The batch size of a feed (every input shares it); 0 for a feed of no inputs."""
    return int(len(next(iter(feed.values())))) if feed else 0


def take(feed: Feed, rows: Any) -> Feed:
    """The same samples (a slice or index array over the batch) of every input.

    Args:
        feed: inputs by name.
        rows: a slice, an index array or a boolean mask over the batch.

    Returns:
        The feed of those rows.
    """
    return {k: v[rows] for k, v in feed.items()}
