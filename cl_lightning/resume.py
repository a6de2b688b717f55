"""``resume=<run dir>``: continue a stopped or killed run in its own directory, with its own configuration.

The checkpoints are ``checkpoints/last.ckpt`` (after every task) and ``checkpoints/mid_task.ckpt`` (every
``checkpoint_every_n_steps`` steps); the newer (by global step) that loads wins, so a run killed in the middle of a
task continues from the middle of that task, and ends with the accuracy matrix of an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cl_lightning.callbacks.periodic_eval import PeriodicEvaluation
from cl_lightning.contract import CLMethod
from cl_lightning.data.datamodule import TaskSequenceDataModule
from cl_lightning.errors import RunDirectoryError
from cl_lightning.models.module import CLModule
from cl_lightning.run_dir import RESULTS_FILE

# Overrides a resuming command may carry: they change how the run is watched or how far it goes this time, never
# its results. Everything else belongs to the run and is refused (the run keeps its own configuration).
ALLOWED_ON_RESUME = ("resume", "threads", "max_tasks", "logger", "trainer.enable_progress_bar", "callbacks", "hydra")


def override_key(override: str) -> str:
    """``method`` for ``method=ewc``, ``optimizer.lr`` for ``optimizer.lr=0.5``, ``hybrid.er`` for
    ``+method@hybrid.er=er``, ``seed`` for ``~seed``."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[1] if "@" in key else key


def refused_overrides(overrides: list[str]) -> list[str]:
    """The overrides of a resuming command that would change the run (all but :data:`ALLOWED_ON_RESUME`)."""
    refused = []
    for override in overrides:
        key = override_key(override)
        if not any(key == allowed or key.startswith(allowed + ".") for allowed in ALLOWED_ON_RESUME):
            refused.append(override)
    return refused


def prepare_resume(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[DictConfig, dict[str, Any], Path]:
    """Resolve ``resume=<run dir>``: the run's own resolved config and its newest readable checkpoint.

    Only ``threads``, ``max_tasks``, the logger, the progress bar and extra ``callbacks`` come from the resuming
    command; any other override in ``overrides`` (the command line's) is refused, naming it. A directory without
    a loadable checkpoint or with a finished run is refused and left as it was.
    """
    run_dir = Path(str(cfg.resume)).expanduser()
    refused = refused_overrides(overrides or [])
    if refused:
        raise RunDirectoryError(
            f"resume={run_dir} continues that run with its own configuration; {' '.join(refused)} would change it: "
            f"drop {'it' if len(refused) == 1 else 'them'}, or start a new run (only "
            f"{', '.join(ALLOWED_ON_RESUME[1:])} may be given with resume)"
        )
    results_file = run_dir / RESULTS_FILE
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
        except json.JSONDecodeError as err:
            raise RunDirectoryError(f"resume={run_dir}: results.json is not valid JSON ({err})") from err
        if results.get("complete"):
            raise RunDirectoryError(f"resume={run_dir}: that run is already complete; nothing to resume")
    paths = [run_dir / "checkpoints" / name for name in ("last.ckpt", "mid_task.ckpt")]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise RunDirectoryError(
            f"resume={run_dir}: no checkpoints/last.ckpt or checkpoints/mid_task.ckpt there; start a new run instead"
        )
    loaded, problems = [], []
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            loaded.append((int(state["global_step"]), path, state, state["cl_lightning"]["config"]))
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is skipped for an older one
            problems.append(f"{path.name}: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
    if not loaded:
        raise RunDirectoryError(
            f"resume={run_dir}: cannot load any checkpoint ({'; '.join(problems)}); they are corrupted or from an "
            "incompatible version; the run directory is left as it was"
        )
    _, path, state, config = max(loaded, key=lambda item: item[0])
    resumed = OmegaConf.create(config)
    with open_dict(resumed):
        resumed.paths.output_dir = str(run_dir)
        resumed.resume = str(run_dir)
        # settings of the invocation, not of the experiment
        resumed.threads = cfg.get("threads")
        resumed.max_tasks = cfg.get("max_tasks")
        resumed.callbacks = cfg.get("callbacks") or {}
        if any(override_key(o).split(".")[0] == "logger" for o in overrides or []):
            resumed.logger = cfg.get("logger")
        if any(override_key(o) == "trainer.enable_progress_bar" for o in overrides or []):
            resumed.trainer.enable_progress_bar = cfg.trainer.get("enable_progress_bar", True)
    return resumed, state, path


def restore(state: dict[str, Any], trainer: pl.Trainer, module: CLModule, dm: TaskSequenceDataModule) -> int:
    """Load a checkpoint into a freshly built run; return the first task still to train (or to finish).

    The module (weights, accuracy matrices, task counters), the datamodule, every continual method's state, the
    fit loop's progress (so epochs, the global step and, mid-task, the position in the epoch continue) and the RNG
    state are restored. The optimizer and the LR scheduler are restored for a mid-task checkpoint; at a task
    boundary the optimizer only when it is kept across tasks (``module.reset_optimizer=false``), and the scheduler
    never (each task's fit builds a new one, resumed or not).
    """
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise RunDirectoryError(
            f"resume: the checkpoint does not fit this run ({str(err).splitlines()[0][:200]}); it is from an "
            "incompatible version; the run directory is left as it was"
        ) from err
    dm.load_state_dict(state.get(type(dm).__qualname__, {}))
    saved = state.get("callbacks", {})
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, CLMethod | PeriodicEvaluation) and callback.state_key in saved:
            callback.load_state_dict(saved[callback.state_key])
    trainer.fit_loop.load_state_dict(state["loops"]["fit_loop"])
    mid_task = int(module.task_finished) < int(module.current_task)
    if (mid_task or not module.reset_optimizer) and state.get("optimizer_states"):
        module.pending_optimizer_state = state["optimizer_states"][0]
    if mid_task and state.get("lr_schedulers"):
        module.pending_scheduler_state = state["lr_schedulers"][0]
    if "rng_states" in state:
        torch.set_rng_state(state["rng_states"]["torch"])
    return int(module.task_finished) + 1
