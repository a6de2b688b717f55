"""What the exemplar methods of class-incremental learning share (iCaRL, LUCIR): :class:`ExemplarMethod`.

An exemplar method keeps a ``herding`` memory under a budget shared by the classes seen, trains on the new data with
exemplars added to each batch in proportion (their papers' union of the two,
:func:`~cl_lightning.methods.replay.proportional_replay`), distils from the frozen network of the previous task end
(:class:`~cl_lightning.core.teacher.Teacher`) and can classify by the nearest mean of exemplars
(:class:`~cl_lightning.core.nme.ClassMeans`). Its objective is its own (:meth:`ExemplarMethod.replaces_task_loss`);
a subclass writes :meth:`~cl_lightning.methods.replay.ReplayMethod.replay_terms`, its evaluation
(:meth:`~cl_lightning.contract.CLMethod.eval_scores`) and what it prepares per task (:meth:`prepare_task`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.nme import ClassMeans
from cl_lightning.core.teacher import Teacher
from cl_lightning.errors import ConfigError
from cl_lightning.methods.replay import (
    ReplayMethod,
    check_own_classes,
    proportional_replay,
    seen_task_accuracies,
    task_features,
)
from cl_lightning.models.backbones import routes_by_task
from cl_lightning.validation import check_int

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule

__all__ = ["ExemplarMethod"]


class ExemplarMethod(ReplayMethod):
    """Base class of iCaRL-style methods: herding exemplars, the previous task's frozen network, class means.

    At each task end the buffer's herding selection takes the new classes' exemplars with the network just trained
    (older classes keep the head of their herding order), the class means are recomputed from the exemplars with
    that network, and the network is copied as the next task's teacher; each at most once per task, also across a
    resume. Defined where every task brings classes of its own (class-IL; task-IL with the module's masking):
    domain-IL's shared outputs are refused at setup, as are networks without ``features`` or that route by task.

    Attributes:
        fixed_replay: ``method.replay_batch_size`` when given (else exemplars in proportion, :meth:`replay_count`).
        old: The frozen network of the previous task end.
        means: The exemplars' class means, from the last task end.

    Args:
        buffer_size: The memory budget shared by every class seen.
        replay_batch_size: Exemplars added to each batch; ``None``: in proportion.
        seed: Seed of the buffer's generator.
    """

    selections: ClassVar[tuple[str, ...]] = ("herding",)
    supported_scenarios: ClassVar[tuple[str, ...]] = ("class_il", "task_il")
    needs_task_boundaries: ClassVar[bool] = True

    def __init__(self, buffer_size: int, replay_batch_size: int | None, seed: int) -> None:
        fixed = None if replay_batch_size is None else check_int("method.replay_batch_size", replay_batch_size)
        super().__init__(buffer_size, fixed or 1, "herding", seed)
        self.fixed_replay = fixed
        self.old = Teacher()
        self.means = ClassMeans()
        self._n_task = 1  # training samples of the current task

    @override
    def replaces_task_loss(self) -> bool:
        return True

    # ------------------------------------------------------------------ setup and task events
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_own_classes(pl_module, self.name)  # type: ignore[arg-type]
        net = pl_module.net  # type: ignore[attr-defined]
        if not callable(getattr(net, "features", None)) or routes_by_task(net):
            raise ConfigError(
                f"method={self.name} needs a network with features() that does not route by task, not "
                f"{type(net).__name__}; use model=mlp, cnn or resnet18"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.old.attach(pl_module.net)  # type: ignore[arg-type]
        self.means.to(pl_module.device)
        self.prepare_task(trainer, pl_module)  # type: ignore[arg-type]

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        super().on_task_start(trainer, pl_module, task_id)
        self.prepare_task(trainer, pl_module)

    def prepare_task(self, trainer: pl.Trainer, pl_module: CLModule) -> None:
        """What the current task's steps read, on the module's device: called at every fit start (a run resumed
        mid-task gets no task start) and task start. Subclasses extend it (calling ``super()``)."""
        t = int(pl_module.current_task)
        self._n_task = max(1, len(trainer.datamodule.tasks[t].train_y))  # type: ignore[attr-defined]

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        super().on_task_end(trainer, pl_module, task_id)  # herding: new classes in, old ones reduced
        if task_id > self.means.task:
            buf = self.buffer
            assert buf.x is not None and buf.y is not None
            feats = task_features(pl_module, buf.x[: buf.size])
            self.means.update(feats, buf.y[: buf.size], pl_module.output_masks.shape[1], task_id)
        self.old.take(pl_module.net, task_id)

    # ------------------------------------------------------------------ training and evaluation
    def replay_count(self, batch_size: int) -> int:
        """Exemplars added to a batch of ``batch_size`` new samples (:func:`proportional_replay`)."""
        return proportional_replay(self.fixed_replay, batch_size, self.buffer, self._n_task)

    def nme_scores(self, pl_module: CLModule, inputs: Tensor) -> Tensor | None:
        """Nearest-mean-of-exemplars scores (:func:`~cl_lightning.core.nme.nme_scores`) of network inputs, or
        ``None`` before the first task end."""
        return self.means.scores(pl_module.net.features(inputs)) if self.means.ready else None

    def classifier_accuracies(self, pl_module: CLModule, nme: bool) -> list[float]:
        """Accuracy on each task seen (fractions, the run's evaluation split) of the nearest-mean classifier
        (``nme``) or of the network's head predicting among the classes seen so far: the classifier that is not in
        the accuracy matrix, for :meth:`~cl_lightning.contract.CLMethod.diagnostics`."""
        seen = pl_module.seen_mask()

        def scores(inputs: Tensor, task: int) -> Tensor:
            by_means = self.nme_scores(pl_module, inputs) if nme else None
            return by_means if by_means is not None else pl_module(inputs, task).masked_fill(~seen, float("-inf"))

        return seen_task_accuracies(pl_module, scores)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | self.old.state_dict() | self.means.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.old.load_state_dict(state_dict)
        self.means.load_state_dict(state_dict)
