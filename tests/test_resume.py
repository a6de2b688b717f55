"""Exact resume after preemption: a run SIGKILLed (or interrupted) in the middle of a task and resumed equals the
uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cl_lightning.train import RunInterrupted, train

REPO = Path(__file__).resolve().parents[1]
RUN = [
    "dataset.source._target_=helpers.synthetic.blobs", "dataset.name=blobs", "epochs_per_task=2", "batch_size=16",
    "logger=none", "threads=1",
]  # fmt: skip


def cli(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CL_OUTPUT_DIR": str(out), "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(
        [sys.executable, "-m", "cl_lightning", *args], capture_output=True, text=True, timeout=300, env=env, cwd=out
    )


@pytest.mark.slow  # resume checks run with -m slow (CI runs both); tests/test_contract.py covers every method
@pytest.mark.parametrize("extra", [[], ["optimizer=adam", "model.dropout=0.2"]])
def test_sigkill_mid_task_then_resume_is_bit_identical(tmp_path: Path, extra: list[str]) -> None:
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole = cli(tmp_path / "whole", *RUN, *extra)
    assert whole.returncode == 0, whole.stderr[-2000:]
    # 10 steps per task: step 18 is in the middle of task 2 (index 1); the last checkpoint before it is step 16
    killed = cli(
        tmp_path / "killed", *RUN, *extra, "checkpoint_every_n_steps=4",
        "+callbacks.kill._target_=helpers.kill.KillAtStep", "+callbacks.kill.step=18",
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    (run_dir,) = (tmp_path / "killed").glob("*/*")
    assert json.loads((run_dir / "results.json").read_text())["tasks_completed"] == 1
    resumed = cli(tmp_path / "killed", f"resume={run_dir}", "threads=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.loads(next((tmp_path / "whole").glob("*/*/results.json")).read_text())
    got = json.loads((run_dir / "results.json").read_text())
    assert got["complete"] and got["acc_matrix"] == expected["acc_matrix"]


SCHEDULER = "scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 2, gamma: 0.5}"


def test_an_lr_scheduler_resumes_mid_task_where_it_was(make_cfg) -> None:
    """The LR scheduler's position is restored from a mid-task checkpoint: the resumed run ends with the weights of
    the uninterrupted one, bit for bit (StepLR halves the lr every second epoch, 3 epochs of 5 steps per task; the
    interruption at step 25 is in the second epoch of task 1, and the checkpoint it resumes from is step 24's)."""
    common = [SCHEDULER, "epochs_per_task=3", "batch_size=16", "logger=none", "max_tasks=2", "optimizer=sgd"]
    whole = make_cfg(*common)
    train(whole)
    cut = make_cfg(*common, "checkpoint_every_n_steps=4", "+callbacks.cut._target_=helpers.kill.InterruptAtStep",
                   "+callbacks.cut.step=25")  # fmt: skip
    with pytest.raises(RunInterrupted):
        train(cut)
    mid = torch.load(Path(cut.paths.output_dir) / "checkpoints" / "mid_task.ckpt", weights_only=True)
    assert mid["global_step"] == 24 and mid["lr_schedulers"][0]["last_epoch"] >= 1, "the scheduler has stepped"
    train(make_cfg(f"resume={cut.paths.output_dir}", "logger=none", "max_tasks=1"))  # the rest of task 1

    def weights(cfg) -> dict:
        state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
        return state["state_dict"]

    expected, got = weights(whole), weights(cut)
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ"
