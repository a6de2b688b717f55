"""A callback that kills its own process with SIGKILL at a given step: preemption, as a test can stage it."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    """SIGKILL the process right after optimizer step ``step`` (before that step's checkpoint can be written).

    Args:
        step: The optimizer step (Lightning's global step).
        seed: Only in the run with this seed (the one ``seed_everything`` set): in a sweep of seeds run one after
            another in one process, the jobs before it finish and it is killed (``None``: any run).
    """

    def __init__(self, step: int, seed: int | None = None) -> None:
        self.step, self.seed = step, seed

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        chosen = self.seed is None or os.environ.get("PL_GLOBAL_SEED") == str(self.seed)
        if trainer.global_step == self.step and chosen:
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAtStep(pl.Callback):
    """Raise ``KeyboardInterrupt`` (a Ctrl-C, in-process) right after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt
