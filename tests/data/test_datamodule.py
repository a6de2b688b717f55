"""Tests of TaskSequenceDataModule, TensorBatchLoader and random_crop_flip on the synthetic blobs (10 classes,
40 train and 10 test samples per class, ``[1, 4, 4]`` uint8 images)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers.synthetic import blobs
from torch import Tensor
from torchvision.transforms.v2 import functional as tvf

from cl_lightning.data import scenarios
from cl_lightning.data.batch import Batch
from cl_lightning.data.datamodule import TaskSequenceDataModule, random_crop_flip
from cl_lightning.data.loader import TensorBatchLoader
from cl_lightning.data.scenarios import permutations
from cl_lightning.errors import ConfigError

N_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 40, 10


def make_dm(**kwargs: Any) -> TaskSequenceDataModule:
    """A set-up datamodule on blobs; five split tasks of two classes unless overridden."""
    kwargs = {"n_tasks": 5, "batch_size": 16, "eval_batch_size": 7, **kwargs}
    dm = TaskSequenceDataModule(source=blobs, name="blobs", **kwargs)
    dm.setup("fit")
    return dm


def collect(loader: TensorBatchLoader) -> Batch:
    """Concatenate every batch of one pass, field by field."""
    batches = list(loader)
    return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in Batch._fields))


def rows(x: Tensor) -> list[tuple[int, ...]]:
    """The samples of ``x`` as a sorted list of tuples: a multiset to compare splits by content."""
    return sorted(map(tuple, x.flatten(1).tolist()))


# ---------------------------------------------------------------------------------------------------- shapes, outputs
@pytest.mark.parametrize(
    ("bench", "scenario", "n_outputs"),
    [
        ("split", "class_il", 10),
        ("split", "task_il", 10),
        ("split", "domain_il", 2),
        ("permuted", "class_il", 30),
        ("permuted", "task_il", 30),
        ("permuted", "domain_il", 10),
        ("rotated", "domain_il", 10),
    ],
)
def test_outputs_per_scenario(bench: str, scenario: str, n_outputs: int) -> None:
    # not named `benchmark`: pytest-benchmark owns that fixture name
    n_tasks = 5 if bench == "split" else 3
    dm = make_dm(benchmark=bench, scenario=scenario, n_tasks=n_tasks)
    assert dm.input_shape == (1, 4, 4)
    assert dm.n_outputs == n_outputs
    assert len(dm.task_outputs) == n_tasks
    k = n_outputs // n_tasks if scenario != "domain_il" else n_outputs
    for t, outputs in enumerate(dm.task_outputs):
        offset = 0 if scenario == "domain_il" else t * k
        assert torch.equal(outputs, torch.arange(offset, offset + k))


def test_setup_is_idempotent() -> None:
    dm = make_dm()
    tasks = dm.tasks
    dm.setup("test")
    assert dm.tasks is tasks


# ---------------------------------------------------------------------------------------------------- training loader
def test_set_task_switches_training_data() -> None:
    dm = make_dm()
    for t in range(5):
        dm.set_task(t)
        assert dm.current_task == t
        got = collect(dm.train_dataloader())
        assert torch.isin(got.y, dm.task_outputs[t]).all()
        # one pass over the task, each sample once, with its own label
        assert torch.equal(got.index.sort().values, torch.arange(2 * TRAIN_PER_CLASS))
        assert torch.equal(got.x, dm.tasks[t].train_x[got.index])
        assert torch.equal(got.y, dm.tasks[t].train_y[got.index])
    with pytest.raises(ValueError, match="task_id"):
        dm.set_task(5)


def test_cumulative_serves_all_tasks_so_far() -> None:
    dm = make_dm(cumulative=True, scenario="task_il")
    dm.set_task(2)
    got = collect(dm.train_dataloader())
    assert len(got.y) == sum(len(t.train_y) for t in dm.tasks[:3]) == 3 * 2 * TRAIN_PER_CLASS
    assert set(got.y.tolist()) == set(range(6))
    assert torch.bincount(got.task_id).tolist() == [2 * TRAIN_PER_CLASS] * 3
    assert rows(got.x) == rows(torch.cat([t.train_x for t in dm.tasks[:3]]))


def test_batches_are_named() -> None:
    dm = make_dm()
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch)
    assert Batch._fields == ("x", "y", "task_id", "index")
    assert batch.x.dtype == torch.uint8 and batch.x.shape == (16, 1, 4, 4)
    assert batch.y.shape == batch.task_id.shape == batch.index.shape == (16,)


@pytest.mark.parametrize(("scenario", "visible"), [("class_il", False), ("domain_il", False), ("task_il", True)])
def test_task_id_hidden_unless_task_il(scenario: str, visible: bool) -> None:
    dm = make_dm(scenario=scenario)
    dm.set_task(3)
    assert dm.task_ids_visible is visible
    got = collect(dm.train_dataloader())
    assert (got.task_id == (3 if visible else -1)).all()


def test_steps_per_task_gives_full_batches_beyond_one_pass() -> None:
    dm = make_dm(steps_per_task=12)  # 80 samples per task: 5 batches of 16 per pass
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 12
    assert all(len(b.y) == 16 for b in batches)
    # the first pass still sees every sample exactly once
    first_pass = torch.cat([b.index for b in batches[:5]])
    assert torch.equal(first_pass.sort().values, torch.arange(80))


def test_steps_per_task_with_batch_larger_than_task() -> None:
    dm = make_dm(steps_per_task=3, batch_size=200)
    batches = list(dm.train_dataloader())
    assert [len(b.y) for b in batches] == [200, 200, 200]


def test_max_samples_per_task_caps_to_a_subset() -> None:
    full = make_dm()
    dm = make_dm(max_samples_per_task=25)
    for t in range(5):
        assert len(dm.tasks[t].train_y) == 25
        assert set(rows(dm.tasks[t].train_x)) <= set(rows(full.tasks[t].train_x))
        assert len(dm.tasks[t].test_y) == len(full.tasks[t].test_y)
    dm.set_task(1)
    assert len(collect(dm.train_dataloader()).y) == 25


def test_task_order_reverse_renumbers_tasks() -> None:
    natural = make_dm()
    dm = make_dm(task_order="reverse")
    assert [t.task_id for t in dm.tasks] == list(range(5))
    assert torch.equal(dm.task_outputs[0], natural.task_outputs[4])
    assert torch.equal(dm.tasks[0].test_x, natural.tasks[4].test_x)


# ---------------------------------------------------------------------------------------------------- evaluation
def test_eval_dataloaders_cover_each_test_sample_once() -> None:
    dm = make_dm(scenario="task_il")
    loaders = dm.eval_dataloaders()
    assert len(loaders) == 5
    assert len(dm.test_dataloader()) == 5
    for t, loader in enumerate(loaders):
        got = collect(loader)
        assert len(loader) == -(-2 * TEST_PER_CLASS // 7)
        assert torch.equal(got.x, dm.tasks[t].test_x)
        assert torch.equal(got.y, dm.tasks[t].test_y)
        assert torch.equal(got.index, torch.arange(2 * TEST_PER_CLASS))
        assert (got.task_id == t).all()


def test_eval_split_val_serves_validation_split() -> None:
    dm = make_dm(val_fraction=0.25, eval_split="val")
    for task, loader in zip(dm.tasks, dm.eval_dataloaders(), strict=True):
        assert task.val_x is not None
        assert len(task.val_y) == 20 and len(task.train_y) == 60  # type: ignore[arg-type]
        assert torch.equal(collect(loader).x, task.val_x)
    test_loaders = dm.eval_dataloaders("test")
    assert torch.equal(collect(test_loaders[0]).x, dm.tasks[0].test_x)


# ---------------------------------------------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("scenario", ["domain_il", "task_il", "class_il"])
def test_permuted_tasks_permute_pixels(scenario: str) -> None:
    source = blobs()
    dm = make_dm(benchmark="permuted", scenario=scenario, n_tasks=3, seed=4)
    perms = permutations(3, 16, seed=4)
    for t, task in enumerate(dm.tasks):
        expected = source.test_x.flatten(1)[:, perms[t]].reshape(source.test_x.shape)
        assert torch.equal(task.test_x, expected)
        offset = 0 if scenario == "domain_il" else 10 * t
        assert torch.equal(task.test_y, source.test_y + offset)
        assert torch.equal(task.train_y, source.train_y + offset)
    assert torch.equal(dm.tasks[0].test_x, source.test_x)
    assert not torch.equal(dm.tasks[1].test_x, source.test_x)


@pytest.mark.parametrize("angles", [[0.0, 90.0], None])
def test_rotated_tasks_rotate_counter_clockwise(angles: list[float] | None) -> None:
    # None spreads two tasks over [0, 180): 0 and 90 degrees
    source = blobs()
    dm = make_dm(benchmark="rotated", scenario="domain_il", n_tasks=2, angles=angles)
    assert torch.equal(dm.tasks[0].test_x, source.test_x)
    assert torch.equal(dm.tasks[1].test_x, torch.rot90(source.test_x, 1, dims=(-2, -1)))
    assert torch.equal(dm.tasks[1].train_x, torch.rot90(source.train_x, 1, dims=(-2, -1)))
    assert torch.equal(dm.tasks[1].test_y, source.test_y)


def test_rotated_tasks_draw_seeded_uniform_angles() -> None:
    # dataset.angles=uniform: Mammoth's rot-mnist, one angle per task from U[0, 180), the same for train and test
    source = blobs()
    dm = make_dm(benchmark="rotated", scenario="domain_il", n_tasks=3, angles="uniform", seed=5)
    angles = scenarios.rotation_angles("uniform", 3, seed=5)
    for task, angle in zip(dm.tasks, angles, strict=True):
        assert task.description.startswith(f"rotate {angle:g} deg")
        rotated = tvf.rotate(source.test_x, angle, interpolation=tvf.InterpolationMode.BILINEAR)
        assert torch.equal(task.test_x, rotated)
    again = make_dm(benchmark="rotated", scenario="domain_il", n_tasks=3, angles="uniform", seed=5)
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(dm.tasks, again.tasks, strict=True))


# ---------------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_scales_uint8_to_unit_interval() -> None:
    dm = make_dm()
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = dm.preprocess(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))
    # float inputs are taken as already scaled
    torch.testing.assert_close(dm.preprocess(torch.full((1, 1, 1, 1), 3.0)), torch.full((1, 1, 1, 1), 3.0))


def test_preprocess_normalises_per_channel() -> None:
    dm = make_dm(mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0])
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    expected = torch.tensor([(0.0 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (1.0 - 0.3) / 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(dm.preprocess(x), expected.expand(2, 3, 2, 2))


# ---------------------------------------------------------------------------------------------------- state, stream
def test_state_dict_round_trips_current_task() -> None:
    dm = make_dm()
    dm.set_task(3)
    state = dm.state_dict()
    restored = make_dm()
    restored.load_state_dict(state)
    assert restored.current_task == 3
    restored.load_state_dict({})
    assert restored.current_task == 3


@pytest.mark.parametrize("blur", [0.0, 0.4])
def test_online_stream_is_one_pass_over_all_training_data(blur: float) -> None:
    dm = make_dm(stream="online", blur=blur)
    dm.set_task(3)  # the task counter does not change what an online stream serves
    stream = collect(dm.train_dataloader())
    assert torch.equal(stream.index, torch.arange(N_CLASSES * TRAIN_PER_CLASS)), "each sample once, in order"
    assert (stream.task_id == -1).all()
    every = torch.cat([torch.cat([t.train_x.flatten(1), t.train_y[:, None]], 1) for t in dm.tasks])
    assert rows(torch.cat([stream.x.flatten(1), stream.y[:, None]], 1)) == rows(every)
    true_tasks = dm.stream_tasks()
    assert torch.equal(true_tasks, true_tasks.sort().values) == (blur == 0.0)


# ---------------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"eval_split": "val"}, r"dataset\.eval_split='val' needs dataset\.val_fraction"),
        ({"benchmark": "rotated", "n_tasks": 2, "angles": [0.0, 45.0, 90.0]}, r"dataset\.angles has 3 values"),
        ({"benchmark": "rotated", "n_tasks": 2, "angles": "random"}, r"dataset\.angles='random'"),
        ({"mean": [0.5]}, r"dataset\.mean and dataset\.std"),
        ({"mean": [0.5], "std": [0.0]}, r"dataset\.std"),
        ({"benchmark": "shuffled"}, r"dataset\.benchmark='shuffled'"),
        ({"scenario": "online_il"}, r"dataset\.scenario='online_il'"),
        ({"n_tasks": 0}, r"dataset\.n_tasks=0"),
        ({"batch_size": True}, r"batch_size=True"),
        ({"val_fraction": 1.0}, r"dataset\.val_fraction"),
        ({"stream": "batch"}, r"dataset\.stream"),
        ({"augment": "mixup"}, r"dataset\.augment"),
    ],
)
def test_invalid_config_raises_at_construction(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        TaskSequenceDataModule(source=blobs, name="blobs", **kwargs)


def test_class_order_rejected_for_transform_benchmarks() -> None:
    dm = TaskSequenceDataModule(source=blobs, name="blobs", benchmark="permuted", n_tasks=2, class_order="random")
    with pytest.raises(ConfigError, match=r"dataset\.class_order"):
        dm.setup("fit")


def test_split_n_tasks_must_divide_classes() -> None:
    dm = TaskSequenceDataModule(source=blobs, name="blobs", n_tasks=3)
    with pytest.raises(ConfigError, match=r"dataset\.n_tasks=3.*\[1, 2, 5, 10\]"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------------- TensorBatchLoader
def make_loader(n: int, batch_size: int, **kwargs: Any) -> TensorBatchLoader:
    ids = torch.arange(n)
    return TensorBatchLoader(ids * 10, ids, torch.zeros(n, dtype=torch.long), batch_size, **kwargs)


def test_loader_shuffle_is_seeded() -> None:
    def passes(seed: int) -> list[list[int]]:
        return [b.index.tolist() for b in make_loader(50, 8, shuffle=True, seed=seed)]

    assert passes(3) == passes(3)
    assert passes(3) != passes(4)
    assert sorted(sum(passes(3), [])) == list(range(50))
    assert sum(passes(3), []) != list(range(50))


def test_loader_gathers_by_index() -> None:
    index = torch.arange(100, 120)
    loader = TensorBatchLoader(torch.arange(20) * 10, torch.arange(20), torch.zeros(20), 6, shuffle=True, index=index)
    for batch in loader:
        assert torch.equal(batch.x, batch.y * 10)
        assert torch.equal(batch.index, batch.y + 100)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("n", "batch_size", "world_size"), [(10, 3, 1), (9, 3, 1), (1, 4, 1), (11, 3, 2), (10, 4, 3)])
def test_loader_len_matches_batches(n: int, batch_size: int, world_size: int, shuffle: bool) -> None:
    for rank in range(world_size):
        loader = make_loader(n, batch_size, shuffle=shuffle, rank=rank, world_size=world_size)
        assert len(loader) == len(list(loader))


@pytest.mark.parametrize("n", [12, 11])
def test_loader_training_shards_are_disjoint_equal_and_complete(n: int) -> None:
    shards = [collect(make_loader(n, 4, shuffle=True, seed=1, rank=r, world_size=2)).index.tolist() for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    padding = 2 * -(-n // 2) - n
    assert len(set(shards[0]) & set(shards[1])) <= padding
    assert len(shards[0] + shards[1]) == n + padding


@pytest.mark.parametrize("world_size", [2, 3])
def test_loader_eval_shards_cover_exactly_once(world_size: int) -> None:
    shards = [
        collect(make_loader(11, 4, shuffle=False, rank=r, world_size=world_size)).index for r in range(world_size)
    ]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(11))


def test_loader_fixed_number_of_batches() -> None:
    loader = make_loader(5, 16, shuffle=True, n_batches=3)
    batches = list(loader)
    assert len(loader) == 3
    assert [len(b.y) for b in batches] == [16, 16, 16]


def test_loader_rejects_empty_batches() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(5, 0, shuffle=False)


# ---------------------------------------------------------------------------------------------------- random_crop_flip
@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_flip_keeps_shape(padding: int) -> None:
    x = torch.rand(3, 2, 5, 6)
    assert random_crop_flip(x, padding=padding).shape == x.shape


def _candidates(sample: Tensor, padding: int) -> list[Tensor]:
    """Every crop of the zero-padded ``[C, H, W]`` sample, unflipped and flipped horizontally."""
    _, h, w = sample.shape
    padded = torch.nn.functional.pad(sample, (padding,) * 4)
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_crop_flip_outputs_are_padded_crops_possibly_flipped() -> None:
    # channel 1 differs from channel 0, so a sample whose channels were cropped differently matches no candidate
    image = torch.stack([torch.arange(1.0, 17.0), torch.arange(101.0, 117.0)]).view(2, 4, 4)
    candidates = _candidates(image, padding=2)
    out = random_crop_flip(image.expand(1000, 2, 4, 4), padding=2, generator=torch.Generator().manual_seed(0))
    hit = set()
    for sample in out:
        matches = [i for i, c in enumerate(candidates) if torch.equal(sample, c)]
        assert len(matches) == 1
        hit.add(matches[0])
    # every offset (extremes included), flipped and not, is drawn
    assert hit == set(range(len(candidates)))


def test_crop_alone_draws_every_padded_crop_and_never_a_mirror() -> None:
    """``dataset.augment=crop`` (GDumb's MNIST augmentation: torchvision's RandomCrop with padding 4, no flip)."""
    image = torch.stack([torch.arange(1.0, 17.0), torch.arange(101.0, 117.0)]).view(2, 4, 4)
    candidates = _candidates(image, padding=2)
    unflipped = len(candidates) // 2
    out = random_crop_flip(
        image.expand(1000, 2, 4, 4), padding=2, generator=torch.Generator().manual_seed(0), flip=False
    )
    hit = {next(i for i, c in enumerate(candidates) if torch.equal(sample, c)) for sample in out}
    assert hit == set(range(unflipped)), "every offset, none flipped"
    dm = make_dm(augment="crop")
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    assert torch.equal(dm.preprocess(x, train=False), torch.ones(2, 1, 4, 4)), "evaluation is not augmented"
    assert (dm.preprocess(x[:1].expand(200, 1, 4, 4), train=True) == 0).any(), "training crops into the padding"


def test_crop_flip_without_padding_is_identity_or_mirror() -> None:
    x = torch.rand(64, 1, 3, 3)
    out = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()


def test_crop_flip_is_reproducible_with_a_generator() -> None:
    x = torch.rand(16, 3, 8, 8)

    def run(seed: int) -> Tensor:
        return random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize(
    ("kind", "extra"),
    [("permuted", {}), ("rotated", {"angles": [0.0, 90.0, 180.0, 270.0]}), ("permuted", {"max_samples_per_task": 200})],
)
def test_transform_benchmarks_hold_out_the_same_base_images_in_every_task(kind: str, extra: dict) -> None:
    """No validation image of one task is a transformed copy of an image another task trains on. A pixel
    permutation and a rotation by a multiple of 90 degrees keep each image's multiset of pixel values, which
    identifies its base image (blobs' noisy pixels are unique per image)."""
    dm = make_dm(benchmark=kind, n_tasks=4, val_fraction=0.25, scenario="domain_il", **extra)

    def base(x: Tensor) -> set[tuple[int, ...]]:
        return {tuple(sorted(row)) for row in x.flatten(1).tolist()}

    assert len(base(dm.tasks[0].train_x)) == len(dm.tasks[0].train_x), "signatures identify the images"
    for t in dm.tasks:
        for u in dm.tasks:
            assert t.val_x is not None
            shared = base(t.val_x) & base(u.train_x)
            assert not shared, f"task {t.task_id}'s validation images are in task {u.task_id}'s training set"
