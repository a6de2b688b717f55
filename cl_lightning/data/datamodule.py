"""``TaskSequenceDataModule``: a dataset cut into a sequence of tasks, served one task at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cl_lightning.data import scenarios
from cl_lightning.data.batch import Batch
from cl_lightning.data.loader import TensorBatchLoader
from cl_lightning.data.scenarios import Task
from cl_lightning.errors import ConfigError

BENCHMARKS = ("split", "permuted", "rotated")


class TaskSequenceDataModule(pl.LightningDataModule):
    """A continual-learning benchmark: tasks built from one source dataset, switched by :meth:`set_task`.

    The training loader serves the current task (or, with ``cumulative``, every task up to it: joint training);
    the evaluation loaders serve the test split (or the validation split) of *every* task, so each row of the
    accuracy matrix is complete and forward transfer can be computed.

    Args:
        source: Callable returning a :class:`~cl_lightning.data.sources.SourceData` (a Hydra ``_partial_``).
        name: Benchmark name, written to ``results.json``.
        benchmark: ``split`` (classes cut into tasks), ``permuted`` (one pixel permutation per task) or
            ``rotated`` (one rotation angle per task).
        scenario: ``class_il``, ``task_il`` or ``domain_il``.
        n_tasks: Number of tasks.
        class_order: Split benchmarks: ``None`` (natural), ``"random"`` (seeded) or a list of all class ids.
        task_order: ``None``, ``"random"``, ``"reverse"`` or a list of task indices (easy-to-hard curricula).
        angles: Rotated benchmark: the angle of each task in degrees; ``None`` spreads ``n_tasks`` angles evenly
            over [0, 180); ``"uniform"`` draws each task's angle from U[0, 180), seeded (Mammoth's rot-mnist).
        seed: Seeds class/task orders, permutations, the validation split and shuffling.
        batch_size: Training batch size per process.
        eval_batch_size: Evaluation batch size.
        steps_per_task: If set, each task is one "epoch" of exactly this many batches.
        val_fraction: Fraction of each task's training data held out as a validation split.
        eval_split: ``test`` or ``val``: the split the accuracy matrix is measured on (tune on ``val``).
        stream: ``tasks`` (boundaries known) or ``online``: one pass over one stream of every task's training data,
            served in its order by one training loader (one fit, no boundary the learner or the methods see); the
            true tasks are used by evaluation only (:meth:`boundary_steps`).
        blur: Online stream: the width, in task lengths, of the window around each boundary over which the share of
            the next task rises linearly from 0 to 1 (:func:`~cl_lightning.data.scenarios.online_stream_order`);
            0 is a sharp boundary.
        mean: Per-channel mean for normalisation after scaling to [0, 1] (``None``: no normalisation).
        std: Per-channel standard deviation.
        augment: ``none``, ``crop_flip`` (random 4-pixel-padded crop and horizontal flip, batched on the device) or
            ``crop`` (the crop alone: torchvision's ``RandomCrop(size, padding=4)``, GDumb's MNIST augmentation).
        cumulative: Train on the union of all tasks seen so far (set by methods such as ``joint``).
        max_samples_per_task: Keep at most this many training samples per task (quick runs, tests).
    """

    def __init__(
        self,
        source: Callable[[], Any],
        name: str,
        benchmark: str = "split",
        scenario: str = "class_il",
        n_tasks: int = 5,
        class_order: str | Sequence[int] | None = None,
        task_order: str | Sequence[int] | None = None,
        angles: str | Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        steps_per_task: int | None = None,
        val_fraction: float = 0.0,
        eval_split: str = "test",
        stream: str = "tasks",
        blur: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: str = "none",
        cumulative: bool = False,
        max_samples_per_task: int | None = None,
        supported_scenarios: Sequence[str] = scenarios.SCENARIOS,
    ) -> None:
        super().__init__()
        if benchmark not in BENCHMARKS:
            raise ConfigError(f"dataset.benchmark={benchmark!r}: choose one of {', '.join(BENCHMARKS)}")
        scenarios.check_scenario(scenario, tuple(supported_scenarios))
        _check_int("dataset.n_tasks", n_tasks, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("dataset.eval_batch_size", eval_batch_size, 1)
        if steps_per_task is not None:
            _check_int("steps_per_task", steps_per_task, 1)
        if max_samples_per_task is not None:
            _check_int("dataset.max_samples_per_task", max_samples_per_task, 1)
        if eval_split not in ("test", "val"):
            raise ConfigError(f"dataset.eval_split={eval_split!r}: choose 'test' or 'val'")
        if eval_split == "val" and not val_fraction > 0:
            raise ConfigError("dataset.eval_split='val' needs dataset.val_fraction > 0 (e.g. 0.1)")
        if stream not in ("tasks", "online"):
            raise ConfigError(f"dataset.stream={stream!r}: choose 'tasks' or 'online'")
        if augment not in ("none", "crop", "crop_flip"):
            raise ConfigError(f"dataset.augment={augment!r}: choose 'none', 'crop' or 'crop_flip'")
        if (mean is None) != (std is None):
            raise ConfigError("dataset.mean and dataset.std must be given together (or both null)")
        if std is not None and any(float(s) <= 0 for s in std):
            raise ConfigError(f"dataset.std={list(std)}: every value must be > 0")
        if angles is not None:
            scenarios.rotation_angles(angles, n_tasks, seed)  # validates: one-line error before any data is read
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"dataset.val_fraction={val_fraction}: must be in [0, 1)")
        self.source, self.name, self.benchmark, self.scenario = source, name, benchmark, scenario
        self.n_tasks = n_tasks
        self.class_order, self.task_order, self.angles = class_order, task_order, angles
        self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size
        self.steps_per_task, self.val_fraction, self.eval_split = steps_per_task, val_fraction, eval_split
        self.stream, self.blur, self.augment = stream, blur, augment
        self.mean = None if mean is None else torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor([float(s) for s in std]).view(1, -1, 1, 1)
        self.cumulative, self.max_samples_per_task = cumulative, max_samples_per_task
        # set by the run from its methods' ``training_tasks`` hooks: task -> the tasks it trains on (overrides
        # ``cumulative``)
        self.training_tasks: Callable[[int], Sequence[int]] | None = None
        self.tasks: list[Task] = []
        self.n_outputs = 0
        self.input_shape: tuple[int, ...] = ()
        self.current_task = 0
        self._stream: tuple[Tensor, Tensor, Tensor, list[int]] | None = None

    # ------------------------------------------------------------------ building
    @override
    def setup(self, stage: str | None = None) -> None:
        """Load the source and build the tasks (once; later calls are no-ops)."""
        if self.tasks:
            return
        data = self.source()
        self.input_shape = tuple(data.train_x.shape[1:])
        if self.benchmark == "split":
            order = scenarios.resolve_class_order(self.class_order, data.n_classes, self.seed)
            tasks, self.n_outputs = scenarios.split_by_class(
                data.train_x, data.train_y, data.test_x, data.test_y, data.n_classes, self.n_tasks,
                self.scenario, order,
            )  # fmt: skip
        else:
            if self.class_order is not None:
                raise ConfigError(
                    f"dataset.class_order is for split benchmarks; {self.name} has all classes in every task"
                )
            if self.benchmark == "permuted":
                n_features = int(torch.tensor(self.input_shape).prod())
                transforms: list[tuple[str, object]] = [
                    ("permute", p) for p in scenarios.permutations(self.n_tasks, n_features, self.seed)
                ]
            else:
                angles = scenarios.rotation_angles(self.angles, self.n_tasks, self.seed)
                transforms = [("rotate", a) for a in angles]
            tasks, self.n_outputs = scenarios.transform_tasks(
                data.train_x, data.train_y, data.test_x, data.test_y, data.n_classes, self.scenario, transforms
            )
        order = scenarios.resolve_task_order(self.task_order, self.n_tasks, self.seed)
        tasks = [tasks[i] for i in order]
        # Transform benchmarks (every task the same base images, transformed) hold out the same base images in every
        # task, before any subsampling: no validation image is a copy of one that another task trains on. Split
        # benchmarks' tasks share no images; each carves its own split.
        shared_base = self.benchmark != "split"
        for position, task in enumerate(tasks):
            task.description = f"{task.description} (built as task {task.task_id})"
            task.task_id = position
            if shared_base:
                scenarios.carve_validation(task, self.val_fraction, self.seed, key=0)
            if self.max_samples_per_task is not None and len(task.train_y) > self.max_samples_per_task:
                gen = torch.Generator().manual_seed(self.seed * 7919 + position)
                keep = torch.randperm(len(task.train_y), generator=gen)[: self.max_samples_per_task].sort().values
                task.train_x, task.train_y = task.train_x[keep], task.train_y[keep]
            if not shared_base:
                scenarios.carve_validation(task, self.val_fraction, self.seed)
        self.tasks = tasks
        if self.stream == "online":
            sizes = [len(t.train_y) for t in tasks]
            perm = scenarios.online_stream_order(sizes, self.blur, self.seed)
            x = torch.cat([t.train_x for t in tasks])[perm]
            y = torch.cat([t.train_y for t in tasks])[perm]
            tid = torch.cat([torch.full((len(t.train_y),), t.task_id) for t in tasks])[perm]
            self._stream = (x, y, tid, sizes)

    def boundary_steps(self, world_size: int = 1) -> list[int]:
        """Online stream: the optimizer step after which the stream has passed each task's nominal end (the
        cumulative task sizes; a step takes ``batch_size`` samples on each of ``world_size`` processes). The last
        is the stream's last step."""
        assert self._stream is not None
        per_step = self.batch_size * world_size
        ends = torch.tensor(self._stream[3]).cumsum(0)
        return [int(-(-int(e) // per_step)) for e in ends]

    def task_start_steps(self, world_size: int = 1) -> list[int]:
        """Online stream: the optimizer steps taken before the stream reaches each task's nominal start."""
        assert self._stream is not None
        per_step = self.batch_size * world_size
        starts = [0, *torch.tensor(self._stream[3]).cumsum(0)[:-1].tolist()]
        return [int(s) // per_step for s in starts]

    def stream_tasks(self) -> Tensor:
        """Online stream: the true task of each position of the stream, in order (for tests and reports)."""
        assert self._stream is not None
        return self._stream[2]

    @property
    def task_outputs(self) -> list[Tensor]:
        """Logit indices of each task's labels."""
        return [t.outputs for t in self.tasks]

    @property
    def task_ids_visible(self) -> bool:
        """Whether batches carry the task id: only task-IL gives it to the learner (and so to methods)."""
        return self.scenario == "task_il"

    def set_task(self, task_id: int) -> None:
        """Make ``task_id`` the task the training loader serves."""
        if not 0 <= task_id < self.n_tasks:
            raise ValueError(f"task_id must be in [0, {self.n_tasks}), got {task_id}")
        self.current_task = task_id

    # ------------------------------------------------------------------ loaders
    def _dist(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        return trainer.global_rank, trainer.world_size, trainer.current_epoch

    def _hide(self, tid: Tensor) -> Tensor:
        return tid if self.task_ids_visible else torch.full_like(tid, -1)

    @override
    def train_dataloader(self) -> TensorBatchLoader:
        t = self.current_task
        rank, world, epoch = self._dist()
        if self._stream is not None:
            # the whole stream, in its order, in one pass: one fit, no boundary the learner could see
            x, y, tid, _ = self._stream
            return TensorBatchLoader(
                x, y, self._hide(tid), self.batch_size, shuffle=False, pad=True, rank=rank, world_size=world,
                index=torch.arange(len(y)),
            )  # fmt: skip
        else:
            if self.training_tasks is not None:
                seen = [self.tasks[i] for i in self.training_tasks(t)]
            else:
                seen = self.tasks[: t + 1] if self.cumulative else [self.tasks[t]]
            x = torch.cat([s.train_x for s in seen]) if len(seen) > 1 else seen[0].train_x
            y = torch.cat([s.train_y for s in seen]) if len(seen) > 1 else seen[0].train_y
            tid = torch.cat([torch.full((len(s.train_y),), s.task_id) for s in seen])
            index = torch.cat([torch.arange(len(s.train_y)) for s in seen])
        return TensorBatchLoader(
            x, y, self._hide(tid), self.batch_size, shuffle=True, seed=self.seed * 100_003 + epoch,
            n_batches=self.steps_per_task, rank=rank, world_size=world, index=index,
        )  # fmt: skip

    def eval_dataloaders(self, split: str | None = None) -> list[TensorBatchLoader]:
        """One loader per task over its evaluation split (``eval_split`` unless given)."""
        split = split or self.eval_split
        rank, world, _ = self._dist()
        loaders = []
        for task in self.tasks:
            x, y = (task.val_x, task.val_y) if split == "val" else (task.test_x, task.test_y)
            assert x is not None and y is not None
            tid = torch.full((len(y),), task.task_id)
            loaders.append(
                TensorBatchLoader(x, y, tid, self.eval_batch_size, shuffle=False, rank=rank, world_size=world)
            )
        return loaders

    @override
    def test_dataloader(self) -> list[TensorBatchLoader]:
        return self.eval_dataloaders()

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A Batch moves field by field: Lightning's generic walk through collections costs about a tenth of a
        # batch-10 step of a small MLP. On the CPU the tensors are already there and the batch passes as it is.
        if isinstance(batch, Batch):
            if all(t.device == device for t in batch):
                return batch
            non_blocking = device.type not in ("cpu", "mps")  # as Lightning's own move
            return Batch(*(t.to(device, non_blocking=non_blocking) for t in batch))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ------------------------------------------------------------------ device-side preprocessing
    def preprocess(self, x: Tensor, train: bool = False) -> Tensor:
        """Scale ``uint8`` inputs to [0, 1], augment (``train`` only, if configured) and normalise, on ``x``'s device.

        Batches stay ``uint8`` until the module calls this, so methods that store samples keep them un-augmented
        and four times smaller, and augment them again when they replay them (as Mammoth's buffers do).
        """
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if train and self.augment != "none":
            x = random_crop_flip(x, padding=4, flip=self.augment == "crop_flip")
        if self.mean is not None and self.std is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"current_task": self.current_task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_task = int(state_dict.get("current_task", self.current_task))


def random_crop_flip(
    x: Tensor, padding: int = 4, generator: torch.Generator | None = None, flip: bool = True
) -> Tensor:
    """Per-sample random crop (zero padding) and, with ``flip``, horizontal flip of a batch, in one gather on
    ``x``'s device.

    >>> x = torch.arange(16.0).view(1, 1, 4, 4)
    >>> random_crop_flip(x, padding=0).shape
    torch.Size([1, 1, 4, 4])
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dev = x.device
    oy = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = ox[:, None] + torch.arange(w, device=dev)
    if flip:
        flipped = torch.rand(b, device=dev, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]
    samples = torch.arange(b, device=dev)[:, None, None, None]
    channels = torch.arange(c, device=dev)[None, :, None, None]
    return padded[samples, channels, rows, cols]


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}")
