"""Summary table of a Hydra multirun: mean and std over seeds of each metric, per method x dataset x scenario.

Only complete runs are pooled (:func:`cl_lightning.results.run_status`). Diverged runs (stopped on a non-finite loss,
whose few rows can look better than any finished run's), runs stopped early and failed jobs are counted in their
group's row and listed apart by job directory; they never enter a mean, a std or a figure.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cl_lightning.results import RunStatus, run_status

log = logging.getLogger(__name__)

METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc", "train_seconds")


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


GROUPED_ELSEWHERE = {"seed", "method", "dataset", "dataset.scenario"}


def _settings(sweep_dir: Path) -> dict[str, str]:
    """Per job directory, the command-line overrides that vary across the sweep (seeds aside), e.g. ``lr=0.1``."""
    overrides: dict[str, dict[str, str]] = {}
    for job in sweep_dir.iterdir():
        path = job / ".hydra" / "overrides.yaml"
        if path.is_file():
            items = OmegaConf.load(path)
            overrides[job.name] = dict(str(o).split("=", 1) for o in items if "=" in str(o))  # type: ignore[union-attr]
    keys = {k for ov in overrides.values() for k in ov} - GROUPED_ELSEWHERE
    varying = sorted(k for k in keys if len({ov.get(k) for ov in overrides.values()}) > 1)
    return {job: " ".join(f"{k}={ov.get(k)}" for k in varying) for job, ov in overrides.items()}


def _job_results(sweep_dir: Path) -> list[tuple[Path, dict[str, Any], RunStatus]]:
    """``(path, results, status)`` of every ``<job>/results.json`` of the sweep, in path order."""
    out = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        results = json.loads(path.read_text())
        out.append((path, results, run_status(results)))
    return out


def summarize_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per (method, dataset, scenario, setting) over every ``results.json`` below ``sweep_dir``.

    ``setting`` holds the swept overrides other than the seed (e.g. ``optimizer.lr=0.1``), so the statistics are
    over seeds only. Only complete runs enter the statistics (``runs``, ``seeds``, ``<metric>_mean``/``_std``):
    runs that stopped early are counted in ``incomplete`` and diverged runs in ``diverged``, and both are listed by
    :func:`excluded_runs`. The standard deviation is the sample one (``n - 1``).
    """
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    left_out: dict[tuple[str, str, str, str], dict[str, int]] = defaultdict(lambda: {"incomplete": 0, "diverged": 0})
    settings = _settings(sweep_dir)
    for path, res, status in _job_results(sweep_dir):
        key = (res["method"], res["dataset"], res["scenario"], settings.get(path.parent.name, ""))
        if status.complete:
            groups[key].append(res)
        else:
            left_out[key][status.kind] += 1
    rows = []
    for key in sorted(set(groups) | set(left_out)):
        runs = groups.get(key, [])
        row: dict[str, Any] = {"method": key[0], "dataset": key[1], "scenario": key[2], "setting": key[3]}
        row["runs"] = len(runs)
        row["seeds"] = " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        row["incomplete"] = left_out[key]["incomplete"] if key in left_out else 0
        row["diverged"] = left_out[key]["diverged"] if key in left_out else 0
        for metric in METRICS:
            values = [float(r[metric]) for r in runs if r.get(metric) is not None]
            if values:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
        rows.append(row)
    return rows


def excluded_runs(sweep_dir: Path) -> list[tuple[str, RunStatus]]:
    """``(job directory name, status)`` of every run of the sweep left out of the statistics (diverged first).

    These are the runs with a ``results.json`` that is not complete: diverged or stopped early. Jobs without
    results are :func:`failed_jobs`.
    """
    excluded = [(path.parent.name, status) for path, _, status in _job_results(sweep_dir) if not status.complete]
    return sorted(excluded, key=lambda item: item[1].kind != "diverged")


