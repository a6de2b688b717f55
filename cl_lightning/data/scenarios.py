"""Turn one labelled dataset into a sequence of tasks, in one of the three scenarios of van de Ven & Tolias (2019).

Every task is materialised as in-memory tensors: inputs stay ``uint8`` (a quarter of the memory of ``float32``) and
are converted batch by batch on the model's device.

Label spaces (``outputs`` of a task are the logit indices its samples can take):

- **split** benchmarks (Split-MNIST, Split-CIFAR, ...): the classes, in ``class_order``, are cut into ``n_tasks``
  equal groups. ``class_il`` and ``task_il`` label a sample by the position of its class in ``class_order``, so task
  ``t`` owns outputs ``[t*k, (t+1)*k)``; ``domain_il`` labels it by its position inside its group (``[0, k)``, the
  same head for every task).
- **input-transform** benchmarks (Permuted-/Rotated-MNIST): every task has all classes. ``domain_il`` keeps the
  labels (one shared head); ``task_il`` and ``class_il`` give task ``t`` its own block ``[t*C, (t+1)*C)``, as in
  van de Ven & Tolias (2019).

In ``task_il`` the model's logits are restricted to the task's outputs (a multi-head classifier written as masked
logits over one linear layer, which is the same function).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cl_lightning.errors import ConfigError

SCENARIOS = ("class_il", "task_il", "domain_il")


@dataclass
class Task:
    """One task of a sequence: its data and the logit indices its labels live in."""

    task_id: int
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    outputs: Tensor
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    description: str = ""


def check_scenario(scenario: str, supported: Sequence[str] = SCENARIOS) -> str:
    """Return ``scenario`` if it is one of ``supported``, else raise a one-line :class:`ConfigError`."""
    if scenario not in supported:
        raise ConfigError(f"dataset.scenario={scenario!r} is not supported here; choose one of {', '.join(supported)}")
    return scenario


def resolve_class_order(class_order: str | Sequence[int] | None, n_classes: int, seed: int) -> list[int]:
    """Resolve ``dataset.class_order``: ``None`` (natural), ``"random"`` (seeded) or an explicit permutation.

    >>> resolve_class_order(None, 4, 0)
    [0, 1, 2, 3]
    >>> resolve_class_order([3, 2, 1, 0], 4, 0)
    [3, 2, 1, 0]
    >>> sorted(resolve_class_order("random", 4, 0))
    [0, 1, 2, 3]
    """
    if class_order is None or class_order == "natural":
        return list(range(n_classes))
    if isinstance(class_order, str):
        if class_order != "random":
            raise ConfigError(
                f"dataset.class_order={class_order!r}: use null (natural), 'random' or a list of all class ids"
            )
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(n_classes, generator=gen).tolist()
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(n_classes)):
        raise ConfigError(f"dataset.class_order={order}: must list each class id 0..{n_classes - 1} exactly once")
    return order


def resolve_task_order(task_order: str | Sequence[int] | None, n_tasks: int, seed: int) -> list[int]:
    """Resolve ``dataset.task_order``: ``None`` (as built), ``"random"``, ``"reverse"`` or an explicit permutation.

    >>> resolve_task_order("reverse", 3, 0)
    [2, 1, 0]
    """
    if task_order is None or task_order == "natural":
        return list(range(n_tasks))
    if isinstance(task_order, str):
        if task_order == "reverse":
            return list(reversed(range(n_tasks)))
        if task_order == "random":
            gen = torch.Generator().manual_seed(seed + 1)
            return torch.randperm(n_tasks, generator=gen).tolist()
        raise ConfigError(f"dataset.task_order={task_order!r}: use null, 'random', 'reverse' or a list of task indices")
    order = [int(t) for t in task_order]
    if sorted(order) != list(range(n_tasks)):
        raise ConfigError(f"dataset.task_order={order}: must list each task index 0..{n_tasks - 1} exactly once")
    return order


def split_by_class(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    n_classes: int,
    n_tasks: int,
    scenario: str,
    class_order: list[int],
) -> tuple[list[Task], int]:
    """Cut a dataset into ``n_tasks`` tasks of ``n_classes / n_tasks`` classes each.

    Returns:
        The tasks and the number of model outputs the scenario needs.
    """
    if n_tasks < 1 or n_classes % n_tasks:
        divisors = [d for d in range(1, n_classes + 1) if n_classes % d == 0]
        raise ConfigError(f"dataset.n_tasks={n_tasks}: must divide the {n_classes} classes; use one of {divisors}")
    per_task = n_classes // n_tasks
    position = torch.empty(n_classes, dtype=torch.long)
    position[torch.tensor(class_order)] = torch.arange(n_classes)
    tasks = []
    for t in range(n_tasks):
        classes = class_order[t * per_task : (t + 1) * per_task]
        offset = 0 if scenario == "domain_il" else t * per_task

        shift = t * per_task - offset
        trx, try_ = _pick(train_x, train_y, classes, position, shift)
        tex, tey = _pick(test_x, test_y, classes, position, shift)
        outputs = torch.arange(offset, offset + per_task)
        tasks.append(Task(t, trx, try_, tex, tey, outputs, description=f"classes {classes}"))
    n_outputs = per_task if scenario == "domain_il" else n_classes
    return tasks, n_outputs


def _pick(x: Tensor, y: Tensor, classes: list[int], position: Tensor, shift: int) -> tuple[Tensor, Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep].contiguous(), position[y[keep]] - shift


def permutations(n_tasks: int, n_features: int, seed: int, identity_first: bool = True) -> list[Tensor]:
    """Pixel permutations of Permuted-MNIST, fixed by ``seed``.

    The first task keeps the original images when ``identity_first`` (as in GEM and van de Ven & Tolias).
    """
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n_features, generator=gen) for _ in range(n_tasks)]
    if identity_first:
        perms[0] = torch.arange(n_features)
    return perms


def rotation_angles(angles: str | Sequence[float] | None, n_tasks: int, seed: int) -> list[float]:
    """Resolve ``dataset.angles`` of Rotated-MNIST: one rotation angle (degrees) per task.

    ``None`` spreads ``n_tasks`` angles evenly over [0, 180) in increasing order; ``"uniform"`` draws each task's
    angle independently from U[0, 180), fixed by ``seed`` (Mammoth's rot-mnist, Buzzega et al. 2020: 20 tasks of a
    random rotation each); a list gives the angles explicitly.

    >>> rotation_angles(None, 4, 0)
    [0.0, 45.0, 90.0, 135.0]
    >>> all(0 <= a < 180 for a in rotation_angles("uniform", 20, 0))
    True
    """
    if angles is None:
        return [180.0 * t / n_tasks for t in range(n_tasks)]
    if isinstance(angles, str):
        if angles != "uniform":
            raise ConfigError(
                f"dataset.angles={angles!r}: use null (evenly spaced over [0, 180)), 'uniform' (seeded draws from "
                "U[0, 180)) or a list of one angle per task"
            )
        gen = torch.Generator().manual_seed(seed)
        return (180.0 * torch.rand(n_tasks, generator=gen, dtype=torch.float64)).tolist()
    values = [float(a) for a in angles]
    if len(values) != n_tasks:
        raise ConfigError(
            f"dataset.angles has {len(values)} values but dataset.n_tasks={n_tasks}; give one angle per task"
        )
    return values


def transform_tasks(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    n_classes: int,
    scenario: str,
    transforms: Sequence[tuple[str, object]],
) -> tuple[list[Task], int]:
    """Build one task per input transform (a pixel permutation or a rotation angle), all classes in each."""
    from torchvision.transforms.v2 import functional as tvf

    def apply(x: Tensor, kind: str, arg: object) -> Tensor:
        if kind == "permute":
            perm = arg
            assert isinstance(perm, Tensor)
            return x.flatten(1)[:, perm].reshape(x.shape).contiguous()
        angle = float(arg)  # type: ignore[arg-type]
        return tvf.rotate(x, angle, interpolation=tvf.InterpolationMode.BILINEAR).contiguous()

    tasks = []
    for t, (kind, arg) in enumerate(transforms):
        offset = 0 if scenario == "domain_il" else t * n_classes
        outputs = torch.arange(offset, offset + n_classes)
        desc = f"{kind} {arg:g} deg" if kind == "rotate" else f"{kind} #{t}"  # type: ignore[str-format]
        tasks.append(
            Task(
                t,
                apply(train_x, kind, arg),
                train_y + offset,
                apply(test_x, kind, arg),
                test_y + offset,
                outputs,
                description=desc,
            )
        )
    n_outputs = n_classes if scenario == "domain_il" else n_classes * len(transforms)
    return tasks, n_outputs


def carve_validation(task: Task, fraction: float, seed: int, key: int | None = None) -> None:
    """Move a seeded ``fraction`` of the task's training samples into its validation split (in place).

    The split is drawn from ``seed`` and ``key`` (default: the task's id). Tasks that are transforms of the same
    base images (permuted, rotated) must pass one ``key`` for all: every task then holds out the same base images,
    so no task's validation image is a transformed copy of an image another task trains on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={fraction}: must be in [0, 1)")
    if fraction == 0.0:
        return
    n = len(task.train_y)
    n_val = max(1, round(n * fraction))
    gen = torch.Generator().manual_seed(seed * 1000 + (task.task_id if key is None else key))
    perm = torch.randperm(n, generator=gen)
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    task.val_x, task.val_y = task.train_x[val_idx], task.train_y[val_idx]
    task.train_x, task.train_y = task.train_x[train_idx], task.train_y[train_idx]


def online_stream_order(task_sizes: Sequence[int], blur: float, seed: int) -> Tensor:
    """Order the concatenated training samples of all tasks as one stream with blurred boundaries.

    Each sample of task ``t`` gets the key ``t + u + b * v`` with ``u`` uniform in [0, 1) (its place inside the
    task) and ``v`` uniform in [-1/2, 1/2); sorting by key gives the stream. With ``blur = 0`` the tasks follow each
    other with sharp boundaries. With ``blur = b`` the keys of task ``t`` have the density of ``U[0, 1)`` convolved
    with ``U[-b/2, b/2)``: flat inside the task, falling linearly to 0 over the window ``[t+1-b/2, t+1+b/2)`` while
    task ``t+1``'s rises, so the share of the next task in the stream rises linearly from 0 to 1 through a window
    of ``b`` task lengths centred on the boundary (``tests/data/test_datamodule.py`` measures it). The stream is
    served in this order (one pass, no shuffling).

    Returns:
        A permutation of ``range(sum(task_sizes))`` indexing the concatenation of the tasks.

    >>> online_stream_order([2, 2], 0.0, 0).tolist()[:2] in ([0, 1], [1, 0])
    True
    """
    if not 0.0 <= blur <= 1.0:
        raise ConfigError(f"dataset.blur={blur}: must be in [0, 1] (a fraction of a task's length)")
    gen = torch.Generator().manual_seed(seed + 7)
    keys = []
    for t, size in enumerate(task_sizes):
        u = torch.rand(size, generator=gen, dtype=torch.float64)
        v = torch.rand(size, generator=gen, dtype=torch.float64) - 0.5
        keys.append(t + u + blur * v)
    return torch.cat(keys).argsort()
