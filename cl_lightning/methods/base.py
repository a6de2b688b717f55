"""The contract between a continual method and the training loop.

A method changes training through three doors only (``CONVENTIONS.md``, rule 3):

1. **loss terms** -- :meth:`CLMethod.loss_terms` returns named extra losses; :class:`~cl_lightning.models.CLModule`
   adds them to the task loss and logs each by name (no callback hook can replace the loss);
2. **gradient edits** -- Lightning's ``on_before_optimizer_step`` (after AMP unscaling);
3. **task events** -- :meth:`CLMethod.on_task_start` / :meth:`CLMethod.on_task_end`, called by the module from
   inside ``trainer.fit`` (so the strategy, the optimizer and the process group exist), at most once per task even
   across a resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from cl_lightning.data.scenarios import SCENARIOS
from cl_lightning.errors import ConfigError

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


class CLMethod(pl.Callback):
    """Base class of every continual-learning method.

    Subclasses declare what they support with class attributes and are checked at ``setup``, before any training.

    Attributes:
        name: The method's name, as in ``conf/method/<name>.yaml`` and ``results.json``.
        supported_scenarios: Scenarios the method is defined for.
        needs_task_boundaries: The method acts at task boundaries and cannot run on an online stream.
        cumulative_data: The method trains on the union of all tasks seen so far (joint training).
    """

    name: ClassVar[str] = "method"
    supported_scenarios: ClassVar[tuple[str, ...]] = SCENARIOS
    needs_task_boundaries: ClassVar[bool] = False
    cumulative_data: ClassVar[bool] = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            return
        scenario = getattr(dm, "scenario", None)
        if scenario is not None and scenario not in self.supported_scenarios:
            raise ConfigError(
                f"method={self.name} does not support dataset.scenario={scenario}; "
                f"use one of {', '.join(self.supported_scenarios)}"
            )
        if self.needs_task_boundaries and getattr(dm, "stream", "tasks") == "online":
            raise ConfigError(
                f"method={self.name} needs task boundaries and cannot run with dataset.stream=online; "
                "use dataset.stream=tasks or a task-free method"
            )

    @property
    @override
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.name}]"

    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        """Called once when training on ``task_id`` begins."""

    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        """Called once when training on ``task_id`` has finished, before it is evaluated."""

    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        """Extra loss terms for this training step, by name (summed with the task loss by the module)."""
        return {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
