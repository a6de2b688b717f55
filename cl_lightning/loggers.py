"""A TensorBoard logger that keeps one event file for the whole task sequence."""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


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
