"""A Markdown report with plots of every run below a directory: ``python -m cl_lightning.report <dir> [--out DIR]``.

The directory is a run directory (it holds ``results.json``), a sweep directory (``<job>/results.json``) or any tree
of them (``outputs/``). The report (``report.md``) has the comparison of methods (mean ± sample std, 95% CI and the
paired test against ``summary.reference`` over seeds per method x dataset x scenario x swept setting, with the cost
beside the accuracy, computed by the sweep summary's own ``summarize_runs``), bars of the groups and their accuracy over
the tasks seen so far on one axes with seed bands, the failed, diverged, incomplete, duplicate and unreadable runs, and
for every run its metrics, its accuracy matrix as a table and its figures: the matrix as a heatmap and the accuracy on
each task after each training task. Accuracies are in percent everywhere. Figures are PNG files drawn on
matplotlib's Agg canvas (:mod:`cl_lightning.plots`).

Only complete runs are pooled (:func:`cl_lightning.results.run_status`): a diverged run (stopped on a non-finite loss;
its few rows often show the least forgetting of all) and a run stopped early are listed apart and enter no mean, std
or bar; each still gets its own section and figures.

A report never overwrites files: the output directory (default ``<dir>/report``) must not exist or be empty.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from cl_lightning import __version__
from cl_lightning.callbacks.sweep_summary import (
    METRIC_LABELS,
    METRICS,
    duplicate_runs,
    failed_jobs,
    format_ci,
    format_stat,
    format_vs,
    left_out_counts,
    metric_value,
    seed_statistics,
    statistics_table,
    summarize_runs,
)
from cl_lightning.plots import accuracy_curves, accuracy_heatmap, anytime_curves, comparison_bars, group_curves
from cl_lightning.results import RunStatus, run_status

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
REQUIRED = ("method", "dataset", "scenario", "seed", "acc_matrix")
COMPARED = ("avg_acc", "forgetting")


class ReportError(RuntimeError):
    """The report cannot be written (bad path, output directory taken). The message is one line."""


@dataclass
class Run:
    """One run's ``results.json`` and where it was found.

    Attributes:
        path: The run directory (the folder of its ``results.json``).
        slug: A file-name-safe, unique name of the run, from its path relative to the report's root.
        results: The parsed ``results.json``.
        plots: The run's figures, as paths relative to the report directory, by kind.
    """

    path: Path
    slug: str
    results: dict[str, Any]
    plots: dict[str, str] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        """Tasks in the run's sequence."""
        return int(self.results.get("n_tasks") or len(self.results["acc_matrix"][0]))

    @property
    def done(self) -> int:
        """Tasks trained so far (rows of the accuracy matrix)."""
        return int(self.results.get("tasks_completed", len(self.results["acc_matrix"])))

    @property
    def status(self) -> RunStatus:
        """Complete, incomplete or diverged, judged as the sweep summary judges it."""
        return run_status(self.results)

    @property
    def complete(self) -> bool:
        """Whether every task was trained with finite results: the only runs pooled into means."""
        return self.status.complete

    @property
    def label(self) -> str:
        """``method on dataset (scenario, seed s)``."""
        r = self.results
        return f"{r['method']} on {r['dataset']} ({r['scenario']}, seed {r['seed']})"


def _slug(root: Path, run_dir: Path) -> str:
    rel = run_dir.relative_to(root)
    name = "__".join(rel.parts) if rel.parts else root.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"


