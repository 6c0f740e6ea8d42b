"""Data sets: digits (ships inside scikit-learn), synthetic blobs, and a user's .npz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploytool.errors import BadInput

BUILTIN = ("digits", "blobs")


@dataclass
class Dataset:
    """A data set split into train and test rows.

    Attributes:
        name: digits, blobs, or the .npz file's stem.
        x_train: float32 features [N, F].
        y_train: int64 labels [N], classes 0..K-1.
        x_test: float32 held-out features.
        y_test: int64 held-out labels.
    """

    name: str
    x_train: np.ndarray  # float32 [N, F]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)


def _split(name: str, x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float, stratify: bool = True) -> Dataset:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                              stratify=y if stratify else None)
    return Dataset(name, x_tr.astype(np.float32), y_tr.astype(np.int64), x_te.astype(np.float32),
                   y_te.astype(np.int64))


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """The 1797 8x8 digit images of scikit-learn, pixels scaled to [0, 1], split by `seed`.

    Args:
        seed: seeds the split.
        test_fraction: the share of rows held out.

    Returns:
        The Dataset (64 features, 10 classes).
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _split("digits", d.data / 16.0, d.target, seed, test_fraction)


def load_blobs(seed: int = 0, n_samples: int = 4096, n_features: int = 64, n_classes: int = 8,
               test_fraction: float = 0.2) -> Dataset:
    """Gaussian clusters, standardised: any size, for benchmarks.

    Args:
        seed: seeds the clusters and the split.
        n_samples: rows (>= 10).
        n_features: columns (>= 1).
        n_classes: clusters (>= 2).
        test_fraction: the share of rows held out.

    Returns:
        The Dataset.

    Raises:
        BadInput: sizes out of range, or more values than deploytool generates (check_data_options).
    """
    from sklearn.datasets import make_blobs

    check_data_options("blobs", {"n_samples": n_samples, "n_features": n_features, "n_classes": n_classes,
                                 "test_fraction": test_fraction})
    x, y = make_blobs(n_samples=n_samples, n_features=n_features, centers=n_classes, cluster_std=4.0,
                      random_state=seed)
    x = (x - x.mean(0)) / x.std(0)
    return _split("blobs", x, y, seed, test_fraction)


#: the most classes a data set may have (labels 0..K-1); more is a mistake, not a classification task
MAX_CLASSES = 10000
#: the largest built-in data set that may be generated (samples x features values)
MAX_GENERATED_VALUES = 10**8


