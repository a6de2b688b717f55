"""Building a run from its config: checks first, then the datamodule, the network, the methods and the trainer.

Every check raises a one-line :class:`~cl_lightning.errors.ConfigError` naming the key, the value and the fix,
before anything is trained; a key the config does not know (``+epoch_per_task=3``) is refused with the nearest
valid one.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from cl_lightning.callbacks.periodic_eval import PeriodicEvaluation
from cl_lightning.callbacks.progress import TaskProgressBar
from cl_lightning.callbacks.stream import StreamBoundaries
from cl_lightning.cli import CONFIG_DIR
from cl_lightning.contract import CLMethod, check_combination
from cl_lightning.data.datamodule import TaskSequenceDataModule
from cl_lightning.data.sources import DatasetNotFoundError
from cl_lightning.errors import ConfigError
from cl_lightning.models.module import CLModule

log = logging.getLogger("cl_lightning")

SUMMARY_METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "task_il_avg_acc")
# module.* keys the run passes itself (the rest of CLModule's arguments are the config's)
_MODULE_ARGS_FROM_RUN = {"net", "optimizer", "scenario", "task_outputs", "n_outputs", "scheduler",
                         "hide_task_boundaries", "preprocess", "augments"}  # fmt: skip


def _nearest(key: str, valid: set[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def known_top_level_keys() -> set[str]:
    """The top-level keys a run's config may have: those of ``conf/train.yaml``, the config groups, ``hybrid``."""
    base = OmegaConf.load(Path(CONFIG_DIR) / "train.yaml")
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    return {str(k) for k in base if k != "defaults"} | groups | {"hybrid", "hydra"}


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the config does not know (``+epoch_per_task=3``), naming the nearest valid key."""
    known = known_top_level_keys()
    for key in cfg:
        if str(key) not in known:
            raise ConfigError(f"{key}: unknown key, it would be ignored{_nearest(str(key), known)}")
    module_keys = set(inspect.signature(CLModule.__init__).parameters) - {"self"} - _MODULE_ARGS_FROM_RUN
    for key in cfg.get("module") or {}:
        if str(key) not in module_keys:
            raise ConfigError(f"module.{key}: unknown key{_nearest(str(key), module_keys, 'module.')}")


def validate_config(cfg: DictConfig) -> None:
    """Check the top-level keys before anything is built; raise a one-line :class:`ConfigError`."""
    check_known_keys(cfg)

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
    threads = OmegaConf.select(cfg, "threads")
    not_count = isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    if threads != "auto" and threads is not None and not_count:
        raise ConfigError(f"threads={threads!r}: must be auto, an integer >= 1, or null (torch's default)")
    compile_backend(cfg.get("compile"))
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
    if stream == "online" and cfg.get("max_tasks") is not None:
        raise ConfigError(
            f"max_tasks={cfg.max_tasks}: dataset.stream=online is one pass with no stop between tasks; "
            "drop max_tasks (checkpoint_every_n_steps and resume= continue a stopped stream)"
        )
    warn_if_oversubscribed(cfg)


def compile_backend(value: Any) -> str | None:
    """The ``torch.compile`` backend that ``compile`` names: ``false`` none, ``true`` inductor (torch's default),
    or a backend name from ``torch.compiler.list_backends``; a one-line error for anything else."""
    if value is None or value is False:
        return None
    backend = "inductor" if value is True else value
    if not isinstance(backend, str) or backend not in torch.compiler.list_backends(exclude_tags=()):
        usual = ", ".join(torch.compiler.list_backends())  # the experimental and debugging ones left out
        raise ConfigError(f"compile={value!r}: choose true, false or a torch.compile backend ({usual})")
    return backend


def compile_network(net: torch.nn.Module, value: Any) -> None:
    """``compile=true``: compile ``net`` in place (``nn.Module.compile``) with the backend ``value`` names.

    In place rather than ``torch.compile(net)``: the network keeps its class, its submodules (a method reaches
    ``net.head``) and its parameter names, so checkpoints, methods' per-parameter state and teachers (deep copies,
    which compile their own forward) are the same with or without compilation. Only calls of the whole network
    are compiled; a method that calls one of its layers, or ``torch.func`` over it, runs that part eagerly.
    """
    backend = compile_backend(value)
    if backend is not None:
        net.compile(backend=backend)
        log.info("compile=%s: the network's forward is compiled with torch.compile(backend=%r)", value, backend)


def warn_if_oversubscribed(cfg: DictConfig) -> None:
    """Warn when more CPU processes are asked for than there are cores (each would get a fraction of one)."""
    devices = OmegaConf.select(cfg, "trainer.devices")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if on_cpu and isinstance(devices, int) and not isinstance(devices, bool) and devices > cores:
        log.warning(
            "trainer.devices=%d CPU processes on %d cores: each gets %.2g of a core and the run is slower than "
            "with trainer.devices=%d", devices, cores, cores / devices, cores,
        )  # fmt: skip


def _unknown_argument(node: Any, key: str, err: BaseException) -> ConfigError | None:
    """A one-line error for ``TypeError: ... unexpected keyword argument 'x'`` of ``node``'s target, else None."""
    found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if found is None or target is None:
        return None
    try:
        valid = set(inspect.signature(get_method(str(target))).parameters) - {"self", "args", "kwargs"}
    except Exception:  # noqa: BLE001 - no signature to suggest from
        valid = set()
    bad = found.group(1)
    hint = _nearest(bad, valid, f"{key}.") if valid else ""
    return ConfigError(f"{key}.{bad}: unknown key of {target}{hint}")


