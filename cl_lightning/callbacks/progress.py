"""A progress bar that says which task is training: ``task 3/5 · epoch 2/10``."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


class TaskProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, labelled with the task and the epoch within it.

    Args:
        n_tasks: Number of tasks in the sequence.
        epochs_per_task: Epochs per task (1 when training a fixed number of steps per task).
        refresh_rate: Batches between refreshes.
    """

    def __init__(self, n_tasks: int, epochs_per_task: int, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.n_tasks, self.epochs_per_task = n_tasks, epochs_per_task

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: object) -> None:
        super().on_train_epoch_start(trainer, *args)
        task = trainer.current_epoch // self.epochs_per_task
        epoch = trainer.current_epoch % self.epochs_per_task
        desc = f"task {task + 1}/{self.n_tasks}"
        if self.epochs_per_task > 1:
            desc += f" · epoch {epoch + 1}/{self.epochs_per_task}"
        self.train_progress_bar.set_description(desc)
