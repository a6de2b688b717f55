"""Tests of the pure continual-learning metrics against a loop-based numpy reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from cl_lightning.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer, summary

# ---------------------------------------------------------------------------------------------------------------------
# Reference: the papers' formulas written as plain loops, independent of the vectorised implementation.
# ---------------------------------------------------------------------------------------------------------------------


def ref_average_accuracy(r: np.ndarray) -> float:
    t = r.shape[0]
    return sum(r[t - 1, j] for j in range(t)) / t


def ref_forgetting(r: np.ndarray) -> float:
    t = r.shape[0]
    if t == 1:
        return 0.0
    return sum(max(r[row, j] for row in range(t - 1)) - r[t - 1, j] for j in range(t - 1)) / (t - 1)


def ref_backward_transfer(r: np.ndarray) -> float:
    t = r.shape[0]
    if t == 1:
        return 0.0
    return sum(r[t - 1, j] - r[j, j] for j in range(t - 1)) / (t - 1)


def ref_forward_transfer(r: np.ndarray, b: np.ndarray) -> float:
    t = r.shape[0]
    if t == 1:
        return 0.0
    return sum(r[j - 1, j] - b[j] for j in range(1, t)) / (t - 1)


def _as_kind(array: np.ndarray, kind: str) -> Any:
    if kind == "tensor":
        return torch.from_numpy(array).float()
    if kind == "list":
        return array.tolist()
    return array


@pytest.mark.parametrize("kind", ["tensor", "numpy", "list"])
@pytest.mark.parametrize("n_tasks", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_matrices_match_reference(seed: int, n_tasks: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    r = rng.random((n_tasks, n_tasks))
    b = rng.random(n_tasks)
    # float32 tensors lose precision on the way in; the reference sees the same rounded values.
    if kind == "tensor":
        r, b = r.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    matrix, baseline = _as_kind(r, kind), _as_kind(b, kind)

    assert average_accuracy(matrix) == pytest.approx(ref_average_accuracy(r), abs=1e-12)
    assert forgetting(matrix) == pytest.approx(ref_forgetting(r), abs=1e-12)
    assert backward_transfer(matrix) == pytest.approx(ref_backward_transfer(r), abs=1e-12)
    assert forward_transfer(matrix, baseline) == pytest.approx(ref_forward_transfer(r, b), abs=1e-12)
    assert summary(matrix, baseline) == pytest.approx(
        {
            "avg_acc": ref_average_accuracy(r),
            "forgetting": ref_forgetting(r),
            "bwt": ref_backward_transfer(r),
            "fwt": ref_forward_transfer(r, b),
        },
        abs=1e-12,
    )


@pytest.mark.parametrize("fn", [average_accuracy, forgetting, backward_transfer])
def test_returns_python_float(fn: Callable[[Any], float]) -> None:
    matrix = torch.rand(4, 4, dtype=torch.float64, requires_grad=True)
    assert type(fn(matrix)) is float
    assert type(fn(matrix.detach().numpy())) is float
    assert type(forward_transfer(matrix, torch.full((4,), 0.1))) is float


def test_perfect_no_forgetting() -> None:
    # Each task keeps the accuracy it reached when trained; untrained tasks sit at chance (0.1) below it.
    final = np.array([0.9, 0.8, 0.95, 0.7])
    r = np.full((4, 4), 0.1)
    for i in range(4):
        r[i, : i + 1] = final[: i + 1]
    assert forgetting(r) == 0.0
    assert backward_transfer(r) == 0.0
    assert average_accuracy(r) == pytest.approx(final.mean())
    assert forward_transfer(r, np.full(4, 0.1)) == pytest.approx(0.0)


@pytest.mark.parametrize("n_tasks", [2, 3, 7])
def test_naive_fine_tuning_forgets_everything(n_tasks: int) -> None:
    r = np.eye(n_tasks)  # perfect on the task just trained, zero on all others
    assert forgetting(r) == 1.0
    assert backward_transfer(r) == -1.0
    assert average_accuracy(r) == pytest.approx(1 / n_tasks)
    assert forward_transfer(r, np.zeros(n_tasks)) == 0.0


def test_forgetting_max_includes_rows_before_the_task_was_trained() -> None:
    # Task 1 scores 0.6 before it is trained (row 0), 0.4 when trained (row 1), 0.4 at the end. Chaudhry et al.
    # take the max over all earlier rows, so the untrained 0.6 counts: f_1 = 0.6 - 0.4 = 0.2; BWT sees 0.
    r = [
        [1.0, 0.6, 0.0],
        [1.0, 0.4, 0.0],
        [1.0, 0.4, 1.0],
    ]
    assert forgetting(r) == pytest.approx((0.0 + 0.2) / 2)
    assert backward_transfer(r) == pytest.approx(0.0)


def test_improvement_gives_negative_forgetting_and_positive_bwt() -> None:
    r = [[0.5, 0.0], [0.7, 0.9]]
    assert forgetting(r) == pytest.approx(-0.2)
    assert backward_transfer(r) == pytest.approx(0.2)


@pytest.mark.parametrize("kind", ["tensor", "numpy", "list"])
def test_single_task(kind: str) -> None:
    matrix = _as_kind(np.array([[0.75]]), kind)
    assert average_accuracy(matrix) == 0.75
    assert forgetting(matrix) == 0.0
    assert backward_transfer(matrix) == 0.0
    assert forward_transfer(matrix, _as_kind(np.array([0.5]), kind)) == 0.0
    assert summary(matrix) == {"avg_acc": 0.75, "forgetting": 0.0, "bwt": 0.0, "fwt": None}


def test_summary_without_baseline_has_fwt_none() -> None:
    r = [[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.9]]
    result = summary(r)
    assert set(result) == {"avg_acc", "forgetting", "bwt", "fwt"}
    assert result["fwt"] is None
    assert summary(r, [0.1, 0.05, 0.2])["fwt"] == pytest.approx(0.075)


def test_inputs_are_not_modified() -> None:
    matrix = torch.rand(3, 3)
    before = matrix.clone()
    summary(matrix, torch.rand(3))
    assert torch.equal(matrix, before)


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], r"square 2-D .*\(2, 3\)"),
        ([0.5, 0.5], r"square 2-D .*\(2,\)"),
        (np.full((2, 2, 2), 0.5), r"square 2-D .*\(2, 2, 2\)"),
        (0.5, r"square 2-D .*\(\)"),
        (np.zeros((0, 0)), "empty"),
        ([[0.5, 0.5], [0.5]], "numeric and rectangular"),
        ([["a", "b"], ["c", "d"]], "numeric and rectangular"),
        ([[0.5, float("nan")], [0.5, 0.5]], r"non-finite value nan at index \[0, 1\].*evaluate"),
        (torch.tensor([[0.5, 0.5], [float("inf"), 0.5]]), r"non-finite value inf at index \[1, 0\]"),
        ([[0.5, 0.5], [0.5, 95.0]], r"95\.0 at index \[1, 1\], outside \[0, 1\].*percentages"),
        ([[-0.1, 0.5], [0.5, 0.5]], r"-0\.1 at index \[0, 0\], outside \[0, 1\]"),
    ],
)
@pytest.mark.parametrize("fn", [average_accuracy, forgetting, backward_transfer, summary])
def test_invalid_matrix_raises(fn: Callable[[Any], Any], matrix: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(matrix)


@pytest.mark.parametrize(
    ("baseline", "match"),
    [
        ([0.1, 0.1], r"length T=3.*\(2,\)"),
        ([[0.1, 0.1, 0.1]], r"length T=3.*\(1, 3\)"),
        ([0.1, 1.5, 0.1], r"baseline has the value 1\.5 at index \[1\], outside \[0, 1\]"),
        ([0.1, float("nan"), 0.1], r"baseline has the non-finite value nan at index \[1\]"),
    ],
)
def test_invalid_baseline_raises(baseline: Any, match: str) -> None:
    r = np.full((3, 3), 0.5)
    with pytest.raises(ValueError, match=match):
        forward_transfer(r, baseline)
    with pytest.raises(ValueError, match=match):
        summary(r, baseline)


def test_single_task_still_validates_baseline() -> None:
    with pytest.raises(ValueError, match="length T=1"):
        forward_transfer([[0.5]], [0.1, 0.2])


def test_hand_example_from_docs() -> None:
    # The worked example of docs/metrics.md, computed by hand there.
    r = [[0.8, 0.1, 0.2], [0.85, 0.9, 0.3], [0.6, 0.7, 0.9]]
    b = [0.1, 0.1, 0.1]
    assert average_accuracy(r) == pytest.approx(2.2 / 3)
    assert forgetting(r) == pytest.approx((0.25 + 0.2) / 2)
    assert backward_transfer(r) == pytest.approx((-0.2 - 0.2) / 2)
    assert forward_transfer(r, b) == pytest.approx((0.0 + 0.2) / 2)
