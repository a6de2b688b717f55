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
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cl_lightning.build import build_run, compile_network, validate_config
from cl_lightning.cli import CONFIG_DIR, main
from cl_lightning.data.sources import DatasetNotFoundError
from cl_lightning.errors import ConfigError, DivergenceError, OtherRunError, RunDirectoryError
from cl_lightning.results import write_json_atomic
from cl_lightning.resume import AUTO, prepare_auto, prepare_resume
from cl_lightning.run_dir import FAILED_FILE, RunDirectory, launch_rank
from cl_lightning.task_loop import Run, RunInterrupted, run_tasks
from cl_lightning.threads import auto_threads, batch_flops

__all__ = ["CONFIG_DIR", "Run", "RunInterrupted", "main", "run_command", "train"]

log = logging.getLogger("cl_lightning")
# Lightning 2.6 calls a pytree API that torch 2.14 deprecates; harmless, and printed once per fit otherwise.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
REFUSALS = (ConfigError, RunDirectoryError, DatasetNotFoundError)


def _command_overrides() -> list[str] | None:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def train(cfg: DictConfig, overrides: list[str] | None = None) -> Run:
    """Run one experiment (or resume one with ``resume=<run dir>``) and return its results and built objects.

    With ``resume=auto`` a finished run in the run's directory (``paths.output_dir``) is skipped, writing nothing
    there: the :class:`Run` returned then holds its ``results.json`` alone (no module, datamodule or trainer).

    Args:
        cfg: The composed config (``conf/train.yaml`` with overrides).
        overrides: The command line's overrides, checked against a resumed run's configuration (default: Hydra's,
            when Hydra runs; none otherwise).
    """
    auto = cfg.get("resume") == AUTO
    run_dir = RunDirectory(cfg.paths.output_dir if auto or not cfg.get("resume") else cfg.resume)
    rank0 = launch_rank() == 0  # only the first process claims the directory: under DDP the others share it
    resume_state: dict[str, Any] | None = None
    trained = False
    try:
        if auto:
            found = prepare_auto(cfg)
            if found.kind == "finished":
                _skip_finished(run_dir.path, found.results or {})
                return Run(found.results or {})
            cfg, resume_state, ckpt_path = found.cfg, found.state, found.checkpoint
        elif cfg.get("resume"):
            overrides = overrides if overrides is not None else _command_overrides()
            cfg, resume_state, ckpt_path = prepare_resume(cfg, overrides)
        if rank0:
            run_dir.claim(new_run=resume_state is None)
            if auto:  # this job's own failure record from an earlier attempt; it runs again now
                (run_dir.path / FAILED_FILE).unlink(missing_ok=True)
            if resume_state is None:
                run_dir.write_hydra_files(cfg)  # the sweep summary reads a failed job's overrides there too
        validate_config(cfg)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        run = Run()
        run.module, run.datamodule, run.methods, run.trainer, epochs = build_run(cfg, run_dir.path)
        set_threads(cfg.get("threads"), run)
        compile_network(run.module.net, cfg.get("compile"))  # after counting the FLOPs of an eager forward
        if resume_state is not None:
            log.info("resuming from %s", ckpt_path)
        trained = run_tasks(cfg, run, epochs, resume_state)
        return run
    except REFUSALS:
        if rank0 and not trained and resume_state is None:
            run_dir.discard()  # a refused command leaves nothing behind
        raise
    finally:
        run_dir.release()


def _skip_finished(path: Path, results: dict[str, Any]) -> None:
    """One line saying that ``resume=auto`` skips the finished run in ``path``; nothing is written there.

    The log file Hydra set up in that directory (opened at its first record) is detached first, so that the line
    goes to the console only and the run's ``train.log`` stays as the run left it.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == path.absolute():
            root.removeHandler(handler)
            handler.close()
    acc = results.get("avg_acc")
    state = "diverged" if results.get("diverged") else "complete" + ("" if acc is None else f", avg_acc {acc:.2%}")
    log.info("resume=auto: %s holds a finished run (%s); skipped, nothing rewritten", path, state)


def set_threads(threads: int | str | None, run: Run) -> None:
    """Torch's intra-op threads: ``auto`` picks them from the work and the machine (:mod:`cl_lightning.threads`),
    a number is used as given, ``null`` keeps torch's default."""
    if threads == "auto":
        dm, trainer = run.datamodule, run.trainer
        flops = batch_flops(run.module.net, dm.input_shape, dm.batch_size)
        processes = trainer.num_devices if trainer.strategy.root_device.type == "cpu" else 1
        threads = auto_threads(flops, processes)
        log.info("threads=auto: %d intra-op thread(s) (forward pass over a batch: %.2g FLOPs)", threads, flops)
    if threads is not None:
        torch.set_num_threads(int(threads))


def run_command(cfg: DictConfig) -> float | None:
    """What ``python -m cl_lightning`` runs (:func:`cl_lightning.cli.main`): :func:`train`, with errors for people.

    Refused configurations exit 2 with one ``error:`` line, a diverged run exits 3, Ctrl-C exits 130 saying how to
    resume; in a sweep a failed job leaves ``failed.json`` and the sweep goes on, except for a job whose directory
    holds another run (:class:`~cl_lightning.errors.OtherRunError`), which writes nothing there and stops the sweep.
    Returns ``results[optimized_metric]`` when ``optimized_metric`` is set, for Hydra's Optuna sweeper.
    """
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    metric = cfg.get("optimized_metric")
    try:
        results = train(cfg)
        return float(results[metric]) if metric else None
    except REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        if not multirun or isinstance(err, OtherRunError):
            # in a sweep, a job directory that holds another run is not written (failed.json neither): the
            # command line does not fit that sweep directory, and the sweep stops here
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
