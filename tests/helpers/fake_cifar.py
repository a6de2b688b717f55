"""Small CIFAR-10 files in the official pickled format, for end-to-end runs of the real loader."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch, per_class: int = 10) -> None:
    """``root/cifar-10-batches-py`` with ``per_class`` training images of each class per batch file (5 files) and
    ``per_class`` test images of each; torchvision's md5 table is pointed at the fakes. Classes differ by colour so
    a model can learn them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 225, size=(10, 3))

    def rows(n: int) -> tuple[np.ndarray, list[int]]:
        labels = np.repeat(np.arange(10), n)
        pixels = colours[labels][:, :, None] + rng.integers(-25, 26, size=(len(labels), 3, 1024))
        return pixels.clip(0, 255).astype(np.uint8).reshape(len(labels), 3072), labels.tolist()

    for i in range(1, 6):
        data, labels = rows(per_class)
        _dump(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": labels, "data": data})
    data, labels = rows(per_class)
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels, "data": data})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"num_cases_per_batch": 10 * per_class, "label_names": names, "num_vis": 3072})
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(
        cls, "meta", {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")}
    )
