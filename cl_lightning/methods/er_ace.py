"""ER-ACE: experience replay with the asymmetric cross-entropy, the incoming batch's loss over its own classes."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.methods.replay import ReplayMethod

if TYPE_CHECKING:
    from cl_lightning.core.buffer import BufferSample
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["ERACE"]


class ERACE(ReplayMethod):
    """ER-ACE (Caccia et al., "New Insights on Reducing Abrupt Representation Change in Online Continual Learning",
    ICLR 2022, section 4).

    Once the buffer holds samples, each step trains on::

        L = CE( mask_present(f(x_b)), y_b ) + CE( mask(f(x_r)), y_r )

    The incoming batch's softmax runs over the classes present in it only (``mask_present``: every other logit is
    ``-inf``), so learning the new classes does not push the old classes' logits down on new data, the source of the
    abrupt change of representation at a task switch; the replayed batch ``(x_r, y_r)`` of ``replay_batch_size``
    samples drawn from the reservoir buffer uses the run's usual masking (``pl_module.training_logits``: the classes
    seen so far in class-IL, its own head in task-IL) and so keeps old and new classes apart. The two means are
    summed, as in their code (and Mammoth's ``er_ace.py``). While the buffer is empty (the first steps of the
    stream) the incoming loss is the plain cross-entropy, as their code does before the first task ends.

    Their code also keeps in the incoming batch's softmax the classes not seen yet (it assumes classes arrive in
    index order); here those are already out of every training loss by the class-IL mask of unseen classes
    (``module.train_outputs=seen``, the default) and in it with ``train_outputs=all``, as in theirs.

    The method is task-free: the reservoir takes every batch after the step's replay is drawn (ER's order), and it runs
    on ``dataset.stream=online``. The replayed batch goes through the network with the incoming one, in one pass over
    both when the network has no batch statistics (``module.fused_forward=auto``), as their code does. Its objective is
    the whole loss (:meth:`replaces_task_loss`); the module still logs the plain task loss. DDP: the buffer is identical
    on every rank (:class:`ReplayMethod`); each rank's incoming mask is that of its own batch, like its loss.

    Args:
        buffer_size: Slots of the reservoir buffer.
        replay_batch_size: Samples replayed per step (fewer while the buffer holds fewer).
        seed: Seed of the buffer's generator.
    """

    name: ClassVar[str] = "er_ace"

    def __init__(self, buffer_size: int = 500, replay_batch_size: int = 10, seed: int = 0) -> None:
        super().__init__(buffer_size, replay_batch_size, "reservoir", seed)

    @override
    def replaces_task_loss(self) -> bool:
        return True  # the incoming batch's loss is asymmetric; it and the replay's are the whole objective

    @staticmethod
    def incoming_loss(pl_module: CLModule, batch: Batch, logits: Tensor) -> Tensor:
        """``CE(mask_present(z), y)``: the training logits with every class absent from the batch masked."""
        z = pl_module.training_logits(logits, batch.task_id)
        present = torch.zeros(z.shape[1], dtype=torch.bool, device=z.device).index_fill_(0, batch.y, True)
        return F.cross_entropy(z.masked_fill(~present, float("-inf")), batch.y)

    @override
    def replay_draws(self, pl_module: CLModule, batch: Batch) -> list[BufferSample]:
        replay = self.draw(pl_module)
        return [] if replay is None else [replay]

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if not (replayed := self.replayed(pl_module)):
            return {"incoming": F.cross_entropy(pl_module.training_logits(logits, batch.task_id), batch.y)}
        ((replay, out),) = replayed
        return {
            "incoming": self.incoming_loss(pl_module, batch, logits),
            "replay": F.cross_entropy(pl_module.training_logits(out, replay.task_id), replay.y),
        }
