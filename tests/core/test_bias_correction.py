"""BiC's bias-correction math: per-task layers applied to their own outputs only, the stage-2 fit, the hold-outs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_lightning.core.bias_correction import (
    balanced_holdout,
    bias_loss,
    correction_vectors,
    fit_bias,
    holdout_count,
    spaced_holdout,
)

MASKS = torch.eye(3, dtype=torch.bool).repeat_interleave(2, 1)  # task t owns outputs 2t, 2t + 1


def test_each_layer_touches_its_own_tasks_outputs_only() -> None:
    scale, shift = correction_vectors(MASKS, torch.tensor([1.0, 0.5]), torch.tensor([0.0, -2.0]))
    z = torch.randn(4, 6)
    q = z * scale + shift
    assert torch.equal(q[:, :2], z[:, :2]), "task 0: no layer"
    assert torch.equal(q[:, 4:], z[:, 4:]), "task 2: no layer fitted yet"
    torch.testing.assert_close(q[:, 2:4], 0.5 * z[:, 2:4] - 2.0)
    none = correction_vectors(MASKS, torch.ones(0), torch.zeros(0))
    assert torch.equal(none[0], torch.ones(6)) and torch.equal(none[1], torch.zeros(6))


def test_bias_loss_is_the_cross_entropy_of_the_corrected_seen_outputs() -> None:
    z, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 2])
    new, seen = MASKS[1], MASKS[:2].any(0)
    alpha, beta = torch.tensor(0.7), torch.tensor(-0.3)
    q = torch.cat([z[:, :2], 0.7 * z[:, 2:4] - 0.3], dim=1)
    torch.testing.assert_close(bias_loss(z, y, new, seen, alpha, beta), F.cross_entropy(q, y))


def test_fit_lowers_the_loss_of_biased_logits_deterministically() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(25)
    z = F.one_hot(y, 6).float() * 3 + torch.randn(100, 6, generator=gen)
    z[:, 2:4] += 2.5  # the new classes' logits are biased upwards
    new, seen = MASKS[1], MASKS[:2].any(0)
    fits = [fit_bias(z, y, new, seen, 50, 16, 0.01, 0.9, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert fits[0] == fits[1], "same seed, same fit"
    alpha, beta = fits[0]
    before = bias_loss(z, y, new, seen, torch.tensor(1.0), torch.tensor(0.0))
    after = bias_loss(z, y, new, seen, torch.tensor(alpha), torch.tensor(beta))
    assert after < before - 0.1 and beta < 0


def test_holdout_counts_keep_one_exemplar_for_training() -> None:
    assert [holdout_count(m, 0.1) for m in (0, 1, 2, 10, 30, 50, 62)] == [0, 0, 1, 1, 3, 5, 7]
    assert holdout_count(50, 0.0) == 0 and holdout_count(3, 0.9) == 2


def test_exemplar_holdout_is_class_balanced_and_spread_over_the_priority_order() -> None:
    labels = torch.tensor([1] * 20 + [0] * 20)
    ranks = torch.cat([torch.randperm(20, generator=torch.Generator().manual_seed(0)), torch.arange(20)])
    held = spaced_holdout(labels, ranks, 0.1)
    assert torch.bincount(labels[held]).tolist() == [2, 2]
    assert sorted(ranks[held & (labels == 0)].tolist()) == [9, 19]
    assert sorted(ranks[held & (labels == 1)].tolist()) == [9, 19]


def test_new_data_holdout_is_balanced_seeded_and_never_takes_a_whole_class() -> None:
    labels = torch.tensor([3] * 30 + [4] * 2)
    a = balanced_holdout(labels, 5, torch.Generator().manual_seed(0))
    b = balanced_holdout(labels, 5, torch.Generator().manual_seed(0))
    c = balanced_holdout(labels, 5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.bincount(labels[a], minlength=5)[3:].tolist() == [5, 1]
    assert len(balanced_holdout(labels, 0, torch.Generator())) == 0
