"""Continual-learning metrics: the ``AccuracyMatrix`` torchmetrics state and pure functions of the matrix."""

from cl_lightning.metrics.accuracy_matrix import AccuracyMatrix
from cl_lightning.metrics.functional import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    summary,
)

__all__ = [
    "AccuracyMatrix",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "summary",
]
