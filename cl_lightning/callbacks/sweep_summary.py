"""Summary table of a Hydra multirun: mean and std over seeds of each metric, per method x dataset x scenario."""

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


def summarize_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per (method, dataset, scenario, setting) over every ``results.json`` below ``sweep_dir``.

    ``setting`` holds the swept overrides other than the seed (e.g. ``optimizer.lr=0.1``), so the statistics are
    over seeds only. Runs that did not finish (fewer tasks completed than planned) are counted in ``incomplete``
    and left out of the statistics. The standard deviation is the sample one (``n - 1``).
    """
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    incomplete: dict[tuple[str, str, str, str], int] = defaultdict(int)
    settings = _settings(sweep_dir)
    for path in sorted(sweep_dir.glob("*/results.json")):
        res = json.loads(path.read_text())
        key = (res["method"], res["dataset"], res["scenario"], settings.get(path.parent.name, ""))
        if res.get("complete", True):
            groups[key].append(res)
        else:
            incomplete[key] += 1
    rows = []
    for key in sorted(set(groups) | set(incomplete)):
        runs = groups.get(key, [])
        row: dict[str, Any] = {"method": key[0], "dataset": key[1], "scenario": key[2], "setting": key[3]}
        row["runs"] = len(runs)
        row["seeds"] = " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        row["incomplete"] = incomplete.get(key, 0)
        for metric in METRICS:
            values = [float(r[metric]) for r in runs if r.get(metric) is not None]
            if values:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
        rows.append(row)
    return rows


def failed_jobs(sweep_dir: Path) -> list[tuple[str, str]]:
    """``(job directory name, error)`` of every job of the sweep that did not finish.

    A job failed when it left ``failed.json`` (an error the job caught) or has no ``results.json`` at all (it died).
    """
    failed = []
    for job in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()):
        if (job / "failed.json").is_file():
            failed.append((job.name, json.loads((job / "failed.json").read_text())["error"].splitlines()[0]))
        elif not (job / "results.json").is_file():
            failed.append((job.name, "no results.json (the job died)"))
    return failed


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` at ``sweep_dir`` and return the rows."""
    rows = summarize_runs(sweep_dir)
    failed = failed_jobs(sweep_dir)
    columns = ["method", "dataset", "scenario", "setting", "runs", "seeds", "incomplete"]
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
            f"{row['runs']}" + (f" (+{row['incomplete']} incomplete)" if row["incomplete"] else ""),
        ]
        for metric in METRICS:
            if f"{metric}_mean" not in row:
                cells.append("-")
            elif metric == "train_seconds":
                cells.append(f"{row[f'{metric}_mean']:.1f} ± {row[f'{metric}_std']:.1f}")
            else:
                cells.append(f"{100 * row[f'{metric}_mean']:.2f} ± {100 * row[f'{metric}_std']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = "\nMean ± sample std over seeds, in percent (train seconds in seconds).\n"
    if failed:
        note += f"\n## Failed jobs ({len(failed)})\n\n" + "".join(f"- `{job}`: {error}\n" for job, error in failed)
        with open(sweep_dir / "summary.csv", "a", newline="") as f:
            writer = csv.writer(f)
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
        if failed:
            # every job ran; the sweep as a whole still reports failure to the shell
            log.error("%d job(s) of the sweep failed; see %s", len(failed), sweep_dir / "summary.md")
            sys.exit(1)
