"""The command line as users type it: `python -m cl_lightning ...` in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli


def test_default_run_on_embedded_data(tmp_path: Path) -> None:
    proc = run_cli(out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy matrix" in proc.stdout and "avg_acc=" in proc.stdout
    (results_file,) = tmp_path.glob("*/*/results.json")
    results = json.loads(results_file.read_text())
    assert results["dataset"] == "split_digits" and results["method"] == "naive" and results["complete"]
    assert len(results["acc_matrix"]) == 5
    run_dir = results_file.parent
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").exists()


@pytest.mark.slow  # a command-line subprocess (CI runs -m slow too): the default suite under 5 min
def test_multirun_writes_summary_over_seeds(tmp_path: Path) -> None:
    proc = run_cli(
        "-m", "method=naive,joint", "seed=0,1", "dataset.source._target_=helpers.synthetic.blobs",
        "dataset.name=blobs", "epochs_per_task=2", "batch_size=16", "logger=none", "save_checkpoints=false",
        out=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary_md,) = tmp_path.glob("*/*/summary.md")
    (summary_csv,) = tmp_path.glob("*/*/summary.csv")
    text = summary_md.read_text()
    assert "| joint | blobs | class_il | - | 2 |" in text and "| naive | blobs | class_il | - | 2 |" in text
    rows = summary_csv.read_text().splitlines()
    assert rows[0].startswith("method,dataset,scenario,setting,runs,seeds") and len(rows) == 3
    assert len(list(summary_md.parent.glob("*/results.json"))) == 4


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["dataset.scenario=bogus"], "dataset.scenario='bogus'"),
        pytest.param(["optimizer.lr=-0.1"], "optimizer.lr=-0.1", marks=pytest.mark.slow),
        pytest.param(["dataset.n_tasks=3"], "dataset.n_tasks=3", marks=pytest.mark.slow),
    ],
)
def test_bad_values_exit_nonzero_with_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = run_cli(*args, out=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert not list(tmp_path.rglob("results.json"))


def test_unknown_method_lists_the_available_ones(tmp_path: Path) -> None:
    proc = run_cli("method=nope", out=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'method/nope'" in proc.stderr
    assert "naive" in proc.stderr and "joint" in proc.stderr


def test_missing_dataset_says_where_it_looked(tmp_path: Path) -> None:
    proc = run_cli("dataset=split_cifar", f"data_dir={tmp_path / 'nowhere'}", out=tmp_path)
    assert proc.returncode == 2
    assert "CIFAR-10 was not found" in proc.stderr or "not found" in proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr


@pytest.mark.slow  # a command-line subprocess (CI runs -m slow too): the default suite under 5 min
def test_a_failed_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    proc = run_cli(
        "-m", "optimizer.lr=0.1,-1,0.05", "dataset.source._target_=helpers.synthetic.blobs", "dataset.name=blobs",
        "epochs_per_task=1", "logger=none", "save_checkpoints=false", out=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, "the sweep reports its failed job to the shell"
    (summary_md,) = tmp_path.glob("*/*/summary.md")
    assert len(list(summary_md.parent.glob("*/results.json"))) == 2, "the jobs after the failed one ran"
    text = summary_md.read_text()
    assert "## Failed jobs (1)" in text and "optimizer.lr=-1" in text
    assert "| naive | blobs | class_il | optimizer.lr=0.05 | 1 |" in text, "swept settings are not pooled"
