"""Summary table of a Hydra multirun: statistics over seeds of each metric, per method x dataset x scenario.

Per metric: the mean, the sample std, the number of runs ``n`` and a 95% confidence interval for the mean (Student's
t with ``n - 1`` degrees of freedom: ``mean ± t(0.975, n-1) · std / sqrt(n)``); one run has neither std nor interval
("n=1"). With ``summary.reference=<method>`` each other method of the same dataset, scenario and setting is compared
with the reference by a paired t-test across seeds (``scipy.stats.ttest_rel``; runs paired by seed, only the seeds
both have), with the mean paired difference and its two-sided p-value.

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
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from scipy import stats

from cl_lightning.results import RunStatus, run_status

log = logging.getLogger(__name__)

#: The metrics summarised over seeds: accuracies (fractions), then the cost (``results.json``'s ``cost``, see
#: :mod:`cl_lightning.cost`): training seconds, estimated training FLOPs, the bytes of the network plus the methods'
#: state, and the peak device memory (CUDA only).
METRICS = (
    "avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc",
    "train_seconds", "train_flops", "memory_bytes", "peak_memory_bytes",
)  # fmt: skip
COST_METRICS = ("train_flops", "memory_bytes", "peak_memory_bytes")
#: Column titles of the metrics that are not accuracies in percent.
METRIC_LABELS = {
    "train_seconds": "train s",
    "train_flops": "train FLOPs (est.)",
    "memory_bytes": "model + state MB",
    "peak_memory_bytes": "peak MB",
}


def metric_value(results: Mapping[str, Any], metric: str) -> float | None:
    """A run's value of a summary metric: a ``results.json`` key, or for the cost metrics one read from ``cost``
    (``memory_bytes`` is ``model_bytes`` plus every method's ``method_state_bytes``)."""
    if metric not in COST_METRICS:
        value = results.get(metric)
    else:
        cost = results.get("cost") or {}
        if metric == "memory_bytes":
            model = cost.get("model_bytes")
            value = None if model is None else model + sum((cost.get("method_state_bytes") or {}).values())
        else:
            value = cost.get(metric)
    return None if value is None else float(value)


def seed_statistics(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample std, ``n`` and the 95% Student-t confidence interval of the mean of ``values`` (one per seed).

    With one value the std and the interval are ``None``: one run says nothing about the spread over seeds.

    Example:
        >>> out = seed_statistics([0.5, 0.6, 0.7])
        >>> round(out["std"], 6), round(out["ci95_low"], 4), round(out["ci95_high"], 4)
        (0.1, 0.3516, 0.8484)
        >>> seed_statistics([0.5])
        {'mean': 0.5, 'std': None, 'n': 1, 'ci95_low': None, 'ci95_high': None}
    """
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "ci95_low": None, "ci95_high": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95_low": mean - half, "ci95_high": mean + half}


def paired_test(values: Mapping[int, float], reference: Mapping[int, float]) -> dict[str, float | int | None]:
    """Paired t-test of ``values`` against ``reference``, both keyed by seed, over the seeds both have.

    Returns ``diff`` (the mean of ``value - reference`` over the pairs), ``p`` (two-sided, ``scipy.stats.ttest_rel``;
    ``None`` with fewer than two pairs or when every pair differs by the same amount, where the test is undefined)
    and ``pairs``.

    Example:
        >>> out = paired_test({0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}, {0: 0.1, 1: 0.25, 2: 0.3})
        >>> round(out["diff"], 4), round(out["p"], 5), out["pairs"]
        (0.3833, 0.00189, 3)
    """
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return {"diff": None, "p": None, "pairs": 0}
    a, b = [values[s] for s in seeds], [reference[s] for s in seeds]
    diff = sum(x - y for x, y in zip(a, b, strict=True)) / len(seeds)
    p = None
    if len(seeds) > 1:
        with warnings.catch_warnings():  # constant differences: scipy warns and returns nan, reported as None
            warnings.simplefilter("ignore", RuntimeWarning)
            pvalue = float(stats.ttest_rel(a, b).pvalue)
        p = pvalue if math.isfinite(pvalue) else None
    return {"diff": diff, "p": p, "pairs": len(seeds)}


GROUPED_ELSEWHERE = {"seed", "method", "dataset", "dataset.scenario"}
#: Overrides that change how a run is carried out, not what it measures: they never split a group of runs.
NOT_SETTINGS = {
    "resume", "max_tasks", "threads", "logger", "save_checkpoints", "checkpoint_every_n_steps",
    "trainer.enable_progress_bar", "summary.reference", "data_dir",
}  # fmt: skip
NOT_SETTING_PREFIXES = ("hydra.", "paths.", "logger.", "callbacks.", "+callbacks.")


def _default_value(job: Path, key: str) -> str:
    """The value of ``key`` in a job that did not override it: its config group's choice (``.hydra/hydra.yaml``) or
    its resolved value (``.hydra/config.yaml``); ``default`` when neither file says."""
    hydra_file, config_file = job / ".hydra" / "hydra.yaml", job / ".hydra" / "config.yaml"
    try:
        if hydra_file.is_file():
            choice = OmegaConf.select(OmegaConf.load(hydra_file), f"hydra.runtime.choices.{key.lstrip('+~')}")
            if choice is not None:
                return str(choice)
        if config_file.is_file():
            value = OmegaConf.select(OmegaConf.load(config_file), key.lstrip("+~"), throw_on_resolution_failure=False)
            if value is not None and not isinstance(value, DictConfig | ListConfig):
                return str(value)
    except Exception:  # noqa: BLE001 - a damaged file: the value is only a label
        pass
    return "default"


def _settings(sweep_dir: Path) -> dict[str, str]:
    """Per job directory, the command-line overrides that vary across the sweep (seeds aside), e.g. ``lr=0.1``.

    A key that some jobs do not override takes, in those, the value their config had (so ``model=cnn`` in one job
    and nothing in the others reads ``model=mlp`` there); keys with one value in every job are dropped, and so are
    the keys of :data:`NOT_SETTINGS` (how a run was carried out: ``resume``, ``threads``, ``logger`` ...).
    """
    overrides: dict[str, dict[str, str]] = {}
    for job in sweep_dir.iterdir():
        path = job / ".hydra" / "overrides.yaml"
        if path.is_file():
            items = OmegaConf.load(path)
            overrides[job.name] = dict(str(o).split("=", 1) for o in items if "=" in str(o))  # type: ignore[union-attr]
    keys = {k for ov in overrides.values() for k in ov} - GROUPED_ELSEWHERE - NOT_SETTINGS
    keys = {k for k in keys if not k.startswith(NOT_SETTING_PREFIXES)}
    for job, ov in overrides.items():
        for key in keys - set(ov):
            ov[key] = _default_value(sweep_dir / job, key)
    varying = sorted(k for k in keys if len({ov[k] for ov in overrides.values()}) > 1)
    return {job: " ".join(f"{k}={ov[k]}" for k in varying) for job, ov in overrides.items()}


def _job_results(sweep_dir: Path) -> list[tuple[Path, dict[str, Any], RunStatus]]:
    """``(path, results, status)`` of every ``<job>/results.json`` of the sweep, in path order."""
    out = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        results = json.loads(path.read_text())
        out.append((path, results, run_status(results)))
    return out


Key = tuple[str, str, str, str]


def _grouped_jobs(sweep_dir: Path) -> dict[Key, tuple[list[dict[str, Any]], list[str], dict[str, int]]]:
    """Per (method, dataset, scenario, setting): the pooled runs' results and directories, one run per seed (the
    first in path order), and the counts of the runs left out (incomplete, diverged, duplicates of a pooled seed)."""
    settings = _settings(sweep_dir)
    out: dict[Key, tuple[list[dict[str, Any]], list[str], dict[str, int]]] = {}
    for path, res, status in _job_results(sweep_dir):
        key = (res["method"], res["dataset"], res["scenario"], settings.get(path.parent.name, ""))
        runs, run_dirs, counts = out.setdefault(key, ([], [], {"incomplete": 0, "diverged": 0, "duplicates": 0}))
        if not status.complete:
            counts[status.kind] += 1
        elif any(r["seed"] == res["seed"] for r in runs):
            counts["duplicates"] += 1
        else:
            runs.append(res)
            run_dirs.append(str(path.parent))
    return out


def duplicate_runs(sweep_dir: Path) -> list[tuple[str, str]]:
    """``(job, job it repeats)`` for every complete run whose seed and settings an earlier complete run of its group
    already has: a repeat of a seed is not a new sample, so it is listed apart and pooled in no mean."""
    settings = _settings(sweep_dir)
    first: dict[tuple[Key, Any], str] = {}
    out = []
    for path, res, status in _job_results(sweep_dir):
        if not status.complete:
            continue
        key = ((res["method"], res["dataset"], res["scenario"], settings.get(path.parent.name, "")), res["seed"])
        if key in first:
            out.append((path.parent.name, first[key]))
        else:
            first[key] = path.parent.name
    return out


def recorded_reference(sweep_dir: Path) -> str | None:
    """The ``summary.reference`` the runs of the sweep were started with, when they all agree on one (else None)."""
    recorded = set()
    for _, res, _ in _job_results(sweep_dir):
        config = res.get("config")
        summary = config.get("summary") if isinstance(config, dict) else None
        recorded.add(summary.get("reference") if isinstance(summary, dict) else None)
    return recorded.pop() if len(recorded) == 1 else None


def summarize_runs(sweep_dir: Path, reference: str | None = None) -> list[dict[str, Any]]:
    """One row per (method, dataset, scenario, setting) over every ``results.json`` below ``sweep_dir``.

    ``setting`` holds the swept overrides other than the seed (e.g. ``optimizer.lr=0.1``), so the statistics are
    over seeds only. Only complete runs enter the statistics (``runs``, ``seeds``, and per metric ``<metric>_mean``,
    ``_std`` (sample, ``n - 1``; ``None`` for one run), ``_n``, ``_ci95_low``/``_ci95_high``, see
    :func:`seed_statistics`): runs that stopped early are counted in ``incomplete`` and diverged runs in
    ``diverged``, and both are listed by :func:`excluded_runs`.

    Args:
        sweep_dir: The sweep directory.
        reference: A method to compare every other method with (same dataset, scenario and setting): its rows get
            ``reference`` true, the others ``<metric>_diff``, ``_p`` and ``_pairs`` (:func:`paired_test`). Default:
            the ``summary.reference`` the runs recorded in their config, if any.
    """
    reference = reference if reference is not None else recorded_reference(sweep_dir)
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    dirs: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    left_out: dict[tuple[str, str, str, str], dict[str, int]] = defaultdict(
        lambda: {"incomplete": 0, "diverged": 0, "duplicates": 0}
    )
    grouped = _grouped_jobs(sweep_dir)
    for key, (runs, run_dirs, counts) in grouped.items():
        groups[key], dirs[key] = runs, run_dirs
        left_out[key] |= counts
    rows = []
    for key in sorted(grouped):
        runs = groups.get(key, [])
        row: dict[str, Any] = {"method": key[0], "dataset": key[1], "scenario": key[2], "setting": key[3]}
        row["runs"] = len(runs)
        row["seeds"] = " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        row |= left_out[key]
        row["run_dirs"] = dirs[key]
        for metric in METRICS:
            values = [v for r in runs if (v := metric_value(r, metric)) is not None]
            if values:
                row |= {f"{metric}_{k}": v for k, v in seed_statistics(values).items()}
        rows.append(row)
    if reference is not None:
        _compare_with(rows, groups, reference)
    return rows


def _compare_with(
    rows: list[dict[str, Any]], groups: Mapping[tuple[str, str, str, str], list[dict[str, Any]]], reference: str
) -> None:
    """Add the paired test against ``reference``'s runs of the same dataset, scenario and setting to ``rows``."""
    for row in rows:
        row["reference"] = row["method"] == reference
        ref_runs = groups.get((reference, row["dataset"], row["scenario"], row["setting"]), [])
        if row["reference"] or not ref_runs:
            continue
        runs = groups.get((row["method"], row["dataset"], row["scenario"], row["setting"]), [])
        for metric in METRICS:
            mine = {int(r["seed"]): v for r in runs if (v := metric_value(r, metric)) is not None}
            theirs = {int(r["seed"]): v for r in ref_runs if (v := metric_value(r, metric)) is not None}
            if mine and theirs:
                row |= {f"{metric}_{k}": v for k, v in paired_test(mine, theirs).items()}


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
    if row.get("duplicates"):
        parts.append(f"+{row['duplicates']} duplicate{'s' if row['duplicates'] > 1 else ''}")
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


def format_value(metric: str, value: float) -> str:
    """A metric's value as the tables print it: accuracies in percent, ``train_seconds`` in seconds, FLOPs with three
    significant digits, bytes in MB (10^6 bytes)."""
    if metric == "train_seconds":
        return f"{value:.1f}"
    if metric == "train_flops":
        return f"{value:.3g}"
    if metric.endswith("_bytes"):
        return f"{value / 1e6:.3g}"
    return f"{100 * value:.2f}"


def format_stat(row: Mapping[str, Any], metric: str) -> str:
    """``mean ± std`` of a summary row's metric, ``mean (n=1)`` for one run, ``-`` without a value."""
    if row.get(f"{metric}_mean") is None:
        return "-"
    mean = format_value(metric, row[f"{metric}_mean"])
    std = row.get(f"{metric}_std")
    return f"{mean} (n=1)" if std is None else f"{mean} ± {format_value(metric, std)}"


def format_ci(row: Mapping[str, Any], metric: str) -> str:
    """The 95% interval of a summary row's metric, ``[low, high]``; ``n=1`` for one run, ``-`` without a value."""
    if row.get(f"{metric}_mean") is None:
        return "-"
    if row.get(f"{metric}_ci95_low") is None:
        return f"n={row.get(f'{metric}_n', 1)}"
    return f"[{format_value(metric, row[f'{metric}_ci95_low'])}, {format_value(metric, row[f'{metric}_ci95_high'])}]"


def format_vs(row: Mapping[str, Any], metric: str) -> str:
    """The paired comparison with the reference: ``+12.30 (p=0.0019, 3 pairs)``, ``reference`` or ``-``."""
    if row.get("reference"):
        return "reference"
    pairs = row.get(f"{metric}_pairs")
    if not pairs:
        return "-"
    diff = row[f"{metric}_diff"]
    sign = "+" if diff >= 0 else "-"
    text = f"{sign}{format_value(metric, abs(diff))}"
    if row.get(f"{metric}_p") is not None:
        return f"{text} (p={row[f'{metric}_p']:.3g}, {pairs} pairs)"
    why = "1 pair" if pairs == 1 else f"{pairs} pairs with equal differences"
    return f"{text} ({why}: no test)"


def statistics_table(rows: list[dict[str, Any]], keys: list[str], reference: str | None) -> list[str]:
    """Markdown lines: one row per group x metric with ``n``, mean, std, the 95% CI and the paired test.

    Args:
        rows: Summary rows (:func:`summarize_runs`).
        keys: The grouping columns to print first (e.g. ``method``, ``dataset``, ``scenario``, ``setting``).
        reference: The reference method of the paired test, or None (no test columns).
    """
    header = [*keys, "metric", "n", "mean", "std", "95% CI"] + ([f"vs {reference} (paired t)"] if reference else [])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        for metric in METRICS:
            if row.get(f"{metric}_mean") is None:
                continue
            std = row.get(f"{metric}_std")
            cells = [str(row.get(k) or "-") for k in keys] + [metric, str(row[f"{metric}_n"])]
            cells += [format_value(metric, row[f"{metric}_mean"]), "n=1" if std is None else format_value(metric, std)]
            cells += [format_ci(row, metric)] + ([format_vs(row, metric)] if reference else [])
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary(sweep_dir: Path, reference: str | None = None) -> list[dict[str, Any]]:
    """Write ``summary.csv`` and ``summary.md`` at ``sweep_dir`` and return the rows.

    ``summary.md`` has the table of groups (mean ± std of each metric, the 95% CI of ``avg_acc`` and, with a
    reference, ``avg_acc``'s paired comparison with it), then the statistics of every metric (:func:`statistics_table`).
    Both files list the runs left out of the statistics after the tables: diverged runs (``DIVERGED`` rows in the CSV:
    job, where it diverged, its message), runs stopped early (``INCOMPLETE``) and failed jobs (``FAILED``).

    Args:
        sweep_dir: The sweep directory.
        reference: The method the others are compared with (``summary.reference``); default: the one the runs
            recorded, if any (:func:`recorded_reference`).
    """
    reference = reference if reference is not None else recorded_reference(sweep_dir)
    rows = summarize_runs(sweep_dir, reference)
    excluded = excluded_runs(sweep_dir)
    failed = failed_jobs(sweep_dir)
    columns = ["method", "dataset", "scenario", "setting", "runs", "seeds", "incomplete", "diverged", "duplicates"]
    columns += [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n", "ci95_low", "ci95_high")]
    if reference is not None:
        columns += ["reference"] + [f"{m}_{s}" for m in METRICS for s in ("diff", "p", "pairs")]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    shown = [m for m in METRICS if m not in COST_METRICS or any(f"{m}_mean" in r for r in rows)]
    header = ["method", "dataset", "scenario", "setting", "runs", *(METRIC_LABELS.get(m, m) for m in shown)]
    header += ["avg_acc 95% CI"]
    header += [f"avg_acc vs {reference}"] if reference else []
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        cells = [row["method"], row["dataset"], row["scenario"], row["setting"] or "-"]
        cells += [f"{row['runs']}{left_out_counts(row)}", *(format_stat(row, m) for m in shown)]
        cells += [format_ci(row, "avg_acc")] + ([format_vs(row, "avg_acc")] if reference else [])
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nMean ± sample std over seeds of the complete runs, in percent (train seconds in seconds; memory in MB, "
        "10^6 bytes: the network's and the methods' state_dict tensors; peak MB: CUDA's peak allocation; train FLOPs: "
        "an estimate, the network's own forward and backward passes, methods' extra passes not counted); n=1: one "
        "run, no spread. 95% CI: Student-t interval of the mean over seeds."
    )
    if reference:
        note += (
            f" vs {reference}: mean difference from {reference} over the seeds both have, with the two-sided p-value "
            "of a paired t-test across seeds."
        )
    note += "\n\n## Statistics over seeds\n\n"
    note += "\n".join(statistics_table(rows, ["method", "dataset", "scenario", "setting"], reference)) + "\n"
    diverged = [(job, status) for job, status in excluded if status.kind == "diverged"]
    incomplete = [(job, status) for job, status in excluded if status.kind == "incomplete"]
    if diverged:
        note += f"\n## Diverged runs ({len(diverged)})\n\nLeft out of every mean and std.\n\n"
        note += "".join(f"- `{job}`: {status.describe()}\n" for job, status in diverged)
    if incomplete:
        note += f"\n## Incomplete runs ({len(incomplete)})\n\nLeft out of every mean and std; "
        note += "`python -m cl_lightning resume=<job dir>` continues one.\n\n"
        note += "".join(f"- `{job}`: {status.reason}\n" for job, status in incomplete)
    duplicates = duplicate_runs(sweep_dir)
    if duplicates:
        note += f"\n## Duplicate runs ({len(duplicates)})\n\nA seed repeated with the same settings is not a new "
        note += "sample: pooled once (the first run), the repeats left out of every mean and std.\n\n"
        note += "".join(f"- `{job}`: same seed and settings as `{first}`\n" for job, first in duplicates)
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


def planned_methods(config: DictConfig) -> list[str] | None:
    """The methods a multirun will run, from its ``method=`` override (swept or not) or the config's choice.

    None when they cannot be told before the jobs run: a method added under ``hybrid`` (named ``a+b``), a swept
    ``experiment`` (which may bring its own method), or overrides Hydra's parser does not read.
    """
    overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task", default=None) or []]
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    overrides += [f"{k}={v}" for k, v in params.items()]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra reports its own parse errors; the check at the end still runs
        return None
    methods: list[str] | None = None
    for override in parsed:
        group = override.key_or_group
        if group == "method" and override.package:  # +method@hybrid.er=er: names like ewc+er
            return None
        if group == "hybrid" or group.startswith("hybrid.") or (group == "experiment" and override.is_sweep_override()):
            return None
        if group == "method":
            swept = override.is_sweep_override()
            methods = list(override.sweep_string_iterator()) if swept else [str(override.value())]
    if methods is None:
        if OmegaConf.select(config, "hybrid", default=None):
            return None
        choice = OmegaConf.select(config, "hydra.runtime.choices.method", default=None)
        methods = [str(choice)] if choice is not None else None
    return methods


def _reference_error(reference: Any, methods: list[str]) -> str:
    return (
        f"summary.reference={reference!r}: not a method of this sweep (its methods: {', '.join(methods)}); "
        "set it to one of them or drop it"
    )


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, summarise the runs' ``results.json`` files."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a ``summary.reference`` that is not one of the sweep's methods, before any job runs."""
        reference = OmegaConf.select(config, "summary.reference", default=None)
        if reference is None:
            return
        if not isinstance(reference, str):
            print(f"error: summary.reference={reference!r}: must be a method name, e.g. naive", file=sys.stderr)
            sys.exit(2)
        methods = planned_methods(config)
        if methods is not None and reference not in methods:
            print(f"error: {_reference_error(reference, methods)}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write ``summary.csv``/``summary.md``; exit 1 when a job failed or diverged, or the reference ran not."""
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        reference = OmegaConf.select(config, "summary.reference", default=None)
        rows = write_summary(sweep_dir, reference)
        log.info("sweep summary of %d groups written to %s", len(rows), sweep_dir / "summary.md")
        print((sweep_dir / "summary.md").read_text())
        methods = sorted({row["method"] for row in rows})
        if reference is not None and reference not in methods:
            print(f"error: {_reference_error(reference, methods)}", file=sys.stderr)
            sys.exit(1)
        failed = failed_jobs(sweep_dir)
        diverged = [job for job, status in excluded_runs(sweep_dir) if status.kind == "diverged"]
        if failed or diverged:
            # every job ran; the sweep as a whole still reports failure to the shell, as a lone diverged run does
            log.error(
                "%d job(s) of the sweep failed and %d diverged; see %s",
                len(failed), len(diverged), sweep_dir / "summary.md",
            )  # fmt: skip
            sys.exit(1)
