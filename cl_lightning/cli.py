"""The command line, ``python -m cl_lightning [group=option ...] [key=value ...]`` (``-m`` sweeps).

This module imports neither torch nor Lightning: ``--help``, ``--cfg job`` and ``--info`` answer from Hydra alone,
and the run's modules are imported only when a run starts (:func:`cl_lightning.train.run_command`).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cl_lightning.config_resolvers import register_resolvers

# The configs live at the repository's top level (conf/), beside the package; an absolute path keeps
# `python -m cl_lightning` working from any directory (Hydra would read a relative one as a Python module path).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_resolvers()  # `${cl.case:...}` and `${cl_or:...}` in the configs, before Hydra resolves any of them


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; returns ``results[optimized_metric]`` when it is set (for Hydra's Optuna sweeper)."""
    from cl_lightning.train import run_command

    return run_command(cfg)
