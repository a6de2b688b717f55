"""A TensorBoard logger that keeps one event file for the whole task sequence, and logging to every logger of a run.

A run may have several loggers (``logger=[tensorboard,csv]``); Lightning's ``trainer.logger`` is only the first of
them, so everything the run logs itself goes through :func:`log_metrics`, which writes to all of
``trainer.loggers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class HasLoggers(Protocol):
    """A ``Trainer`` or a ``LightningModule``: both list the run's loggers."""

    @property
    def loggers(self) -> list[Logger]: ...


def log_metrics(holder: HasLoggers, metrics: Mapping[str, Any], step: int) -> None:
    """Write ``metrics`` at ``step`` to every logger of the run (none: nothing)."""
    for logger in holder.loggers:
        logger.log_metrics(dict(metrics), step=step)


class SequenceTensorBoardLogger(TensorBoardLogger):
    """Lightning's ``TensorBoardLogger``, but ``finalize`` flushes instead of closing.

    A run calls ``trainer.fit`` once per task and Lightning finalizes the logger at the end of each fit; closing the
    writer there makes the next task open a new event file, and TensorBoard, which reads files in name order, would
    then see steps out of order (and may purge them as orphaned). ``close()`` ends the run's single file.
    """

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.flush()
        self.save()

    @rank_zero_only
    def close(self) -> None:
        """Flush and close the event file (the end of the run)."""
        if self._experiment is not None:
            self._experiment.close()
        self.save()
