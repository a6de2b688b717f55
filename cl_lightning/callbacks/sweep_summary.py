"""Summary table of a Hydra multirun: mean and std over seeds of each metric, per method x dataset x scenario."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc", "train_seconds")


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per (method, dataset, scenario) over every ``results.json`` below ``sweep_dir``.

    Runs that did not finish (no ``results.json``, or fewer tasks completed than planned) are counted in
    ``incomplete`` and left out of the statistics. The standard deviation is the sample one (``n - 1``).
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    incomplete: dict[tuple[str, str, str], int] = defaultdict(int)
    for path in sorted(sweep_dir.glob("*/results.json")):
        res = json.loads(path.read_text())
        key = (res["method"], res["dataset"], res["scenario"])
        if res.get("complete", True):
            groups[key].append(res)
        else:
            incomplete[key] += 1
    rows = []
    for key in sorted(set(groups) | set(incomplete)):
        runs = groups.get(key, [])
        row: dict[str, Any] = {"method": key[0], "dataset": key[1], "scenario": key[2], "runs": len(runs)}
        row["seeds"] = " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        row["incomplete"] = incomplete.get(key, 0)
        for metric in METRICS:
            values = [float(r[metric]) for r in runs if r.get(metric) is not None]
            if values:
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(values)
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` at ``sweep_dir`` and return the rows."""
    rows = summarize_runs(sweep_dir)
    columns = ["method", "dataset", "scenario", "runs", "seeds", "incomplete"]
    columns += [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    lines = [
        "| method | dataset | scenario | runs | " + " | ".join(METRICS[:-1]) + " | train s |",
        "|" + "---|" * (4 + len(METRICS)),
    ]
    for row in rows:
        cells = [
            row["method"],
            row["dataset"],
            row["scenario"],
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