def instantiate_node(node: Any, key: str = "", **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our one-line errors through instead of Hydra's multi-line wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, ConfigError | DatasetNotFoundError):
                raise cause from err
            if isinstance(cause, TypeError) and (unknown := _unknown_argument(node, key, cause)) is not None:
                raise unknown from err
            if isinstance(cause, ImportError):  # e.g. logger=wandb without the wandb package
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                raise ConfigError(f"{key}: {first}; install the package it names (pip install ...)") from err
            cause = cause.__cause__
        if (unknown := _unknown_argument(node, key, err)) is not None:
            raise unknown from err
        raise


def build_methods(cfg: DictConfig) -> list[CLMethod]:
    """The run's continual methods: ``method`` plus any combined with it under ``hybrid``.

    ``python -m cl_lightning method=ewc +method@hybrid.er=er`` adds experience replay to EWC (Hydra's syntax for a
    second option of the same group at another place in the config); ``hybrid.er.buffer_size=500`` sets its values.
    """
    nodes = [("method", cfg.method)] + [(f"hybrid.{k}", v) for k, v in (cfg.get("hybrid") or {}).items()]
    methods = []
    for key, node in nodes:
        method = instantiate_node(node, key)
        if not isinstance(method, CLMethod):
            raise ConfigError(f"{key}._target_={node.get('_target_')!r} is not a cl_lightning CLMethod")
        methods.append(method)
    check_combination(methods)
    return methods


def build_model(cfg: DictConfig, dm: TaskSequenceDataModule) -> torch.nn.Module:
    """The network for ``dm``'s inputs and outputs from the ``model`` group (a factory)."""
    factory = instantiate_node(cfg.model, "model")
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


def build_loggers(node: Any) -> list[Any] | Any:
    """The run's loggers: ``logger=<name>`` and ``logger=[a,b]`` give one node per chosen logger under its name
    (``logger.csv``, ``logger.tensorboard``); a node with a ``_target_`` of its own is one logger; none: ``False``."""
    if not node:
        return False
    if "_target_" in node:
        return instantiate_node(node, "logger")
    return [instantiate_node(sub, f"logger.{name}") for name, sub in node.items() if sub] or False


# Lightning's short spellings of trainer.precision, and what it calls them
_PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def build_run(
    cfg: DictConfig, run_dir: Path
) -> tuple[CLModule, TaskSequenceDataModule, list[CLMethod], pl.Trainer, int]:
    """The module, the datamodule, the methods and the trainer of ``cfg``; and the epochs of each task."""
    methods = build_methods(cfg)
    dm: TaskSequenceDataModule = instantiate_node(cfg.dataset, "dataset")
    dm.training_tasks = lambda t: sorted({i for m in methods for i in m.training_tasks(t)})
    dm.setup("fit")
    net = build_model(cfg, dm)
    module = CLModule(
        net,
        optimizer=instantiate_node(cfg.optimizer, "optimizer"),
        scenario=dm.scenario,
        task_outputs=dm.task_outputs,
        n_outputs=dm.n_outputs,
        scheduler=instantiate_node(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        hide_task_boundaries=dm.stream == "online",
        preprocess=dm.preprocess,
        augments=dm.augment != "none",
        # the module takes the optimizer step itself (manual optimization) and clips there
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        gradient_clip_algorithm=cfg.trainer.get("gradient_clip_algorithm"),
        **cfg.module,
    )
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if accumulate not in (None, 1):
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate}: not supported, every batch is one optimizer step of the "
            "method (its replay and gradient edits are per step); raise batch_size instead"
        )
    logger = build_loggers(cfg.get("logger"))
    # methods that train on after the task's epochs (PackNet's retraining) lengthen every task by as much
    epochs = (1 if cfg.steps_per_task else cfg.epochs_per_task) + max(m.extra_epochs() for m in methods)
    callbacks: list[pl.Callback] = [*methods]
    if cfg.get("eval_every_n_steps"):
        # before the stream's rows and ModelCheckpoint: a checkpoint of a step holds that step's evaluation
        callbacks.append(PeriodicEvaluation(int(cfg.eval_every_n_steps), cfg.get("eval_max_samples_per_task")))
    if dm.stream == "online":
        # after the methods (their step is done), before ModelCheckpoint (a checkpoint of the step holds the row)
        callbacks.append(StreamBoundaries())
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
    callbacks += [instantiate_node(node, f"callbacks.{k}") for k, node in (cfg.get("callbacks") or {}).items()]
    # Lightning's notices (available devices, tips, "`Trainer.fit` stopped" after every task's fit) are noise here:
    # the run prints its own summary; its warnings still show
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainer: pl.Trainer = instantiate_node(
        cfg.trainer, "trainer", callbacks=callbacks, logger=logger, max_epochs=epochs, enable_progress_bar=progress,
        enable_checkpointing=bool(every), gradient_clip_val=None, gradient_clip_algorithm=None,
    )  # fmt: skip
    asked = str(cfg.trainer.get("precision", "32-true"))
    asked = _PRECISION_ALIASES.get(asked, asked)
    if trainer.precision != asked:  # e.g. 16-mixed on the CPU, which Lightning turns into bf16-mixed
        device = type(trainer.accelerator).__name__.removesuffix("Accelerator")
        raise ConfigError(
            f"trainer.precision={asked}: not available on this {device} (Lightning would train in {trainer.precision} "
            f"instead); use trainer.precision={trainer.precision}, or a GPU"
        )
    return module, dm, methods, trainer, epochs
