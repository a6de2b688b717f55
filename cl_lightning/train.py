"""``train(cfg)``: one continual-learning experiment; ``main()`` is its Hydra command line.

The run is one Lightning ``Trainer`` and one TensorBoard run with continuous steps: for each task, the datamodule
switches task, ``trainer.fit`` trains on it (``max_epochs`` grows by ``epochs_per_task``; the loops, the logger and
the global step carry over), then ``trainer.test`` evaluates every task's test set into the next row of the
accuracy matrix. ``results.json`` and a checkpoint are written after every task. Building the run is in
:mod:`cl_lightning.build`, resuming in :mod:`cl_lightning.resume`, the run directory's claim in
:mod:`cl_lightning.run_dir`, what is logged and printed in :mod:`cl_lightning.reporting`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cl_lightning.build import CONFIG_DIR, build_run, validate_config
from cl_lightning.data.datamodule import TaskSequenceDataModule
from cl_lightning.data.sources import DatasetNotFoundError
from cl_lightning.errors import ConfigError, DivergenceError, RunDirectoryError
from cl_lightning.loggers import SequenceTensorBoardLogger
from cl_lightning.methods.base import CLMethod
from cl_lightning.models.module import CLModule
from cl_lightning.reporting import log_hparams, log_task, print_summary
from cl_lightning.results import build_results, format_summary, library_versions, write_json_atomic
from cl_lightning.resume import prepare_resume, restore
from cl_lightning.run_dir import FAILED_FILE, RESULTS_FILE, RunDirectory, launch_rank

__all__ = ["CONFIG_DIR", "Run", "RunInterrupted", "main", "train"]

log = logging.getLogger("cl_lightning")
# Lightning 2.6 calls a pytree API that torch 2.14 deprecates; harmless, and printed once per fit otherwise.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
REFUSALS = (ConfigError, RunDirectoryError, DatasetNotFoundError)


class Run(dict):
    """What :func:`train` returns: the ``results.json`` payload (a dict) and the objects the run was built from.

    Attributes:
        module: The :class:`~cl_lightning.models.module.CLModule` (its ``net`` is the trained network).
        datamodule: The :class:`~cl_lightning.data.datamodule.TaskSequenceDataModule`.
        methods: The continual methods, in the order of the config (``method`` first, then ``hybrid``).
        trainer: The Lightning ``Trainer``.
    """

    module: CLModule
    datamodule: TaskSequenceDataModule
    methods: list[CLMethod]
    trainer: pl.Trainer


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run; the message says what was saved and how to continue."""


def _command_overrides() -> list[str] | None:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def train(cfg: DictConfig, overrides: list[str] | None = None) -> Run:
    """Run one experiment (or resume one with ``resume=<run dir>``) and return its results and built objects.

    Args:
        cfg: The composed config (``conf/train.yaml`` with overrides).
        overrides: The command line's overrides, checked against a resumed run's configuration (default: Hydra's,
            when Hydra runs; none otherwise).
    """
    run_dir = RunDirectory(cfg.get("resume") or cfg.paths.output_dir)
    rank0 = launch_rank() == 0  # only the first process claims the directory: under DDP the others share it
    resume_state: dict[str, Any] | None = None
    trained = False
    try:
        if cfg.get("resume"):
            overrides = overrides if overrides is not None else _command_overrides()
            cfg, resume_state, ckpt_path = prepare_resume(cfg, overrides)
        if rank0:
            run_dir.claim(new_run=resume_state is None)
            if resume_state is None:
                run_dir.write_hydra_files(cfg)  # the sweep summary reads a failed job's overrides there too
        validate_config(cfg)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        run = Run()
        run.module, run.datamodule, run.methods, run.trainer, epochs = build_run(cfg, run_dir.path)
        if resume_state is not None:
            log.info("resuming from %s", ckpt_path)
        trained = _run_tasks(cfg, run, epochs, resume_state)
        return run
    except REFUSALS:
        if rank0 and not trained and resume_state is None:
            run_dir.discard()  # a refused command leaves nothing behind
        raise
    finally:
        run_dir.release()


