"""Dark Experience Replay (DER): replay past samples with the logits the network gave them when they were seen."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.buffer import Buffer
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.er import check_buffer_fits, check_int, gather, stream_task_ids

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


def check_weight(key: str, value: Any) -> float:
    """``value`` as a float if it is a number >= 0, else a one-line :class:`ConfigError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"{key}={value!r}: must be a number >= 0")
    return float(value)


class DER(CLMethod):
    """Dark Experience Replay (Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple
    Baseline", NeurIPS 2020, eq. 6).

    A reservoir buffer ``M`` keeps samples with the raw logits ``z`` the network produced for them at insertion
    time; replay matches the current network's logits to them::

        L = CE(f(x), y) + alpha * E_{(x', z') ~ M} || f(aug(x')) - z' ||^2

    (the mean squared error over all logits, raw and unmasked, as in the paper and Mammoth). The stored logits are
    those of the training step that inserted the sample: the module's ``logits`` argument, computed on the
    augmented input (as Mammoth stores ``outputs.data``), detached, never refreshed. The replay batch is drawn
    before the current batch is inserted (Mammoth's order). Reservoir insertion makes DER task-free: it runs on
    ``dataset.stream=online`` and in every scenario.

    This is *not* PyCIL's "DER" (Yan et al., "DER: Dynamically Expandable Representation", CVPR 2021), a
    different, architecture-growing method.

    DDP: the current batch, its task ids and logits are all-gathered before insertion and every rank inserts them
    with the same seeded generator, so buffers and replay batches are identical on every rank (the rank-0
    checkpoint is valid for all).

    Args:
        buffer_size: Slots of the reservoir buffer.
        replay_batch_size: Samples replayed per step.
        alpha: Weight of the logit-matching term.
        seed: Seed of the buffer's generator.
    """

    name: ClassVar[str] = "der"

    def __init__(self, buffer_size: int = 500, replay_batch_size: int = 128, alpha: float = 1.0, seed: int = 0) -> None:
        check_int("method.buffer_size", buffer_size)
        self.replay_batch_size = check_int("method.replay_batch_size", replay_batch_size)
        self.alpha = check_weight("method.alpha", alpha)
        self.buffer = Buffer(buffer_size, "reservoir", seed)
        self._task = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_buffer_fits(trainer, self.buffer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.buffer.to(pl_module.device)  # restored state is loaded on the host

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        self._task = task_id

    def replay_terms(self, pl_module: CLModule) -> dict[str, Tensor]:
        """The replay losses on the buffer as it is before this step's insertion."""
        sample = self.buffer.sample(self.replay_batch_size)
        assert sample.logits is not None
        out = pl_module(pl_module.prepare(sample.x, train=True), sample.task_id)
        return {"logit_mse": self.alpha * F.mse_loss(out, sample.logits)}

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        terms = {} if self.buffer.is_empty else self.replay_terms(pl_module)
        tid = stream_task_ids(pl_module, batch, self._task)
        x, y, tid, z = gather(pl_module.trainer, batch.x, batch.y, tid, logits.detach().float())
        self.buffer.add(x, y, tid, logits=z)
        return terms

    @override
    def state_dict(self) -> dict[str, Any]:
        # the current task too: a mid-task resume does not call on_task_start again
        return {"buffer": self.buffer.state_dict(), "task": self._task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "buffer" in state_dict:
            self.buffer.load_state_dict(state_dict["buffer"])
        self._task = int(state_dict.get("task", self._task))
