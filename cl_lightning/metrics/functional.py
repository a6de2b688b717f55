"""The summary metrics of continual learning, as pure functions of the accuracy matrix.

The accuracy matrix ``R`` of a run over ``T`` tasks is ``T x T``: ``R[i, j]`` is the accuracy (a fraction in
``[0, 1]``) on the test set of task ``j`` after training on task ``i``, 0-indexed. Every cell must be measured, so
the evaluation protocol is that of GEM: after each task, evaluate on the test sets of *all* ``T`` tasks, including
those not trained yet (forward transfer needs ``R[j - 1, j]``).

Definitions (see ``docs/metrics.md`` for the derivations and a worked example):

- average accuracy (GEM, Lopez-Paz & Ranzato 2017): ``ACC = mean_j R[T-1, j]``
- forgetting (RWalk, Chaudhry et al. 2018): ``F = mean_{j < T-1} (max_{l < T-1} R[l, j] - R[T-1, j])``
- backward transfer (GEM): ``BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])``
- forward transfer (GEM): ``FWT = mean_{j >= 1} (R[j-1, j] - b[j])`` with ``b[j]`` the accuracy of the randomly
  initialised model on task ``j``

Each function accepts a ``torch.Tensor``, a ``numpy`` array or a nested list, computes in float64 on the CPU and
returns a Python ``float``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "summary"]

MatrixLike = Tensor | np.ndarray | Sequence[Sequence[float]]
VectorLike = Tensor | np.ndarray | Sequence[float]


def _to_float64(value: MatrixLike | VectorLike, name: str) -> Tensor:
    """Convert a tensor, array or nested list to a float64 CPU tensor, with a readable error if that fails."""
    if isinstance(value, Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric and rectangular (a tensor, array or nested list): {err}") from err
    return torch.from_numpy(array)


def _check_fractions(values: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming the first cell of ``values`` that is not a finite fraction in ``[0, 1]``."""
    bad = ~torch.isfinite(values)
    if bad.any():
        index = tuple(torch.nonzero(bad)[0].tolist())
        raise ValueError(
            f"{name} has the non-finite value {values[index].item()} at index {list(index)}: every cell must be "
            "measured (evaluate the test sets of all T tasks after training each task, as in GEM)"
        )
    bad = (values < 0) | (values > 1)
    if bad.any():
        index = tuple(torch.nonzero(bad)[0].tolist())
        raise ValueError(
            f"{name} has the value {values[index].item()} at index {list(index)}, outside [0, 1]: accuracies are "
            "fractions (divide percentages by 100)"
        )


def _as_matrix(accuracy_matrix: MatrixLike) -> Tensor:
    """Validate an accuracy matrix and return it as a ``T x T`` float64 CPU tensor.

    Raises:
        ValueError: If it is not numeric, not square 2-D, empty, or has a cell that is not a finite value in
            ``[0, 1]``.
    """
    matrix = _to_float64(accuracy_matrix, "accuracy matrix")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"accuracy matrix must be square 2-D (T x T), got shape {tuple(matrix.shape)}")
    if matrix.shape[0] == 0:
        raise ValueError("accuracy matrix is empty (0 x 0): it needs at least one task")
    _check_fractions(matrix, "accuracy matrix")
    return matrix


def _as_baseline(baseline: VectorLike, n_tasks: int) -> Tensor:
    """Validate a random-initialisation baseline and return it as a float64 CPU vector of length ``n_tasks``.

    Raises:
        ValueError: If it is not a 1-D vector of length ``n_tasks`` of finite values in ``[0, 1]``.
    """
    vector = _to_float64(baseline, "baseline")
    if vector.ndim != 1 or vector.shape[0] != n_tasks:
        raise ValueError(
            f"baseline must be a 1-D vector with one accuracy per task (length T={n_tasks}), "
            f"got shape {tuple(vector.shape)}"
        )
    _check_fractions(vector, "baseline")
    return vector


def average_accuracy(accuracy_matrix: MatrixLike) -> float:
    """Average accuracy over all tasks after training the last one (GEM, Lopez-Paz & Ranzato 2017).

    ``ACC = 1/T * sum_j R[T-1, j]``.

    Args:
        accuracy_matrix: ``T x T`` accuracies in ``[0, 1]``; ``R[i, j]`` is task ``j``'s test accuracy after
            training task ``i``.

    Returns:
        The mean of the last row.

    Raises:
        ValueError: If the matrix is not square 2-D or has a value that is not finite in ``[0, 1]``.

    Example:
        >>> R = [[0.9, 0.1, 0.2],
        ...      [0.6, 0.8, 0.3],
        ...      [0.5, 0.7, 0.9]]
        >>> round(average_accuracy(R), 6)  # (0.5 + 0.7 + 0.9) / 3
        0.7
    """
    matrix = _as_matrix(accuracy_matrix)
    return matrix[-1].mean().item()


