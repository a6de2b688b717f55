"""Exact resume after preemption: a run SIGKILLed in the middle of task 2 and resumed equals the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
