"""Named batches: methods read fields by name, never by position."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    """A batch of samples of a task sequence.

    Attributes:
        x: Inputs, ``[B, C, H, W]``; ``uint8`` on the host, ``float`` once the datamodule prepared it on the device.
        y: Labels in the scenario's label space (see :mod:`cl_lightning.data.scenarios`).
        task_id: Task of each sample; ``-1`` where the scenario hides it (online stream, class- and domain-IL).
        index: Position of each sample in its task's training (or evaluation) split, for methods that store
            per-sample data.
    """

    x: Tensor
    y: Tensor
    task_id: Tensor
    index: Tensor
