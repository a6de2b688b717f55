"""A run never reports garbage and never loses or rewrites a record; nothing typed is silently ignored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import REPO, error_lines, run_cli, tree_bytes

from cl_lightning.errors import ConfigError, DivergenceError, RunDirectoryError
from cl_lightning.run_dir import RunDirectory
from cl_lightning.train import train

BLOBS = ["dataset.source._target_=helpers.synthetic.blobs", "dataset.name=blobs", "epochs_per_task=1"]


def test_divergence_is_an_error_with_exit_code_3(tmp_path: Path) -> None:
    proc = run_cli("optimizer.lr=1e6", "logger=none", out=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "diverged" in line and "step" in line and "task 0" in line and "optimizer.lr" in line
    (results_file,) = tmp_path.glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    assert results["complete"] is False and results["diverged"]["task"] == 0
    assert results["diverged"]["value"] in ("nan", "inf") and results["acc_matrix"] == []
    assert "avg_acc" not in results or results["avg_acc"] is None


def test_divergence_in_a_later_task_keeps_the_finished_rows(make_cfg) -> None:
    cfg = make_cfg("logger=none", "optimizer.lr=0.05")
    run = train(cfg)  # a healthy run first, to compare the rows
    cfg2 = make_cfg("logger=none", "optimizer.lr=0.05", "+callbacks.blowup._target_=helpers.hooks.BlowUpAtTask",
                    "+callbacks.blowup.task=2")  # fmt: skip
    with pytest.raises(DivergenceError, match="task 2"):
        train(cfg2)
    results = json.loads((Path(cfg2.paths.output_dir) / "results.json").read_text())
    assert results["complete"] is False and results["tasks_completed"] == 2
    assert results["acc_matrix"] == run["acc_matrix"][:2] and results["diverged"]["task"] == 2


def test_a_second_run_into_a_held_directory_is_refused(make_cfg) -> None:
    cfg = make_cfg(*BLOBS, "logger=none")
    holder = RunDirectory(cfg.paths.output_dir)
    holder.claim(new_run=True)  # another process's run, in progress
    try:
        with pytest.raises(RunDirectoryError, match="in use by another run"):
            train(cfg)
        assert list(Path(cfg.paths.output_dir).iterdir()) == [], "the refused run wrote nothing"
    finally:
        holder.release()
    train(cfg)  # once released, the directory can be used
    with pytest.raises(RunDirectoryError, match="already holds an earlier run"):
        train(cfg)


def test_two_runs_started_at_once_into_one_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "cl_lightning", f"hydra.run.dir={run_dir}", "threads=1", "logger=none",
           "epochs_per_task=30"]  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [err[-1500:] for _, err in outs]
    refused = next(err for (_, err), p in zip(outs, procs, strict=True) if p.returncode == 2)
    assert "in use by another run" in refused or "already holds an earlier run" in refused
    assert json.loads((run_dir / "results.json").read_text())["complete"]


def test_a_refused_run_leaves_a_finished_directory_byte_identical(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_cli(f"hydra.run.dir={run_dir}", "logger=none", out=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree_bytes(run_dir)
    assert ".hydra/overrides.yaml" in before and "results.json" in before
    again = run_cli(f"hydra.run.dir={run_dir}", "method=ewc", "seed=3", out=tmp_path)
    assert again.returncode == 2 and "already holds an earlier run" in error_lines(again)[0]
    assert tree_bytes(run_dir) == before
    assert oct((run_dir / "results.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_refuses_overrides_that_change_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_cli(f"hydra.run.dir={run_dir}", "logger=none", "max_tasks=2", out=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree_bytes(run_dir)
    proc = run_cli(f"resume={run_dir}", "method=ewc", "optimizer.lr=0.5", "seed=7", out=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "method=ewc" in line and "optimizer.lr=0.5" in line and "seed=7" in line
    assert tree_bytes(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no stray directory"
    done = run_cli(f"resume={run_dir}", "logger=none", out=tmp_path)  # allowed: cannot change results
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "the resumed part writes into its own directory"
    assert "resuming" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["+epoch_per_task=3"], "did you mean epochs_per_task"),
        pytest.param(["+module.reset_optimiser=false"], "did you mean module.reset_optimizer", marks=pytest.mark.slow),
        pytest.param(
            ["+method.buffer_sise=10", "method=er"], "did you mean method.buffer_size", marks=pytest.mark.slow
        ),
    ],
)
def test_unknown_keys_are_refused_and_leave_no_directory(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = run_cli(*args, out=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert expected in line
    assert list(tmp_path.iterdir()) == [], "a refused command leaves no directory"


def test_unwritable_output_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_cli(out=tmp_path, env={"CL_OUTPUT_DIR": str(blocker)})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "a_file is a file" in proc.stderr


@pytest.mark.slow  # waits for a task to finish in a subprocess: with -m slow, as CI runs it
def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    env = {**os.environ, "CL_OUTPUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cl_lightning", "threads=1", "logger=none", "epochs_per_task=400"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 200
    while not list(tmp_path.glob("*/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    (run_dir,) = tmp_path.glob("*/*")
    assert len(lines) == 1 and f"resume={run_dir}" in lines[0]


def test_more_devices_than_cores_warns_with_the_numbers(make_cfg, caplog) -> None:
    from cl_lightning.build import validate_config

    cores = len(os.sched_getaffinity(0))
    with caplog.at_level("WARNING", logger="cl_lightning"):
        validate_config(make_cfg("trainer.accelerator=cpu", f"trainer.devices={cores * 4}"))
    assert f"trainer.devices={cores * 4} CPU processes on {cores} cores" in caplog.text


def test_unknown_top_level_key_is_refused_in_the_api(make_cfg) -> None:
    from omegaconf import open_dict

    cfg = make_cfg(*BLOBS)
    with open_dict(cfg):
        cfg.epoch_per_task = 3
    with pytest.raises(ConfigError, match="epoch_per_task: unknown key.*did you mean epochs_per_task"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()
