"""The command line, ``python -m cl_lightning [group=option ...] [key=value ...]`` (``-m`` sweeps).

This module imports neither torch nor Lightning: ``--help``, ``--cfg job`` and ``--info`` answer from Hydra alone,
and the run's modules are imported only when a run starts (:func:`cl_lightning.train.run_command`).
"""

from __future__ import annotations

import os
from pathlib import Path

# Before torch (and its OpenMP runtime) is loaded: idle OpenMP threads sleep instead of spinning on a core that
# another process needs (cl_lightning/threads.py). A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cl_lightning.config_resolvers import register_resolvers  # noqa: E402

# The configs ship inside the package (cl_lightning/conf/; the repository's top-level conf/ links to it), so a wheel
# or a non-editable install carries them; an absolute path keeps `python -m cl_lightning` working from any
# directory (Hydra would read a relative one as a Python module path).
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
register_resolvers()  # `${cl.case:...}` and `${cl_or:...}` in the configs, before Hydra resolves any of them


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; returns ``results[optimized_metric]`` when it is set (for Hydra's Optuna sweeper)."""
    from cl_lightning.train import run_command

    return run_command(cfg)
