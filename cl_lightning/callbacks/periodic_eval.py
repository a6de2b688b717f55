"""Accuracy on every task during training, every ``n`` optimizer steps: the forgetting curve at fine grain."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override


class PeriodicEvaluation(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, evaluate every task and log ``eval_curve/task_j`` to the logger.

    The task-end accuracy matrix is unaffected: this is a separate, read-only pass (the network in eval mode, no
    gradients, no RNG drawn, BatchNorm statistics untouched). Correct and total counts are summed over processes
    under DDP, so the curve is that of the whole test set.

    Args:
        every_n_steps: Steps between evaluations.
        max_samples_per_task: Evaluate at most this many test samples per task (the first ones), to keep it cheap.
    """

    def __init__(self, every_n_steps: int, max_samples_per_task: int | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"eval_every_n_steps={every_n_steps}: must be >= 1 (or null to turn it off)")
        self.every_n_steps, self.max_samples_per_task = every_n_steps, max_samples_per_task

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or trainer.logger is None:
            return
        dm = trainer.datamodule  # type: ignore[attr-defined]
        was_training = pl_module.training
        pl_module.eval()
        counts = torch.zeros(len(dm.tasks), 2, dtype=torch.float64, device=pl_module.device)
        with torch.no_grad():
            for j, loader in enumerate(dm.eval_dataloaders()):
                seen = 0
                for batch in loader:
                    if self.max_samples_per_task is not None and seen >= self.max_samples_per_task:
                        break
                    x, y = batch.x.to(pl_module.device), batch.y.to(pl_module.device)
                    logits, _ = pl_module.eval_logits(x, j)  # type: ignore[operator]
                    counts[j, 0] += (logits.argmax(1) == y).sum()
                    counts[j, 1] += len(y)
                    seen += len(y)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        pl_module.train(was_training)
        metrics = {f"eval_curve/task_{j}": float(c / t) for j, (c, t) in enumerate(counts.tolist()) if t > 0}
        trainer.logger.log_metrics(metrics, step=step)
