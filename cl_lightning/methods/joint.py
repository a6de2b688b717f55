"""Joint training: the upper bound of every continual-learning table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from cl_lightning.methods.base import CLMethod


class Joint(CLMethod):
    """Train on the union of every task seen so far (Lopez-Paz & Ranzato 2017's "joint"/"iid" upper bound).

    At task ``t`` the training data is ``D_1 u ... u D_t``, shuffled together, so the last row of the accuracy
    matrix is that of a model trained on all tasks at once (in the same number of epochs per task, or steps per
    task with ``steps_per_task``). It is not a continual method (it stores every sample) and needs task boundaries.
    """

    name: ClassVar[str] = "joint"
    needs_task_boundaries: ClassVar[bool] = True

    @override
    def training_tasks(self, task_id: int) -> Sequence[int]:
        return range(task_id + 1)
