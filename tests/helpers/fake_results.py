"""Hand-made ``results.json`` files as ``train()`` writes them: complete, stopped early, or diverged."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cl_lightning.results import build_results, write_json_atomic


def fake_run(
    sweep: Path,
    job: str,
    method: str,
    seed: int,
    matrix: list[list[float]],
    n_tasks: int = 3,
    scenario: str = "class_il",
    overrides: list[str] | None = None,
) -> Path:
    """Write ``<sweep>/<job>/results.json`` as ``train()`` would after ``len(matrix)`` of ``n_tasks`` tasks.

    Args:
        sweep: The sweep directory.
        job: The job's directory name.
        method: ``results["method"]``.
        seed: ``results["seed"]``.
        matrix: The rows of the accuracy matrix trained so far.
        n_tasks: Tasks planned.
        scenario: ``results["scenario"]``; class-IL runs also get a task-IL matrix.
        overrides: If given, written to ``<job>/.hydra/overrides.yaml`` as a Hydra sweep job has it.

    Returns:
        The job directory.
    """
    full = torch.full((n_tasks, n_tasks), float("nan"))
    full[: len(matrix)] = torch.tensor(matrix)
    results = build_results(
        method=method,
        dataset="blobs",
        scenario=scenario,
        seed=seed,
        n_tasks=n_tasks,
        n_done=len(matrix),
        acc_matrix=full,
        baseline=torch.full((n_tasks,), 0.1),
        task_il_matrix=full if scenario == "class_il" else None,
        train_seconds=1.5,
        eval_seconds=0.5,
        config={"method": {"_target_": method}},
        task_descriptions=[f"classes [{2 * t}, {2 * t + 1}]" for t in range(n_tasks)],
    )
    write_json_atomic(sweep / job / "results.json", results)
    if overrides is not None:
        (sweep / job / ".hydra").mkdir(parents=True, exist_ok=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return sweep / job


def mark_diverged(job: Path, step: int, task: int, value: str = "nan") -> dict:
    """Turn ``job``'s ``results.json`` into a diverged run's: ``complete`` false and the ``diverged`` record.

    The accuracy matrix keeps the rows of the tasks completed before the divergence, and their summary metrics, as
    the run writes them when it stops on a non-finite loss.

    Returns:
        The rewritten results.
    """
    path = job / "results.json"
    results = json.loads(path.read_text())
    results["complete"] = False
    results["diverged"] = {
        "step": step,
        "task": task,
        "value": value,
        "message": f"the training loss became {value} at step {step} of task {task}; lower optimizer.lr",
    }
    write_json_atomic(path, results)
    return results
