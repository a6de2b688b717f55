"""A progress bar that says which task is training and its loss: ``task 3/5 · epoch 2/10 ... loss=0.312``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch import Tensor
from typing_extensions import override


class TaskProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, labelled with the task and the epoch within it, showing the training loss.

    Each task's training bar stays on screen with its last loss; the evaluation bars (every task's test set after
    each task) disappear once done, so the console holds one line per task and the run's own summary.

    Args:
        n_tasks: Number of tasks in the sequence.
        epochs_per_task: Epochs per task (1 when training a fixed number of steps per task).
        refresh_rate: Batches between refreshes.
        loss_every: Batches between readings of the loss (on an accelerator each reading waits for the device).
    """

    def __init__(self, n_tasks: int, epochs_per_task: int, refresh_rate: int = 1, loss_every: int = 10) -> None:
        super().__init__(refresh_rate=refresh_rate)
        if loss_every < 1:
            raise ValueError(f"loss_every={loss_every}: must be >= 1")
        self.n_tasks, self.epochs_per_task, self.loss_every = n_tasks, epochs_per_task, loss_every
        self._loss: float | None = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: object) -> None:
        super().on_train_epoch_start(trainer, *args)
        task = trainer.current_epoch // self.epochs_per_task
        epoch = trainer.current_epoch % self.epochs_per_task
        desc = f"task {task + 1}/{self.n_tasks}"
        if self.epochs_per_task > 1:
            desc += f" · epoch {epoch + 1}/{self.epochs_per_task}"
        self.train_progress_bar.set_description(desc)

    @override
    def init_test_tqdm(self) -> Tqdm:
        bar = super().init_test_tqdm()
        bar.leave = False  # Lightning leaves every test bar on screen: one per evaluation of the sequence
        return bar

    def record_loss(self, outputs: Any, batch_idx: int) -> None:
        """Keep the training step's loss (``training_step``'s output) every ``loss_every`` batches."""
        if batch_idx % self.loss_every:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._loss = float(loss.detach())

    def loss_postfix(self) -> dict[str, str]:
        """``{"loss": "0.312"}`` once a loss was read, else empty."""
        return {} if self._loss is None else {"loss": f"{self._loss:.3g}"}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record_loss(outputs, batch_idx)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number says nothing here
        return metrics | self.loss_postfix()
