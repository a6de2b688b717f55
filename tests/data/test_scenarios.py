"""Tests of the pure scenario builders in cl_lightning.data.scenarios, on tiny tensors whose pixels name the sample."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as tvf

from cl_lightning.data.scenarios import (
    Task,
    carve_validation,
    check_scenario,
    online_stream_order,
    permutations,
    resolve_class_order,
    resolve_task_order,
    rotation_angles,
    split_by_class,
    transform_tasks,
)
from cl_lightning.errors import ConfigError

N_CLASSES = 6
SHUFFLED_ORDER = [3, 0, 5, 1, 4, 2]


def _labelled(n_classes: int, per_class: int, start: int = 0) -> tuple[Tensor, Tensor]:
    """Samples ``[N, 1, 1, 1]`` whose only pixel is the sample's id (``start + i``), classes interleaved."""
    n = n_classes * per_class
    x = torch.arange(start, start + n).view(n, 1, 1, 1)
    y = torch.arange(n) % n_classes
    return x, y


def _split(scenario: str, class_order: list[int], n_tasks: int = 3) -> tuple[list[Task], int]:
    """Split a 6-class dataset with 7 train and 3 test samples per class (ids 0..41 and 1000..1017)."""
    train_x, train_y = _labelled(N_CLASSES, 7)
    test_x, test_y = _labelled(N_CLASSES, 3, start=1000)
    tasks, n_outputs = split_by_class(
        train_x, train_y, test_x, test_y, N_CLASSES, n_tasks, scenario, class_order
    )  # fmt: skip
    return tasks, n_outputs


def _class_of(x: Tensor) -> Tensor:
    """The original class of samples built by :func:`_labelled` (test ids start at 1000)."""
    ids = x.flatten()
    return torch.where(ids >= 1000, ids - 1000, ids) % N_CLASSES


# ---------------------------------------------------------------------------------------------------- split_by_class
@pytest.mark.parametrize("scenario", ["class_il", "task_il"])
@pytest.mark.parametrize("class_order", [list(range(N_CLASSES)), SHUFFLED_ORDER])
def test_split_labels_are_positions_in_class_order(scenario: str, class_order: list[int]) -> None:
    tasks, n_outputs = _split(scenario, class_order)
    assert n_outputs == N_CLASSES
    k = N_CLASSES // 3
    for t, task in enumerate(tasks):
        assert task.task_id == t
        assert torch.equal(task.outputs, torch.arange(t * k, (t + 1) * k))
        for x, y in ((task.train_x, task.train_y), (task.test_x, task.test_y)):
            original = _class_of(x)
            expected = torch.tensor([class_order.index(c) for c in original.tolist()])
            assert torch.equal(y, expected)
            assert torch.isin(y, task.outputs).all()
            # the task holds exactly the classes class_order assigns to it
            assert set(original.tolist()) == set(class_order[t * k : (t + 1) * k])


def test_split_tasks_partition_the_dataset() -> None:
    tasks, _ = _split("class_il", SHUFFLED_ORDER)
    train_ids = torch.cat([t.train_x.flatten() for t in tasks]).sort().values
    test_ids = torch.cat([t.test_x.flatten() for t in tasks]).sort().values
    assert torch.equal(train_ids, torch.arange(N_CLASSES * 7))
    assert torch.equal(test_ids, torch.arange(1000, 1000 + N_CLASSES * 3))
    assert [len(t.train_y) for t in tasks] == [2 * 7] * 3
    assert [len(t.test_y) for t in tasks] == [2 * 3] * 3


def test_split_domain_il_shares_one_head() -> None:
    tasks, n_outputs = _split("domain_il", SHUFFLED_ORDER)
    k = N_CLASSES // 3
    assert n_outputs == k
    for t, task in enumerate(tasks):
        assert torch.equal(task.outputs, torch.arange(k))
        original = _class_of(task.train_x)
        expected = torch.tensor([SHUFFLED_ORDER.index(c) - t * k for c in original.tolist()])
        assert torch.equal(task.train_y, expected)
        assert ((task.train_y >= 0) & (task.train_y < k)).all()
        assert ((task.test_y >= 0) & (task.test_y < k)).all()
    # both positions inside a group are used, so the head is not degenerate
    assert set(torch.cat([t.train_y for t in tasks]).tolist()) == set(range(k))


@pytest.mark.parametrize("n_tasks", [4, 5, 0])
def test_split_n_tasks_not_dividing_classes_names_key_and_divisors(n_tasks: int) -> None:
    with pytest.raises(ConfigError, match=rf"dataset\.n_tasks={n_tasks}\b.*\[1, 2, 3, 6\]"):
        _split("class_il", list(range(N_CLASSES)), n_tasks=n_tasks)


# ---------------------------------------------------------------------------------------------------- orders
@pytest.mark.parametrize("natural", [None, "natural"])
def test_class_order_natural(natural: str | None) -> None:
    assert resolve_class_order(natural, 7, seed=3) == list(range(7))


