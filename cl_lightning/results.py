"""``results.json``: what a run measured, written atomically after every task."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

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
    """Write ``payload`` to ``path`` so that a crash leaves the previous complete file, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
