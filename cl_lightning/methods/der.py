"""Dark Experience Replay (DER): replay past samples with the logits the network gave them when they were seen."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.methods.replay import ReplayMethod
from cl_lightning.validation import check_number

if TYPE_CHECKING:
    from cl_lightning.core.buffer import BufferSample
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


class DER(ReplayMethod):
    """Dark Experience Replay (Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple
    Baseline", NeurIPS 2020, eq. 6).

    A reservoir buffer ``M`` keeps samples with the raw logits ``z`` the network produced for them at insertion
    time; replay matches the current network's logits to them::

        L = CE(f(x), y) + alpha * E_{(x', z') ~ M} || f(aug(x')) - z' ||^2

    (the mean squared error over all logits, raw and unmasked, as in the paper and Mammoth). The stored logits are those
    of the training step that inserted the sample: the module's ``logits`` argument, computed on the augmented input (as
    Mammoth stores ``outputs.data``), detached, never refreshed (:attr:`stores_logits`). The replay batch is drawn
    before the current batch is inserted (Mammoth's order). Reservoir insertion makes DER task-free: it runs on
    ``dataset.stream=online`` and in every scenario. The replay batch goes through the network with the current batch,
    in one pass over their concatenation when the network has no batch statistics (``module.fused_forward=auto``: the
    same logits as a pass of its own), else in a pass of its own, as in Mammoth. DDP: the batch and its logits are
    all-gathered before insertion (:class:`~cl_lightning.methods.replay.ReplayMethod`), buffers are identical on every
    rank.

    This is *not* PyCIL's "DER" (Yan et al., "DER: Dynamically Expandable Representation", CVPR 2021), a
    different, architecture-growing method.

    Args:
        buffer_size: Slots of the reservoir buffer.
        replay_batch_size: Samples replayed per step.
        alpha: Weight of the logit-matching term.
        seed: Seed of the buffer's generator.
    """

    name: ClassVar[str] = "der"
    stores_logits: ClassVar[bool] = True

    def __init__(self, buffer_size: int = 500, replay_batch_size: int = 128, alpha: float = 1.0, seed: int = 0) -> None:
        super().__init__(buffer_size, replay_batch_size, "reservoir", seed)
        self.alpha = check_number("method.alpha", alpha)

    @override
    def replay_draws(self, pl_module: CLModule, batch: Batch) -> list[BufferSample]:
        replay = self.draw(pl_module)
        return [] if replay is None else [replay]

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if not (replayed := self.replayed(pl_module)):
            return {}
        replay, out = replayed[0]
        assert replay.logits is not None
        return {"logit_mse": self.alpha * F.mse_loss(out, replay.logits)}
