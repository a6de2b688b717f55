"""What every replay method shares: :class:`ReplayMethod`, the base class, and the helpers it is made of.

A replay method keeps a :class:`~cl_lightning.core.buffer.Buffer` of past samples and trains on batches drawn from
it. The plumbing is the same for all of them and lives here, so that a method file holds its paper's equation and
little else (Mammoth's ``ContinualModel`` + ``Buffer``; ``CONVENTIONS.md``, rule 13):

- the buffer, moved to the module's device at every fit (restored state is loaded on the host);
- the current task, saved (a run resumed in the middle of a task gets no ``on_task_start``), and the task id stored
  with each sample (:func:`stream_task_ids`: the true task in task-IL, ``-1`` on an online stream);
- streaming insertion (``reservoir``, ``class_balanced``) of the current batch *after* the step's replay is drawn
  (Mammoth's order: a batch is never replayed in its own step), all-gathered under DDP (:func:`gather`) so the
  buffers of all ranks stay identical;
- task-end selection (``herding``, ``kcenter``, ``random``) from the finished task's training data, once per task
  even across a resume, rebalancing the buffer or keeping ``buffer_size // n_tasks`` samples per task (GEM's and
  A-GEM's episodic memories: :func:`per_task_quota`, :func:`fill_from_task`, :func:`task_features`);
- replay batches drawn and prepared like training batches (:meth:`ReplayMethod.draw`), before the current batch is
  forwarded, so that the module forwards them with it (:meth:`ReplayMethod.replay_draws`,
  :meth:`ReplayMethod.replayed`);
- a warning when the buffer is larger than all the run's training data (:func:`check_buffer_fits`);
- ``state_dict`` with CPU tensors only (``torch.load(weights_only=True)`` reads it on any machine).

A replay method subclasses :class:`ReplayMethod` and writes :meth:`~ReplayMethod.replay_terms`::

    class LabelReplay(ReplayMethod):
        '''The paper, and its equation: L = CE(f(x), y) + beta * E_{(x', y') ~ M} CE(f(aug(x')), y').'''

        name: ClassVar[str] = "label_replay"

        def __init__(self, buffer_size: int = 500, replay_batch_size: int = 10, beta: float = 1.0, seed: int = 0):
            super().__init__(buffer_size, replay_batch_size, "reservoir", seed)
            self.beta = check_number("method.beta", beta)

        def replay_draws(self, pl_module, batch):
            replay = self.draw(pl_module)  # None while the buffer is empty
            return [] if replay is None else [replay]

        def replay_terms(self, pl_module, batch, logits):
            if not (replayed := self.replayed(pl_module)):  # the draws, with the network's logits of them
                return {}
            ((replay, out),) = replayed
            return {"replay": self.beta * F.cross_entropy(pl_module.training_logits(out, replay.task_id), replay.y)}

with its ``conf/method/label_replay.yaml``. The module forwards the draws with the current batch, in one pass over
their concatenation when the network has no batch statistics (``module.fused_forward``). Class attributes choose the
rest: :attr:`~ReplayMethod.selections` (the policies ``method.selection`` may name), :attr:`~ReplayMethod.stores_logits`
(DER's logits of insertion time), :attr:`~ReplayMethod.memory_per_task` (GEM's fixed memory per task). A method that
edits gradients instead (A-GEM) returns no loss term and draws in ``on_before_optimizer_step``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.buffer import STREAMING_SELECTIONS, Buffer, BufferSample
from cl_lightning.errors import ConfigError
from cl_lightning.loggers import log_metrics
from cl_lightning.methods.base import CLMethod
from cl_lightning.validation import check_choice, check_int

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = [
    "ProjectionRate",
    "ReplayMethod",
    "check_buffer_fits",
    "check_own_classes",
    "fill_from_task",
    "gather",
    "per_task_quota",
    "proportional_replay",
    "seen_task_accuracies",
    "stream_task_ids",
    "task_features",
]


class ReplayMethod(CLMethod):
    """Base class of the methods that train on samples replayed from a :class:`~cl_lightning.core.buffer.Buffer`.

    Every training step, :meth:`loss_terms` returns the subclass's :meth:`replay_terms`, computed on the buffer as
    it is before the step, then (streaming selections) inserts the current batch as stored, un-augmented, with its
    task ids (:func:`stream_task_ids`) and, where :attr:`stores_logits`, the module's logits of the step, detached.
    At each task end a task-end selection chooses from the finished task's training data (once per task, also
    across a resume). DDP: insertion all-gathers the batch and every rank inserts it with the same seeded generator;
    task-end selections read the whole task, identical on every rank. Buffers, and the replay batches drawn from
    them, are therefore identical on every rank, and the checkpoint written by rank 0 is valid for all.

    Attributes:
        selections: The policies ``method.selection`` may name (:data:`~cl_lightning.core.buffer.SELECTIONS`).
        stores_logits: Whether insertion stores the step's logits with the samples (DER's targets).
        memory_per_task: Whether a task-end selection keeps ``buffer_size // dataset.n_tasks`` samples of each task
            (GEM's and A-GEM's episodic memories; refused at setup when that is 0) instead of rebalancing the buffer
            over the tasks seen.
        buffer: The samples.
        replay_batch_size: Samples :meth:`draw` draws (fewer while the buffer holds fewer).
        quota: Samples per task of the task-end selection, set at setup (``None``: rebalance).

    Args:
        buffer_size: Slots of the buffer (``method.buffer_size``).
        replay_batch_size: Samples replayed per draw (``method.replay_batch_size``).
        selection: The buffer's policy, one of :attr:`selections` (``method.selection``).
        seed: Seed of the buffer's generator (insertion decisions, task-end subsets, replay draws).
    """

    selections: ClassVar[tuple[str, ...]] = ("reservoir",)
    stores_logits: ClassVar[bool] = False
    memory_per_task: ClassVar[bool] = False

    def __init__(self, buffer_size: int, replay_batch_size: int, selection: str = "reservoir", seed: int = 0) -> None:
        super().__init__()
        self.buffer_size = check_int("method.buffer_size", buffer_size)
        self.replay_batch_size = check_int("method.replay_batch_size", replay_batch_size)
        self.selection = check_choice("method.selection", selection, self.selections)
        self.buffer = Buffer(buffer_size, selection, seed)
        self.quota: int | None = None
        self._task = -1  # the current task, from on_task_start (saved: a mid-task resume gets no task start)
        self._filled = -1  # the last task selected from at task end (never select from a task twice)
        self._drawn: list[BufferSample] = []  # this step's replay_draws, until its loss terms are taken

    @property
    def streaming(self) -> bool:
        """Whether the buffer takes every step's batch (else it selects at task end)."""
        return self.selection in STREAMING_SELECTIONS

    # ------------------------------------------------------------------ the hooks a subclass writes
    def replay_draws(self, pl_module: CLModule, batch: Batch) -> list[BufferSample]:
        """The replay batches of this step whose logits :meth:`replay_terms` needs (default: none), drawn with
        :meth:`draw` before the current batch goes through the network, so that the module forwards them with it
        (one pass over the concatenation where that is exact, :attr:`CLModule.fuses_forward`). The buffer is as
        it is before this step's insertion; ``batch`` is the current batch, un-augmented."""
        return []

    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        """The method's loss terms for this step, by name, on the buffer as it is before this step's insertion.

        Arguments as :meth:`~cl_lightning.contract.CLMethod.loss_terms`; :meth:`replayed` gives the batches of
        :meth:`replay_draws` with the network's logits of them. Default: none (a method that replays in another
        door, such as a gradient edit).
        """
        return {}

    def replayed(self, pl_module: CLModule) -> list[tuple[BufferSample, Tensor]]:
        """This step's :meth:`replay_draws`, each with the network's raw logits of its ``x`` (in the graph)."""
        return list(zip(self._drawn, pl_module.step_outputs(self), strict=True))

    def draw(self, pl_module: CLModule, n: int | None = None) -> BufferSample | None:
        """A replay batch of ``n`` (default :attr:`replay_batch_size`) distinct stored samples, or ``None`` while
        the buffer is empty. Its ``x`` are network inputs, ``pl_module.prepare(x, train=True)`` of the stored
        inputs (augmented anew at every draw, like a training batch); ``y``, ``task_id``, ``logits`` as stored."""
        if self.buffer.is_empty:
            return None
        sample = self.buffer.sample(self.replay_batch_size if n is None else n)
        return sample._replace(x=pl_module.prepare(sample.x, train=True))

    def insert(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> None:
        """Offer the current batch (all ranks' under DDP) to a streaming buffer, with its logits where
        :attr:`stores_logits`."""
        tid = stream_task_ids(pl_module, batch, self._task)
        if self.stores_logits:
            x, y, tid, z = gather(pl_module.trainer, batch.x, batch.y, tid, logits.detach().float())
            self.buffer.add(x, y, tid, logits=z)
        else:
            self.buffer.add(*gather(pl_module.trainer, batch.x, batch.y, tid))

    # ------------------------------------------------------------------ plumbing
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_buffer_fits(trainer, self.buffer)
        if not self.streaming and getattr(getattr(trainer, "datamodule", None), "stream", "tasks") == "online":
            raise ConfigError(
                f"method.selection={self.selection} selects at task end and cannot run with dataset.stream=online; "
                f"use method.selection=reservoir or class_balanced"
            )
        if self.memory_per_task:
            self.quota = per_task_quota(trainer, self.buffer_size, self.name)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.buffer.to(pl_module.device)  # restored state is loaded on the host

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        self._task = task_id

    @override
    def step_inputs(self, pl_module: CLModule, batch: Batch) -> list[tuple[Tensor, Tensor]]:
        self._drawn = self.replay_draws(pl_module, batch)
        return [(sample.x, sample.task_id) for sample in self._drawn]

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        terms = self.replay_terms(pl_module, batch, logits)  # drawn before the insertion
        self._drawn = []
        if self.streaming:
            self.insert(pl_module, batch, logits)
        return terms

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if not self.streaming and task_id > self._filled:
            fill_from_task(self.buffer, trainer, pl_module, task_id, self.quota)
            self._filled = task_id

    @override
    def state_dict(self) -> dict[str, Any]:
        buffer = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.buffer.state_dict().items()}
        return {"buffer": buffer, "filled": self._filled, "task": self._task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "buffer" in state_dict:
            self.buffer.load_state_dict(state_dict["buffer"])
        self._filled = int(state_dict.get("filled", self._filled))
        self._task = int(state_dict.get("task", self._task))


# ---------------------------------------------------------------------- helpers (also for methods without a base)
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


def proportional_replay(fixed: int | None, batch_size: int, buffer: Buffer, task_samples: int) -> int:
    """Exemplars to add to a batch of ``batch_size`` new samples so that training approximates mini-batches of the
    union of the task's ``task_samples`` training samples and the buffer (iCaRL's and LUCIR's training set):
    ``round(batch_size * len(buffer) / task_samples)``, so that an epoch over the new data also sees each stored
    sample once in expectation, and at least 1 while the buffer holds samples (with small batches the proportion
    rounds to 0: set ``method.replay_batch_size`` for such protocols); ``fixed`` (a ``method.replay_batch_size``
    given) instead when not ``None``.
    """
    if fixed is not None:
        return fixed
    if len(buffer) == 0:
        return 0
    return max(1, round(batch_size * len(buffer) / max(1, task_samples)))


def check_own_classes(pl_module: CLModule, name: str) -> None:
    """Refuse task sequences whose tasks share outputs (domain-IL) for a method whose targets treat the current
    task's classes as new and the earlier tasks' as old (iCaRL, LUCIR)."""
    if bool((pl_module.output_masks.sum(0) > 1).any()):
        raise ConfigError(
            f"method={name} needs tasks with classes of their own (its losses treat the current task's classes as new "
            "and the earlier tasks' as old), but these tasks share outputs; use dataset.scenario=class_il"
        )


@torch.no_grad()
def seen_task_accuracies(
    pl_module: CLModule, scores: Callable[[Tensor, int], Tensor], chunk: int = 1024
) -> list[float]:
    """Accuracy (a fraction, 6 decimals) of a classifier of the method's own on each task seen so far, over the
    run's evaluation split, in evaluation mode: a second classifier's figures for :meth:`CLMethod.diagnostics`
    (e.g. iCaRL's head beside its nearest-mean classifier).

    ``scores(inputs, task)`` maps network inputs of ``task`` (un-augmented) to scores whose argmax is the
    prediction. Every process evaluates the whole split (the same figures on every rank).
    """
    dm = pl_module.trainer.datamodule  # type: ignore[attr-defined]
    net = pl_module.net
    was_training = net.training
    net.eval()
    accs = []
    try:
        for j in range(int(pl_module.current_task) + 1):
            task = dm.tasks[j]
            x, y = (task.val_x, task.val_y) if dm.eval_split == "val" else (task.test_x, task.test_y)
            correct = 0
            for part_x, part_y in zip(x.split(chunk), y.split(chunk), strict=True):
                with pl_module.task_view(j):
                    pred = scores(pl_module.prepare(part_x.to(pl_module.device)), j).argmax(1)
                correct += int((pred == part_y.to(pred.device)).sum())
            accs.append(round(correct / max(1, len(y)), 6))
    finally:
        net.train(was_training)
    return accs


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
        if self.steps >= module.log_every_n_steps:
            if module.loggers:
                log_metrics(module, {self.tag: float(self.projected) / self.steps}, module.global_step)
            self.projected, self.steps = 0.0, 0
