"""Feeds: the named input arrays a model takes, from a data set, a file, arrays, or made up.

The one loader of input rows for verify, export's validation and bench: a data set's flat rows are
reshaped to the model's input shape (digits' 64 pixels become [1, 8, 8] for an image model), a .npz
with one array per input name feeds a multi-input model, and `random_feed` makes inputs from the
signature alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.errors import BadInput
from deploytool.signature import BATCH, ModelSignature, is_static, numpy_dtype

Feed = dict[str, np.ndarray]
#: the size given to a dynamic non-batch dim the signature has no example size for
DEFAULT_DIM = 8


def load_feed(data: str | Path | np.ndarray | Mapping[str, Any], signature: ModelSignature, *,
              samples: int | None = None, seed: int = 0, data_options: Mapping[str, Any] | None = None
              ) -> tuple[str, Feed]:
    """(label, feed) for `signature` from `data`, checked against the signature.

    Args:
        data: a data set name or .npz path (see deploytool.data; its held-out rows, then training rows
            when more `samples` are asked for), a .npz of one array per input name, an array (a
            single-input model), or a dict of arrays keyed by input name.
        signature: the model's signature.
        samples: how many samples to take (None: all held-out rows).
        seed: the data split's seed.
        data_options: options of a built-in data set (e.g. n_features for blobs).

    Returns:
        A label saying where the rows came from, and the feed.

    Raises:
        BadInput: data that cannot feed this model (wrong names, sizes, dtypes; NaN).
    """
    if samples is not None and samples < 1:
        raise BadInput(f"samples must be >= 1, got {samples}")
    label, named = _read(data, signature, samples, seed, data_options or {})
    missing = [n for n in signature.input_names if n not in named]
    if missing:
        raise BadInput(f"{label} has no input(s) {missing}; the model takes {signature.describe()}")
    feed = {}
    for meta in signature.inputs:
        arr = np.asarray(named[meta.name])[:samples]
        sample_shape = tuple(d if is_static(d) else -1 for d in meta.shape[1:])
        if arr.ndim != len(meta.shape) and -1 not in sample_shape and arr.size:
            if arr.reshape(len(arr), -1).shape[1] != int(np.prod(sample_shape)):
                raise BadInput(f"{label}: input {meta.name!r} samples have shape {list(arr.shape[1:])}, the model "
                               f"takes {meta.text()}")
            arr = arr.reshape(len(arr), *sample_shape)
        want = numpy_dtype(meta.dtype)
        if want is not None and arr.dtype != want and np.can_cast(arr.dtype, want, "same_kind"):
            arr = arr.astype(want)
        feed[meta.name] = arr
    return label, any_batch(signature).check_feed(feed, what=f"{label} input")


def any_batch(signature: ModelSignature) -> ModelSignature:
    """`signature` with every input's batch dim dynamic: a feed may hold any number of samples, since
    a static-batch runner takes them in padded chunks of its batch (parity.run_batched)."""
    if signature.static_batch is None:
        return signature
    inputs = tuple(replace(m, shape=(BATCH, *m.shape[1:])) for m in signature.inputs)
    return replace(signature, inputs=inputs)


def sample_feed(signature: ModelSignature, *, data: Any = None, run_config: Mapping[str, Any] | None = None,
                samples: int | None = None, seed: int = 0, made_up: int = 512) -> tuple[str, Feed]:
    """The samples a command runs on: `data` when given, else the data set the run was trained on (when
    it has one), else `made_up` made-up samples from the signature.

    Args:
        signature: the model's signature.
        data: anything `load_feed` takes, or None.
        run_config: the config.json of the model's run, if known.
        samples: how many samples (None: all held-out ones).
        seed: the data split's seed (a run's own seed for its data set).
        made_up: how many made-up samples at most, when nothing else is known.

    Returns:
        (label, feed).

    Raises:
        BadInput: data that cannot feed this model.
    """
    if data is not None:
        return load_feed(data, signature, samples=samples, seed=seed)
    if run_config and run_config.get("dataset"):
        return load_feed(run_config["dataset"], signature, samples=samples, seed=run_config.get("seed", seed),
                         data_options=run_config.get("data_options", {}))
    return "made-up samples", random_feed(signature, made_up if samples is None else min(samples, made_up), seed=seed)


def _read(data: Any, signature: ModelSignature, samples: int | None, seed: int,
          data_options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    names = signature.input_names
    if isinstance(data, Mapping):
        return "arrays", dict(data)
    if isinstance(data, np.ndarray):
        return "array", _single(names, data, "an array")
    if str(data).endswith(".npz") and Path(data).is_file():
        arrays = _npz(Path(data))
        if set(names) <= set(arrays):
            return Path(data).name, {n: arrays[n] for n in names}
    from deploytool.data import load_dataset

    ds = load_dataset(str(data), seed, **data_options)
    rows = ds.x_test if samples is None or samples <= len(ds.x_test) else np.concatenate([ds.x_test, ds.x_train])
    label = f"{ds.name} held-out" + ("" if rows is ds.x_test else " + train")
    return label, _single(names, rows, f"data set {ds.name}")


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
    rng = np.random.default_rng(seed)
    feed = {}
    for meta in signature.inputs:
        shape = [batch] + [d if is_static(d) else signature.dim_examples.get(str(d), DEFAULT_DIM)
                           for d in meta.shape[1:]]
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
    """The batch size of a feed (every input shares it)."""
    return int(len(next(iter(feed.values()))))


def take(feed: Feed, rows: Any) -> Feed:
    """The same samples (a slice or index array over the batch) of every input."""
    return {k: v[rows] for k, v in feed.items()}
