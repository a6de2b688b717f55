"""A run can be used after it ran: its network loads, evaluates to what results.json says, and exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import tree_bytes

from cl_lightning.errors import RunDirectoryError
from cl_lightning.evaluate import evaluate, load_run
from cl_lightning.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("scenario", ["class_il", "task_il"])
def test_a_loaded_run_evaluates_to_its_last_row(make_cfg, scenario: str) -> None:
    cfg = make_cfg("logger=none", "epochs_per_task=2", f"dataset.scenario={scenario}")
    results = train(cfg)
    before = tree_bytes(Path(cfg.paths.output_dir))
    run = load_run(cfg.paths.output_dir)
    got = evaluate(run)
    assert run.tasks_trained == 5 and got["accuracy"] == results["acc_matrix"][-1]
    if scenario == "class_il":
        assert got["task_il_accuracy"] == results["task_il_acc_matrix"][-1]
    assert tree_bytes(Path(cfg.paths.output_dir)) == before, "nothing in the run directory is written"


def test_a_packnet_run_evaluates_each_task_with_its_own_weights(make_cfg) -> None:
    cfg = make_cfg("logger=none", "method=packnet", "dataset.scenario=task_il", "epochs_per_task=2")
    results = train(cfg)
    assert evaluate(load_run(cfg.paths.output_dir))["accuracy"] == results["acc_matrix"][-1]


@pytest.mark.slow  # a command-line subprocess (CI runs -m slow too): the default suite under 5 min
def test_the_command_exports_the_network(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("logger=none", "epochs_per_task=1", "max_tasks=2")
    results = train(cfg)
    out = tmp_path / "net.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "cl_lightning.evaluate", cfg.paths.output_dir, "--export", str(out), "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tasks_trained"] == 2 and got["accuracy"] == results["acc_matrix"][-1]
    weights = torch.load(out, weights_only=True)
    net = load_run(cfg.paths.output_dir).net
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    again = subprocess.run([sys.executable, "-m", "cl_lightning.evaluate", cfg.paths.output_dir, "--export", str(out)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_a_directory_without_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RunDirectoryError, match="no checkpoints/last.ckpt"):
        load_run(tmp_path)
