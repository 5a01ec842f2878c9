"""Datasets of the demo, all read from local files, nothing downloaded.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 real images shipped
  inside the package), split once into train and test with a fixed seed.
* ``cifar10`` / ``cifar100``: a local copy in the standard python-pickle
  layout (``cifar-10-batches-py``: ``data_batch_1..5`` and ``test_batch``;
  ``cifar-100-python``: ``train`` and ``test``).

Every loader returns a :class:`Dataset` of float tensors ``[N, C, H, W]``,
normalised with the training set's per-channel mean and standard deviation.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor

# The digits split never depends on --seed: every run compares on the same images.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25

CIFAR_LAYOUTS = {
    # name: (folder inside --data-dir, training files, test file, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
}


class DataError(ValueError):
    """A dataset directory or file that cannot be used (missing, wrong layout, bad contents)."""


@dataclasses.dataclass
class Dataset:
    """Normalised train and test tensors plus what the models need to know."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    augment: bool  # random crop + flip while training (CIFAR), none for digits

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _normalise(x_train: Tensor, x_test: Tensor) -> Tuple[Tensor, Tensor]:
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits() -> Dataset:
    """scikit-learn's digits (8x8 grey images of 0-9, values 0..16), 75/25 split
    by a fixed permutation."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = int(round(DIGITS_TEST_FRACTION * len(labels)))
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = _normalise(images[train], images[test])
    return Dataset("digits", x_train, labels[train], x_test, labels[test], num_classes=10, augment=False)


def _find_cifar_dir(name: str, data_dir: str) -> str:
    """The folder that holds the pickle files: ``data_dir`` itself or its
    standard sub-folder; a clear :class:`DataError` when neither has them."""
    folder, train_files, test_file, _, _ = CIFAR_LAYOUTS[name]
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir!r} is not a directory; point it at a local {name} copy "
                        f"(the folder that holds {folder}/ or its files; nothing is downloaded)")
    needed = train_files + [test_file]
    for candidate in (os.path.join(data_dir, folder), data_dir):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in needed):
            return candidate
    missing = [f for f in needed if not os.path.isfile(os.path.join(data_dir, folder, f))
               and not os.path.isfile(os.path.join(data_dir, f))]
    raise DataError(f"{data_dir!r} is not a {name} directory in the python-pickle format: expected "
                    f"{folder}/ with {', '.join(needed)} (missing: {', '.join(missing)}); nothing is downloaded")


def _read_batch(path: str, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # a truncated or foreign file: say which one
        raise DataError(f"cannot read CIFAR pickle {path!r}: {exc}") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR pickle {path!r} does not hold a dict of arrays")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"CIFAR pickle {path!r} lacks the 'data' or {label_key!r} entry "
                        f"(has: {', '.join(sorted(map(str, batch)))})")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"CIFAR pickle {path!r} has data of shape {data.shape} and {len(labels)} labels; "
                        f"expected [N, 3072] uint8 rows and N labels")
    return data, labels


def load_cifar(name: str, data_dir: str) -> Dataset:
    """A local CIFAR-10/100 copy (``name``: "cifar10" or "cifar100")."""
    if name not in CIFAR_LAYOUTS:
        raise DataError(f"unknown CIFAR variant {name!r}; choose one of {', '.join(CIFAR_LAYOUTS)}")
    folder = _find_cifar_dir(name, data_dir)
    _, train_files, test_file, label_key, classes = CIFAR_LAYOUTS[name]

    def read(files: List[str]) -> Tuple[Tensor, Tensor]:
        parts = [_read_batch(os.path.join(folder, f), label_key) for f in files]
        data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise DataError(f"{name} labels in {folder!r} fall outside 0..{classes - 1}")
        return torch.from_numpy(data.astype(np.float32) / 255.0), torch.from_numpy(labels)

    x_train, y_train = read(train_files)
    x_test, y_test = read([test_file])
    if len(y_train) == 0 or len(y_test) == 0:
        raise DataError(f"{name} directory {folder!r} holds no training or no test images")
    x_train, x_test = _normalise(x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=classes, augment=True)


def load(name: str, data_dir: str | None = None) -> Dataset:
    """The dataset the command line asks for."""
    if name == "digits":
        return load_digits()
    if name in CIFAR_LAYOUTS:
        if not data_dir:
            raise DataError(f"--data {name} needs --data-dir DIR, a local copy in the python-pickle format "
                            f"({CIFAR_LAYOUTS[name][0]}/); nothing is downloaded")
        return load_cifar(name, data_dir)
    raise DataError(f"unknown dataset {name!r}; choose digits, cifar10 or cifar100")

