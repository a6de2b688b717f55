"""Learning without Forgetting: distil the previous model's answers on old outputs, using only the new data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from cl_lightning.core.distill import distillation_loss, output_groups, padded_distillation_loss
from cl_lightning.core.teacher import Teacher
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import CLMethod
from cl_lightning.validation import check_bool, check_choice, check_number

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


class LwF(CLMethod):
    """Learning without Forgetting (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017).

    At the end of each task the network is copied and frozen (the teacher, eval mode). While training task ``t``
    (counted from 0, so ``t`` tasks came before it), on the current batch's inputs ``x``:

        L = L_task + alpha * T^2 * sum_g KL( softmax(z_old(x)_g / T) || softmax(z(x)_g / T) )

    over the groups ``g`` of outputs the previous tasks used: in task-IL each old task's head is its own group
    (Li & Hoiem's one loss per old task, summed); in class-IL one group of all classes seen before task ``t``; in
    domain-IL the shared head. ``T`` is the temperature (Li & Hoiem and van de Ven & Tolias use 2) and the ``T^2``
    factor (Hinton et al. 2015) keeps the soft targets' gradient scale independent of ``T``; see
    :func:`~cl_lightning.core.distill.distillation_loss`. The term is ``lwf/distill``, the whole product
    ``alpha * T^2 * sum_g KL`` (batch mean).

    **What** ``alpha`` **multiplies**: the ``T^2``-scaled loss, not Li & Hoiem's. Their objective is
    ``L_new + lambda_o * L_old`` with ``L_old`` the temperature-``T`` cross-entropy to the old network's soft outputs
    and no ``T^2`` factor; ``KL`` differs from that cross-entropy by the teacher's entropy, a constant, so the
    gradients are those of ``lambda_o = alpha * T^2``: the default ``alpha = 1`` at ``T = 2`` is ``lambda_o = 4``,
    and Li & Hoiem's ``lambda_o = 1`` is ``alpha = 1 / T^2 = 0.25``. (``alpha = 1`` is Hinton et al.'s scaling of a
    distillation term with weight 1.) Changing ``T`` with ``alpha`` fixed keeps the distillation gradient's scale;
    changing it with ``lambda_o`` fixed would not.

    ``alpha = "tasks"`` is van de Ven & Tolias's (2019) weighting: ``t`` times the *mean* over the groups, i.e.
    ``alpha = t / G`` for ``G`` groups: ``alpha = t`` in class- and domain-IL (one group), ``alpha = 1`` in task-IL
    (``t`` heads). Their code weights ``(1 / (t+1)) L_task + (t / (t+1)) mean_g L_distill,g`` (its ``rnt``, with a
    distillation loss that carries the ``T^2`` too); ours is that times ``t + 1``, a factor per task that Adam, the
    optimizer of their protocol, cancels except through the moment estimates it carries across the task boundary
    (deep generative replay's ``replay_weight`` is weighted the same way).

    ``class_il_outputs`` chooses the class-IL distributions:

    - ``old`` (default): the student's and the teacher's softmax over the classes of the previous tasks (the
      formula above; Li & Hoiem's "old outputs").
    - ``seen``: the student's softmax over every class it trains on (the classes seen so far, the current task's
      included, with ``module.train_outputs=seen``) against the teacher's softmax over the old classes padded with
      zero probability on the current task's classes, as van de Ven & Tolias's code does (its ``loss_fn_kd``);
      see :func:`~cl_lightning.core.distill.padded_distillation_loss`. The term then also pulls the current classes'
      probabilities down on the new data, against the bias toward them that makes class-IL fine-tuning forget.

    The teacher sees the batch un-augmented (``prepare(x, train=False)``), like Li & Hoiem, who record the old
    network's responses on the new task's images once before training; the student's logits are the module's, on
    the augmented batch (identical without augmentation, e.g. MNIST). The teacher's forward pass is the method's
    whole cost per step.

    State: the teacher's ``state_dict`` (parameters and buffers, by name) and the task it was copied after; a
    resumed run rebuilds it from a copy of the current network's structure.

    DDP: every rank copies the same (synchronised) parameters at the task end, so teachers are identical; the loss
    is local to each rank's batch like the task loss.

    Args:
        alpha: Weight ``alpha >= 0`` of the ``T^2``-scaled distillation loss ``T^2 * sum_g KL``; Li & Hoiem's
            ``lambda_o`` is ``alpha * T^2`` (see above). ``"tasks"``: van de Ven & Tolias's weighting (see above).
        temperature: ``T > 0``.
        class_il_outputs: ``old`` or ``seen`` (see above); read in class-IL only.
        class_mean: Average each distribution's term over its classes instead of summing it, dividing by the
            classes of its softmax: with ``seen``, those the student trains on, padded ones included (the seen
            classes, or all with ``module.train_outputs=all``); an old head's or the old classes' otherwise. This
            is the ``utils.loss_fn_kd`` of van de Ven & Tolias's code as the 2019 paper ran it (commit 86802a8),
            ``(-targets * log_q).mean()`` over the batch and the classes; their later versions sum over them.
    """

    name: ClassVar[str] = "lwf"
    needs_task_boundaries: ClassVar[bool] = True

    def __init__(
        self,
        alpha: float | str = 1.0,
        temperature: float = 2.0,
        class_il_outputs: str = "old",
        class_mean: bool = False,
    ) -> None:
        super().__init__()
        if alpha == "tasks":
            self.alpha: float | str = "tasks"
        elif isinstance(alpha, str):
            raise ConfigError(f"method.alpha={alpha!r}: must be a number >= 0 or 'tasks' (van de Ven & Tolias)")
        else:
            self.alpha = check_number("method.alpha", alpha)
        self.temperature = check_number("method.temperature", temperature, strict=True)
        self.class_il_outputs = check_choice("method.class_il_outputs", class_il_outputs, ("old", "seen"))
        self.class_mean = check_bool("method.class_mean", class_mean)
        self.old = Teacher()  # the network copied at the last task end
        self._groups: Tensor | list[Tensor] | None = None  # of the current task, set at its start
        self._weight = 0.0  # alpha for the current task
        self._padded: tuple[Tensor, Tensor] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.old.attach(pl_module.net)  # type: ignore[arg-type]
        # here rather than only at the task start: a run resumed mid-task gets no task start
        self._prepare_task(pl_module)  # type: ignore[arg-type]

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        self.old.take(pl_module.net, task_id)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen network of the previous task (``None`` before the first task end)."""
        return self.old.net

    @property
    def teacher_task(self) -> int:
        """The task at whose end :attr:`teacher` was copied (``-1``: none)."""
        return self.old.task

    @staticmethod
    def groups(pl_module: CLModule) -> Tensor | list[Tensor]:
        """Output groups distilled while training the current task (see the class docstring)."""
        old = pl_module.output_masks[: int(pl_module.current_task)]
        return output_groups(old if pl_module.scenario == "task_il" else old.any(0, keepdim=True))

    def _prepare_task(self, pl_module: CLModule) -> None:
        # once per task, on the module's device: no host-device traffic per step
        task = int(pl_module.current_task)
        self._groups = self.groups(pl_module) if task > 0 else None
        n_groups = len(self._groups) if self._groups is not None else 1
        self._weight = task / n_groups if self.alpha == "tasks" else float(self.alpha)  # type: ignore[arg-type]
        padded = pl_module.scenario == "class_il" and self.class_il_outputs == "seen" and task > 0
        old = pl_module.output_masks[:task].any(0)
        self._padded = (torch.ones_like(old), old) if padded else None  # (student's outputs, teacher's outputs)

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        self._prepare_task(pl_module)

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if self.teacher is None or self._weight == 0 or self._groups is None:
            return {}
        with torch.no_grad():
            teacher_logits = self.teacher(pl_module.prepare(batch.x, train=False))
        if self._padded is not None:
            # the student's distribution is over the outputs it trains on: its masked training logits
            student = pl_module.training_logits(logits, batch.task_id)
            loss = padded_distillation_loss(
                student, teacher_logits, *self._padded, self.temperature, class_mean=self.class_mean
            )
        else:
            loss = distillation_loss(logits, teacher_logits, self._groups, self.temperature, self.class_mean)
        return {"distill": self._weight * loss}

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.old.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.old.load_state_dict(state_dict)
