"""Data sets: digits (ships inside scikit-learn), synthetic blobs, and a user's .npz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploytool.errors import BadInput

BUILTIN = ("digits", "blobs")


@dataclass
class Dataset:
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
    """The 1797 8x8 digit images of scikit-learn, pixels scaled to [0, 1], split by `seed`."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _split("digits", d.data / 16.0, d.target, seed, test_fraction)


def load_blobs(seed: int = 0, n_samples: int = 4096, n_features: int = 64, n_classes: int = 8,
               test_fraction: float = 0.2) -> Dataset:
    """Gaussian clusters, standardised: any size, for benchmarks."""
    from sklearn.datasets import make_blobs

    if n_samples < 10 or n_features < 1 or n_classes < 2:
        raise BadInput("blobs needs n_samples >= 10, n_features >= 1, n_classes >= 2")
    x, y = make_blobs(n_samples=n_samples, n_features=n_features, centers=n_classes, cluster_std=4.0,
                      random_state=seed)
    x = (x - x.mean(0)) / x.std(0)
    return _split("blobs", x, y, seed, test_fraction)


def load_npz(path: str | Path, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """A user's .npz with arrays `x` [N, F] and integer labels `y` [N]; pickled objects are refused."""
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
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise BadInput(f"{path} holds pickled objects, which are refused: save plain numeric arrays") from exc
    except (OSError, EOFError) as exc:
        raise BadInput(f"{path} is not a readable .npz file: {exc}") from exc
    if x.ndim != 2 or y.ndim != 1:
        raise BadInput(f"{path}: x must be 2-D [N, F] and y 1-D [N], got x{list(x.shape)} y{list(y.shape)}")
    if len(x) != len(y):
        raise BadInput(f"{path}: x has {len(x)} rows but y has {len(y)} labels")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"{path}: x must be numeric and y integer labels, got {x.dtype} and {y.dtype}")
    if not np.isfinite(x).all():
        raise BadInput(f"{path}: x contains NaN or inf")
    if len(y) < 10 or y.min() < 0:
        raise BadInput(f"{path}: need at least 10 rows and labels >= 0")
    try:
        return _split(path.stem, x, y, seed, test_fraction)
    except ValueError:  # a class too small to stratify
        return _split(path.stem, x, y, seed, test_fraction, stratify=False)


def load_dataset(name: str, seed: int = 0, **kwargs) -> Dataset:
    """digits | blobs | a path to an .npz file."""
    loaders = dict(zip(BUILTIN, (load_digits, load_blobs)))
    if name in loaders:
        return loaders[name](seed, **kwargs)
    if name.endswith(".npz") or Path(name).exists():
        return load_npz(name, seed)
    raise BadInput(f"unknown data set {name!r}; use digits, blobs or a path to an .npz file")