def left_out_counts(row: dict[str, Any]) -> str:
    """``" (+1 incomplete, +2 diverged)"``: the runs of a summary row left out of its statistics, or ``""``."""
    parts = [f"+{row[k]} {k}" for k in ("incomplete", "diverged") if row.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


def failed_jobs(sweep_dir: Path) -> list[tuple[str, str]]:
    """``(job directory name, error)`` of every job of the sweep that did not finish and is not listed as diverged.

    A job failed when it left ``failed.json`` (an error the job caught) or has no ``results.json`` at all (it died).
    A job whose ``results.json`` records a divergence is listed by :func:`excluded_runs` instead, even if it also
    left ``failed.json``. A job directory is one with Hydra's ``.hydra/``, a ``failed.json`` or a log file: a job
    that fails before it claims its directory leaves ``failed.json`` without ``.hydra/``.
    """
    failed = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and _is_job_dir(p)):
        results = job / "results.json"
        if results.is_file() and run_status(json.loads(results.read_text())).kind == "diverged":
            continue
        if (job / "failed.json").is_file():
            failed.append((job.name, json.loads((job / "failed.json").read_text())["error"].splitlines()[0]))
        elif not results.is_file():
            failed.append((job.name, "no results.json (the job died)"))
    return failed


def _is_job_dir(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / "failed.json").is_file() or any(path.glob("*.log"))


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` at ``sweep_dir`` and return the rows.

    Both list the runs left out of the statistics after the table: diverged runs (``DIVERGED`` rows in the CSV:
    job, where it diverged, its message), runs stopped early (``INCOMPLETE``) and failed jobs (``FAILED``).
    """
    rows = summarize_runs(sweep_dir)
    excluded = excluded_runs(sweep_dir)
    failed = failed_jobs(sweep_dir)
    columns = ["method", "dataset", "scenario", "setting", "runs", "seeds", "incomplete", "diverged"]
    columns += [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    lines = [
        "| method | dataset | scenario | setting | runs | " + " | ".join(METRICS[:-1]) + " | train s |",
        "|" + "---|" * (5 + len(METRICS)),
    ]
    for row in rows:
        cells = [
            row["method"],
            row["dataset"],
            row["scenario"],
            row["setting"] or "-",
            f"{row['runs']}{left_out_counts(row)}",
        ]
        for metric in METRICS:
            if f"{metric}_mean" not in row:
                cells.append("-")
            elif metric == "train_seconds":
                cells.append(f"{row[f'{metric}_mean']:.1f} ± {row[f'{metric}_std']:.1f}")
            else:
                cells.append(f"{100 * row[f'{metric}_mean']:.2f} ± {100 * row[f'{metric}_std']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = "\nMean ± sample std over seeds of the complete runs, in percent (train seconds in seconds).\n"
    diverged = [(job, status) for job, status in excluded if status.kind == "diverged"]
    incomplete = [(job, status) for job, status in excluded if status.kind == "incomplete"]
    if diverged:
        note += f"\n## Diverged runs ({len(diverged)})\n\nLeft out of every mean and std.\n\n"
        note += "".join(f"- `{job}`: {status.describe()}\n" for job, status in diverged)
    if incomplete:
        note += f"\n## Incomplete runs ({len(incomplete)})\n\nLeft out of every mean and std; "
        note += "`python -m cl_lightning resume=<job dir>` continues one.\n\n"
        note += "".join(f"- `{job}`: {status.reason}\n" for job, status in incomplete)
    if failed:
        note += f"\n## Failed jobs ({len(failed)})\n\n" + "".join(f"- `{job}`: {error}\n" for job, error in failed)
    if excluded or failed:
        with open(sweep_dir / "summary.csv", "a", newline="") as f:
            writer = csv.writer(f)
            for job, status in diverged:
                writer.writerow(["DIVERGED", job, status.reason, status.message])
            for job, status in incomplete:
                writer.writerow(["INCOMPLETE", job, status.reason])
            for job, error in failed:
                writer.writerow(["FAILED", job, error])
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n" + note)
    return rows


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarise the runs' ``results.json`` files."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        log.info("sweep summary of %d groups written to %s", len(rows), sweep_dir / "summary.md")
        print((sweep_dir / "summary.md").read_text())
        failed = failed_jobs(sweep_dir)
        diverged = [job for job, status in excluded_runs(sweep_dir) if status.kind == "diverged"]
        if failed or diverged:
            # every job ran; the sweep as a whole still reports failure to the shell, as a lone diverged run does
            log.error(
                "%d job(s) of the sweep failed and %d diverged; see %s",
                len(failed), len(diverged), sweep_dir / "summary.md",
            )  # fmt: skip
            sys.exit(1)