def forgetting(accuracy_matrix: MatrixLike) -> float:
    """Average forgetting of the first ``T - 1`` tasks (RWalk, Chaudhry et al. 2018).

    ``F = 1/(T-1) * sum_{j=0}^{T-2} (max_{l=0}^{T-2} R[l, j] - R[T-1, j])``: for each task but the last, the best
    accuracy it ever had before the last task was trained, minus its final accuracy. As in the paper's
    ``f_j^k = max_{l in 1..k-1} a_{l,j} - a_{k,j}``, the maximum runs over *all* earlier rows, including rows
    ``l < j`` measured before task ``j`` was trained. The last task cannot have been forgotten yet and is left out.

    Args:
        accuracy_matrix: ``T x T`` accuracies in ``[0, 1]``; ``R[i, j]`` is task ``j``'s test accuracy after
            training task ``i``.

    Returns:
        The average forgetting, in ``[-1, 1]`` (negative when the final accuracy beats every earlier one);
        ``0.0`` when ``T == 1``.

    Raises:
        ValueError: If the matrix is not square 2-D or has a value that is not finite in ``[0, 1]``.

    Example:
        >>> R = [[0.9, 0.1, 0.2],
        ...      [0.6, 0.8, 0.3],
        ...      [0.5, 0.7, 0.9]]
        >>> round(forgetting(R), 6)  # ((0.9 - 0.5) + (0.8 - 0.7)) / 2
        0.25
    """
    matrix = _as_matrix(accuracy_matrix)
    if matrix.shape[0] == 1:
        return 0.0
    best_before_last = matrix[:-1, :-1].amax(dim=0)
    return (best_before_last - matrix[-1, :-1]).mean().item()


def backward_transfer(accuracy_matrix: MatrixLike) -> float:
    """Backward transfer: how training later tasks changed the earlier ones (GEM, Lopez-Paz & Ranzato 2017).

    ``BWT = 1/(T-1) * sum_{j=0}^{T-2} (R[T-1, j] - R[j, j])``: final accuracy minus the accuracy just after
    training, averaged over all tasks but the last. Negative values are forgetting.

    Args:
        accuracy_matrix: ``T x T`` accuracies in ``[0, 1]``; ``R[i, j]`` is task ``j``'s test accuracy after
            training task ``i``.

    Returns:
        The backward transfer, in ``[-1, 1]``; ``0.0`` when ``T == 1``.

    Raises:
        ValueError: If the matrix is not square 2-D or has a value that is not finite in ``[0, 1]``.

    Example:
        >>> R = [[0.9, 0.1, 0.2],
        ...      [0.6, 0.8, 0.3],
        ...      [0.5, 0.7, 0.9]]
        >>> round(backward_transfer(R), 6)  # ((0.5 - 0.9) + (0.7 - 0.8)) / 2
        -0.25
    """
    matrix = _as_matrix(accuracy_matrix)
    if matrix.shape[0] == 1:
        return 0.0
    return (matrix[-1, :-1] - matrix.diagonal()[:-1]).mean().item()


def forward_transfer(accuracy_matrix: MatrixLike, baseline: VectorLike) -> float:
    """Forward transfer: how training earlier tasks helps a task not yet seen (GEM, Lopez-Paz & Ranzato 2017).

    ``FWT = 1/(T-1) * sum_{j=1}^{T-1} (R[j-1, j] - b[j])``, with ``b[j]`` (the paper's ``b_j``) the test accuracy
    on task ``j`` of the model at random initialisation. ``b[0]`` is accepted but unused.

    Args:
        accuracy_matrix: ``T x T`` accuracies in ``[0, 1]``; ``R[i, j]`` is task ``j``'s test accuracy after
            training task ``i``.
        baseline: length-``T`` accuracies in ``[0, 1]`` of the randomly initialised model on each task.

    Returns:
        The forward transfer, in ``[-1, 1]``; ``0.0`` when ``T == 1``.

    Raises:
        ValueError: If the matrix is not square 2-D, the baseline does not have length ``T``, or either has a
            value that is not finite in ``[0, 1]``.

    Example:
        >>> R = [[0.9, 0.1, 0.2],
        ...      [0.6, 0.8, 0.3],
        ...      [0.5, 0.7, 0.9]]
        >>> round(forward_transfer(R, baseline=[0.1, 0.05, 0.2]), 6)  # ((0.1 - 0.05) + (0.3 - 0.2)) / 2
        0.075
    """
    matrix = _as_matrix(accuracy_matrix)
    base = _as_baseline(baseline, matrix.shape[0])
    if matrix.shape[0] == 1:
        return 0.0
    return (matrix.diagonal(offset=1) - base[1:]).mean().item()


def summary(accuracy_matrix: MatrixLike, baseline: VectorLike | None = None) -> dict[str, float | None]:
    """All four metrics of an accuracy matrix, keyed for logging.

    Args:
        accuracy_matrix: ``T x T`` accuracies in ``[0, 1]``; ``R[i, j]`` is task ``j``'s test accuracy after
            training task ``i``.
        baseline: optional length-``T`` accuracies of the randomly initialised model; without it forward transfer
            cannot be computed and ``fwt`` is ``None``.

    Returns:
        ``{"avg_acc": ..., "forgetting": ..., "bwt": ..., "fwt": ...}``.

    Raises:
        ValueError: As the individual functions.

    Example:
        >>> R = [[0.9, 0.1, 0.2],
        ...      [0.6, 0.8, 0.3],
        ...      [0.5, 0.7, 0.9]]
        >>> {k: None if v is None else round(v, 6) for k, v in summary(R).items()}
        {'avg_acc': 0.7, 'forgetting': 0.25, 'bwt': -0.25, 'fwt': None}
    """
    matrix = _as_matrix(accuracy_matrix)
    return {
        "avg_acc": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": None if baseline is None else forward_transfer(matrix, baseline),
    }
