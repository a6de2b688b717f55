"""Learning without Forgetting: distil the previous model's answers on old outputs, using only the new data."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from cl_lightning.core.distill import distillation_loss, output_groups
from cl_lightning.methods.base import CLMethod
from cl_lightning.validation import check_number

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


class LwF(CLMethod):
    """Learning without Forgetting (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017).

    At the end of each task the network is copied and frozen (the teacher, eval mode). While training task ``t``,
    on the current batch's inputs ``x``:

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
    distillation term with weight 1, as in van de Ven & Tolias's code, whose distillation loss carries the ``T^2``
    too; they weight the two losses by the number of tasks seen instead of by a constant.) Changing ``T`` with
    ``alpha`` fixed keeps the distillation gradient's scale; changing it with ``lambda_o`` fixed would not.

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
            ``lambda_o`` is ``alpha * T^2`` (see above).
        temperature: ``T > 0``.
    """

    name: ClassVar[str] = "lwf"
    needs_task_boundaries: ClassVar[bool] = True

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__()
        self.alpha = check_number("method.alpha", alpha)
        self.temperature = check_number("method.temperature", temperature, strict=True)
        self.teacher: nn.Module | None = None
        self.teacher_task = -1  # the task at whose end the teacher was copied
        self._loaded: dict[str, Tensor] | None = None
        self._groups: Tensor | list[Tensor] | None = None  # of the current task, set at its start

    @staticmethod
    def _freeze(net: nn.Module) -> nn.Module:
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:
            teacher = copy.deepcopy(pl_module.net)  # type: ignore[arg-type]
            teacher.load_state_dict(self._loaded)
            self.teacher, self._loaded = self._freeze(teacher), None
        elif self.teacher is not None:
            self.teacher.to(pl_module.device)
        # here rather than only at the task start: a run resumed mid-task gets no task start
        task = int(pl_module.current_task)  # type: ignore[attr-defined]
        self._groups = self.groups(pl_module) if task > 0 else None  # type: ignore[arg-type]

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id <= self.teacher_task:
            return
        self.teacher = self._freeze(copy.deepcopy(pl_module.net))
        self.teacher_task = task_id

    @staticmethod
    def groups(pl_module: CLModule) -> Tensor | list[Tensor]:
        """Output groups distilled while training the current task (see the class docstring)."""
        old = pl_module.output_masks[: int(pl_module.current_task)]
        return output_groups(old if pl_module.scenario == "task_il" else old.any(0, keepdim=True))

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        # once per task, on the module's device: no host-device traffic per step
        self._groups = self.groups(pl_module) if task_id > 0 else None

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if self.teacher is None or self.alpha == 0 or self._groups is None:
            return {}
        with torch.no_grad():
            teacher_logits = self.teacher(pl_module.prepare(batch.x, train=False))
        return {"distill": self.alpha * distillation_loss(logits, teacher_logits, self._groups, self.temperature)}

    @override
    def state_dict(self) -> dict[str, Any]:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._loaded
        return {"teacher": {k: v.detach().cpu() for k, v in (teacher or {}).items()}, "teacher_task": self.teacher_task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.teacher_task = int(state_dict.get("teacher_task", -1))
        loaded = state_dict.get("teacher") or None
        self._loaded = dict(loaded) if loaded else None
        self.teacher = None
