"""Hydra sweeps: the joblib launcher locally, the SLURM launcher's config, and Optuna on a validation split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cl_lightning.train import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = [
    "dataset.source._target_=helpers.synthetic.blobs", "dataset.name=blobs", "epochs_per_task=1", "logger=none",
    "save_checkpoints=false", "threads=1",
]  # fmt: skip


def run_cli(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CL_OUTPUT_DIR": str(out), "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(
        [sys.executable, "-m", "cl_lightning", *args], capture_output=True, text=True, timeout=300, env=env, cwd=out
    )


def test_slurm_launcher_composes_and_instantiates() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"],
            return_hydra_config=True,
        )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg.partition == "gpu" and launcher_cfg.gpus_per_node == 4 and launcher_cfg.timeout_min == 240
    launcher = instantiate(launcher_cfg)
    assert type(launcher).__name__ == "SlurmLauncher"


@pytest.mark.slow  # each job process imports torch and Lightning anew
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "-m", "hydra/launcher=local", "method=naive,joint", *SYNTHETIC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = tmp_path.glob("*/*/summary.md")
    assert "| joint | blobs |" in summary.read_text() and "| naive | blobs |" in summary.read_text()


def test_optuna_tunes_on_the_validation_split(tmp_path: Path) -> None:
    proc = run_cli(
        tmp_path, "hparams_search=lr", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
        *SYNTHETIC,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*/*/*/results.json")]
    assert len(results) == 2
    lrs = {r["config"]["optimizer"]["lr"] for r in results}
    assert len(lrs) == 2, "each trial draws its own learning rate"
    assert all(r["config"]["dataset"]["eval_split"] == "val" for r in results), "never tuned on the test set"
    (best,) = tmp_path.glob("*/*/optimization_results.yaml")
    assert "best_value" in best.read_text()
