"""Hydra sweeps: the joblib launcher locally, the SLURM launcher's config, and Optuna on a validation split."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.slow  # a command-line subprocess (CI runs -m slow too): the default suite under 5 min
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


# ------------------------------------------------------------------------------------------ summary of a sweep dir
NAIVE = [[0.9, 0.1, 0.0], [0.2, 0.95, 0.0], [0.1, 0.2, 0.97]]
EWC = [[0.9, 0.1, 0.0], [0.6, 0.9, 0.0], [0.5, 0.6, 0.9]]
# diverged in its third task: the two rows before show no forgetting at all, the "best" value of the sweep
EWC_DIVERGED = [[0.9, 0.1, 0.0], [0.9, 0.9, 0.0]]


@pytest.fixture
def diverged_sweep(tmp_path: Path) -> Path:
    """``-m method=naive,ewc seed=0,1``, EWC with seed 1 diverged at step 57 of task 2, and one run stopped early."""
    from helpers.fake_results import fake_run, mark_diverged

    root = tmp_path / "sweep"
    fake_run(root, "0_naive_seed0", "naive", 0, NAIVE, overrides=["method=naive", "seed=0"])
    fake_run(root, "1_naive_seed1", "naive", 1, NAIVE, overrides=["method=naive", "seed=1"])
    fake_run(root, "2_ewc_seed0", "ewc", 0, EWC, overrides=["method=ewc", "seed=0"])
    mark_diverged(fake_run(root, "3_ewc_seed1", "ewc", 1, EWC_DIVERGED, overrides=["method=ewc", "seed=1"]), 57, 2)
    fake_run(root, "4_ewc_seed2", "ewc", 2, EWC[:1], overrides=["method=ewc", "seed=2"])  # stopped by max_tasks
    return root


def _results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


def test_summary_never_pools_a_diverged_run(diverged_sweep: Path) -> None:
    from cl_lightning.callbacks.sweep_summary import summarize_runs, write_summary

    ewc_complete = _results(diverged_sweep / "2_ewc_seed0")
    assert _results(diverged_sweep / "3_ewc_seed1")["forgetting"] < ewc_complete["forgetting"], "the trap"
    rows = write_summary(diverged_sweep)
    assert rows == summarize_runs(diverged_sweep)
    (ewc,) = [r for r in rows if r["method"] == "ewc"]
    assert (ewc["runs"], ewc["seeds"], ewc["diverged"], ewc["incomplete"]) == (1, "0", 1, 1)
    assert ewc["forgetting_mean"] == pytest.approx(ewc_complete["forgetting"]) and ewc["forgetting_std"] is None
    assert ewc["avg_acc_mean"] == pytest.approx(ewc_complete["avg_acc"])

    md = (diverged_sweep / "summary.md").read_text()
    assert "| ewc | blobs | class_il | - | 1 (+1 incomplete, +1 diverged) |" in md
    assert f"{100 * ewc_complete['forgetting']:.2f} (n=1)" in md, "one run: n=1, no std"
    assert "## Diverged runs (1)" in md
    assert "- `3_ewc_seed1`: diverged at step 57 of task 2 (nan)" in md
    assert "## Incomplete runs (1)" in md and "- `4_ewc_seed2`: stopped after 1/3 tasks" in md
    assert "Failed jobs" not in md

    with open(diverged_sweep / "summary.csv", newline="") as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1:]
    assert "diverged" in header
    by_method = {row[0]: dict(zip(header, row, strict=True)) for row in body if row[0] in ("naive", "ewc")}
    assert by_method["ewc"]["diverged"] == "1" and by_method["ewc"]["runs"] == "1"
    assert float(by_method["ewc"]["forgetting_mean"]) == pytest.approx(ewc_complete["forgetting"])
    assert body[-2][:3] == ["DIVERGED", "3_ewc_seed1", "diverged at step 57 of task 2 (nan)"]
    assert body[-1][:2] == ["INCOMPLETE", "4_ewc_seed2"]


def test_a_group_of_only_diverged_runs_has_no_mean(tmp_path: Path) -> None:
    from helpers.fake_results import fake_run, mark_diverged

    from cl_lightning.callbacks.sweep_summary import write_summary

    root = tmp_path / "sweep"
    fake_run(root, "0_naive_seed0", "naive", 0, NAIVE, overrides=["method=naive"])
    mark_diverged(fake_run(root, "1_ewc_seed0", "ewc", 0, EWC_DIVERGED, overrides=["method=ewc"]), 3, 1, "inf")
    (ewc,) = [r for r in write_summary(root) if r["method"] == "ewc"]
    assert ewc["runs"] == 0 and not any(k.endswith("_mean") for k in ewc)
    md = (root / "summary.md").read_text()
    assert "| ewc | blobs | class_il | - | 0 (+1 diverged) | - | - |" in md
    assert "- `1_ewc_seed0`: diverged at step 3 of task 1 (inf)" in md


def test_a_diverged_job_is_not_also_a_failed_one_and_fails_the_sweep(diverged_sweep: Path) -> None:
    from omegaconf import OmegaConf

    from cl_lightning.callbacks.sweep_summary import SweepSummary, failed_jobs

    # should the job also leave failed.json, it is still listed once, as diverged
    (diverged_sweep / "3_ewc_seed1" / "failed.json").write_text(json.dumps({"error": "DivergenceError: nan"}))
    assert failed_jobs(diverged_sweep) == []
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(diverged_sweep)}}})
    with pytest.raises(SystemExit) as info:
        SweepSummary().on_multirun_end(config)
    assert info.value.code == 1, "a sweep with a diverged job reports failure to the shell"
    assert (diverged_sweep / "summary.md").read_text().count("3_ewc_seed1") == 1


def test_results_without_the_complete_key_are_judged_by_their_rows(tmp_path: Path) -> None:
    from helpers.fake_results import fake_run

    from cl_lightning.callbacks.sweep_summary import summarize_runs

    root = tmp_path / "sweep"
    job = fake_run(root, "0_naive_seed0", "naive", 0, NAIVE[:2])
    results = _results(job)
    del results["complete"]  # an older or hand-edited file: two of three tasks, not to be taken as complete
    (job / "results.json").write_text(json.dumps(results))
    (row,) = summarize_runs(root)
    assert row["runs"] == 0 and row["incomplete"] == 1


# ------------------------------------------------------------------------------------- statistics across seeds
def _scaled(matrix: list[list[float]], factor: float) -> list[list[float]]:
    return [[min(1.0, v * factor) for v in row] for row in matrix]


@pytest.fixture
def seeded_sweep(tmp_path: Path) -> Path:
    """naive over seeds 0-2 and ewc over seeds 0-3 (seed 3 has no naive run to pair with), one lone joint run."""
    from helpers.fake_results import fake_run

    root = tmp_path / "sweep"
    for seed, factor in enumerate([1.0, 0.9, 0.95]):
        fake_run(root, f"{seed}_naive_seed{seed}", "naive", seed, _scaled(NAIVE, factor), overrides=["method=naive"])
    for seed, factor in enumerate([1.0, 0.97, 0.92, 0.8]):
        fake_run(root, f"{3 + seed}_ewc_seed{seed}", "ewc", seed, _scaled(EWC, factor), overrides=["method=ewc"])
    fake_run(root, "7_joint_seed0", "joint", 0, EWC, overrides=["method=joint"])
    return root


def test_summary_gives_a_t_interval_and_a_paired_test_by_seed(seeded_sweep: Path) -> None:
    from scipy import stats

    from cl_lightning.callbacks.sweep_summary import summarize_runs, write_summary

    naive = {r["seed"]: r["avg_acc"] for r in map(_results, sorted(seeded_sweep.glob("*_naive_*")))}
    ewc = {r["seed"]: r["avg_acc"] for r in map(_results, sorted(seeded_sweep.glob("*_ewc_*")))}
    rows = {r["method"]: r for r in summarize_runs(seeded_sweep, reference="naive")}
    values = np.array(list(ewc.values()))
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    row = rows["ewc"]
    assert row["avg_acc_n"] == 4 and row["avg_acc_std"] == pytest.approx(values.std(ddof=1))
    interval = (row["avg_acc_ci95_low"], row["avg_acc_ci95_high"])
    assert interval == pytest.approx((values.mean() - half, values.mean() + half))
    # pairs matched by seed; ewc's seed 3 has no naive run and is left out of the test
    expected = stats.ttest_rel([ewc[s] for s in (0, 1, 2)], [naive[s] for s in (0, 1, 2)])
    assert row["avg_acc_pairs"] == 3 and row["avg_acc_p"] == pytest.approx(expected.pvalue)
    assert row["avg_acc_diff"] == pytest.approx(np.mean([ewc[s] - naive[s] for s in (0, 1, 2)]))
    assert rows["naive"].get("avg_acc_p") is None and rows["naive"]["reference"]
    assert rows["joint"]["avg_acc_std"] is None and rows["joint"]["avg_acc_ci95_low"] is None, "n=1: no std, no CI"
    assert rows["joint"]["avg_acc_pairs"] == 1 and rows["joint"]["avg_acc_p"] is None, "one pair is no test"

    write_summary(seeded_sweep, reference="naive")
    md = (seeded_sweep / "summary.md").read_text()
    assert "| avg_acc 95% CI |" in md and "avg_acc vs naive" in md
    low, high = 100 * row["avg_acc_ci95_low"], 100 * row["avg_acc_ci95_high"]
    assert f"[{low:.2f}, {high:.2f}]" in md
    assert f"p={expected.pvalue:.3g}" in md and "3 pairs" in md
    assert "## Statistics over seeds" in md and "| ewc | blobs | class_il | - | forgetting | 4 |" in md
    assert "± 0.00" not in md and "(n=1)" in md, "a lone run says n=1"
    with open(seeded_sweep / "summary.csv", newline="") as f:
        header = next(csv.reader(f))
    assert {"avg_acc_n", "avg_acc_ci95_low", "avg_acc_ci95_high", "avg_acc_p", "avg_acc_pairs"} <= set(header)


def test_the_reference_is_a_config_key_and_is_recorded(make_cfg) -> None:
    cfg = make_cfg("summary.reference=naive")
    assert cfg.summary.reference == "naive"
    assert make_cfg().summary.reference is None


def test_the_summary_reads_the_reference_the_runs_recorded(seeded_sweep: Path) -> None:
    from cl_lightning.callbacks.sweep_summary import summarize_runs

    for path in seeded_sweep.glob("*/results.json"):
        results = json.loads(path.read_text())
        results["config"]["summary"] = {"reference": "naive"}
        path.write_text(json.dumps(results))
    (ewc,) = [r for r in summarize_runs(seeded_sweep) if r["method"] == "ewc"]
    assert ewc["avg_acc_pairs"] == 3


def test_a_reference_not_in_the_sweep_is_refused_before_the_jobs(
    seeded_sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from omegaconf import OmegaConf

    from cl_lightning.callbacks.sweep_summary import SweepSummary

    config = OmegaConf.create({
        "summary": {"reference": "navie"},
        "hydra": {"sweep": {"dir": str(seeded_sweep)}, "overrides": {"task": ["method=naive,ewc", "seed=0,1"]},
                  "runtime": {"choices": {"method": "naive"}}},
    })  # fmt: skip
    with pytest.raises(SystemExit) as info:
        SweepSummary().on_multirun_start(config)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summary.reference='navie'" in err and "naive, ewc" in err, err

    # a sweep whose methods cannot be told in advance (e.g. hybrids): refused at the end, the summary still written
    config.hydra.overrides.task = ["+method@hybrid.er=er"]
    SweepSummary().on_multirun_start(config)
    with pytest.raises(SystemExit) as info:
        SweepSummary().on_multirun_end(config)
    assert info.value.code == 1 and (seeded_sweep / "summary.md").is_file()
    err = capsys.readouterr().err
    assert "summary.reference='navie'" in err and "ewc, joint, naive" in err, err


def test_the_summary_shows_cost_beside_accuracy(seeded_sweep: Path) -> None:
    from cl_lightning.callbacks.sweep_summary import summarize_runs, write_summary

    for i, path in enumerate(sorted(seeded_sweep.glob("*/results.json"))):
        results = json.loads(path.read_text())
        results["cost"] = {"train_flops": 1e9 + i, "model_bytes": 40_000, "method_state_bytes": {"x": 60_000 + i},
                           "peak_memory_bytes": None}  # fmt: skip
        path.write_text(json.dumps(results))
    rows = {r["method"]: r for r in summarize_runs(seeded_sweep)}
    assert rows["ewc"]["memory_bytes_mean"] == pytest.approx(100_000 + (3 + 4 + 5 + 6) / 4)
    assert rows["ewc"]["train_flops_n"] == 4 and "peak_memory_bytes_mean" not in rows["ewc"], "CPU: no peak"
    write_summary(seeded_sweep)
    md = (seeded_sweep / "summary.md").read_text()
    header = md.splitlines()[0]
    assert "| avg_acc |" in header and "| train FLOPs (est.) | model + state MB |" in header and "peak" not in header
    assert "| 1e+09 ± 1.29 | 0.1 ± 1.29e-06 |" in md


def test_settings_list_what_varies_and_duplicate_seeds_are_not_pooled(tmp_path: Path) -> None:
    """Single runs in one folder: `model=cnn` given to one only (the others' model is the default mlp, not "None"),
    `resume=` and `threads=` are no setting, and a run repeated with the same seed and settings is not a new seed."""
    from helpers.fake_results import fake_run

    from cl_lightning.callbacks.sweep_summary import duplicate_runs, summarize_runs, write_summary

    root = tmp_path / "outputs" / "2024-01-01"
    fake_run(root, "10-00_naive", "naive", 0, NAIVE, overrides=["method=naive", "model=mlp", "threads=1"])
    fake_run(root, "10-01_naive", "naive", 1, NAIVE, overrides=["method=naive", "resume=x"])
    fake_run(root, "10-02_naive", "naive", 0, _scaled(NAIVE, 0.9), overrides=["method=naive"])  # seed 0 again
    fake_run(root, "10-03_naive", "naive", 0, NAIVE, overrides=["method=naive", "model=cnn"])
    for job, model in (("10-00_naive", "mlp"), ("10-01_naive", "mlp"), ("10-02_naive", "mlp"), ("10-03_naive", "cnn")):
        (root / job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      model: {model}\n")
    rows = {r["setting"]: r for r in summarize_runs(root)}
    assert set(rows) == {"model=mlp", "model=cnn"}, rows.keys()
    mlp = rows["model=mlp"]
    assert (mlp["runs"], mlp["seeds"], mlp["duplicates"]) == (2, "0 1", 1), "seeds 0 1, not 0 0 1"
    assert mlp["avg_acc_mean"] == pytest.approx(_results(root / "10-00_naive")["avg_acc"]), "the first of seed 0"
    assert duplicate_runs(root) == [("10-02_naive", "10-00_naive")]
    write_summary(root)
    md = (root / "summary.md").read_text()
    assert "| naive | blobs | class_il | model=mlp | 2 (+1 duplicate) |" in md and "None" not in md
    assert "## Duplicate runs (1)" in md and "- `10-02_naive`: same seed and settings as `10-00_naive`" in md
