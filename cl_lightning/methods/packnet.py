"""PackNet: pack tasks into one network by iterative pruning; each task owns a fixed, disjoint set of weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from cl_lightning.core.pruning import (
    FREE,
    OWNER_DTYPE,
    free_fraction,
    magnitude_prune,
    owned_fraction,
    prunable_weights,
    row_owners,
    trainable_mask,
    visible_mask,
)
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import CLMethod

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule


class PackNet(CLMethod):
    """PackNet (Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning", CVPR
    2018, Section 3).

    Task ``t`` trains the weights no earlier task owns (the *free* ones) for ``epochs_per_task`` epochs (or
    ``steps_per_task`` steps), then prunes, per layer, the fraction ``prune_ratio`` of those free weights of smallest
    magnitude: they are set to 0 and stay free for later tasks. The kept ones are retrained alone for
    ``retrain_epochs`` more epochs and then belong to ``t`` for good. With ``F_l`` the free weights of layer ``l``::

        keep_t(l) = top_{(1 - prune_ratio) |F_l|} |w_i|, i in F_l;    F_l <- F_l minus keep_t(l)

    so task ``t`` owns ``(1 - p) p^t`` of each layer and ``p^T`` stays free after ``T`` tasks. The model of task
    ``t`` is the network with the weights of tasks ``> t`` (and the free ones) set to 0 (the paper's binary masks):
    every evaluation of task ``t`` runs inside :meth:`task_view`, which does exactly that, so a task's accuracy
    never changes once it is trained.

    Prunable: the weight matrices and kernels of ``Linear`` and ``Conv`` layers outside ``net.head``. Biases,
    normalisation layers (their parameters and, by keeping them in eval mode, their running statistics) and any
    other parameter are trained on the first task only and frozen afterwards, as in the paper. The head: the paper
    gives each task its own classifier; in task-IL here the shared ``head`` masks the logits outside the task, so
    its rows of task ``t``'s outputs (weights and biases) are owned by ``t`` whole, trained during ``t`` only and
    never pruned (the rows of other tasks get no gradient from the masked loss anyway).

    Frozen weights stay bit-identical whatever the optimizer: gradients outside the task's trainable mask are
    zeroed in ``on_before_optimizer_step`` and, since momentum, Adam's moments and weight decay move a weight even
    with a zero gradient, the frozen values are written back after every optimizer step (``on_train_batch_end``;
    methods come before every other callback there, so checkpoints and periodic evaluations see restored weights).

    Where we follow the paper rather than its code: the pruned count is ``round(p |F_l|)`` by a stable sort of the
    magnitudes (the code prunes everything at or below the ``k``-th value, more with ties); the last task is pruned
    too, leaving capacity for tasks added later. Retraining is counted in epochs after the task's epochs (with
    ``steps_per_task``, one epoch is ``steps_per_task`` steps), so it is resumable like any epoch.

    Args:
        prune_ratio: Fraction of each layer's free weights released after each task, in (0, 1) (the paper: 0.5 or
            0.75).
        retrain_epochs: Epochs of retraining the kept weights after pruning, >= 0.
    """

    name: ClassVar[str] = "packnet"
    supported_scenarios: ClassVar[tuple[str, ...]] = ("task_il",)
    needs_task_boundaries: ClassVar[bool] = True
    gradient_edit: ClassVar[str | None] = "mask"

    def __init__(self, prune_ratio: float = 0.8, retrain_epochs: int = 1) -> None:
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, int | float) or not 0 < prune_ratio < 1:
            raise ConfigError(f"method.prune_ratio={prune_ratio!r}: must be a number in (0, 1), e.g. 0.75")
        if isinstance(retrain_epochs, bool) or not isinstance(retrain_epochs, int) or retrain_epochs < 0:
            raise ConfigError(f"method.retrain_epochs={retrain_epochs!r}: must be an integer >= 0")
        self.prune_ratio = float(prune_ratio)
        self.retrain_epochs = retrain_epochs
        self.owners: dict[str, Tensor] = {}  # owner map of every prunable weight and head parameter, by name
        self.prunable: list[str] = []
        self.pruned_task = -1  # the last task whose free weights were pruned
        # rebuilt on every fit: the task, its trainable masks (True: all, False: none), the frozen values
        self._task = 0
        self._params: dict[str, nn.Parameter] = {}
        self._masks: dict[str, Tensor | bool] = {}
        self._frozen: dict[str, Tensor] = {}
        self._norms: list[nn.Module] = []

    @override
    def extra_epochs(self) -> int:
        return self.retrain_epochs  # each task retrains its kept weights after pruning

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        net: nn.Module = pl_module.net  # type: ignore[assignment]
        self.prunable = prunable_weights(net, getattr(net, "head", None))
        if not self.prunable:
            raise ConfigError(
                f"method=packnet: model {type(net).__name__} has no Linear or Conv weights outside its head to prune; "
                "use a model such as model=mlp or model=cnn"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net: nn.Module = pl_module.net  # type: ignore[assignment]
        params = dict(net.named_parameters())
        if not self.owners:  # a fresh run (a resumed one has them from its checkpoint)
            self.owners = {n: torch.full(params[n].shape, FREE, dtype=OWNER_DTYPE) for n in self.prunable}
            head = getattr(net, "head", None)
            n_outputs = pl_module.output_masks.shape[1]  # type: ignore[union-attr]
            for name, p in head.named_parameters() if head is not None else ():
                if p.ndim >= 1 and p.shape[0] == n_outputs:
                    self.owners[f"head.{name}"] = row_owners(pl_module.output_masks, p.shape)  # type: ignore[arg-type]
        self.owners = {n: o.to(params[n].device) for n, o in self.owners.items()}
        self._params = params
        self._task = int(pl_module.current_task)  # type: ignore[arg-type]
        self._norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        self._refresh()

    def _refresh(self) -> None:
        """Trainable masks of the current task and the values every frozen weight must keep."""
        pruned = self.pruned_task >= self._task
        self._masks = {}
        for name in self._params:
            mask = trainable_mask(self.owners[name], self._task, pruned) if name in self.owners else self._task == 0
            # the first task's free weights are everything: no per-step work for them
            self._masks[name] = True if isinstance(mask, Tensor) and bool(mask.all()) else mask
        self._frozen = {n: self._params[n].detach().clone() for n, m in self._masks.items() if m is not True}

    def prune(self) -> None:
        """Prune the current task's free weights (idempotent: once per task)."""
        if self.pruned_task >= self._task:
            return
        with torch.no_grad():
            for name in self.prunable:
                p = self._params[name]
                self.owners[name] = magnitude_prune(p, self.owners[name], self._task, self.prune_ratio)
                p.masked_fill_(self.owners[name] == FREE, 0.0)  # released weights restart from 0 (the paper)
        self.pruned_task = self._task
        self._refresh()

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        self.prune()  # retrain_epochs=0: prune without retraining

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The task's last `retrain_epochs` epochs retrain; the epoch counter is the loop's, restored by a resume.
        # Checked before every batch, not in on_train_epoch_start: a run resumed from a checkpoint taken at the last
        # step of an epoch starts the next epoch without calling that hook.
        retraining_from = int(trainer.max_epochs or 0) - self.retrain_epochs
        if self.retrain_epochs and trainer.current_epoch >= retraining_from:
            self.prune()
        if self._task > 0:  # running statistics belong to the first task (training mode is reset by evaluations)
            for module in self._norms:
                module.eval()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in self._norms:  # back to the module's mode: the next fit starts with no module left in eval
            module.train(pl_module.training)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for name, mask in self._masks.items():
            grad = self._params[name].grad
            if grad is None or mask is True:
                continue
            if mask is False:
                grad.zero_()
            else:
                grad.mul_(mask)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        with torch.no_grad():
            for name, frozen in self._frozen.items():
                mask = self._masks[name]
                p = self._params[name]
                p.copy_(frozen if mask is False else torch.where(mask, p, frozen))  # type: ignore[arg-type]

    @override
    @contextmanager
    def task_view(self, pl_module: CLModule, task_id: int) -> Iterator[None]:
        if not self.owners:  # the initial evaluation: nothing trained, nothing to hide
            yield
            return
        params = dict(pl_module.net.named_parameters())
        free_visible = task_id >= int(pl_module.current_task)
        saved: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, owner in self.owners.items():
                p = params[name]
                hidden = ~visible_mask(owner.to(p.device), task_id, free_visible)
                saved[name] = p.detach().clone()
                p.masked_fill_(hidden, 0.0)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    @override
    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        done = int(pl_module.task_finished)
        if not self.owners or done < 0:
            return {}
        prunable = {n: self.owners[n] for n in self.prunable}
        return {
            "free_capacity": [round(free_fraction(prunable, t), 6) for t in range(done + 1)],
            "free_fraction": round(free_fraction(prunable, done), 6),
            "task_fraction": [round(owned_fraction(prunable, t), 6) for t in range(done + 1)],
            "prunable_weights": sum(o.numel() for o in prunable.values()),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"owners": {n: o.cpu() for n, o in self.owners.items()}, "pruned_task": self.pruned_task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "owners" in state_dict:
            self.owners = {n: o.clone() for n, o in state_dict["owners"].items()}
        self.pruned_task = int(state_dict.get("pruned_task", self.pruned_task))
