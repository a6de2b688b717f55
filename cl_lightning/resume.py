"""``resume=<run dir>``: continue a stopped or killed run in its own directory, with its own configuration.

The checkpoints are ``checkpoints/last.ckpt`` (after every task) and ``checkpoints/mid_task.ckpt`` (every
``checkpoint_every_n_steps`` steps); the newer (by global step) that loads wins, so a run killed in the middle of a
task continues from the middle of that task, and ends with the accuracy matrix of an uninterrupted run.

``resume=auto`` (:func:`prepare_auto`) decides by the run's own directory (``paths.output_dir``: a fixed
``hydra.run.dir``, or a sweep job's directory): a finished run there is skipped with nothing written, a run with a
checkpoint continues from its newest one, an empty directory starts a new run. A run there whose configuration is
not the command's is refused, naming the keys, so re-running a sweep's command line with ``resume=auto`` skips the
finished jobs and continues the interrupted ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cl_lightning.callbacks.periodic_eval import PeriodicEvaluation
from cl_lightning.contract import CLMethod
from cl_lightning.data.datamodule import TaskSequenceDataModule
from cl_lightning.errors import OtherRunError, RunDirectoryError
from cl_lightning.models.module import CLModule
from cl_lightning.results import run_status
from cl_lightning.run_dir import RESULTS_FILE

# Overrides a resuming command may carry: they change how the run is watched or how far it goes this time, never
# its results. Everything else belongs to the run and is refused (the run keeps its own configuration).
ALLOWED_ON_RESUME = ("resume", "threads", "max_tasks", "logger", "trainer.enable_progress_bar", "callbacks", "hydra")
#: ``resume=auto``: continue the run in this run's own directory if it has one, else start it.
AUTO = "auto"


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
    results = _read_results(run_dir, f"resume={run_dir}")
    if results is not None and results.get("complete"):
        raise RunDirectoryError(f"resume={run_dir}: that run is already complete; nothing to resume")
    if not _checkpoints(run_dir):
        hint = (
            f"; a sweep directory? re-run the sweep's command line with -m hydra.sweep.dir={run_dir} resume=auto"
            if (run_dir / "multirun.yaml").is_file() else "; start a new run instead"
        )  # fmt: skip
        raise RunDirectoryError(f"resume={run_dir}: no checkpoints/last.ckpt or checkpoints/mid_task.ckpt there{hint}")
    path, state, config = newest_checkpoint(run_dir, f"resume={run_dir}")
    return _resumed_config(config, run_dir, cfg, overrides), state, path


def _read_results(run_dir: Path, what: str) -> dict[str, Any] | None:
    """The run's parsed ``results.json``, ``None`` without one; invalid JSON is refused."""
    results_file = run_dir / RESULTS_FILE
    if not results_file.is_file():
        return None
    try:
        return json.loads(results_file.read_text())
    except json.JSONDecodeError as err:
        raise RunDirectoryError(f"{what}: {run_dir / RESULTS_FILE} is not valid JSON ({err})") from err


def _checkpoints(run_dir: Path) -> list[Path]:
    paths = [run_dir / "checkpoints" / name for name in ("last.ckpt", "mid_task.ckpt")]
    return [p for p in paths if p.is_file()]


def newest_checkpoint(run_dir: Path, what: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The newest (by global step) of the run's checkpoints that loads: its path, its state and the run's config.

    Args:
        run_dir: The run directory.
        what: How the refusal names the command (e.g. ``resume=<run dir>``).

    Raises:
        RunDirectoryError: None loads (corrupted, or from an incompatible version).
    """
    loaded, problems = [], []
    paths = _checkpoints(run_dir)
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            loaded.append((int(state["global_step"]), path, state, state["cl_lightning"]["config"]))
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is skipped for an older one
            problems.append(f"{path.name}: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
    if not loaded:
        raise RunDirectoryError(
            f"{what}: cannot load any checkpoint ({'; '.join(problems)}); they are corrupted or from an "
            "incompatible version; the run directory is left as it was"
        )
    _, path, state, config = max(loaded, key=lambda item: item[0])
    return path, state, config


def _resumed_config(
    config: Mapping[str, Any], run_dir: Path, cfg: DictConfig, overrides: list[str] | None
) -> DictConfig:
    """The run's own ``config`` with the settings of this invocation (``overrides``: the command line's, which say
    whether the logger and the progress bar were given; ``None``: take them from ``cfg`` as well)."""
    resumed = OmegaConf.create(dict(config))
    with open_dict(resumed):
        resumed.paths.output_dir = str(run_dir)
        resumed.resume = str(run_dir)
        # settings of the invocation, not of the experiment
        resumed.threads = cfg.get("threads")
        resumed.max_tasks = cfg.get("max_tasks")
        resumed.callbacks = cfg.get("callbacks") or {}
        if overrides is None or any(override_key(o).split(".")[0] == "logger" for o in overrides):
            resumed.logger = cfg.get("logger")
        if overrides is None or any(override_key(o) == "trainer.enable_progress_bar" for o in overrides):
            resumed.trainer.enable_progress_bar = cfg.trainer.get("enable_progress_bar", True)
    return resumed


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def differing_keys(recorded: Mapping[str, Any], command: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ between a run's recorded config and a command's (both resolved), leaving
    out :data:`ALLOWED_ON_RESUME` (how a run is carried out, never its results) and ``paths.output_dir`` (the
    directory itself).

    >>> differing_keys({"seed": 0, "optimizer": {"lr": 0.1}, "threads": 1}, {"seed": 3, "optimizer": {"lr": 0.1}})
    ['seed']
    """
    ours, theirs = _flatten(recorded), _flatten(command)
    return [
        key for key in sorted(set(ours) | set(theirs))
        if ours.get(key, "<unset>") != theirs.get(key, "<unset>") and key != "paths.output_dir"
        and not any(key == allowed or key.startswith(allowed + ".") for allowed in ALLOWED_ON_RESUME)
    ]  # fmt: skip


