"""The task loop of a run: for each task, fit, evaluate every task, write ``results.json`` and a checkpoint.

A non-finite loss or weight stops it (:class:`~cl_lightning.errors.DivergenceError`) with ``results.json`` marked
``diverged`` (the finished tasks' rows kept); Ctrl-C stops it with :class:`RunInterrupted`, whose message says what
was saved and how to continue.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from cl_lightning.callbacks.periodic_eval import PeriodicEvaluation
from cl_lightning.callbacks.stream import StreamBoundaries
from cl_lightning.contract import CLMethod
from cl_lightning.cost import CostMeter, train_step_flops
from cl_lightning.data.datamodule import TaskSequenceDataModule
from cl_lightning.errors import DivergenceError
from cl_lightning.loggers import SequenceTensorBoardLogger
from cl_lightning.models.module import CLModule
from cl_lightning.reporting import log_hparams, log_task, print_summary
from cl_lightning.results import build_results, format_summary, library_versions, write_json_atomic
from cl_lightning.resume import restore
from cl_lightning.run_dir import RESULTS_FILE

log = logging.getLogger("cl_lightning")


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


def run_tasks(cfg: DictConfig, run: Run, epochs: int, resume_state: dict[str, Any] | None) -> bool:
    """The task loop: fit, evaluate, write results and checkpoints after every task; fills ``run`` in place."""
    module, dm, methods, trainer = run.module, run.datamodule, run.methods, run.trainer
    run_dir = Path(cfg.paths.output_dir)
    name = "+".join(m.name for m in methods)
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
        results["cost"] = meter.results(module.net, methods, trainer.strategy.root_device)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, PeriodicEvaluation):
                results |= callback.results()
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
    meter = CostMeter()
    if resume_state is not None:
        first = restore(resume_state, trainer, module, dm)
        saved = resume_state["cl_lightning"]
        train_s, eval_s = float(saved["train_seconds"]), float(saved["eval_seconds"])
        # a checkpoint older than `cost`: the earlier tasks' shares are unknown, the next one's starts from here
        since = {"train_seconds": train_s, "eval_seconds": eval_s, "step": int(resume_state.get("global_step", 0))}
        meter = CostMeter(saved.get("cost") or {"totals": since})
        log.info("resuming %s at task %d/%d", run_dir, first + 1, dm.n_tasks)
    else:
        evaluate(-1)  # the randomly initialised model: forward transfer's baseline
    module.run_info["cost"] = meter.state()
    last = dm.n_tasks if cfg.get("max_tasks") is None else min(dm.n_tasks, first + int(cfg.max_tasks))
    results: dict[str, Any] = {}

    def task_done(task: int, timings: tuple[float, float] | None = None) -> None:
        """Row ``task`` of the matrix is measured: results, checkpoint, log (``timings``: training and evaluation
        seconds so far, when they are measured inside a fit)."""
        nonlocal results, train_s, eval_s
        if timings is not None:
            train_s, eval_s = timings
        # counted on a copy of the network, once per task (a network may grow with the tasks), never per step
        flops = train_step_flops(module.net, dm.input_shape, dm.batch_size, task)
        meter.task_done(task, train_s, eval_s, trainer.global_step, flops, trainer.world_size)
        module.run_info["cost"] = meter.state()
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

    task = first
    try:
        if dm.stream == "online":
            if first < dm.n_tasks:
                train_s, eval_s = _fit_stream(trainer, module, dm, task_done, train_s, eval_s, resume_state is not None)
        else:
            for task in range(first, last):
                dm.set_task(task)
                module.current_task.fill_(task)
                trainer.fit_loop.max_epochs = (task + 1) * epochs
                start = time.perf_counter()
                module.run_info |= {"train_seconds": train_s, "eval_seconds": eval_s}  # as of this task's start
                _interruptible(trainer.fit, trainer, module, datamodule=dm)
                train_s += time.perf_counter() - start
                evaluate(task)
                task_done(task)
        if trainer.is_global_zero and results and results["complete"]:
            log_hparams(trainer, cfg, results)
    except DivergenceError as err:
        if dm.stream == "online":
            task = int(module.task_finished) + 1  # the rows measured before it
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
        if dm.stream == "online":
            task = int(module.current_task)
        saved = any((run_dir / "checkpoints" / f).is_file() for f in ("last.ckpt", "mid_task.ckpt"))
        raise RunInterrupted(
            f"stopped during task {task + 1}/{dm.n_tasks}; "
            + (f"continue with: python -m cl_lightning resume={run_dir}" if saved
               else "no task had finished, nothing to resume: start the run again")
        ) from None  # fmt: skip
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, SequenceTensorBoardLogger):
                logger.close()
            else:
                logger.save()  # what was logged after the last fit (its row, the summary) is written too
    run.update(results)
    if trainer.is_global_zero and results:
        print_summary(results, name, run_dir / RESULTS_FILE)
    return bool(results)


def _fit_stream(
    trainer: pl.Trainer,
    module: CLModule,
    dm: TaskSequenceDataModule,
    task_done: Any,
    train_s: float,
    eval_s: float,
    resumed: bool,
) -> tuple[float, float]:
    """An online stream: one fit over the whole stream (one optimizer, one scheduler, no hook at a true boundary);
    :class:`~cl_lightning.callbacks.stream.StreamBoundaries` measures a row of the matrix each time the stream
    passes a task's nominal end and calls ``task_done`` there. Returns the training and evaluation seconds so far
    (evaluation inside the fit is not training time)."""
    boundaries = next(cb for cb in trainer.callbacks if isinstance(cb, StreamBoundaries))  # type: ignore[attr-defined]
    if not resumed:
        module.current_task.fill_(0)
    trainer.fit_loop.max_epochs = 1
    start = time.perf_counter()
    inside = boundaries.eval_seconds

    def timings() -> tuple[float, float]:
        evaluated = boundaries.eval_seconds - inside
        return train_s + time.perf_counter() - start - evaluated, eval_s + evaluated

    def on_row(task: int) -> None:
        task_done(task, timings())

    boundaries.on_row = on_row
    module.run_info |= {"train_seconds": train_s, "eval_seconds": eval_s}
    _interruptible(trainer.fit, trainer, module, datamodule=dm)
    return timings()


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
