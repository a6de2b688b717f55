"""The accuracy matrix of a continual-learning run as a torchmetrics ``Metric``."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["AccuracyMatrix"]


def _task_index(value: Any, name: str, n_tasks: int) -> int:
    """Return ``value`` as a task index in ``[0, n_tasks)`` or raise a ``ValueError`` that says what is wrong."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer task index in [0, {n_tasks - 1}], got the bool {value}")
    try:
        index = operator.index(value)  # int, numpy integer or 0-d integer tensor
    except TypeError as err:
        raise ValueError(f"{name} must be an integer task index in [0, {n_tasks - 1}], got {value!r}") from err
    if not 0 <= index < n_tasks:
        raise ValueError(f"{name}={index} is out of range: this AccuracyMatrix has n_tasks={n_tasks} (0-indexed)")
    return index


class AccuracyMatrix(Metric):
    """Accuracy on every task's test set after training each task: the ``T x T`` matrix ``R``.

    ``R[i, j] = correct[i, j] / total[i, j]`` is the test accuracy on task ``j`` after training task ``i``
    (0-indexed), the object from which GEM (Lopez-Paz & Ranzato 2017) defines average accuracy, backward and
    forward transfer and RWalk (Chaudhry et al. 2018) defines forgetting; see
    :mod:`cl_lightning.metrics.functional`.

    The state is two ``T x T`` int64 count matrices, sum-reduced across processes and persistent, so a checkpoint
    holds the whole matrix and a run can be resumed mid-sequence. Counts rather than fractions make the
    distributed reduction exact whatever the shard sizes. The metric is meant to be filled row by row over the
    whole task sequence without ``reset()``: after training task ``i``, call ``update(..., train_task=i,
    eval_task=j)`` for every test batch of every task ``j``. Cells never updated compute to NaN.

    Args:
        n_tasks: number of tasks ``T`` in the sequence, at least 1.
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Raises:
        ValueError: If ``n_tasks`` is not an integer >= 1.

    Example:
        >>> import torch
        >>> metric = AccuracyMatrix(n_tasks=2)
        >>> metric.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]), train_task=0, eval_task=0)
        >>> metric.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), train_task=0, eval_task=1)
        >>> metric.compute()
        tensor([[0.7500, 0.5000],
                [   nan,    nan]])
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    correct: Tensor
    total: Tensor

    def __init__(self, n_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be an integer >= 1 (the number of tasks), got {n_tasks!r}")
        self.n_tasks = n_tasks
        for name in ("correct", "total"):
            self.add_state(
                name, default=torch.zeros(n_tasks, n_tasks, dtype=torch.long), dist_reduce_fx="sum", persistent=True
            )

    def update(self, preds: Tensor, target: Tensor, train_task: int, eval_task: int) -> None:
        """Count the correct predictions of one batch into cell ``[train_task, eval_task]``.

        Args:
            preds: logits or scores ``[B, C]`` (the arg-max is the prediction) or integer labels ``[B]``.
            target: integer labels ``[B]``.
            train_task: index of the last task trained, the row.
            eval_task: index of the task whose test set ``preds`` come from, the column.

        Raises:
            ValueError: If a task index is not an integer in ``[0, n_tasks)`` or the shapes or dtypes of ``preds``
                and ``target`` do not fit.
        """
        row = _task_index(train_task, "train_task", self.n_tasks)
        col = _task_index(eval_task, "eval_task", self.n_tasks)
        if target.ndim != 1 or target.is_floating_point() or target.is_complex():
            raise ValueError(
                f"target must be a 1-D tensor of integer labels, got shape {tuple(target.shape)} and {target.dtype}"
            )
        if preds.ndim == 2:
            labels = preds.argmax(dim=1)
        elif preds.ndim == 1 and not (preds.is_floating_point() or preds.is_complex()):
            labels = preds
        else:
            # A 1-D float tensor is ambiguous (binary probabilities? labels cast to float?), so it is refused.
            raise ValueError(
                f"preds must be logits [B, C] or integer labels [B], got shape {tuple(preds.shape)} and {preds.dtype}"
            )
        if labels.shape[0] != target.shape[0]:
            raise ValueError(
                f"preds and target hold different numbers of samples: {labels.shape[0]} vs {target.shape[0]}"
            )
        # Tensor counts added in place: no host sync per batch on an accelerator.
        self.correct[row, col] += (labels == target).sum().to(self.correct.device)
        self.total[row, col] += target.shape[0]

    def compute(self) -> Tensor:
        """Return the accuracy matrix.

        Returns:
            Float ``T x T`` tensor of fractions in ``[0, 1]``; NaN in cells with no sample yet.
        """
        fractions = self.correct.float() / self.total.clamp(min=1).float()
        return torch.where(self.total > 0, fractions, torch.full_like(fractions, float("nan")))

    def row(self, train_task: int) -> Tensor:
        """Return row ``train_task`` of :meth:`compute`: every task's accuracy after training that task.

        Args:
            train_task: index of the row.

        Returns:
            Float vector of length ``T``; NaN where no sample was counted.

        Raises:
            ValueError: If ``train_task`` is not an integer in ``[0, n_tasks)``.
        """
        return self.compute()[_task_index(train_task, "train_task", self.n_tasks)]

    def _wrap_compute(self, compute: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """Keep the ``T x T`` shape that torchmetrics' compute wrapper squeezes away when ``T == 1``.

        ``Metric._wrap_compute`` squeezes any one-element result to 0-d, which would turn a one-task matrix into a
        scalar. Overriding this hook (as torchmetrics' own ``CompositionalMetric`` does) rather than re-wrapping
        ``self.compute`` in ``__init__`` survives ``clone()`` and pickling, which wrap ``compute`` again.
        """
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def keep_matrix_shape(*args: Any, **kwargs: Any) -> Tensor:
            return wrapped(*args, **kwargs).reshape(self.n_tasks, self.n_tasks)

        return keep_matrix_shape

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Copy the counts in place, checking their shape, and drop any cached ``compute()`` result.

        ``Metric._load_from_state_dict`` assigns the checkpoint's tensor object as the state: it keeps the
        checkpoint's device, aliases the caller's dict (later updates would write into it), accepts any shape and
        leaves a previously cached ``compute()`` value in place, so a metric loaded after a ``compute()`` would
        return the old matrix. Copying in place, as ``nn.Module`` does for buffers, avoids all four.
        """
        for name in ("correct", "total"):
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            current: Tensor = getattr(self, name)
            if not isinstance(value, Tensor) or value.shape != current.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                error_msgs.append(
                    f"{key}: expected counts of shape {tuple(current.shape)} (n_tasks={self.n_tasks}), got {shape}; "
                    "build the AccuracyMatrix with the n_tasks of the checkpoint"
                )
                continue
            with torch.no_grad():
                current.copy_(value)
        # torchmetrics caches compute(); new counts invalidate it, exactly as update() does.
        self._computed = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
