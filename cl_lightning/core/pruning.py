"""PackNet's weight ownership and per-layer magnitude pruning (Lightning-free).

Every prunable weight tensor has an *owner map* of the same shape: the index of the task that owns each weight, or
:data:`FREE` for a weight no task owns yet (trainable by the current task, hidden from the finished ones). A task
first trains the free weights, then :func:`magnitude_prune` keeps the largest of them for it (they become owned by
the task) and releases the others (set to zero by the caller, free for later tasks).

- :func:`prunable_weights`: the weight matrices and kernels of ``Linear`` and ``Conv`` layers outside the head;
- :func:`row_owners`: ownership of a task-IL head, row by row (each output belongs to one task);
- :func:`magnitude_prune`: the per-layer pruning step;
- :func:`trainable_mask` / :func:`visible_mask`: the weights a task may change, and those its evaluation uses;
- :func:`free_fraction` / :func:`owned_fraction`: capacity accounting.

Example:
    >>> owner = torch.tensor([FREE, 0, FREE, FREE, FREE])
    >>> weight = torch.tensor([0.5, 9.0, -3.0, 0.1, 2.0])
    >>> magnitude_prune(weight, owner, task=1, ratio=0.5).tolist()  # 4 free: keep the 2 largest |w|
    [-1, 0, 1, -1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

FREE = -1
OWNER_DTYPE = torch.int16

__all__ = [
    "FREE",
    "OWNER_DTYPE",
    "free_fraction",
    "magnitude_prune",
    "owned_fraction",
    "prunable_weights",
    "row_owners",
    "trainable_mask",
    "visible_mask",
]


def prunable_weights(net: nn.Module, exclude: nn.Module | None = None) -> list[str]:
    """Names (as in ``net.named_parameters()``) of the weights of every ``Linear`` and ``Conv`` layer of ``net``
    outside ``exclude`` (the task-IL head, owned row by row instead). Biases and normalisation layers are not
    prunable (PackNet trains them on the first task only)."""
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    names = []
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd) and id(module.weight) not in skip:
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def row_owners(output_masks: Tensor, shape: torch.Size) -> Tensor:
    """Owner map of a head parameter of ``shape`` (``[n_outputs, ...]``): row ``r`` belongs to the first task whose
    outputs include ``r`` (``output_masks[t, r]``), :data:`FREE` if none does."""
    masks = output_masks.bool().cpu()
    owned = masks.any(0)
    first = masks.to(torch.int8).argmax(0).to(OWNER_DTYPE)  # first True along tasks
    rows = torch.where(owned, first, torch.full_like(first, FREE))
    return rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def magnitude_prune(weight: Tensor, owner: Tensor, task: int, ratio: float) -> Tensor:
    """One PackNet pruning step on one layer: the new owner map.

    Of the ``n`` free weights (``owner == FREE``), the ``round(ratio * n)`` of smallest magnitude stay free and the
    others become owned by ``task``; weights already owned are untouched. Ties in magnitude are broken by position
    (a stable sort), so the result is deterministic. The caller zeroes the weights that stayed free.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio}: must be in [0, 1]")
    free = (owner == FREE).flatten()
    index = free.nonzero().squeeze(1)
    n_prune = math.floor(ratio * len(index) + 0.5)
    order = torch.argsort(weight.detach().flatten()[index].abs(), descending=True, stable=True)
    keep = index[order[: len(index) - n_prune]]
    new = owner.flatten().clone()
    new[keep] = task
    return new.view_as(owner)


def trainable_mask(owner: Tensor, task: int, pruned: bool) -> Tensor:
    """Weights ``task`` may change: the free ones before its pruning, then only those it kept (and, in a head, its
    own rows throughout)."""
    mine = owner == task
    return mine if pruned else mine | (owner == FREE)


def visible_mask(owner: Tensor, task: int, free_visible: bool) -> Tensor:
    """Weights the model of ``task`` uses: those of tasks ``<= task``, and the free ones when ``free_visible`` (the
    task in training, whose free weights are its own work in progress, and the tasks not trained yet)."""
    mask = (owner >= 0) & (owner <= task)
    return mask | (owner == FREE) if free_visible else mask


def free_fraction(owners: Mapping[str, Tensor], after_task: int) -> float:
    """Fraction of the weights under ``owners`` that were free once ``after_task`` had its share (owned by no task
    up to it): the capacity left for later tasks at that point."""
    total = sum(o.numel() for o in owners.values())
    free = sum(int(((o == FREE) | (o > after_task)).sum()) for o in owners.values())
    return free / total if total else 0.0


def owned_fraction(owners: Mapping[str, Tensor], task: int) -> float:
    """Fraction of the weights under ``owners`` owned by ``task``."""
    total = sum(o.numel() for o in owners.values())
    return sum(int((o == task).sum()) for o in owners.values()) / total if total else 0.0