def test_class_order_random_is_seeded_permutation() -> None:
    a, b, c = (resolve_class_order("random", 10, seed=s) for s in (0, 0, 1))
    assert sorted(a) == list(range(10))
    assert a == b
    assert a != c
    assert a != list(range(10))


def test_class_order_explicit_is_kept() -> None:
    assert resolve_class_order(SHUFFLED_ORDER, N_CLASSES, seed=0) == SHUFFLED_ORDER
    assert resolve_class_order((1, 0), 2, seed=0) == [1, 0]


@pytest.mark.parametrize("bad", [[0, 0, 1, 2], [0, 1, 2], [0, 1, 2, 4], [0, 1, 2, 3, 3], "sorted"])
def test_class_order_invalid_names_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.class_order"):
        resolve_class_order(bad, 4, seed=0)  # type: ignore[arg-type]


def test_task_order_variants() -> None:
    assert resolve_task_order(None, 4, seed=0) == [0, 1, 2, 3]
    assert resolve_task_order("natural", 4, seed=0) == [0, 1, 2, 3]
    assert resolve_task_order("reverse", 4, seed=0) == [3, 2, 1, 0]
    assert resolve_task_order([2, 0, 3, 1], 4, seed=0) == [2, 0, 3, 1]
    a, b, c = (resolve_task_order("random", 10, seed=s) for s in (5, 5, 6))
    assert sorted(a) == list(range(10))
    assert a == b
    assert a != c


@pytest.mark.parametrize("bad", ["shuffle", [0, 0, 1], [0, 1], [1, 2, 3]])
def test_task_order_invalid_names_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.task_order"):
        resolve_task_order(bad, 3, seed=0)  # type: ignore[arg-type]


def test_check_scenario() -> None:
    assert check_scenario("task_il") == "task_il"
    with pytest.raises(ConfigError, match=r"dataset\.scenario='online_il'.*class_il, task_il, domain_il"):
        check_scenario("online_il")
    with pytest.raises(ConfigError, match=r"choose one of class_il$"):
        check_scenario("task_il", supported=("class_il",))


# ---------------------------------------------------------------------------------------------------- permutations
def test_permutations_are_seeded_true_permutations() -> None:
    a, b, c = (permutations(4, 50, seed=s) for s in (0, 0, 1))
    assert len(a) == 4
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    for p in a:
        assert torch.equal(p.sort().values, torch.arange(50))
    assert torch.equal(a[0], torch.arange(50))
    assert not torch.equal(a[1], c[1])
    assert not torch.equal(a[1], a[2])


def test_permutations_identity_first_optional() -> None:
    perms = permutations(2, 50, seed=0, identity_first=False)
    assert not torch.equal(perms[0], torch.arange(50))
    assert torch.equal(perms[1], permutations(2, 50, seed=0)[1])


@pytest.mark.parametrize(("scenario", "n_outputs"), [("domain_il", 3), ("task_il", 9), ("class_il", 9)])
def test_transform_tasks_permute(scenario: str, n_outputs: int) -> None:
    gen = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (8, 1, 3, 3), generator=gen, dtype=torch.uint8)
    test_x = torch.randint(0, 256, (5, 1, 3, 3), generator=gen, dtype=torch.uint8)
    train_y, test_y = torch.arange(8) % 3, torch.arange(5) % 3
    perms = permutations(3, 9, seed=2)
    tasks, got = transform_tasks(
        train_x, train_y, test_x, test_y, 3, scenario, [("permute", p) for p in perms]
    )  # fmt: skip
    assert got == n_outputs
    for t, task in enumerate(tasks):
        offset = 0 if scenario == "domain_il" else 3 * t
        assert torch.equal(task.outputs, torch.arange(offset, offset + 3))
        assert torch.equal(task.train_y, train_y + offset)
        assert torch.equal(task.test_y, test_y + offset)
        for flat in range(9):
            # pixel `flat` of the permuted image is pixel perm[flat] of the original
            src = int(perms[t][flat])
            assert torch.equal(task.test_x.flatten(1)[:, flat], test_x.flatten(1)[:, src])
    assert torch.equal(tasks[0].train_x, train_x)