def load_npz(path: str | Path, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """A user's .npz with arrays `x` [N, F] and integer labels `y` [N]; pickled objects are refused.

    Args:
        path: the .npz file (numpy.savez of arrays named x and y).
        seed: seeds the train/test split.
        test_fraction: the share of rows held out for the metrics.

    Returns:
        The Dataset, x as float32.

    Raises:
        BadInput: a file that is not a readable .npz (truncated, pickled objects), arrays of the wrong
            shape or type (complex or non-numeric x, non-integer labels), values that are not finite in
            float32, no features, fewer than 10 rows, or labels that are not classes 0..K-1.
    """
    import zipfile
    import zlib

    from deploytool.io import check_file

    path = check_file(path, "data file")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # an .npz is a zip archive
            raise BadInput(f"{path} is not an .npz file: save arrays x and y with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise BadInput(f"{path} must hold arrays named 'x' and 'y', found {sorted(npz.files)}")
            x, y = npz["x"], npz["y"]
    except BadInput:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):  # object arrays need pickle, which is refused
            raise BadInput(f"{path} holds pickled objects, which are refused: save plain numeric arrays") from exc
        raise BadInput(f"{path} is not a readable .npz file (truncated or corrupt?): {_first_line(exc)}") from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise BadInput(f"{path} is not a readable .npz file (truncated or corrupt?): {_first_line(exc)}") from exc
    x, y = check_xy(x, y, str(path))
    try:
        return _split(path.stem, x, y, seed, test_fraction)
    except ValueError:  # a class too small to stratify
        return _split(path.stem, x, y, seed, test_fraction, stratify=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_xy(x: np.ndarray, y: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays x [N, F] (real numbers) and y [N] (integer class labels 0..K-1) -> float32 x, int64 y.

    Args:
        x: the features, one row per sample.
        y: the labels.
        source: what the arrays came from, for the messages (a file name).

    Returns:
        (x as float32, y as int64).

    Raises:
        BadInput: what is wrong, naming `source`.
    """
    if x.ndim != 2 or y.ndim != 1:
        raise BadInput(f"{source}: x must be 2-D [N, F] and y 1-D [N], got x{list(x.shape)} y{list(y.shape)}")
    if len(x) != len(y):
        raise BadInput(f"{source}: x has {len(x)} rows but y has {len(y)} labels")
    if np.iscomplexobj(x):
        raise BadInput(f"{source}: x is complex ({x.dtype}); give real numbers (the imaginary part would be lost)")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"{source}: x must be numeric and y integer labels, got {x.dtype} and {y.dtype}")
    if x.shape[1] < 1:
        raise BadInput(f"{source}: x has no features (shape {list(x.shape)}); give at least one column")
    if len(y) < 10:
        raise BadInput(f"{source}: need at least 10 rows, got {len(y)}")
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below, with the file named
        x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():  # after the cast: 1e300 is finite in float64, inf in float32
        raise BadInput(f"{source}: x contains NaN or inf, or values beyond float32's range (~3.4e38)")
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise BadInput(f"{source}: labels must be classes 0..K-1, got a label {low}")
    if high >= MAX_CLASSES:
        raise BadInput(f"{source}: labels must be classes 0..K-1 with K <= {MAX_CLASSES}, got a label {high}")
    present = len(np.unique(y))
    if present < 2:
        raise BadInput(f"{source}: y holds a single class ({high}); nothing to learn")
    if present * 2 < high + 1:
        raise BadInput(f"{source}: labels must be classes 0..K-1, but only {present} of the {high + 1} classes "
                       f"0..{high} occur: renumber them (e.g. numpy.unique(y, return_inverse=True))")
    return x32, y.astype(np.int64)


#: the data_options each data set takes (an .npz: only its split)
OPTIONS = {"digits": ("test_fraction",), "blobs": ("n_samples", "n_features", "n_classes", "test_fraction"),
           "npz": ("test_fraction",)}


def check_data_options(name: str, options: dict) -> None:
    """Refuse data_options a data set does not take, of the wrong type, or too large to generate.

    Args:
        name: digits, blobs or a path to an .npz file.
        options: the data_options of a recipe.

    Returns:
        None; it only raises.

    Raises:
        BadInput: naming the option and what is wrong.
    """
    if not isinstance(options, dict):
        raise BadInput(f"data_options must be a table of options, got {options!r}")
    kind = name if name in BUILTIN else "npz"
    known = OPTIONS[kind]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise BadInput(f"data_options {', '.join(map(repr, unknown))} do not apply to data set {name} "
                       f"(it takes {', '.join(known)})")
    for key, value in options.items():
        if key == "test_fraction":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise BadInput(f"data_options test_fraction must be a number between 0 and 1, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool):
            raise BadInput(f"data_options {key} must be a whole number, got {value!r}")
    if kind == "blobs":
        n_samples, n_features = options.get("n_samples", 4096), options.get("n_features", 64)
        n_classes = options.get("n_classes", 8)
        if n_samples < 10 or n_features < 1 or not 2 <= n_classes <= min(MAX_CLASSES, n_samples // 2):
            raise BadInput(f"data_options: blobs needs n_samples >= 10, n_features >= 1 and 2 <= n_classes <= "
                           f"min({MAX_CLASSES}, n_samples / 2), got {n_samples}, {n_features}, {n_classes}")
        if n_samples * n_features > MAX_GENERATED_VALUES:
            raise BadInput(f"data_options: blobs of {n_samples} x {n_features} values is more than the "
                           f"{MAX_GENERATED_VALUES:.0e} deploytool generates; use fewer samples or features")


def load_dataset(name: str, seed: int = 0, **kwargs) -> Dataset:
    """digits | blobs | a path to an .npz file.

    Args:
        name: digits, blobs, or a path to an .npz file.
        seed: seeds the split (and blobs' generation).
        **kwargs: data_options the data set takes (check_data_options).

    Returns:
        The Dataset.

    Raises:
        BadInput: an unknown data set, an option it does not take, or a bad .npz.
    """
    loaders = dict(zip(BUILTIN, (load_digits, load_blobs)))
    if name not in loaders and not (name.endswith(".npz") or Path(name).exists()):
        raise BadInput(f"unknown data set {name!r}; use digits, blobs or a path to an .npz file")
    check_data_options(name, kwargs)
    if name in loaders:
        return loaders[name](seed, **kwargs)
    return load_npz(name, seed, **kwargs)
