"""``train(cfg)``: one continual-learning experiment; ``main()`` is its Hydra command line.

The run is one Lightning ``Trainer`` and one TensorBoard run with continuous steps: for each task, the datamodule
switches task, ``trainer.fit`` trains on it (``max_epochs`` grows by ``epochs_per_task``; the loops, the logger and
the global step carry over), then ``trainer.test`` evaluates every task's test set into the next row of the
accuracy matrix. ``results.json`` and a checkpoint are written after every task.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from cl_lightning.callbacks.periodic_eval import PeriodicEvaluation
from cl_lightning.callbacks.progress import TaskProgressBar
from cl_lightning.data.datamodule import TaskSequenceDataModule
from cl_lightning.data.sources import DatasetNotFoundError
from cl_lightning.errors import ConfigError, RunDirectoryError
from cl_lightning.loggers import SequenceTensorBoardLogger
from cl_lightning.methods.base import CLMethod, check_combination
from cl_lightning.models.module import CLModule
from cl_lightning.results import build_results, format_matrix, format_summary, write_json_atomic

log = logging.getLogger("cl_lightning")
# Lightning 2.6 calls a pytree API that torch 2.14 deprecates; harmless, and printed once per fit otherwise.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)

RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"
SUMMARY_METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc")
# The configs live at the repository's top level (conf/), beside the package; an absolute path keeps
# `python -m cl_lightning` working from any directory (Hydra would read a relative one as a Python module path).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def validate_config(cfg: DictConfig) -> None:
    """Check the top-level keys before anything is built; raise a one-line :class:`ConfigError`."""

    def integer(key: str, minimum: int, optional: bool = False) -> None:
        value = OmegaConf.select(cfg, key)
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            null = " (or null)" if optional else ""
            raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}{null}")

    integer("epochs_per_task", 1)
    integer("steps_per_task", 1, optional=True)
    integer("batch_size", 1)
    integer("seed", 0)
    integer("threads", 1, optional=True)
    integer("max_tasks", 1, optional=True)
    integer("checkpoint_every_n_steps", 1, optional=True)
    integer("eval_every_n_steps", 1, optional=True)
    integer("eval_max_samples_per_task", 1, optional=True)
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if lr is not None and (not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0 or math.isinf(lr)):
        raise ConfigError(f"optimizer.lr={lr!r}: must be a number > 0 (e.g. optimizer.lr=0.01)")
    metric = cfg.get("optimized_metric")
    if metric is not None and metric not in SUMMARY_METRICS:
        raise ConfigError(f"optimized_metric={metric!r}: choose one of {', '.join(SUMMARY_METRICS)}")
    stream = OmegaConf.select(cfg, "dataset.stream")
    if stream == "online" and (cfg.epochs_per_task != 1 or cfg.steps_per_task is not None):
        raise ConfigError(
            f"dataset.stream=online is a single pass: set epochs_per_task=1 and steps_per_task=null "
            f"(got {cfg.epochs_per_task} and {cfg.steps_per_task})"
        )


def check_fresh_run_dir(run_dir: Path) -> None:
    """Refuse to start in a directory that already holds a run's results or checkpoints."""
    taken = [p for p in (run_dir / RESULTS_FILE, run_dir / "checkpoints") if p.exists()]
    if taken:
        raise RunDirectoryError(
            f"{run_dir} already holds an earlier run ({taken[0].name}); its outputs are kept: choose another "
            "directory with hydra.run.dir=... (or paths.output_dir=...)"
        )


