"""Shared fixtures: the real Hydra configs, composed and shrunk to a synthetic task sequence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from cl_lightning.train import CONFIG_DIR

torch.set_num_threads(1)

SYNTHETIC = [
    "dataset.source._target_=helpers.synthetic.blobs",
    "dataset.name=blobs",
    "epochs_per_task=4",
    "batch_size=16",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/train.yaml`` with overrides; the run writes into a fresh directory under ``tmp_path``."""
    counter = iter(range(1000))

    def _make(*overrides: str, synthetic: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[*(SYNTHETIC if synthetic else []), *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"run{next(counter)}")
        return cfg

    return _make