def _run_tasks(cfg: DictConfig, run: Run, epochs: int, resume_state: dict[str, Any] | None) -> bool:
    """The task loop: fit, evaluate, write results and checkpoints after every task; fills ``run`` in place."""
    module, dm, methods, trainer = run.module, run.datamodule, run.methods, run.trainer
    run_dir = Path(cfg.paths.output_dir)
    name = "+".join(m.name for m in methods)
    # One fit per task: Lightning's per-fit notices ("`Trainer.fit` stopped", tips) would repeat T times.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config.pop("resume", None)
    train_s = eval_s = 0.0
    module.run_info = {"config": config, "train_seconds": 0.0, "eval_seconds": 0.0}

    def results_after(n_done: int) -> dict[str, Any]:
        results = build_results(
            method=name, dataset=dm.name, scenario=dm.scenario, seed=cfg.seed, n_tasks=dm.n_tasks, n_done=n_done,
            acc_matrix=module.acc_matrix.compute().cpu(), baseline=module.init_matrix.compute()[0].cpu(),
            task_il_matrix=module.task_il_matrix.compute().cpu() if dm.scenario == "class_il" else None,
            train_seconds=train_s, eval_seconds=eval_s, config=config,
            task_descriptions=[t.description for t in dm.tasks],
        )  # fmt: skip
        results["world_size"] = trainer.world_size
        diagnostics = {m.name: d for m in methods if (d := m.diagnostics(module))}
        if diagnostics:
            results["diagnostics"] = diagnostics
        return results

    def evaluate(row: int) -> None:
        nonlocal eval_s
        module.eval_row = row
        start = time.perf_counter()
        _interruptible(trainer.test, trainer, module, datamodule=dm, verbose=False)  # fills row `row`
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
    task = first
    try:
        for task in range(first, last):
            dm.set_task(task)
            module.current_task.fill_(task)
            trainer.fit_loop.max_epochs = (task + 1) * epochs
            start = time.perf_counter()
            module.run_info |= {"train_seconds": train_s, "eval_seconds": eval_s}  # as of this task's start
            _interruptible(trainer.fit, trainer, module, datamodule=dm)
            train_s += time.perf_counter() - start
            evaluate(task)
            results = results_after(task + 1)
            if cfg.get("save_checkpoints", True):
                module.run_info |= {"train_seconds": train_s, "eval_seconds": eval_s}
                # every rank calls it (Lightning writes on rank 0 and synchronises the others)
                _save_checkpoint(trainer, run_dir / "checkpoints" / "last.ckpt")
                (run_dir / "checkpoints" / "mid_task.ckpt").unlink(missing_ok=True)  # older than last.ckpt now
            if trainer.is_global_zero:
                write_json_atomic(run_dir / RESULTS_FILE, results)
                log_task(trainer, results, task)
                log.info("task %d/%d done: %s", task + 1, dm.n_tasks, format_summary(results))
        if trainer.is_global_zero and results and results["complete"]:
            log_hparams(trainer, cfg, results)
    except DivergenceError as err:
        if trainer.is_global_zero:
            # the tasks finished before it stay as measured; the run is marked diverged and incomplete
            payload = results_after(task) if task > 0 else {
                "method": name, "dataset": dm.name, "scenario": dm.scenario, "seed": cfg.seed, "n_tasks": dm.n_tasks,
                "tasks_completed": 0, "acc_matrix": [], "init_acc": module.init_matrix.compute()[0].tolist(),
                "train_seconds": train_s, "eval_seconds": eval_s, "config": config, "versions": library_versions(),
            }  # fmt: skip
            payload["complete"] = False
            payload["diverged"] = {"step": err.step, "task": err.task, "value": err.value, "message": str(err)}
            write_json_atomic(run_dir / RESULTS_FILE, payload)
        raise
    except KeyboardInterrupt:
        saved = any((run_dir / "checkpoints" / f).is_file() for f in ("last.ckpt", "mid_task.ckpt"))
        raise RunInterrupted(
            f"stopped during task {task + 1}/{dm.n_tasks}; "
            + (f"continue with: python -m cl_lightning resume={run_dir}" if saved
               else "no task had finished, nothing to resume: start the run again")
        ) from None  # fmt: skip
    finally:
        if isinstance(trainer.logger, SequenceTensorBoardLogger):
            trainer.logger.close()
    run.update(results)
    if trainer.is_global_zero and results:
        print_summary(results, name, run_dir / RESULTS_FILE)
    return bool(results)


def _interruptible(call: Any, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
    """``trainer.fit``/``test``; Ctrl-C raises ``KeyboardInterrupt`` (Lightning itself exits with status 1)."""
    try:
        out = call(*args, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    return out


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
    except REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        _record_failure(cfg, err)
    except DivergenceError as err:
        print(f"error: {err}", file=sys.stderr)
        if not multirun:
            sys.exit(3)
        # results.json says "diverged"; the sweep summary lists the job apart and the sweep exits non-zero
    except KeyboardInterrupt as err:  # RunInterrupted says what was saved; before training nothing was
        print(f"interrupted: {err or 'stopped before training started; nothing was saved'}", file=sys.stderr)
        sys.exit(130)
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
