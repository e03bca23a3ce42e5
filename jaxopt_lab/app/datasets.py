"""The main job's data: the embedded digits set and user ``.npz`` files.

The default data set is scikit-learn's 8x8 handwritten digits (1,797 images, 10
classes), which ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np

from jaxopt_lab.train.data import Dataset, make_dataset


def load_digits(*, seed: int = 0, image: bool = True, **kwargs) -> Dataset:
    """The embedded default: scikit-learn's digits, as (N, 8, 8, 1) images or (N, 64)."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = d.images[..., None] if image else d.data
    return make_dataset(x.astype(np.float32) / 16.0, d.target, seed=seed, name="digits", **kwargs)


def load_npz(path: str | os.PathLike, *, seed: int = 0, **kwargs) -> Dataset:
    """Loads a user ``.npz`` file holding arrays ``x`` and ``y``.

    Raises:
      ValueError: the file is missing, unreadable, or lacks ``x``/``y``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(getattr(f, "files", ()))
            if {"x", "y"} <= keys:
                x, y = f["x"], f["y"]
    except Exception as e:  # zipfile.BadZipFile, OSError, pickle refusal, ...
        raise ValueError(f"data file {path!r} is not a readable .npz file: {e}") from None
    if not {"x", "y"} <= keys:
        raise ValueError(f"data file {path!r} must hold arrays 'x' and 'y', found {sorted(keys)}")
    return make_dataset(x, y, seed=seed, name=path, **kwargs)