@dataclass
class AutoResume:
    """What ``resume=auto`` found in the run's directory (:func:`prepare_auto`).

    Attributes:
        kind: ``"new"`` (no run there: start one), ``"finished"`` (complete or diverged: skip it, write nothing) or
            ``"resume"`` (continue from ``checkpoint``).
        cfg: The config to run: the command's for a new run, the run's own with this invocation's settings to resume.
        results: A finished run's ``results.json``.
        state: The checkpoint to resume from, loaded.
        checkpoint: Its path.
    """

    kind: Literal["new", "finished", "resume"]
    cfg: DictConfig
    results: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    checkpoint: Path | None = None


def prepare_auto(cfg: DictConfig) -> AutoResume:
    """Resolve ``resume=auto`` by the run's own directory, ``cfg.paths.output_dir``, having written nothing.

    A finished run there (``results.json`` complete, or diverged, which would diverge again) is to be skipped; a
    stopped or killed one with a checkpoint continues from its newest; otherwise a new run starts (and
    :meth:`~cl_lightning.run_dir.RunDirectory.claim` still refuses a directory holding results without a
    checkpoint). A run there whose config differs from ``cfg`` in keys other than :data:`ALLOWED_ON_RESUME` is
    refused with one line naming them.

    Raises:
        OtherRunError: The configs differ.
        RunDirectoryError: ``results.json`` or every checkpoint is unreadable.
    """
    run_dir = Path(str(cfg.paths.output_dir))
    what = f"resume=auto in {run_dir}"
    command = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(command, dict)
    command.pop("resume", None)

    def refuse_if_other(recorded: Mapping[str, Any], source: str) -> None:
        keys = differing_keys(recorded, command)
        if keys:
            shown = ", ".join(keys[:12]) + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")
            raise OtherRunError(
                f"{what}: the run there (its {source}) differs from this command in {shown}; nothing the command "
                "gives is ignored: give the run's values, or choose another directory (hydra.run.dir=..., "
                "hydra.sweep.dir=...)"
            )

    results = _read_results(run_dir, what)
    if results is not None and run_status(results).kind in ("complete", "diverged"):
        refuse_if_other(results.get("config") or {}, "results.json")
        return AutoResume("finished", cfg, results=results)
    if not _checkpoints(run_dir):
        return AutoResume("new", cfg)
    path, state, config = newest_checkpoint(run_dir, what)
    refuse_if_other(config, f"checkpoints/{path.name}")
    return AutoResume("resume", _resumed_config(config, run_dir, cfg, None), state=state, checkpoint=path)


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
    loops = state["loops"]["fit_loop"]
    steps = loops.get("epoch_loop.manual_optimization.optim_step_progress", {}).get("total", {}).get("completed")
    if steps is not None and steps != int(state.get("global_step", steps)):
        # the module optimizes manually; a checkpoint of the earlier automatic loop would restart the step count
        raise RunDirectoryError(
            f"resume: the checkpoint counts {state['global_step']} steps in a loop this version does not run (it is "
            "from an earlier cl_lightning); finish the run with that version or start a new one; the run directory "
            "is left as it was"
        )
    trainer.fit_loop.load_state_dict(loops)
    mid_task = int(module.task_finished) < int(module.current_task)
    if (mid_task or not module.reset_optimizer) and state.get("optimizer_states"):
        module.pending_optimizer_state = state["optimizer_states"][0]
    if mid_task and state.get("lr_schedulers"):
        module.pending_scheduler_state = state["lr_schedulers"][0]
    if "rng_states" in state:
        torch.set_rng_state(state["rng_states"]["torch"])
    return int(module.task_finished) + 1
