"""DER++: Dark Experience Replay plus a replay loss on the stored labels."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.methods.der import DER
from cl_lightning.validation import check_number

if TYPE_CHECKING:
    from cl_lightning.core.buffer import BufferSample
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


class DERpp(DER):
    """DER++ (Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple Baseline",
    NeurIPS 2020, eq. 7).

    DER's logit matching on a buffer batch ``A``, plus the cross-entropy of an *independent* buffer batch ``B`` on
    its stored labels (in task-IL with its own task's head)::

        L = CE(f(x), y) + alpha * E_{(x', z') ~ M} ||f(aug(x')) - z'||^2
                        + beta * E_{(x'', y'') ~ M} CE(f(aug(x'')), y'')

    Both batches are drawn, in that order, before the current batch is inserted (Mammoth's order). Without batch
    statistics in the network the current batch, A and B go through it in one pass over their concatenation
    (``module.fused_forward=auto``; Mammoth forwards each on its own, which with batch norm we keep). The label term
    corrects DER when the stored logits are from an early, poor network or the distribution shifts abruptly.
    Not PyCIL's "DER" (Yan et al. 2021, dynamically expandable representations), a different method.

    Args:
        buffer_size: Slots of the reservoir buffer.
        replay_batch_size: Samples in each of the two replay batches.
        alpha: Weight of the logit-matching term.
        beta: Weight of the label replay term.
        seed: Seed of the buffer's generator.
    """

    name: ClassVar[str] = "derpp"

    def __init__(
        self, buffer_size: int = 500, replay_batch_size: int = 10, alpha: float = 1.0, beta: float = 0.5, seed: int = 0
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, alpha, seed)
        self.beta = check_number("method.beta", beta)

    @override
    def replay_draws(self, pl_module: CLModule, batch: Batch) -> list[BufferSample]:
        drawn = super().replay_draws(pl_module, batch)  # A
        if (replay := self.draw(pl_module)) is not None:  # B, drawn after and independently of A
            drawn.append(replay)
        return drawn

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        terms = super().replay_terms(pl_module, batch, logits)
        if len(replayed := self.replayed(pl_module)) == 2:
            replay, out = replayed[1]
            terms["replay"] = self.beta * F.cross_entropy(pl_module.training_logits(out, replay.task_id), replay.y)
        return terms