def test_transform_tasks_rotate_90_is_counter_clockwise() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 2, 5, 5), generator=gen, dtype=torch.uint8)
    y = torch.arange(6) % 2
    tasks, n_outputs = transform_tasks(x, y, x, y, 2, "domain_il", [("rotate", 0.0), ("rotate", 90.0)])
    assert n_outputs == 2
    assert torch.equal(tasks[0].train_x, x)
    assert torch.equal(tasks[1].train_x, torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(tasks[1].test_x, tvf.rotate(x, 90.0, interpolation=tvf.InterpolationMode.BILINEAR))
    # counter-clockwise: the top-right pixel moves to the top-left
    assert torch.equal(tasks[1].train_x[..., 0, 0], x[..., 0, -1])
    assert torch.equal(tasks[1].train_y, y)
    assert "90 deg" in tasks[1].description


# ---------------------------------------------------------------------------------------------------- validation
def _task(n: int = 50, task_id: int = 0) -> Task:
    x = torch.arange(n).view(n, 1, 1, 1)
    return Task(task_id, x, torch.arange(n) * 10, x[:2], torch.zeros(2), torch.arange(2))


def test_carve_validation_disjoint_and_sized() -> None:
    task = _task(50)
    carve_validation(task, 0.2, seed=0)
    assert task.val_x is not None and task.val_y is not None
    assert len(task.val_y) == 10 and len(task.train_y) == 40
    val_ids, train_ids = set(task.val_x.flatten().tolist()), set(task.train_x.flatten().tolist())
    assert not val_ids & train_ids
    assert val_ids | train_ids == set(range(50))
    # labels travel with their inputs
    assert torch.equal(task.val_y, task.val_x.flatten() * 10)
    assert torch.equal(task.train_y, task.train_x.flatten() * 10)


def test_carve_validation_seeded_per_seed_and_task() -> None:
    def val_ids(seed: int, task_id: int = 0) -> list[int]:
        task = _task(50, task_id)
        carve_validation(task, 0.2, seed=seed)
        assert task.val_x is not None
        return task.val_x.flatten().tolist()

    assert val_ids(0) == val_ids(0)
    assert val_ids(0) != val_ids(1)
    assert val_ids(0, task_id=0) != val_ids(0, task_id=1)


def test_carve_validation_small_fraction_keeps_one_sample() -> None:
    task = _task(10)
    carve_validation(task, 0.01, seed=0)
    assert task.val_y is not None and len(task.val_y) == 1 and len(task.train_y) == 9


def test_carve_validation_zero_is_noop() -> None:
    task = _task(10)
    carve_validation(task, 0.0, seed=0)
    assert task.val_x is None and task.val_y is None
    assert len(task.train_y) == 10


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_carve_validation_invalid_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.val_fraction"):
        carve_validation(_task(), fraction, seed=0)


# ---------------------------------------------------------------------------------------------------- online stream
def _task_of(order: Tensor, sizes: list[int]) -> Tensor:
    """Task of each stream position."""
    owner = torch.cat([torch.full((s,), t) for t, s in enumerate(sizes)])
    return owner[order]


@pytest.mark.parametrize("blur", [0.0, 0.3, 1.0])
def test_online_stream_is_a_seeded_permutation(blur: float) -> None:
    sizes = [30, 50, 20]
    order = online_stream_order(sizes, blur, seed=0)
    assert torch.equal(order.sort().values, torch.arange(100))
    assert torch.equal(order, online_stream_order(sizes, blur, seed=0))
    assert not torch.equal(order, online_stream_order(sizes, blur, seed=1))


def test_online_stream_without_blur_keeps_tasks_contiguous() -> None:
    sizes = [30, 50, 20]
    owner = _task_of(online_stream_order(sizes, 0.0, seed=0), sizes)
    assert torch.equal(owner, torch.cat([torch.full((s,), t) for t, s in enumerate(sizes)]))


def test_online_stream_blur_mixes_only_near_boundaries() -> None:
    sizes = [1000, 1000]
    owner = _task_of(online_stream_order(sizes, 0.2, seed=0), sizes)
    first_of_task1 = int(owner.nonzero()[0])
    last_of_task0 = int((owner == 0).nonzero()[-1])
    # keys of task 1 are >= 1 - 0.2/2 and a fraction 1 - 0.2/2 of task 0's keys lie below that, so about 900
    # task-0 samples (binomial, sd ~10) precede every task-1 sample; symmetrically at the end. A blur twice or half
    # as wide moves these positions by about 100 or 50.
    assert 850 <= first_of_task1 <= 940
    assert 1060 <= last_of_task0 <= 1150


@pytest.mark.parametrize("blur", [-0.1, 1.5])
def test_online_stream_invalid_blur(blur: float) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.blur"):
        online_stream_order([3, 3], blur, seed=0)


# ---------------------------------------------------------------------------------------------------- rotation angles
def test_rotation_angles_default_spreads_evenly_in_increasing_order() -> None:
    assert rotation_angles(None, 4, seed=0) == [0.0, 45.0, 90.0, 135.0]


def test_rotation_angles_explicit_list_is_kept() -> None:
    assert rotation_angles([10, 200.5], 2, seed=0) == [10.0, 200.5]


def test_rotation_angles_uniform_is_seeded_and_in_range() -> None:
    # Mammoth's rot-mnist (Buzzega et al. 2020): each task's angle drawn uniformly from [0, 180)
    angles = rotation_angles("uniform", 20, seed=3)
    assert len(angles) == 20 and all(0.0 <= a < 180.0 for a in angles)
    assert angles == rotation_angles("uniform", 20, seed=3), "the same seed draws the same angles"
    assert angles != rotation_angles("uniform", 20, seed=4), "another seed, other angles"
    assert angles != sorted(angles), "drawn independently, not spread in order"
    assert len(set(angles)) == 20


@pytest.mark.parametrize(
    ("angles", "message"),
    [("random", r"dataset\.angles='random'"), ([0.0, 90.0, 45.0], r"dataset\.angles has 3 values")],
)
def test_rotation_angles_invalid(angles: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rotation_angles(angles, 2, seed=0)  # type: ignore[arg-type]
