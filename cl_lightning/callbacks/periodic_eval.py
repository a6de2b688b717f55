"""Accuracy on every task during training, every ``n`` optimizer steps: the forgetting curve at fine grain, and the
anytime accuracy of online continual learning."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from cl_lightning.loggers import log_metrics


class PeriodicEvaluation(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, evaluate every task, keep the row and log ``eval_curve/task_j``.

    The task-end accuracy matrix is unaffected: this is a separate, read-only pass (the network in eval mode, no
    gradients, no RNG drawn, BatchNorm statistics untouched). Correct and total counts are summed over processes
    under DDP, so the curve is that of the whole (or the subsampled) test set.

    What it keeps (its ``state_dict``, so a resumed run continues the curve) goes to ``results.json``
    (:meth:`results`): ``anytime.step`` (the steps evaluated), ``anytime.acc_matrix`` (a row per evaluation, a
    column per task), ``task_start_step`` (the optimizer steps taken before each task began: its fit's first step;
    on an online stream the step at which the stream reaches the task's nominal start) and ``avg_anytime_acc``: the
    mean over evaluations of the mean accuracy over the tasks whose start is at or before the evaluation's step
    (the anytime accuracy of Caccia et al. 2022, "New Insights on Reducing Abrupt Representation Change in Online
    Continual Learning").

    Args:
        every_n_steps: Steps between evaluations.
        max_samples_per_task: Evaluate at most this many test samples per task (the first ones), to keep it cheap.
    """

    def __init__(self, every_n_steps: int, max_samples_per_task: int | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"eval_every_n_steps={every_n_steps}: must be >= 1 (or null to turn it off)")
        self.every_n_steps, self.max_samples_per_task = every_n_steps, max_samples_per_task
        self.steps: list[int] = []
        self.rows: list[list[float]] = []
        self.task_start_step: list[int | None] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm: Any = trainer.datamodule  # type: ignore[attr-defined]
        if len(self.task_start_step) < dm.n_tasks:
            self.task_start_step += [None] * (dm.n_tasks - len(self.task_start_step))
        if dm.stream == "online":
            self.task_start_step = list(dm.task_start_steps(trainer.world_size))
            return
        t = int(pl_module.current_task)  # type: ignore[arg-type]
        if self.task_start_step[t] is None:  # not on a resume in the middle of the task
            self.task_start_step[t] = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
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
        row = [float(c / t) if t > 0 else 0.0 for c, t in counts.tolist()]
        self.steps.append(step)
        self.rows.append(row)
        log_metrics(trainer, {f"eval_curve/task_{j}": acc for j, acc in enumerate(row)}, step)

    def results(self) -> dict[str, Any]:
        """The ``results.json`` keys of the curve (see the class docstring); empty before the first evaluation."""
        if not self.rows:
            return {}
        means = []
        for step, row in zip(self.steps, self.rows, strict=True):
            started = [row[t] for t, s in enumerate(self.task_start_step) if s is not None and s <= step]
            means.append(sum(started) / len(started) if started else 0.0)
        return {
            "anytime": {"step": list(self.steps), "acc_matrix": [list(r) for r in self.rows]},
            "task_start_step": list(self.task_start_step),
            "avg_anytime_acc": sum(means) / len(means),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "rows": [list(r) for r in self.rows], "starts": list(self.task_start_step)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state_dict.get("steps", [])]
        self.rows = [[float(v) for v in r] for r in state_dict.get("rows", [])]
        self.task_start_step = [None if s is None else int(s) for s in state_dict.get("starts", [])]