def find_runs(root: Path, exclude: Path | None = None) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every ``results.json`` below ``root`` (``root`` itself included), in path order.

    Args:
        root: A run directory, a sweep directory or any tree of them.
        exclude: A directory not to search (the report's own output directory).

    Returns:
        The readable runs, and ``(path, reason)`` for each ``results.json`` that could not be read.
    """
    runs: list[Run] = []
    unreadable: list[tuple[Path, str]] = []
    excluded = exclude.resolve() if exclude is not None else None
    for path in sorted(root.rglob(RESULTS_FILE)):
        if not path.is_file() or (excluded is not None and excluded in path.resolve().parents):
            continue
        try:
            results = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            unreadable.append((path, f"not valid JSON ({err})"))
            continue
        missing = [k for k in REQUIRED if k not in results] if isinstance(results, dict) else list(REQUIRED)
        if missing:
            unreadable.append((path, f"missing keys {missing}"))
            continue
        if not results["acc_matrix"] and run_status(results).kind != "diverged":
            unreadable.append((path, "empty acc_matrix (no task finished)"))
            continue
        runs.append(Run(path.parent, _slug(root, path.parent), results))
    return runs, unreadable


def _single_run_row(run: Run) -> dict[str, Any]:
    """The comparison row of a lone run (the report's root is one run directory): itself, n=1 (no std, no CI)."""
    res = run.results
    row: dict[str, Any] = {"method": res["method"], "dataset": res["dataset"], "scenario": res["scenario"]}
    kind = run.status.kind
    row |= {"setting": "", "runs": int(run.complete), "seeds": str(res["seed"]) if run.complete else ""}
    row |= {"incomplete": int(kind == "incomplete"), "diverged": int(kind == "diverged"), "duplicates": 0}
    row["run_dirs"] = [str(run.path)] if run.complete else []
    for metric in METRICS if run.complete else ():
        if (value := metric_value(res, metric)) is not None:
            row |= {f"{metric}_{k}": v for k, v in seed_statistics([value]).items()}
    return row


@dataclass
class Comparison:
    """The groups of runs to compare, the failed jobs and what could not be summarised.

    Attributes:
        rows: One row per sweep directory x (method, dataset, scenario, setting), as
            :func:`~cl_lightning.callbacks.sweep_summary.summarize_runs` makes them, with ``sweep``: the directory
            of the runs, relative to the report's root.
        failed: ``(job directory, error)`` for each job that left ``failed.json`` or died without results.
        duplicates: ``(job directory, job it repeats)`` for each complete run whose seed and settings an earlier run
            of its group has (pooled once: a repeated seed is not a new sample).
        skipped: One line per directory whose runs could not be summarised, saying why.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def compare(root: Path, runs: list[Run]) -> Comparison:
    """Group the runs below ``root`` with the sweep summary's own grouping, one directory of runs at a time.

    Every directory that holds runs (a sweep directory, or ``outputs/<date>`` for single runs) is summarised by
    :func:`~cl_lightning.callbacks.sweep_summary.summarize_runs` (mean ± sample std over seeds per method x dataset x
    scenario x swept setting, complete runs only; incomplete and diverged runs counted apart) and its failed jobs
    listed by
    :func:`~cl_lightning.callbacks.sweep_summary.failed_jobs`, so the report and ``summary.md`` agree. Runs of
    different sweeps are never pooled. When ``root`` is a single run, its group is that run.
    """
    result = Comparison()
    resolved = root.resolve()
    parents = {run.path.parent.resolve() for run in runs}
    parents |= {p.parent.parent.resolve() for p in root.rglob("failed.json")}
    for parent in sorted(parents):
        if parent != resolved and resolved not in parent.parents:
            # root is a run directory itself: its group is that run (summarize_runs would pool its siblings)
            result.rows += [_single_run_row(run) | {"sweep": "."} for run in runs if run.path.resolve() == resolved]
            continue
        sweep = parent.relative_to(resolved).as_posix()
        try:
            rows = summarize_runs(parent)
            failed = failed_jobs(parent)
            duplicates = duplicate_runs(parent)
        except (OSError, ValueError, KeyError, TypeError) as err:  # a results.json edited by hand, half-copied ...
            result.skipped.append(f"`{sweep}`: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        result.rows += [row | {"sweep": sweep} for row in rows]
        result.failed += [(f"{sweep}/{job}" if sweep != "." else job, error) for job, error in failed]
        prefix = f"{sweep}/" if sweep != "." else ""
        result.duplicates += [(prefix + job, prefix + first) for job, first in duplicates]
    return result


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=100)


def _padded(matrix: list[list[float]], n_tasks: int) -> np.ndarray:
    """The matrix with NaN rows for the tasks not trained yet (drawn blank by the heatmap)."""
    out = np.full((n_tasks, len(matrix[0])), np.nan)
    out[: len(matrix)] = np.asarray(matrix, dtype=float)
    return out


def plot_run(run: Run, out: Path) -> None:
    """Draw a run's figures into ``out/runs/<slug>/`` and record them in ``run.plots``."""
    folder = out / "runs" / run.slug
    folder.mkdir(parents=True, exist_ok=True)
    res = run.results
    title = f"{res['method']}, {res['dataset']}\n{res['scenario']}, seed {res['seed']}"
    if not run.complete:
        title += f"\n{run.status.reason}"
    if not res["acc_matrix"]:  # diverged in its first task: nothing to draw
        return
    figures = {
        "acc_matrix": lambda: accuracy_heatmap(_padded(res["acc_matrix"], run.n_tasks), title),
        "acc_curves": lambda: accuracy_curves(np.asarray(res["acc_matrix"], dtype=float), title),
    }
    if res.get("anytime"):
        curve = res["anytime"]
        figures["anytime"] = lambda: anytime_curves(curve["step"], curve["acc_matrix"], res["task_start_step"], title)
    if res.get("task_il_acc_matrix"):
        til = _padded(res["task_il_acc_matrix"], run.n_tasks)
        figures["task_il_acc_matrix"] = lambda: accuracy_heatmap(til, f"task-IL accuracy\n{title}")
    for kind, draw in figures.items():
        _save(draw(), folder / f"{kind}.png")
        run.plots[kind] = f"runs/{run.slug}/{kind}.png"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"


def _matrix_table(matrix: list[list[float]], n_tasks: int) -> list[str]:
    lines = ["| after task | " + " | ".join(f"T{j}" for j in range(n_tasks)) + " |", "|---" * (n_tasks + 1) + "|"]
    for i, row in enumerate(matrix):
        lines.append(f"| {i} | " + " | ".join(_pct(v) for v in row) + " |")
    return lines


def _group_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The grouping columns worth a column: ``sweep`` when the rows come from several directories, ``setting`` when
    a sweep varied more than the seed."""
    columns = ["sweep"] if len({r.get("sweep", ".") for r in rows}) > 1 else []
    columns += ["method", "dataset", "scenario"]
    return columns + (["setting"] if any(r.get("setting") for r in rows) else [])


def _references(rows: list[dict[str, Any]]) -> str | None:
    """The reference method of the paired tests (``summary.reference``): its name when every sweep with one used
    the same, ``reference`` when they differ, None when no sweep had one."""
    names = {r["method"] for r in rows if r.get("reference")}
    if not any("reference" in r for r in rows):
        return None
    return names.pop() if len(names) == 1 else "reference"


def _comparison_table(rows: list[dict[str, Any]]) -> list[str]:
    metrics = [m for m in METRICS if any(f"{m}_mean" in r for r in rows)]
    keys = _group_columns(rows)
    reference = _references(rows)
    extra = ["avg_acc 95% CI"] if "avg_acc" in metrics else []
    extra += [f"avg_acc vs {reference}"] if reference and extra else []
    header = [*keys, "runs", "seeds", *(METRIC_LABELS.get(m, m) for m in metrics), *extra]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        runs = f"{row['runs']}{left_out_counts(row)}"
        cells = [str(row.get(k) or "-") for k in keys] + [runs, row["seeds"] or "-"]
        cells += [format_stat(row, metric) for metric in metrics]
        if extra:
            cells.append(format_ci(row, "avg_acc"))
        if len(extra) > 1:
            cells.append(format_vs(row, "avg_acc"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _bar_labels(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with a one-line ``label``: the method, then what tells the groups apart (dataset/scenario when they
    differ, setting, sweep), then the number of runs."""
    keys = _group_columns(rows)
    several = len({(r["dataset"], r["scenario"]) for r in rows}) > 1
    labelled = []
    for row in rows:
        parts = [row["method"]] + ([f"{row['dataset']}/{row['scenario']}"] if several else [])
        parts += [str(row[k]) for k in ("setting", "sweep") if k in keys and row.get(k)]
        labelled.append(row | {"label": " · ".join([*parts, f"n={row['runs']}"])})
    return labelled


def _mean_std(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and sample std over runs of equally long series (None for one run: no band)."""
    stacked = np.vstack(series)
    return stacked.mean(axis=0), (stacked.std(axis=0, ddof=1) if len(series) > 1 else None)


def _seen_average(matrix: list[list[float]]) -> np.ndarray:
    """Percent accuracy over the tasks seen so far after each task: the mean of row i over columns 0..i."""
    return np.array([100 * float(np.mean(row[: i + 1])) for i, row in enumerate(matrix)])


def _anytime_average(res: dict[str, Any]) -> tuple[list[int], np.ndarray]:
    """A run's anytime curve: at each periodic evaluation, the percent accuracy over the tasks started by then."""
    steps, matrix, starts = res["anytime"]["step"], res["anytime"]["acc_matrix"], res.get("task_start_step") or []
    values = []
    for step, row in zip(steps, matrix, strict=True):
        started = [j for j, start in enumerate(starts) if start is not None and start <= step] or [0]
        values.append(100 * float(np.mean([row[j] for j in started])))
    return list(steps), np.array(values)


def _group_figures(rows: list[dict[str, Any]], runs: list[Run], out: Path) -> list[str]:
    """Accuracy over tasks (and anytime accuracy, when the runs have it) per group, one axes per sweep x dataset x
    scenario, mean over seeds with a ± std band. Returns the report's lines for them."""
    by_dir = {str(run.path.resolve()): run for run in runs}
    several_sweeps = len({r.get("sweep", ".") for r in rows}) > 1
    sets: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in _bar_labels(rows):
        sets.setdefault((row.get("sweep", "."), row["dataset"], row["scenario"]), []).append(row)
    lines: list[str] = []
    for n, ((sweep, dataset, scenario), members) in enumerate(sets.items(), start=1):
        title = f"{dataset}, {scenario}" + (f" ({sweep})" if several_sweeps else "")
        over_tasks, anytime = [], []
        for row in members:
            group = [by_dir[d] for d in (str(Path(d).resolve()) for d in row.get("run_dirs", [])) if d in by_dir]
            if not group:
                continue
            mean, std = _mean_std([_seen_average(run.results["acc_matrix"]) for run in group])
            over_tasks.append({"label": row["label"], "x": np.arange(len(mean)), "mean": mean, "std": std})
            curves = [_anytime_average(run.results) for run in group if run.results.get("anytime")]
            if curves and len(curves) == len(group) and all(c[0] == curves[0][0] for c in curves):
                mean, std = _mean_std([c[1] for c in curves])
                anytime.append({"label": row["label"], "x": curves[0][0], "mean": mean, "std": std})
        if not over_tasks:
            continue
        n_tasks = max(len(c["x"]) for c in over_tasks)
        name = f"accuracy_over_tasks_{n}.png"
        fig = group_curves(
            over_tasks, "after training task i", "accuracy on the tasks seen so far (%)", title, list(range(n_tasks))
        )
        _save(fig, out / name)
        lines += [f"Accuracy on the tasks seen so far, {title} (mean over seeds, band ± std):", "", f"![]({name})", ""]
        if anytime:
            name = f"anytime_{n}.png"
            fig = group_curves(anytime, "optimizer step", "accuracy on the tasks started so far (%)", title)
            _save(fig, out / name)
            lines += [f"Anytime accuracy during training, {title} (mean over seeds, band ± std):", ""]
            lines += [f"![]({name})", ""]
    return lines


def _overrides(run_dir: Path) -> list[str]:
    """The command-line overrides of a run, from Hydra's ``.hydra/overrides.yaml`` (empty when absent)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []
    except Exception:  # noqa: BLE001 - a damaged file only loses this line of the report
        return []


def _cost_line(cost: dict[str, Any]) -> str:
    """One line of a run's ``cost``: FLOPs (an estimate), the bytes of the network and of each method's state."""
    parts = []
    if cost.get("train_flops") is not None:
        flops = float(cost["train_flops"])
        parts.append(f"training ≈ {flops:.3g} FLOPs (estimate: the network's own forward and backward passes)")
    if cost.get("model_bytes") is not None:
        parts.append(f"network {cost['model_bytes'] / 1e6:.3g} MB")
    parts += [f"{name} state {n / 1e6:.3g} MB" for name, n in (cost.get("method_state_bytes") or {}).items()]
    if cost.get("peak_memory_bytes") is not None:
        parts.append(f"peak {cost.get('peak_memory_device', 'device')} memory {cost['peak_memory_bytes'] / 1e6:.3g} MB")
    return "Cost: " + ", ".join(parts) + "."


def _run_section(run: Run) -> list[str]:
    res = run.results
    kind = run.status.kind
    if kind == "complete":
        status = "complete"
    elif kind == "incomplete":
        status = f"**incomplete**: {run.done}/{run.n_tasks} tasks trained"
    else:
        status = run.status.describe().replace("diverged", "**diverged**", 1) + "; left out of the comparison"
    metrics = ", ".join(
        f"{k} {_pct(res.get(k))}%" for k in ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc") if k in res
    )
    lines = [f"### {run.slug}", "", f"{run.label}, {status}. `{run.path}`", ""]
    overrides = _overrides(run.path)
    if overrides:
        lines += ["Overrides: " + " ".join(f"`{o}`" for o in overrides), ""]
    if metrics:
        scope = "" if run.complete else f" (over the {len(res['acc_matrix'])} tasks trained, not comparable)"
        lines += [f"Metrics in percent{scope}: {metrics}.", ""]
    if res.get("train_seconds") is not None:
        lines += [f"Train {float(res['train_seconds']):.1f} s, eval {float(res.get('eval_seconds', 0)):.1f} s.", ""]
    if res.get("cost"):
        lines += [_cost_line(res["cost"]), ""]
    if res.get("tasks"):
        lines += ["Tasks: " + "; ".join(f"T{j}: {d}" for j, d in enumerate(res["tasks"])) + ".", ""]
    if not res["acc_matrix"]:
        return lines + ["No task was finished: no accuracy matrix.", ""]
    lines += ["Accuracy matrix (%, row: after training task i, column: task j):", ""]
    lines += _matrix_table(res["acc_matrix"], run.n_tasks) + [""]
    lines += [f"![accuracy matrix]({run.plots['acc_matrix']}) ![accuracy on each task]({run.plots['acc_curves']})"]
    if "anytime" in run.plots:
        lines += [
            "",
            f"Accuracy during training, every {res['anytime']['step'][0]} steps (anytime accuracy "
            f"{_pct(res.get('avg_anytime_acc'))}%):",
            "",
            f"![accuracy during training]({run.plots['anytime']})",
        ]
    if "task_il_acc_matrix" in run.plots:
        lines += [
            "",
            f"Task-IL accuracy (logits masked to each task's classes), average {_pct(res.get('task_il_avg_acc'))}%:",
        ]
        lines += ["", f"![task-IL accuracy matrix]({run.plots['task_il_acc_matrix']})"]
    return lines + [""]


def write_report(path: Path, out: Path | None = None) -> Path:
    """Write ``report.md`` and its figures for every run below ``path``.

    Args:
        path: A run directory, a sweep directory or any tree of them.
        out: The report directory, which must not exist or be empty; default ``<path>/report``.

    Returns:
        The path of ``report.md``.

    Raises:
        ReportError: ``path`` is not a directory or holds no ``results.json``, or ``out`` is not empty.
    """
    path = Path(path).expanduser()
    out = path / "report" if out is None else Path(out).expanduser()
    if not path.exists():
        raise ReportError(f"{path}: no such directory (give a run directory or a sweep directory)")
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (give a run directory or a sweep directory)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReportError(f"{out} already exists and is not empty; its files are kept: choose another with --out DIR")
    runs, unreadable = find_runs(path, exclude=out)
    if not runs:
        found = f" ({len(unreadable)} unreadable: {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
        raise ReportError(f"{path}: no {RESULTS_FILE} found below it{found}")

    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        plot_run(run, out)
    comparison = compare(path, runs)
    rows = comparison.rows
    complete = [r for r in rows if r["runs"]]
    incomplete = [run for run in runs if run.status.kind == "incomplete"]
    diverged = [run for run in runs if run.status.kind == "diverged"]
    n_complete = len(runs) - len(incomplete) - len(diverged)

    lines = [
        f"# Report: {path}",
        "",
        f"{len(runs)} run(s) found below `{path}`: {n_complete} complete, {len(incomplete)} incomplete, "
        f"{len(diverged)} diverged, {len(comparison.failed)} failed. "
        f"Written {datetime.now().isoformat(timespec='seconds')} by cl_lightning {__version__}.",
        "",
        "Accuracies are in percent. Definitions of the metrics: docs/metrics.md; how to read this report: "
        "docs/reading-results.md.",
        "",
        "## Comparison",
        "",
        "Mean ± sample std over seeds of the complete runs, per method x dataset x scenario (and swept setting), "
        "grouped as the sweep summary (`summary.md`) groups them; runs of different directories are not pooled. "
        "Incomplete and diverged runs are counted in brackets and enter no mean, std or bar.",
        "",
        *_comparison_table(rows),
        "",
    ]
    if complete:
        reference = _references(rows)
        lines += [
            "### Statistics over seeds",
            "",
            "Per metric: the complete runs `n`, their mean and sample std, and the 95% Student-t confidence interval "
            "of the mean over seeds (n=1: one run, no spread)"
            + (
                f"; vs {reference}: the mean difference from the reference method (`summary.reference`) over the seeds "
                "both have, with the p-value of a paired t-test across seeds."
                if reference
                else "."
            ),
            "",
            *statistics_table(complete, _group_columns(complete), reference),
            "",
        ]
    lines += [f"Not summarised: {line}" for line in comparison.skipped] + ([""] if comparison.skipped else [])
    if complete:
        title = "mean ± std over seeds, in percent (complete runs; n=1: no error bar)"
        _save(comparison_bars(_bar_labels(complete), COMPARED, title), out / "comparison.png")
        lines += ["![method comparison](comparison.png)", ""]
        lines += _group_figures(complete, runs, out)
    if comparison.duplicates:
        lines += [
            "## Duplicate runs",
            "",
            "A seed repeated with the same settings is not a new sample: pooled once (the first run), the repeats "
            "enter no mean, std or figure of the comparison.",
            "",
        ]
        lines += [f"- `{job}`: same seed and settings as `{first}`" for job, first in comparison.duplicates] + [""]
    if comparison.failed:
        lines += ["## Failed jobs", ""] + [f"- `{job}`: {error}" for job, error in comparison.failed] + [""]
    if diverged:
        lines += [
            "## Diverged runs",
            "",
            "Stopped on a non-finite loss or weights; left out of the comparison (their rows describe the tasks "
            "before the divergence only).",
            "",
        ]
        lines += [f"- `{run.slug}`: {run.status.describe()}" for run in diverged] + [""]
    if incomplete:
        lines += [
            "## Incomplete runs",
            "",
            "Left out of the comparison; `python -m cl_lightning resume=<run dir>` continues one.",
            "",
            "| run | method | dataset | scenario | seed | tasks trained |",
            "|---" * 6 + "|",
        ]
        for run in incomplete:
            r = run.results
            cells = [run.slug, r["method"], r["dataset"], r["scenario"], str(r["seed"]), f"{run.done}/{run.n_tasks}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if unreadable:
        lines += ["## Unreadable results", ""]
        lines += [f"- `{p}`: {reason}" for p, reason in unreadable] + [""]
    lines += ["## Runs", ""]
    for run in runs:
        lines += _run_section(run)
    report = out / REPORT_FILE
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m cl_lightning.report <run or sweep dir> [--out DIR]``; exit code 2 on errors."""
    parser = argparse.ArgumentParser(
        prog="python -m cl_lightning.report",
        description="Markdown report with plots of every results.json below a run or sweep directory.",
    )
    parser.add_argument("path", type=Path, help="a run directory, a sweep directory, or any tree of them")
    out_help = "report directory, which must not exist or be empty (default: <path>/report)"
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help=out_help)
    args = parser.parse_args(argv)
    try:
        report = write_report(args.path, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    n_png = len(list(report.parent.rglob("*.png")))
    print(f"report written to {report} ({n_png} figures)")


if __name__ == "__main__":
    main()
