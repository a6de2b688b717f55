"""Lightning's DDP on CPU (gloo, 2 processes), launched the way users launch it: through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = ["dataset.source._target_=helpers.synthetic.blobs", "dataset.name=blobs", "epochs_per_task=2"]


def run(out: Path, *args: str) -> dict:
    env = {**os.environ, "CL_OUTPUT_DIR": str(out), "PYTHONPATH": str(REPO / "tests")}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cl_lightning", *SYNTHETIC, *args, "threads=1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = out.glob("*/*/results.json")
    return json.loads(results.read_text())


@pytest.mark.slow  # DDP checks run with -m slow (CI runs both)
@pytest.mark.parametrize("method", ["naive", "joint"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path: Path, method: str) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = run(tmp_path / "one", f"method={method}", "batch_size=16")
    ddp = run(tmp_path / "two", f"method={method}", "trainer=ddp", "trainer.devices=2", "batch_size=8")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    # rank r takes every other sample of the same permutation, so the two ranks' batches of 8 are the single
    # process's batch of 16 and the averaged gradient is the same up to floating-point summation order
    for row_single, row_ddp in zip(single["acc_matrix"], ddp["acc_matrix"], strict=True):
        assert row_ddp == pytest.approx(row_single, abs=0.02)
    assert ddp["init_acc"] == single["init_acc"], "evaluation shards cover every test sample exactly once"


@pytest.mark.slow
def test_an_online_stream_under_ddp_matches_one_process(tmp_path: Path) -> None:
    """One stream under DDP: the ranks take alternate samples of the stream in its order, the rows are measured at
    the same nominal steps, and the class-IL mask of seen labels is built from every rank's labels."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    online = ["dataset.stream=online", "epochs_per_task=1", "dataset.blur=0.3", "method=naive"]
    single = run(tmp_path / "one", *online, "batch_size=8")
    ddp = run(tmp_path / "two", *online, "trainer=ddp", "trainer.devices=2", "batch_size=4")
    assert ddp["complete"] and ddp["world_size"] == 2
    for row_single, row_ddp in zip(single["acc_matrix"], ddp["acc_matrix"], strict=True):
        assert row_ddp == pytest.approx(row_single, abs=0.02)
