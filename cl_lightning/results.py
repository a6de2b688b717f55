"""``results.json``: what a run measured, written atomically after every task."""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from cl_lightning.metrics import functional as M

VERSIONED = ("cl_lightning", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a result depends on."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _rows(matrix: Tensor, n_rows: int) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in matrix[:n_rows]]


def summarize(matrix: Tensor, baseline: Tensor | None, n_done: int) -> dict[str, float | None]:
    """Summary metrics of the first ``n_done`` tasks (the square top-left block of the matrix).

    While a run is in progress the metrics describe the tasks trained so far; once all tasks are done they are the
    usual definitions over the whole matrix (:mod:`cl_lightning.metrics.functional`).
    """
    block = matrix[:n_done, :n_done].double()
    base = None if baseline is None else baseline[:n_done].double()
    out = M.summary(block, base)
    return {k: (None if v is None else round(float(v), 6)) for k, v in out.items()}


def build_results(
    *,
    method: str,
    dataset: str,
    scenario: str,
    seed: int,
    n_tasks: int,
    n_done: int,
    acc_matrix: Tensor,
    baseline: Tensor,
    task_il_matrix: Tensor | None,
    train_seconds: float,
    eval_seconds: float,
    config: dict[str, Any],
    task_descriptions: list[str],
) -> dict[str, Any]:
    """The ``results.json`` payload after ``n_done`` tasks."""
    results: dict[str, Any] = {
        "method": method,
        "dataset": dataset,
        "scenario": scenario,
        "seed": seed,
        "n_tasks": n_tasks,
        "tasks_completed": n_done,
        "complete": n_done == n_tasks,
        "acc_matrix": _rows(acc_matrix, n_done),
        "init_acc": [round(float(v), 6) for v in baseline],
        **summarize(acc_matrix, baseline, n_done),
    }
    if task_il_matrix is not None:
        results["task_il_acc_matrix"] = _rows(task_il_matrix, n_done)
        results["task_il_avg_acc"] = summarize(task_il_matrix, None, n_done)["avg_acc"]
    results |= {
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "tasks": task_descriptions,
        "config": config,
        "versions": library_versions(),
        "torch_threads": torch.get_num_threads(),
    }
    return results


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` so that a crash leaves the previous complete file, never a half-written one.

    The file gets the mode of any file the user creates, ``0o666`` less the umask (``0o644`` with the usual umask
    ``022``), so colleagues on a shared cluster can read the results. ``tempfile.mkstemp`` would make it ``0o600``;
    instead the temporary file is created with ``O_EXCL`` under a random name and the permissions ``0o666``, which the
    kernel reduces by the umask itself (no racy ``os.umask`` round trip, and default ACLs apply as usual).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # another writer drew the same name: draw again
            continue
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: The summary metrics of ``results.json``: a run whose values of these are not finite is never averaged.
SUMMARY_KEYS = ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc")


@dataclass(frozen=True)
class RunStatus:
    """What a ``results.json`` says about its run, for the summaries that pool runs into means.

    Only ``complete`` runs are pooled; the others are listed apart with their ``reason``.

    Attributes:
        kind: ``"complete"`` (every planned task trained, finite metrics), ``"incomplete"`` (stopped early, e.g. by
            ``max_tasks`` or a kill; ``resume=`` continues it) or ``"diverged"`` (stopped on a non-finite loss or
            weights, or holding non-finite metrics).
        reason: One line for the listing, e.g. ``"stopped after 2/5 tasks"`` or
            ``"diverged at step 57 of task 2 (nan)"``; empty for a complete run.
        message: A diverged run's own one-line message (what diverged, what to change), else empty.
    """

    kind: Literal["complete", "incomplete", "diverged"]
    reason: str = ""
    message: str = ""

    @property
    def complete(self) -> bool:
        """Whether the run may be pooled into means."""
        return self.kind == "complete"

    def describe(self) -> str:
        """``reason: message`` (or the reason alone), one line."""
        return f"{self.reason}: {self.message}" if self.message else self.reason


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def run_status(results: Mapping[str, Any]) -> RunStatus:
    """Classify a parsed ``results.json`` as complete, incomplete or diverged.

    A run is complete only when it says so (``complete`` true, or absent in files older than the key) *and* its
    accuracy matrix has a row for every planned task *and* its accuracies and summary metrics are finite. A
    ``diverged`` record (``{"step", "task", "value", "message"}``, written when the run stopped on a non-finite loss)
    makes it diverged whatever the other keys say.

    Args:
        results: The parsed file.

    Returns:
        The run's status.

    Example:
        >>> run_status({"n_tasks": 2, "complete": False, "acc_matrix": [[0.9, 0.1]]}).describe()
        'stopped after 1/2 tasks'
        >>> run_status({"complete": False, "diverged": {"step": 57, "task": 1, "value": "nan"}}).describe()
        'diverged at step 57 of task 1 (nan)'
    """
    diverged = results.get("diverged")
    if diverged:
        record: Mapping[str, Any] = diverged if isinstance(diverged, Mapping) else {}
        reason = f"diverged at step {record.get('step', '?')} of task {record.get('task', '?')}"
        if record.get("value"):
            reason += f" ({record['value']})"
        return RunStatus("diverged", reason, " ".join(str(record.get("message") or "").split()))
    rows = results.get("acc_matrix") or []
    planned = results.get("n_tasks")
    planned = int(planned) if planned is not None else (len(rows[0]) if rows else 0)
    done = int(results.get("tasks_completed", len(rows)))
    says_complete = results.get("complete", True) is True
    if not (says_complete and planned > 0 and done == planned and len(rows) == planned):
        return RunStatus("incomplete", f"stopped after {min(done, len(rows))}/{planned} tasks")
    bad = [k for k in SUMMARY_KEYS if not _finite(results.get(k))]
    if not all(_finite(v) for row in rows for v in row):
        bad.insert(0, "acc_matrix")
    if bad:
        return RunStatus("diverged", f"diverged (non-finite {', '.join(bad)} in results.json)")
    return RunStatus("complete")


def format_matrix(
    matrix: Tensor, n_rows: int, title: str = "accuracy matrix (row: after task i, column: task j)"
) -> str:
    """The accuracy matrix as a fixed-width text table, in percent."""
    n_cols = matrix.shape[1]
    lines = [title, "          " + "".join(f"{f'T{j}':>8}" for j in range(n_cols))]
    for i in range(n_rows):
        lines.append(f"after T{i:<3}" + "".join(f"{100 * float(v):8.2f}" for v in matrix[i]))
    return "\n".join(lines)


def format_summary(results: dict[str, Any]) -> str:
    """One line per summary metric, in percent."""
    keys = ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc")
    parts = [f"{k}={100 * results[k]:.2f}%" for k in keys if results.get(k) is not None]
    return "  ".join(parts)
