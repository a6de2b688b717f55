"""PackNet's ownership maps and magnitude pruning, against a sort-based reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cl_lightning.core.pruning import (
    FREE,
    OWNER_DTYPE,
    free_fraction,
    magnitude_prune,
    owned_fraction,
    prunable_weights,
    row_owners,
    trainable_mask,
    visible_mask,
)
from cl_lightning.models.backbones import MLP, SmallCNN


def reference_prune(weight: torch.Tensor, owner: torch.Tensor, task: int, ratio: float) -> torch.Tensor:
    """Element by element: the free weights ranked by magnitude (ties by position), the top ones kept."""
    w, o = weight.flatten().tolist(), owner.flatten().tolist()
    free = [i for i, v in enumerate(o) if v == FREE]
    ranked = sorted(free, key=lambda i: (-abs(w[i]), i))
    n_keep = len(free) - math.floor(ratio * len(free) + 0.5)
    new = list(o)
    for i in ranked[:n_keep]:
        new[i] = task
    return torch.tensor(new, dtype=owner.dtype).view_as(owner)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_magnitude_prune_keeps_the_largest_free_weights(ratio: float) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 9, generator=gen)
    weight[0, :4] = 0.5  # ties
    owner = torch.full((12, 9), FREE, dtype=OWNER_DTYPE)
    owner[torch.rand(12, 9, generator=gen) < 0.3] = 0
    new = magnitude_prune(weight, owner, 1, ratio)
    assert new.dtype == OWNER_DTYPE and torch.equal(new, reference_prune(weight, owner, 1, ratio))
    assert torch.equal(new[owner == 0], owner[owner == 0]), "weights already owned are untouched"
    n_free = int((owner == FREE).sum())
    assert int((new == 1).sum()) == n_free - math.floor(ratio * n_free + 0.5)
    kept, released = weight[new == 1].abs(), weight[(new == FREE)].abs()
    if len(kept) and len(released):
        assert kept.min() >= released.max()


def test_iterated_pruning_gives_disjoint_shares_and_geometric_free_capacity() -> None:
    gen = torch.Generator().manual_seed(1)
    owners = {"a": torch.full((100, 50), FREE, dtype=OWNER_DTYPE), "b": torch.full((30, 7, 3), FREE, dtype=OWNER_DTYPE)}
    for task in range(4):
        for name, owner in owners.items():
            owners[name] = magnitude_prune(torch.randn(owner.shape, generator=gen), owner, task, 0.75)
        assert free_fraction(owners, task) == pytest.approx(0.75 ** (task + 1), abs=2e-3)
        assert owned_fraction(owners, task) == pytest.approx(0.25 * 0.75**task, abs=2e-3)
    # every weight has exactly one owner (or none): the shares are disjoint and cover what is not free
    total = sum(o.numel() for o in owners.values())
    shares = [owned_fraction(owners, t) for t in range(4)]
    assert sum(shares) + free_fraction(owners, 3) == pytest.approx(1.0, abs=1.0 / total)
    assert free_fraction(owners, 1) == pytest.approx(free_fraction(owners, 3) + shares[2] + shares[3])


def test_masks_of_a_task() -> None:
    owner = torch.tensor([FREE, 0, 1, 2, FREE], dtype=OWNER_DTYPE)
    assert trainable_mask(owner, 2, pruned=False).tolist() == [True, False, False, True, True]
    assert trainable_mask(owner, 2, pruned=True).tolist() == [False, False, False, True, False]
    assert visible_mask(owner, 1, free_visible=False).tolist() == [False, True, True, False, False]
    assert visible_mask(owner, 1, free_visible=True).tolist() == [True, True, True, False, True]


def test_row_owners_follow_the_task_outputs() -> None:
    masks = torch.zeros(3, 7, dtype=torch.bool)
    masks[0, :2], masks[1, 2:4], masks[2, 4:6] = True, True, True  # output 6 belongs to no task
    rows = row_owners(masks, torch.Size([7, 5]))
    assert rows.shape == (7, 5) and rows.dtype == OWNER_DTYPE
    assert rows[:, 0].tolist() == [0, 0, 1, 1, 2, 2, FREE] and bool((rows == rows[:, :1]).all())
    assert row_owners(masks, torch.Size([7])).tolist() == [0, 0, 1, 1, 2, 2, FREE]


def test_prunable_weights_are_linear_and_conv_weights_outside_the_head() -> None:
    mlp = MLP((1, 4, 4), 10, hidden=[8, 8])
    assert prunable_weights(mlp, mlp.head) == ["body.1.weight", "body.3.weight"]
    assert prunable_weights(mlp) == ["body.1.weight", "body.3.weight", "head.weight"]
    cnn = SmallCNN((1, 4, 4), 10, channels=[2], hidden=4, batch_norm=True)
    names = prunable_weights(cnn, cnn.head)
    assert names == ["conv.0.weight", "conv.3.weight", "fc.1.weight"]
    params = dict(cnn.named_parameters())
    assert all(params[n].ndim >= 2 for n in names) and isinstance(cnn.conv[1], nn.BatchNorm2d)


def test_bad_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="ratio=1.5"):
        magnitude_prune(torch.ones(3), torch.full((3,), FREE, dtype=OWNER_DTYPE), 0, 1.5)