def _launch_rank() -> int:
    """This process's global rank as the launcher (Lightning, torchrun or SLURM) set it, before DDP starts."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our one-line errors through instead of Hydra's multi-line wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, ConfigError | DatasetNotFoundError):
                raise cause from err
            cause = cause.__cause__
        raise


def build_methods(cfg: DictConfig) -> list[CLMethod]:
    """The run's continual methods: ``method`` plus any combined with it under ``hybrid``.

    ``python -m cl_lightning method=ewc +method@hybrid.er=er`` adds experience replay to EWC (Hydra's syntax for a
    second option of the same group at another place in the config); ``hybrid.er.buffer_size=500`` sets its values.
    """
    nodes = [("method", cfg.method)] + [(f"hybrid.{k}", v) for k, v in (cfg.get("hybrid") or {}).items()]
    methods = []
    for key, node in nodes:
        method = _instantiate(node)
        if not isinstance(method, CLMethod):
            raise ConfigError(f"{key}._target_={node.get('_target_')!r} is not a cl_lightning CLMethod")
        methods.append(method)
    check_combination(methods)
    return methods


def _build_model(cfg: DictConfig, dm: TaskSequenceDataModule) -> torch.nn.Module:
    factory = _instantiate(cfg.model)
    kwargs: dict[str, Any] = {"input_shape": dm.input_shape, "n_outputs": dm.n_outputs}
    try:
        parameters = inspect.signature(factory).parameters
        if "n_tasks" in parameters:
            kwargs["n_tasks"] = dm.n_tasks  # networks that grow per task (progressive networks) allocate up front
        if "task_outputs" in parameters:
            kwargs["task_outputs"] = [t.tolist() for t in dm.task_outputs]  # multi-head networks: each task's logits
    except (TypeError, ValueError):  # a callable without an inspectable signature
        pass
    try:
        return factory(**kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _log_task(trainer: pl.Trainer, results: dict[str, Any], task: int) -> None:
    logger = trainer.logger
    if logger is None:
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
    logger.log_metrics(metrics, step=step)
    experiment = getattr(logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_figure"):
        from cl_lightning.plots import accuracy_heatmap

        rows = results["acc_matrix"]
        matrix = np.full((results["n_tasks"], results["n_tasks"]), np.nan)
        matrix[: len(rows)] = rows
        experiment.add_figure("eval/acc_matrix", accuracy_heatmap(matrix, f"after task {task}"), global_step=step)


def _log_hparams(trainer: pl.Trainer, cfg: DictConfig, results: dict[str, Any]) -> None:
    logger = trainer.logger
    if logger is None:
        return
    flat = {
        k: (v if isinstance(v, int | float | str | bool) else str(v))
        for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()
        if not k.startswith("paths.") and v is not None
    }
    metrics = {f"hparam/{k}": results[k] for k in ("avg_acc", "forgetting", "bwt", "fwt") if results.get(k) is not None}
    logger.log_hyperparams(flat, metrics=metrics)  # type: ignore[call-arg]
    logger.save()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def prepare_resume(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any], Path]:
    """Resolve ``resume=<run dir>``: the run's own resolved config and its newest readable checkpoint.

    The checkpoints are ``checkpoints/last.ckpt`` (after every task) and ``checkpoints/mid_task.ckpt`` (every
    ``checkpoint_every_n_steps`` steps); the newer (by global step) that loads wins, so a run killed in the middle
    of a task continues from the middle of that task. The run continues in its original directory with the
    configuration it started with (stored in the checkpoint); only ``threads``, ``max_tasks`` and the extra
    ``callbacks`` come from the resuming command. A directory without a loadable checkpoint or with a finished run
    is refused and left as it was.
    """
    run_dir = Path(str(cfg.resume)).expanduser()
    results_file = run_dir / RESULTS_FILE
    if results_file.is_file():
        try:
            if json.loads(results_file.read_text()).get("complete"):
                raise RunDirectoryError(f"resume={run_dir}: that run is already complete; nothing to resume")
        except json.JSONDecodeError as err:
            raise RunDirectoryError(f"resume={run_dir}: results.json is not valid JSON ({err})") from err
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
    return resumed, state, path


def restore(state: dict[str, Any], trainer: pl.Trainer, module: CLModule, dm: TaskSequenceDataModule) -> int:
    """Load a checkpoint into a freshly built run; return the first task still to train (or to finish).

    The module (weights, accuracy matrices, task counters), the datamodule, every continual method's state, the
    fit loop's progress (so epochs, the global step and, mid-task, the position in the epoch continue) and the RNG
    state are restored. The optimizer is restored for a mid-task checkpoint, and at a task boundary only when it is
    kept across tasks (``module.reset_optimizer=false``).
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
        if isinstance(callback, CLMethod) and callback.state_key in saved:
            callback.load_state_dict(saved[callback.state_key])
    trainer.fit_loop.load_state_dict(state["loops"]["fit_loop"])
    mid_task = int(module.task_finished) < int(module.current_task)
    if (mid_task or not module.reset_optimizer) and state.get("optimizer_states"):
        module.pending_optimizer_state = state["optimizer_states"][0]
    if "rng_states" in state:
        torch.set_rng_state(state["rng_states"]["torch"])
    return int(module.task_finished) + 1


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment (or resume one with ``resume=<run dir>``) and return its ``results.json`` payload."""
    resume_state: dict[str, Any] | None = None
    if cfg.get("resume"):
        cfg, resume_state, ckpt_path = prepare_resume(cfg)
        log.info("resuming from %s", ckpt_path)
    run_dir = Path(cfg.paths.output_dir)
    if resume_state is None and _launch_rank() == 0:
        # only the first process checks: under DDP the others share its directory
        check_fresh_run_dir(run_dir)
    validate_config(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    methods = build_methods(cfg)
    name = "+".join(m.name for m in methods)
    dm: TaskSequenceDataModule = _instantiate(cfg.dataset, cumulative=any(m.cumulative_data for m in methods))
    dm.setup("fit")
    net = _build_model(cfg, dm)
    module = CLModule(
        net,
        optimizer=instantiate(cfg.optimizer),
        scenario=dm.scenario,
        task_outputs=dm.task_outputs,
        n_outputs=dm.n_outputs,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        hide_task_boundaries=dm.stream == "online",
        preprocess=dm.preprocess,
        augments=dm.augment != "none",
        **cfg.module,
    )
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    # methods that train on after the task's epochs (PackNet's retraining) lengthen every task by as much
    epochs = (1 if cfg.steps_per_task else cfg.epochs_per_task) + max(m.extra_epochs_per_task for m in methods)
    callbacks: list[pl.Callback] = [*methods]
    # A bar on a terminal; in logs (CI, clusters, sweeps) the per-task log line reports progress instead.
    progress = bool(cfg.trainer.get("enable_progress_bar", True)) and sys.stderr.isatty()
    if progress:
        callbacks.append(TaskProgressBar(dm.n_tasks, epochs))
    every = cfg.get("checkpoint_every_n_steps")
    if every:
        # mid-task checkpoints (Lightning's own, with the loop and dataloader position) for exact resume
        callbacks.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints", filename="mid_task", every_n_train_steps=int(every),
                save_top_k=1, save_last=False, enable_version_counter=False,
            )
        )  # fmt: skip
    if cfg.get("eval_every_n_steps"):
        callbacks.append(PeriodicEvaluation(int(cfg.eval_every_n_steps), cfg.get("eval_max_samples_per_task")))
    callbacks += [_instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, max_epochs=epochs, enable_progress_bar=progress,
        enable_checkpointing=bool(every),
    )  # fmt: skip

    # One fit per task: Lightning's per-fit notices ("`Trainer.fit` stopped", tips) would repeat T times.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config.pop("resume", None)
    train_s = eval_s = 0.0
    module.run_info = {"config": config, "train_seconds": 0.0, "eval_seconds": 0.0}

    def evaluate(row: int) -> None:
        nonlocal eval_s
        module.eval_row = row
        start = time.perf_counter()
        trainer.test(module, datamodule=dm, verbose=False)  # fills row `row` of the module's matrices
        eval_s += time.perf_counter() - start

    first = 0
    if resume_state is not None:
        first = restore(resume_state, trainer, module, dm)
        saved = resume_state["cl_lightning"]
        train_s, eval_s = float(saved["train_seconds"]), float(saved["eval_seconds"])
        log.info("resuming %s at task %d/%d", run_dir, first + 1, dm.n_tasks)
    else:
        evaluate(-1)  # the randomly initialised model: forward transfer's baseline
    last = dm.n_tasks if cfg.get("max_tasks") is None else min(dm.n_tasks, first + int(cfg.max_tasks))
    results: dict[str, Any] = {}
    for task in range(first, last):
        dm.set_task(task)
        module.current_task.fill_(task)
        trainer.fit_loop.max_epochs = (task + 1) * epochs
        start = time.perf_counter()
        module.run_info |= {"train_seconds": train_s, "eval_seconds": eval_s}  # as of this task's start
        trainer.fit(module, datamodule=dm)
        train_s += time.perf_counter() - start
        if trainer.interrupted:
            raise KeyboardInterrupt
        evaluate(task)
        results = build_results(
            method=name,
            dataset=dm.name,
            scenario=dm.scenario,
            seed=cfg.seed,
            n_tasks=dm.n_tasks,
            n_done=task + 1,
            acc_matrix=module.acc_matrix.compute().cpu(),
            baseline=module.init_matrix.compute()[0].cpu(),
            task_il_matrix=module.task_il_matrix.compute().cpu() if dm.scenario == "class_il" else None,
            train_seconds=train_s,
            eval_seconds=eval_s,
            config=config,
            task_descriptions=[t.description for t in dm.tasks],
        )
        results["world_size"] = trainer.world_size
        diagnostics = {m.name: d for m in methods if (d := m.diagnostics(module))}
        if diagnostics:
            results["diagnostics"] = diagnostics
        if cfg.get("save_checkpoints", True):
            module.run_info |= {"train_seconds": train_s, "eval_seconds": eval_s}
            # every rank calls it (Lightning writes on rank 0 and synchronises the others)
            _save_checkpoint(trainer, run_dir / "checkpoints" / "last.ckpt")
            (run_dir / "checkpoints" / "mid_task.ckpt").unlink(missing_ok=True)  # older than last.ckpt now
        if trainer.is_global_zero:
            write_json_atomic(run_dir / RESULTS_FILE, results)
            _log_task(trainer, results, task)
            log.info("task %d/%d done: %s", task + 1, dm.n_tasks, format_summary(results))
    if trainer.is_global_zero and results and results["complete"]:
        _log_hparams(trainer, cfg, results)
    if isinstance(trainer.logger, SequenceTensorBoardLogger):
        trainer.logger.close()
    if trainer.is_global_zero and results:
        n_rows = results["tasks_completed"]
        matrix = torch.tensor(results["acc_matrix"])
        print(format_matrix(matrix, n_rows))
        if "task_il_acc_matrix" in results:
            til = torch.tensor(results["task_il_acc_matrix"])
            print(format_matrix(til, n_rows, "task-IL accuracy matrix (logits masked to the task's classes)"))
        print(f"{name} on {dm.name} ({dm.scenario}, seed {cfg.seed}): {format_summary(results)}")
        print(f"train {train_s:.1f}s, eval {eval_s:.1f}s; results in {run_dir / RESULTS_FILE}")
        if not results["complete"]:
            print(f"stopped after task {n_rows}/{dm.n_tasks}; continue with resume={run_dir}")
    return results


def _save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """Save atomically: write beside the target, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:
        os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Command line: ``python -m cl_lightning [group=option ...] [key=value ...]`` (``-m`` sweeps).

    Returns ``results[optimized_metric]`` when ``optimized_metric`` is set, for Hydra's Optuna sweeper.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    metric = cfg.get("optimized_metric")
    try:
        results = train(cfg)
        return float(results[metric]) if metric else None
    except (ConfigError, RunDirectoryError, DatasetNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        _record_failure(cfg, err)
    except Exception as err:
        if not multirun:
            raise
        log.exception("job failed")
        _record_failure(cfg, err)
    return float("nan") if metric else None


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    """In a sweep, a failed job leaves ``failed.json`` in its directory and the sweep goes on.

    The sweep summary lists failed jobs with their error, and the sweep exits non-zero at the end.
    """
    payload = {
        "error": f"{type(err).__name__}: {err}",
        "overrides": list(HydraConfig.get().overrides.task),
        "traceback": traceback.format_exc(),
    }
    write_json_atomic(Path(HydraConfig.get().runtime.output_dir) / FAILED_FILE, payload)
