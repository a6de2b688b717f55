"""Exact resume after preemption: a run SIGKILLed (or interrupted) in the middle of a task and resumed equals the
uninterrupted run."""

from __future__ import annotations

import csv
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


# ------------------------------------------------------------------------------------------------- resume=auto
AUTO = ["epochs_per_task=2", "logger=none"]


def _in(cfg, run_dir: Path):
    """``cfg`` writing into ``run_dir`` (as a fixed ``hydra.run.dir`` or a sweep's job directory would)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def test_auto_without_a_checkpoint_starts_a_fresh_run(make_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "fresh"
    run = train(_in(make_cfg(*AUTO, "resume=auto"), run_dir))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] and results["acc_matrix"] == run["acc_matrix"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and "resume" not in results["config"]


def test_auto_runs_a_failed_job_again_and_drops_its_failure_record(make_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "failed"
    run_dir.mkdir()
    (run_dir / "failed.json").write_text(json.dumps({"error": "RuntimeError: out of memory"}))
    train(_in(make_cfg(*AUTO, "resume=auto"), run_dir))
    assert json.loads((run_dir / "results.json").read_text())["complete"]
    assert not (run_dir / "failed.json").exists(), "the sweep summary would list the job as failed"


def test_auto_skips_a_finished_run_leaving_every_file_untouched(make_cfg, tmp_path: Path, caplog) -> None:
    from helpers.cli import tree_state

    run_dir = tmp_path / "done"
    first = train(_in(make_cfg(*AUTO), run_dir))
    assert json.loads((run_dir / "results.json").read_text())["complete"]
    before = tree_state(run_dir)
    with caplog.at_level("INFO", logger="cl_lightning"):
        again = train(_in(make_cfg(*AUTO, "resume=auto"), run_dir))
    assert tree_state(run_dir) == before, "a finished run's directory is left byte for byte, mtimes included"
    assert again["acc_matrix"] == first["acc_matrix"] and again["avg_acc"] == first["avg_acc"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and str(run_dir) in skipped[0], caplog.text


def test_auto_continues_an_interrupted_run_to_the_uninterrupted_matrix(make_cfg, tmp_path: Path) -> None:
    from helpers.cli import tree_state

    from cl_lightning.errors import RunDirectoryError

    whole = train(make_cfg(*AUTO))
    run_dir = tmp_path / "cut"
    # 10 steps per task: step 18 is in the middle of task 2 (index 1); the newest checkpoint is step 16's mid_task.ckpt
    cut = [*AUTO, "checkpoint_every_n_steps=4", "resume=auto"]
    with pytest.raises(RunInterrupted):
        train(_in(make_cfg(*cut, "+callbacks.cut._target_=helpers.kill.InterruptAtStep", "+callbacks.cut.step=18"),
                  run_dir))  # fmt: skip
    assert json.loads((run_dir / "results.json").read_text())["tasks_completed"] == 1
    before = tree_state(run_dir)
    with pytest.raises(RunDirectoryError, match=r"optimizer\.lr") as refused:
        train(_in(make_cfg(*cut, "optimizer.lr=0.5"), run_dir))  # the checkpoint's config is not this one
    assert "\n" not in str(refused.value) and tree_state(run_dir) == before
    resumed = train(_in(make_cfg(*cut), run_dir))  # the same command, without the interruption
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["complete"]


def test_auto_refuses_a_finished_run_of_another_config_naming_the_keys(make_cfg, tmp_path: Path) -> None:
    from helpers.cli import tree_state

    from cl_lightning.errors import RunDirectoryError

    run_dir = tmp_path / "done"
    train(_in(make_cfg(*AUTO), run_dir))
    before = tree_state(run_dir)
    with pytest.raises(RunDirectoryError) as refused:
        train(_in(make_cfg(*AUTO, "max_tasks=1", "resume=auto", "optimizer.lr=0.5", "seed=3", "threads=1"), run_dir))
    message = str(refused.value)
    assert "\n" not in message and "optimizer.lr" in message and "seed" in message, message
    assert "threads" not in message and "max_tasks" not in message, "how a run is carried out is no difference"
    assert tree_state(run_dir) == before


@pytest.mark.slow  # command-line subprocesses (CI runs -m slow too)
def test_a_single_run_with_resume_auto_on_the_command_line(tmp_path: Path) -> None:
    from helpers.cli import error_lines, run_cli, tree_state

    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", "resume=auto", *RUN[:4], "logger=none"]
    first = run_cli(*args, out=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "resume=auto is not a directory"
    before = tree_state(run_dir)
    assert ".hydra/config.yaml" in before and "train.log" in before
    again = run_cli(*args, out=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert tree_state(run_dir) == before, "train.log and .hydra/ included"
    assert sum("skipped" in line for line in again.stdout.splitlines()) == 1, again.stdout
    other = run_cli(*args, "optimizer.lr=0.5", out=tmp_path)
    assert other.returncode == 2, other.stderr[-2000:]
    (line,) = error_lines(other)
    assert "optimizer.lr" in line and tree_state(run_dir) == before


@pytest.mark.slow  # a sweep in a subprocess, killed, then re-run
def test_a_sweep_rerun_with_resume_auto_skips_finished_jobs_and_continues_the_killed_one(tmp_path: Path) -> None:
    from helpers.cli import error_lines, run_cli, tree_state

    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1,2", f"hydra.sweep.dir={sweep}", *RUN[:4], "logger=none", "checkpoint_every_n_steps=4",
            "resume=auto"]  # fmt: skip
    # jobs run one after another in this process: seeds 0 and 1 finish, seed 2 is killed at step 18 (task 2 of 5)
    killed = run_cli(*args, "+callbacks.kill._target_=helpers.kill.KillAtStep", "+callbacks.kill.step=18",
                     "+callbacks.kill.seed=2", out=tmp_path, timeout=600)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1", "2"]
    finished = {job.name: tree_state(job) for job in jobs[:2]}
    assert all(json.loads((job / "results.json").read_text())["complete"] for job in jobs[:2])
    assert json.loads((jobs[2] / "results.json").read_text())["tasks_completed"] == 1
    killed_hydra = (jobs[2] / ".hydra" / "config.yaml").read_bytes()
    again = run_cli(*args, out=tmp_path, timeout=600)  # the same command line, without the kill
    assert again.returncode == 0, again.stderr[-3000:]
    assert {job.name: tree_state(job) for job in jobs[:2]} == finished, "finished jobs are left byte for byte"
    assert sum("skipped" in line for line in again.stdout.splitlines()) == 2, again.stdout
    results = json.loads((jobs[2] / "results.json").read_text())
    assert results["complete"] and results["tasks_completed"] == 5
    assert (jobs[2] / ".hydra" / "config.yaml").read_bytes() == killed_hydra
    finished = {job.name: tree_state(job) for job in jobs}
    other = run_cli(*args, "optimizer.lr=0.5", out=tmp_path, timeout=600)  # not this sweep's command line
    assert other.returncode == 2, other.stderr[-3000:]
    (line,) = error_lines(other)
    assert "optimizer.lr" in line and {job.name: tree_state(job) for job in jobs} == finished, "failed.json neither"
    assert "resuming" in (jobs[2] / "train.log").read_text()
    with open(sweep / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))  # no FAILED or INCOMPLETE rows after it
    assert row["method"] == "naive" and row["runs"] == "3" and row["avg_acc_n"] == "3", row
    mean = sum(json.loads((job / "results.json").read_text())["avg_acc"] for job in jobs) / 3
    assert float(row["avg_acc_mean"]) == pytest.approx(mean), "the skipped jobs' results feed the summary"


def test_a_checkpoint_whose_loop_counted_its_steps_elsewhere_is_refused(make_cfg, tmp_path: Path) -> None:
    """A checkpoint of the earlier automatic-optimization loop holds its step count where the module's manual loop
    does not look: resuming it would restart the count (and the position in the task). It is refused in one line,
    with the run directory left as it was."""
    from cl_lightning.errors import RunDirectoryError

    cut = make_cfg("epochs_per_task=2", "logger=none", "checkpoint_every_n_steps=4",
                   "+callbacks.cut._target_=helpers.kill.InterruptAtStep", "+callbacks.cut.step=13")  # fmt: skip
    with pytest.raises(RunInterrupted):
        train(cut)
    path = Path(cut.paths.output_dir) / "checkpoints" / "mid_task.ckpt"
    state = torch.load(path, weights_only=True)
    progress = state["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]
    for counts in progress.values():
        counts.update(ready=0, completed=0)  # as the automatic loop left it: its steps were counted elsewhere
    torch.save(state, path)
    before = {p: p.read_bytes() for p in Path(cut.paths.output_dir).rglob("*") if p.is_file()}
    with pytest.raises(RunDirectoryError, match=r"counts 12 steps in a loop this version does not run"):
        train(make_cfg(f"resume={cut.paths.output_dir}", "logger=none"))
    after = {p: p.read_bytes() for p in Path(cut.paths.output_dir).rglob("*") if p.is_file()}
    assert after == before
