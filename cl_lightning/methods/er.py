"""Experience replay (ER): every step also trains on a batch drawn from a memory of past samples."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.buffer import STREAMING_SELECTIONS, BufferSample
from cl_lightning.loggers import log_metrics
from cl_lightning.methods.replay import ReplayMethod

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["ER"]


class ER(ReplayMethod):
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
    The two batches go through the network in one forward pass over their concatenation, as in Mammoth, when the
    network has no batch statistics (``module.fused_forward=auto``); with batch norm they go in two passes, so that
    each is normalised with its own statistics (``module.fused_forward=true`` normalises them together, as
    Mammoth's code does).

    The buffer (see :mod:`cl_lightning.core.buffer`) is filled by ``selection``: ``reservoir`` (the default, as in
    Mammoth's ER) and ``class_balanced`` insert the current batch every step *after* the replay batch is drawn
    (Mammoth's order: a batch is never replayed in its own step) and run task-free (``dataset.stream=online``);
    ``herding`` and ``kcenter`` select from the finished task's training data at task end, so they need task
    boundaries (refused at setup on an online stream). Insertion, selection and DDP (identical buffers on every
    rank) are :class:`~cl_lightning.methods.replay.ReplayMethod`'s.

    Args:
        buffer_size: Slots of the buffer.
        replay_batch_size: Samples replayed per step (fewer while the buffer holds fewer).
        selection: ``reservoir``, ``class_balanced``, ``herding`` or ``kcenter``.
        seed: Seed of the buffer's generator (insertion decisions and replay draws).
    """

    name: ClassVar[str] = "er"
    selections: ClassVar[tuple[str, ...]] = (*STREAMING_SELECTIONS, "herding", "kcenter")

    def __init__(
        self, buffer_size: int = 500, replay_batch_size: int = 10, selection: str = "reservoir", seed: int = 0
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, selection, seed)

    @override
    def replay_draws(self, pl_module: CLModule, batch: Batch) -> list[BufferSample]:
        replay = self.draw(pl_module)
        return [] if replay is None else [replay]

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if not (replayed := self.replayed(pl_module)):
            return {}
        ((replay, out),) = replayed
        replay_ce = F.cross_entropy(pl_module.training_logits(out, replay.task_id), replay.y)
        term = self.union_term(pl_module, batch, logits, replay_ce, len(replay.y))
        # the union term is not the replayed batch's loss: log that one too, at the module's logging interval
        if pl_module.loggers and pl_module.global_step % pl_module.log_every_n_steps == 0:
            log_metrics(pl_module, {f"train/{self.name}/replay_ce": float(replay_ce.detach())}, pl_module.global_step)
        return {"replay": term}

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
