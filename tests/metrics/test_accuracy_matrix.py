"""Tests of the AccuracyMatrix torchmetrics state: counting, NaN cells, distributed sums and checkpoints."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cl_lightning.metrics import AccuracyMatrix, backward_transfer, summary


def _batch(seed: int, size: int = 32, n_classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(size, n_classes, generator=generator)
    target = torch.randint(0, n_classes, (size,), generator=generator)
    return logits, target


def _ref_counts(batches: list[tuple[torch.Tensor, torch.Tensor, int, int]], n_tasks: int) -> tuple[Any, Any]:
    """Numpy reference: correct and total counts per cell."""
    correct = np.zeros((n_tasks, n_tasks), dtype=np.int64)
    total = np.zeros((n_tasks, n_tasks), dtype=np.int64)
    for preds, target, i, j in batches:
        labels = preds.numpy().argmax(axis=1) if preds.ndim == 2 else preds.numpy()
        correct[i, j] += int((labels == target.numpy()).sum())
        total[i, j] += len(target)
    return correct, total


@pytest.mark.parametrize("n_tasks", [0, -1, 2.0, True, "3"])
def test_invalid_n_tasks(n_tasks: Any) -> None:
    with pytest.raises(ValueError, match="n_tasks must be an integer >= 1"):
        AccuracyMatrix(n_tasks=n_tasks)


def test_update_with_logits_counts_exactly() -> None:
    metric = AccuracyMatrix(n_tasks=3)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 1, 2])  # argmax is [0, 1, 2, 0]: two correct
    metric.update(logits, target, train_task=1, eval_task=2)
    expected = torch.zeros(3, 3, dtype=torch.long)
    expected[1, 2] = 2
    assert torch.equal(metric.correct, expected)
    expected[1, 2] = 4
    assert torch.equal(metric.total, expected)
    assert metric.compute()[1, 2].item() == 0.5


def test_update_with_labels_counts_exactly() -> None:
    metric = AccuracyMatrix(n_tasks=2)
    metric.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), train_task=0, eval_task=0)
    metric.update(torch.tensor([0, 0]), torch.tensor([0, 1]), train_task=0, eval_task=0)
    assert metric.correct[0, 0].item() == 3
    assert metric.total[0, 0].item() == 5
    assert metric.compute()[0, 0].item() == pytest.approx(0.6)


def test_random_batches_match_numpy_reference() -> None:
    n_tasks = 4
    rng = np.random.default_rng(0)
    batches = []
    for k in range(30):
        preds, target = _batch(k, size=int(rng.integers(1, 40)))
        if k % 3 == 0:
            preds = preds.argmax(dim=1)  # mix label and logit batches
        batches.append((preds, target, int(rng.integers(n_tasks)), int(rng.integers(n_tasks))))
    metric = AccuracyMatrix(n_tasks=n_tasks)
    for preds, target, i, j in batches:
        metric.update(preds, target, train_task=i, eval_task=j)
    correct, total = _ref_counts(batches, n_tasks)
    np.testing.assert_array_equal(metric.correct.numpy(), correct)
    np.testing.assert_array_equal(metric.total.numpy(), total)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(total > 0, correct / total, np.nan)
    np.testing.assert_allclose(metric.compute().numpy(), expected, rtol=1e-6, equal_nan=True)


def test_empty_cells_are_nan() -> None:
    metric = AccuracyMatrix(n_tasks=3)
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), train_task=0, eval_task=1)
    result = metric.compute()
    assert result.dtype.is_floating_point
    assert result.shape == (3, 3)
    nan = torch.isnan(result)
    assert not nan[0, 1]
    assert int(nan.sum()) == 8
    assert result[0, 1].item() == 1.0


def test_empty_batch_counts_nothing() -> None:
    metric = AccuracyMatrix(n_tasks=1)
    metric.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), train_task=0, eval_task=0)
    assert metric.total.sum().item() == 0
    assert torch.isnan(metric.compute()).all()


def test_row_helper() -> None:
    metric = AccuracyMatrix(n_tasks=2)
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]), train_task=1, eval_task=0)
    row = metric.row(1)
    assert row.shape == (2,)
    assert row[0].item() == 0.5
    assert torch.isnan(row[1])
    with pytest.raises(ValueError, match="train_task=2 is out of range"):
        metric.row(2)


@pytest.mark.parametrize(
    ("train_task", "eval_task", "match"),
    [
        (3, 0, r"train_task=3 is out of range.*n_tasks=3"),
        (-1, 0, r"train_task=-1 is out of range"),
        (0, 3, r"eval_task=3 is out of range"),
        (0.0, 0, r"train_task must be an integer task index in \[0, 2\]"),
        (0, True, r"eval_task must be an integer task index.*bool"),
        (0, torch.tensor(0.0), r"eval_task must be an integer task index"),
    ],
)
def test_invalid_task_indices(train_task: Any, eval_task: Any, match: str) -> None:
    metric = AccuracyMatrix(n_tasks=3)
    with pytest.raises(ValueError, match=match):
        metric.update(torch.tensor([0]), torch.tensor([0]), train_task=train_task, eval_task=eval_task)


def test_integer_like_task_indices_are_accepted() -> None:
    metric = AccuracyMatrix(n_tasks=3)
    metric.update(torch.tensor([0]), torch.tensor([0]), train_task=np.int64(2), eval_task=torch.tensor(1))
    assert metric.total[2, 1].item() == 1


@pytest.mark.parametrize(
    ("preds", "target", "match"),
    [
        (torch.tensor([0.2, 0.9]), torch.tensor([0, 1]), r"logits \[B, C\] or integer labels \[B\]"),
        (torch.zeros(2, 3, 4), torch.tensor([0, 1]), r"got shape \(2, 3, 4\)"),
        (torch.tensor([0, 1]), torch.tensor([[0, 1]]), "target must be a 1-D tensor of integer labels"),
        (torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), "target must be a 1-D tensor of integer labels"),
        (torch.tensor([0, 1, 1]), torch.tensor([0, 1]), "different numbers of samples: 3 vs 2"),
        (torch.zeros(3, 4), torch.tensor([0, 1]), "different numbers of samples: 3 vs 2"),
    ],
)
def test_invalid_preds_or_target(preds: torch.Tensor, target: torch.Tensor, match: str) -> None:
    metric = AccuracyMatrix(n_tasks=2)
    with pytest.raises(ValueError, match=match):
        metric.update(preds, target, train_task=0, eval_task=0)


def test_update_after_compute_invalidates_the_cache() -> None:
    metric = AccuracyMatrix(n_tasks=1)
    metric.update(torch.tensor([0, 0]), torch.tensor([0, 1]), train_task=0, eval_task=0)
    assert metric.compute()[0, 0].item() == 0.5
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 1]), train_task=0, eval_task=0)
    assert metric.compute()[0, 0].item() == 0.75


def test_filled_row_by_row_over_a_task_sequence_without_reset() -> None:
    # Accuracy after task i on task j is given exactly by (a number of correct labels out of 10).
    n_tasks = 3
    hits = np.array([[9, 1, 2], [6, 8, 3], [5, 7, 9]])
    metric = AccuracyMatrix(n_tasks=n_tasks)
    target = torch.zeros(10, dtype=torch.long)
    for i in range(n_tasks):
        for j in range(n_tasks):
            preds = (torch.arange(10) >= hits[i, j]).long()  # the first hits[i, j] predictions are right
            for half in (preds[:5], preds[5:]):  # two test batches per task
                metric.update(half, target[:5], train_task=i, eval_task=j)
        result = metric.compute()  # computed mid-sequence, as a task-end callback would
        np.testing.assert_allclose(result[: i + 1].numpy(), hits[: i + 1] / 10, rtol=1e-6)
        assert torch.isnan(result[i + 1 :]).all()
    assert backward_transfer(metric.compute()) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2, abs=1e-6)
    assert summary(metric.compute())["avg_acc"] == pytest.approx(0.7, abs=1e-6)


def test_single_task_matrix_keeps_its_shape() -> None:
    # torchmetrics squeezes one-element compute() results to 0-d; a 1 x 1 matrix must stay 2-D, also after cloning.
    metric = AccuracyMatrix(n_tasks=1)
    metric.update(torch.tensor([1, 0]), torch.tensor([1, 1]), train_task=0, eval_task=0)
    assert summary(metric.compute()) == {"avg_acc": 0.5, "forgetting": 0.0, "bwt": 0.0, "fwt": None}
    for candidate in (metric, metric.clone(), pickle.loads(pickle.dumps(metric))):
        result = candidate.compute()
        assert result.shape == (1, 1)
        assert result[0, 0].item() == 0.5
        assert candidate.row(0).shape == (1,)
        assert candidate(torch.tensor([1]), torch.tensor([1]), train_task=0, eval_task=0).shape == (1, 1)


def test_forward_call_returns_the_batch_matrix_and_accumulates() -> None:
    metric = AccuracyMatrix(n_tasks=2)
    metric.update(torch.tensor([0, 0]), torch.tensor([0, 0]), train_task=0, eval_task=0)
    batch_value = metric(torch.tensor([1, 0]), torch.tensor([1, 1]), train_task=0, eval_task=0)
    assert batch_value[0, 0].item() == 0.5
    assert metric.compute()[0, 0].item() == 0.75


@pytest.mark.parametrize("use_dict", [False, True])
def test_merge_of_disjoint_halves_equals_the_whole(use_dict: bool) -> None:
    # What the sum reduction does across two DDP processes, each seeing half of every test set.
    n_tasks = 3
    whole, rank0, rank1 = (AccuracyMatrix(n_tasks=n_tasks) for _ in range(3))
    for k, (i, j) in enumerate((i, j) for i in range(n_tasks) for j in range(n_tasks)):
        logits, target = _batch(k, size=21)  # odd size: the halves differ in length
        whole.update(logits, target, train_task=i, eval_task=j)
        rank0.update(logits[:10], target[:10], train_task=i, eval_task=j)
        rank1.update(logits[10:], target[10:], train_task=i, eval_task=j)
    rank0.merge_state(rank1.metric_state if use_dict else rank1)
    assert torch.equal(rank0.correct, whole.correct)
    assert torch.equal(rank0.total, whole.total)
    torch.testing.assert_close(rank0.compute(), whole.compute())


# torchmetrics warns when compute() runs on a metric whose counts were loaded rather than updated; harmless here.
_LOADED_COMPUTE = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric AccuracyMatrix:UserWarning")


def _filled(n_tasks: int = 3) -> AccuracyMatrix:
    metric = AccuracyMatrix(n_tasks=n_tasks)
    for k in range(n_tasks):
        logits, target = _batch(k)
        metric.update(logits, target, train_task=k, eval_task=n_tasks - 1 - k)
    return metric


@_LOADED_COMPUTE
def test_state_dict_round_trip_into_a_fresh_metric() -> None:
    metric = _filled()
    state = metric.state_dict()
    assert set(state) == {"correct", "total"}

    restored = AccuracyMatrix(n_tasks=3)
    restored.load_state_dict(state)
    assert torch.equal(restored.correct, metric.correct)
    assert torch.equal(restored.total, metric.total)
    torch.testing.assert_close(restored.compute(), metric.compute(), equal_nan=True)

    # Accumulation continues after a resume, and the loaded dict is not written through.
    saved_total = state["total"].clone()
    restored.update(torch.tensor([0]), torch.tensor([0]), train_task=2, eval_task=2)
    assert restored.total[2, 2].item() == metric.total[2, 2].item() + 1
    assert torch.equal(state["total"], saved_total)


def test_load_state_dict_drops_a_cached_compute() -> None:
    metric = AccuracyMatrix(n_tasks=2)
    metric.update(torch.tensor([0]), torch.tensor([1]), train_task=0, eval_task=0)
    assert metric.compute()[0, 0].item() == 0.0  # now cached
    metric.load_state_dict(_filled(2).state_dict())
    torch.testing.assert_close(metric.compute(), _filled(2).compute(), equal_nan=True)


def test_load_state_dict_with_other_n_tasks_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match=r"expected counts of shape \(2, 2\) \(n_tasks=2\), got \(3, 3\)"):
        AccuracyMatrix(n_tasks=2).load_state_dict(_filled(3).state_dict())


def test_strict_load_reports_missing_counts() -> None:
    with pytest.raises(RuntimeError, match="Missing key"):
        AccuracyMatrix(n_tasks=2).load_state_dict({})
    AccuracyMatrix(n_tasks=2).load_state_dict({}, strict=False)


class _Holder(nn.Module):
    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.acc_matrix = AccuracyMatrix(n_tasks=n_tasks)


@_LOADED_COMPUTE
def test_states_are_in_the_state_dict_of_a_module_and_survive_a_checkpoint() -> None:
    module = _Holder(3)
    module.acc_matrix = _filled(3)
    state = module.state_dict()
    assert {"acc_matrix.correct", "acc_matrix.total"} <= set(state)

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # the checkpoint format the project requires

    fresh = _Holder(3)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.acc_matrix.correct, module.acc_matrix.correct)
    assert torch.equal(fresh.acc_matrix.total, module.acc_matrix.total)
    torch.testing.assert_close(fresh.acc_matrix.compute(), module.acc_matrix.compute(), equal_nan=True)


def test_reset_clears_the_counts() -> None:
    metric = _filled()
    metric.reset()
    assert metric.total.sum().item() == 0
    assert metric.correct.dtype == torch.long
