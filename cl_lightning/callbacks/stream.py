"""The accuracy matrix of an online stream: a row each time the stream passes a task's nominal end, inside the one
fit over the stream (the learner sees no boundary; only evaluation knows the true tasks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override


class StreamBoundaries(pl.Callback):
    """After the optimizer step at which the stream passes the end of task ``t`` (``steps[t]``), evaluate every
    task into row ``t`` of the accuracy matrix (and of the task-IL matrix in class-IL), mark task ``t`` finished,
    and call ``on_row(t)`` (the run writes ``results.json`` and ``last.ckpt`` there, as after a task's fit).

    Placed after the methods and before Lightning's ``ModelCheckpoint`` among the trainer's callbacks, so a
    checkpoint of that step holds the row. Evaluation is the task-end one (:meth:`CLModule.test_step`, eval mode,
    no gradients, every rank its shard of each test set, summed by the matrices).

    The steps come from :meth:`TaskSequenceDataModule.boundary_steps` for the run's number of processes.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.on_row: Callable[[int], None] | None = None
        self.eval_seconds = 0.0  # evaluation time inside the fit (the run subtracts it from training time)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps = trainer.datamodule.boundary_steps(trainer.world_size)  # type: ignore[attr-defined]

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        module: Any = pl_module
        step = trainer.global_step
        t = int(module.task_finished) + 1
        while t < len(self.steps) and step >= self.steps[t]:
            self._evaluate(trainer, module, t)
            module.task_finished.fill_(t)
            following = min(t + 1, len(self.steps) - 1)  # the nominal task the stream is in now
            module.current_task.fill_(following)
            module.task_started.fill_(following)
            if self.on_row is not None:
                self.on_row(t)
            t += 1

    def _evaluate(self, trainer: pl.Trainer, module: Any, row: int) -> None:
        # the task-end evaluation itself (CLModule.test_step fills row `eval_row`), without leaving the fit
        start = time.perf_counter()
        was_training, module.eval_row = module.training, row
        module.eval()
        with torch.no_grad():
            for j, loader in enumerate(trainer.datamodule.eval_dataloaders()):  # type: ignore[attr-defined]
                for i, batch in enumerate(loader):
                    module.test_step(batch._replace(x=batch.x.to(module.device), y=batch.y.to(module.device)), i, j)
        module.train(was_training)
        self.eval_seconds += time.perf_counter() - start
