"""Experience replay (ER): every step also trains on a batch drawn from a memory of past samples.

The module-level functions are shared by the replay methods (``der``, ``derpp``, ``gem``, ``agem``).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.buffer import SELECTIONS, STREAMING_SELECTIONS, TASK_END_SELECTIONS, Buffer
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import CLMethod

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

ER_SELECTIONS = tuple(s for s in SELECTIONS if s != "random")


def check_int(key: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum``, else a one-line :class:`ConfigError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}")
    return value


def stream_task_ids(pl_module: CLModule, batch: Batch, current_task: int) -> Tensor:
    """Task ids to store with a training batch.

    The true task in task-IL (the batch carries it, also on an online stream); otherwise the current task known
    from ``on_task_start``, or ``-1`` on an online stream (boundaries hidden).
    """
    if pl_module.scenario == "task_il":
        return batch.task_id
    task = -1 if pl_module.hide_task_boundaries else current_task
    return torch.full_like(batch.y, task)


def gather(trainer: pl.Trainer, *tensors: Tensor) -> list[Tensor]:
    """Every process's tensors, concatenated in rank order (identity on one process).

    Replay buffers insert the gathered batch with the same seeded generator on every rank, so they stay identical
    across ranks and the rank-0 checkpoint is valid for all of them.
    """
    if trainer.world_size <= 1:
        return list(tensors)
    return [trainer.strategy.all_gather(t).flatten(0, 1) for t in tensors]


@torch.no_grad()
def task_features(pl_module: CLModule, x: Tensor, chunk: int = 1024) -> Tensor:
    """``net.features`` of stored inputs, un-augmented, in evaluation mode (dropout and batch-norm frozen)."""
    net = pl_module.net
    was_training = net.training
    net.eval()
    try:
        return torch.cat([net.features(pl_module.prepare(part, train=False)) for part in x.split(chunk)])
    finally:
        net.train(was_training)


_CHECKED: weakref.WeakSet[Buffer] = weakref.WeakSet()  # buffers already compared with their run's data


def check_buffer_fits(trainer: pl.Trainer, buffer: Buffer) -> None:
    """Warn, once per buffer, when ``method.buffer_size`` is larger than every training sample the run has.

    Such a buffer never fills: the run is the one a buffer of that many samples would give, and a size chosen for
    a bigger dataset was probably meant. (Memory is not the issue: :class:`~cl_lightning.core.buffer.Buffer`
    allocates what it holds, not its capacity.) Called from each replay method's ``setup``, which every fit and
    test of the run goes through.
    """
    if buffer in _CHECKED:
        return
    tasks = getattr(getattr(trainer, "datamodule", None), "tasks", None)
    if not tasks:
        return  # no task sequence to compare with (yet): checked at the next setup
    _CHECKED.add(buffer)
    n_samples = sum(len(task.train_y) for task in tasks)
    if buffer.capacity > n_samples:
        rank_zero_warn(
            f"method.buffer_size={buffer.capacity} is larger than the {n_samples} training samples this run has "
            f"({len(tasks)} tasks): the buffer can never fill, so the run is the one method.buffer_size={n_samples} "
            "would give; set a buffer_size for this dataset"
        )


def per_task_quota(trainer: pl.Trainer, buffer_size: int, name: str) -> int:
    """``buffer_size // dataset.n_tasks``: the episodic memory of each task (GEM, A-GEM), refused when it is 0."""
    n_tasks = int(trainer.datamodule.n_tasks)  # type: ignore[attr-defined]
    quota = buffer_size // n_tasks
    if quota < 1:
        raise ConfigError(
            f"method.buffer_size={buffer_size}: {name} keeps buffer_size // dataset.n_tasks samples "
            f"per task, which is 0 for {n_tasks} tasks; use method.buffer_size >= {n_tasks}"
        )
    return quota


