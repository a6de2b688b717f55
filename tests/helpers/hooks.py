"""Test doubles for the module's extension points: a task-routed network and methods using the other hooks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from cl_lightning.methods.base import CLMethod


class TaskRoutedNet(nn.Module):
    """One linear classifier per task; ``forward(x, task_id)`` routes each sample to its task's classifier."""

    task_conditioned = True
    calls: ClassVar[list[Tensor]] = []

    def __init__(self, input_shape: Sequence[int], n_outputs: int, n_tasks: int) -> None:
        super().__init__()
        dim = int(torch.tensor(list(input_shape)).prod())
        self.heads = nn.ModuleList(nn.Linear(dim, n_outputs) for _ in range(n_tasks))
        self.head = self.heads[0]
        self.feature_dim = dim

    def features(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def forward(self, x: Tensor, task_id: Tensor | int) -> Tensor:
        tid = torch.as_tensor(task_id, device=x.device).expand(len(x))
        TaskRoutedNet.calls.append(tid.clone())
        out = torch.stack([head(x.flatten(1)) for head in self.heads], 1)
        return out[torch.arange(len(x)), tid]


class RecordingView(CLMethod):
    """Records the task of every evaluation view it is asked for, and whether a forward pass ran inside it."""

    name: ClassVar[str] = "recording_view"
    views: ClassVar[list[int]] = []

    @contextmanager
    def task_view(self, pl_module: Any, task_id: int) -> Iterator[None]:
        RecordingView.views.append(task_id)
        yield


class OwnObjective(CLMethod):
    """Replaces the task loss with a constant-gradient objective: training must then ignore the labels."""

    name: ClassVar[str] = "own_objective"

    def replaces_task_loss(self) -> bool:
        return True

    def loss_terms(self, pl_module: Any, batch: Any, logits: Tensor) -> dict[str, Tensor]:
        return {"zero": 0.0 * logits.sum()}


class OtherObjective(OwnObjective):
    name: ClassVar[str] = "other_objective"


class Reporting(CLMethod):
    """Reports how many tasks it has seen end, as a number and as a list."""

    name: ClassVar[str] = "reporting"

    def __init__(self) -> None:
        self.ended: list[int] = []

    def on_task_end(self, trainer: Any, pl_module: Any, task_id: int) -> None:
        self.ended.append(task_id)

    def diagnostics(self, pl_module: Any) -> dict[str, Any]:
        return {"tasks_ended": len(self.ended), "ended": list(self.ended)}


class ExtraEpochs(CLMethod):
    """Asks for two more epochs per task and counts the epochs each task trains."""

    name: ClassVar[str] = "extra_epochs"

    def __init__(self) -> None:
        self.epochs: dict[int, int] = {}

    def extra_epochs(self) -> int:
        return 2

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        t = int(pl_module.current_task)
        self.epochs[t] = self.epochs.get(t, 0) + 1


class BlowUpAtTask(pl.Callback):
    """Makes the network's weights NaN at the first step of task ``task``: the loss of that step is NaN."""

    def __init__(self, task: int) -> None:
        self.task = task

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if int(pl_module.current_task) == self.task:
            with torch.no_grad():
                next(pl_module.net.parameters()).fill_(float("nan"))


class OwnModel(CLMethod):
    """Trains a small model of its own in :meth:`auxiliary_step` (one SGD step per training step) and records, for
    each call, the step and whether the network's gradients were left as they were."""

    name: ClassVar[str] = "own_model"

    def __init__(self) -> None:
        self.model = nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.calls: list[tuple[int, bool]] = []

    def auxiliary_step(self, pl_module: Any, batch: Any) -> None:
        before = [None if p.grad is None else p.grad.clone() for p in pl_module.net.parameters()]
        loss = (self.model(torch.ones(1, 1)) - 1.0).pow(2).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        after = [p.grad for p in pl_module.net.parameters()]
        untouched = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after, before, strict=True))
        self.calls.append((int(pl_module.trainer.global_step), untouched))
