"""Real-data runs (marked slow, run in CI): the real loaders, scenarios and training on MNIST and Fashion-MNIST.

They skip with a reason where the data is absent (set CL_DATA_DIR to a folder holding MNIST/raw).
"""

from __future__ import annotations

import os

import pytest
import torch

from cl_lightning.data.sources import DatasetNotFoundError, load_fashion_mnist, load_mnist
from cl_lightning.train import train

pytestmark = pytest.mark.slow

SMALL = ["dataset.max_samples_per_task=1500", "epochs_per_task=1", "batch_size=64", "logger=none"]


def _require(loader, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Skip unless the dataset is in ``CL_DATA_DIR``; given ``monkeypatch``, also where the default search (no
    ``CL_DATA_DIR``) finds it, unsetting ``CL_DATA_DIR`` for the test: Debian's Fashion-MNIST."""
    try:
        loader(os.environ.get("CL_DATA_DIR") or None)
        return
    except DatasetNotFoundError as err:
        if monkeypatch is None or not os.environ.get("CL_DATA_DIR"):
            pytest.skip(f"real data absent: {str(err)[:200]}")
    monkeypatch.delenv("CL_DATA_DIR")  # a given directory is the only place looked in: search the default places
    try:
        loader(None)
    except DatasetNotFoundError as err:
        pytest.skip(f"real data absent: {str(err)[:200]}")


@pytest.mark.parametrize(
    ("dataset", "scenario", "n_outputs"),
    [("split_mnist", "class_il", 10), ("split_mnist", "task_il", 10), ("split_mnist", "domain_il", 2)],
)
def test_split_mnist_learns_each_task(make_cfg, dataset: str, scenario: str, n_outputs: int) -> None:
    _require(load_mnist)
    cfg = make_cfg(f"dataset={dataset}", f"dataset.scenario={scenario}", *SMALL, synthetic=False)
    results = train(cfg)
    diag = torch.tensor(results["acc_matrix"]).diagonal()
    assert bool((diag > 0.85).all()), diag
    assert results["n_tasks"] == 5


def test_permuted_and_rotated_mnist(make_cfg) -> None:
    _require(load_mnist)
    for dataset in ("permuted_mnist", "rotated_mnist"):
        # ten classes per task: a few more steps than the two-class splits need
        cfg = make_cfg(f"dataset={dataset}", "dataset.n_tasks=3", *SMALL, "epochs_per_task=4", synthetic=False)
        results = train(cfg)
        matrix = torch.tensor(results["acc_matrix"])
        assert matrix.shape == (3, 3)
        assert bool((matrix.diagonal() > 0.7).all()), (dataset, matrix)  # chance is 0.1


def test_split_fashion_mnist(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    _require(load_fashion_mnist, monkeypatch)
    results = train(make_cfg("dataset=split_fmnist", *SMALL, synthetic=False))
    assert bool((torch.tensor(results["acc_matrix"]).diagonal() > 0.8).all())
