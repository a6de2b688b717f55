"""What a run reports as it goes: results after every task to the logger, hyperparameters at the end, the console."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from cl_lightning.loggers import log_metrics
from cl_lightning.results import format_matrix, format_summary


def log_task(trainer: pl.Trainer, results: dict[str, Any], task: int) -> None:
    """Row ``task`` of the accuracy matrix, the diagnostics and the summary so far, at the current step."""
    if not trainer.loggers:
        return
    step = trainer.global_step
    row = results["acc_matrix"][task]
    metrics = {f"eval/acc/task_{j}": acc for j, acc in enumerate(row)}
    metrics["eval/avg_acc_seen"] = sum(row[: task + 1]) / (task + 1)
    for method, values in results.get("diagnostics", {}).items():
        metrics |= {
            f"diagnostics/{method}/{key}": float(v)
            for key, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    for key in ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc"):
        if results.get(key) is not None:
            metrics[f"summary/{key}"] = results[key]
    log_metrics(trainer, metrics, step)
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            from cl_lightning.plots import accuracy_heatmap

            rows = results["acc_matrix"]
            matrix = np.full((results["n_tasks"], results["n_tasks"]), np.nan)
            matrix[: len(rows)] = rows
            experiment.add_figure("eval/acc_matrix", accuracy_heatmap(matrix, f"after task {task}"), global_step=step)


def log_hparams(trainer: pl.Trainer, cfg: DictConfig, results: dict[str, Any]) -> None:
    """The resolved config as hyperparameters, with the final summary metrics (TensorBoard's HPARAMS tab)."""
    if not trainer.loggers:
        return
    flat = {
        k: (v if isinstance(v, int | float | str | bool) else str(v))
        for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()
        if not k.startswith("paths.") and v is not None
    }
    metrics = {f"hparam/{k}": results[k] for k in ("avg_acc", "forgetting", "bwt", "fwt") if results.get(k) is not None}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab pairs them with the metrics
            logger.log_hyperparams(flat, metrics=metrics)
        else:  # CSV, Weights & Biases, MLflow: the config, then the final metrics at the last step
            logger.log_hyperparams(flat)
            logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def print_summary(results: dict[str, Any], name: str, run_dir: Any) -> None:
    """The accuracy matrices and the summary line on the console."""
    n_rows = results["tasks_completed"]
    print(format_matrix(torch.tensor(results["acc_matrix"]), n_rows))
    if "task_il_acc_matrix" in results:
        til = torch.tensor(results["task_il_acc_matrix"])
        print(format_matrix(til, n_rows, "task-IL accuracy matrix (logits masked to the task's classes)"))
    print(f"{name} on {results['dataset']} ({results['scenario']}, seed {results['seed']}): {format_summary(results)}")
    print(f"train {results['train_seconds']:.1f}s, eval {results['eval_seconds']:.1f}s; results in {run_dir}")
    if not results["complete"]:
        print(f"stopped after task {n_rows}/{results['n_tasks']}; continue with resume={run_dir.parent}")