def fill_from_task(buffer: Buffer, trainer: pl.Trainer, pl_module: CLModule, task: int, quota: int | None) -> None:
    """Task-end selection from the training data of ``task`` (``dm.tasks[task]``, identical on every rank)."""
    data = trainer.datamodule.tasks[task]  # type: ignore[attr-defined]
    x, y = data.train_x.to(pl_module.device), data.train_y.to(pl_module.device)
    features = task_features(pl_module, x) if buffer.selection in ("herding", "kcenter") else None
    buffer.add_task(x, y, task, features, quota)


class ER(CLMethod):
    """Experience replay (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019).

    Each step draws a batch ``(x_r, y_r, t_r)`` of ``r = replay_batch_size`` samples without replacement from a
    buffer ``M`` and trains on one cross-entropy mean over the union of the current batch (``b`` samples) and the
    replayed one, as Chaudhry et al.'s Algorithm 1 (one SGD step on ``B ∪ B_M``), Mammoth's ``er.py`` and
    Avalanche's replay do::

        L = 1/(b + r) * ( sum_{i in batch} CE_i + sum_{j in replay} CE_j ),    CE_i = CE(mask_{t_i}(f(aug(x_i))), y_i)

    where ``mask`` is the scenario's training masking (``pl_module.training_logits``; in task-IL a replayed sample
    uses its own task's head, so the true task id is stored). Replayed inputs are stored un-augmented and augmented
    again when replayed. (Not ``CE(batch) + CE(replay)``, a sum of two means, which weights a replay step twice.)

    The module owns the task loss ``CE_b`` (the current batch's mean) and adds the loss terms to it, so the union
    mean is reached through the term ``er/replay = r/(b + r) * (CE_r - CE_b)``, with ``CE_r`` the replayed
    batch's mean and ``CE_b`` recomputed from the module's logits with the module's masking (part of the graph,
    not detached): ``CE_b + er/replay`` is the union mean in value and gradient (tested against a direct
    computation). ``er/replay`` is therefore negative when the replayed samples are fitted better than the new
    ones; the replayed batch's own mean is logged as ``train/er/replay_ce`` every ``module.log_every_n_steps``.
    With a method that replaces the task loss (there is no ``CE_b`` to share a mean with), the term is ``CE_r``.
    The two batches go through the network in two forward passes (the module's and the replay's), so BatchNorm
    layers, in training mode, normalise each with its own statistics (Mammoth forwards the concatenation once).

    The buffer (see :mod:`cl_lightning.core.buffer`) is filled by ``selection``: ``reservoir`` (the default, as in
    Mammoth's ER) and ``class_balanced`` insert the current batch every step *after* the replay batch is drawn
    (Mammoth's order: a batch is never replayed in its own step) and run task-free (``dataset.stream=online``);
    ``herding`` and ``kcenter`` select from the finished task's training data at task end, so they need task
    boundaries (refused at setup on an online stream).

    DDP: the current batch is all-gathered before insertion and every rank inserts it with the same seeded
    generator, so buffers (and the replay batches they draw) are identical on every rank; task-end selections
    read the whole task, identical everywhere. The checkpoint written by rank 0 is therefore valid for all ranks.

    Args:
        buffer_size: Slots of the buffer.
        replay_batch_size: Samples replayed per step (fewer while the buffer holds fewer).
        selection: ``reservoir``, ``class_balanced``, ``herding`` or ``kcenter``.
        seed: Seed of the buffer's generator (insertion decisions and replay draws).
    """

    name: ClassVar[str] = "er"

    def __init__(
        self, buffer_size: int = 500, replay_batch_size: int = 10, selection: str = "reservoir", seed: int = 0
    ) -> None:
        check_int("method.buffer_size", buffer_size)
        self.replay_batch_size = check_int("method.replay_batch_size", replay_batch_size)
        if selection not in ER_SELECTIONS:
            raise ConfigError(f"method.selection={selection!r}: choose one of {', '.join(ER_SELECTIONS)}")
        self.selection = selection
        self.buffer = Buffer(buffer_size, selection, seed)
        self._task = -1  # the current task, from on_task_start
        self._filled = -1  # last task selected at task end (never select a task twice)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_buffer_fits(trainer, self.buffer)
        dm = getattr(trainer, "datamodule", None)
        if self.selection in TASK_END_SELECTIONS and getattr(dm, "stream", "tasks") == "online":
            raise ConfigError(
                f"method.selection={self.selection} selects at task end and cannot run with dataset.stream=online; "
                f"use method.selection=reservoir or class_balanced"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.buffer.to(pl_module.device)  # restored state is loaded on the host

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        self._task = task_id

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if not self.buffer.is_empty:
            replay = self.buffer.sample(self.replay_batch_size)
            out = pl_module(pl_module.prepare(replay.x, train=True), replay.task_id)
            replay_ce = F.cross_entropy(pl_module.training_logits(out, replay.task_id), replay.y)
            terms["replay"] = self.union_term(pl_module, batch, logits, replay_ce, len(replay.y))
            self._log_replay_ce(pl_module, replay_ce)
        if self.selection in STREAMING_SELECTIONS:
            tid = stream_task_ids(pl_module, batch, self._task)
            self.buffer.add(*gather(pl_module.trainer, batch.x, batch.y, tid))
        return terms

    @staticmethod
    def union_term(pl_module: CLModule, batch: Batch, logits: Tensor, replay_ce: Tensor, r: int) -> Tensor:
        """The loss term that turns the module's task loss ``CE_b`` into the mean over batch and replay.

        ``r/(b + r) * (CE_r - CE_b)``: added to ``CE_b`` it gives ``(b CE_b + r CE_r) / (b + r)``, and so does its
        gradient, since ``CE_b`` is recomputed here from the same logits with the same masking as the module's.
        """
        if any(m.replaces_task_loss() for m in pl_module.methods):
            return replay_ce  # no task loss to share a mean with
        b = len(batch.y)
        batch_ce = F.cross_entropy(pl_module.training_logits(logits, batch.task_id), batch.y)
        return (r / (b + r)) * (replay_ce - batch_ce)

    def _log_replay_ce(self, pl_module: CLModule, replay_ce: Tensor) -> None:
        # the union term is not the replayed batch's loss: log that one too, at the module's logging interval
        logger = pl_module.logger
        if logger is not None and pl_module.global_step % pl_module.log_every_n_steps == 0:
            logger.log_metrics({f"train/{self.name}/replay_ce": float(replay_ce.detach())}, step=pl_module.global_step)

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if self.selection in TASK_END_SELECTIONS and task_id > self._filled:
            fill_from_task(self.buffer, trainer, pl_module, task_id, quota=None)
            self._filled = task_id

    @override
    def state_dict(self) -> dict[str, Any]:
        # the current task too: a mid-task resume does not call on_task_start again
        return {"buffer": self.buffer.state_dict(), "filled": self._filled, "task": self._task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "buffer" in state_dict:
            self.buffer.load_state_dict(state_dict["buffer"])
        self._filled = int(state_dict.get("filled", self._filled))
        self._task = int(state_dict.get("task", self._task))


class ProjectionRate:
    """Share of steps whose gradient a projection changed (GEM, A-GEM), logged as ``train/<name>/projection_rate``
    every ``module.log_every_n_steps`` steps. Counts may be device tensors: one host sync per logging interval."""

    def __init__(self, name: str) -> None:
        self.tag = f"train/{name}/projection_rate"
        self.projected: Tensor | float = 0.0
        self.steps = 0

    def update(self, module: CLModule, projected: Tensor | bool) -> None:
        self.projected = self.projected + projected
        self.steps += 1
        if self.steps >= module.log_every_n_steps and module.logger is not None:
            module.logger.log_metrics({self.tag: float(self.projected) / self.steps}, step=module.global_step)
            self.projected, self.steps = 0.0, 0
