"""Distillation loss against a hand-written KL, grouped softmaxes, and the T^2 scaling."""

from __future__ import annotations

import pytest
import torch

from cl_lightning.core.distill import distillation_loss, output_groups, padded_distillation_loss


def reference(student: torch.Tensor, teacher: torch.Tensor, groups: list[list[int]], t: float) -> torch.Tensor:
    total = torch.zeros(())
    for g in groups:
        p = (teacher[:, g] / t).softmax(-1)
        q = (student[:, g] / t).softmax(-1)
        total = total + (p * (p.log() - q.log())).sum(-1).mean()
    return total * t**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_matches_the_per_group_kl_and_groups_may_be_a_tensor_or_a_list(temperature: float) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 6), torch.randn(8, 6)
    groups = [[0, 1], [2, 3], [4, 5]]
    expected = reference(student, teacher, groups, temperature)
    as_tensor = distillation_loss(student, teacher, torch.tensor(groups), temperature)
    as_list = distillation_loss(student, teacher, [torch.tensor(g) for g in groups], temperature)
    torch.testing.assert_close(as_tensor, expected)
    torch.testing.assert_close(as_list, expected)


def test_zero_when_student_agrees_positive_otherwise_and_teacher_gets_no_gradient() -> None:
    z = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    assert distillation_loss(z, z.detach(), [torch.tensor([0, 1, 2])]).item() == pytest.approx(0.0, abs=1e-7)
    loss = distillation_loss(z, teacher, [torch.tensor([0, 4]), torch.tensor([1, 2, 3])])
    assert loss.item() > 0
    loss.backward()
    assert teacher.grad is None and z.grad is not None


def test_gradient_scale_is_independent_of_a_large_temperature() -> None:
    """Hinton et al. (2015): soft targets' gradients scale as 1/T^2, which the T^2 factor undoes. For large T,
    dL/dz = T (q - p) / B -> (z - z_teacher - their mean) / (K B), the same for every T."""
    torch.manual_seed(1)
    student, teacher = torch.randn(16, 4), torch.randn(16, 4)
    norms = []
    for t in (10.0, 40.0):
        z = student.clone().requires_grad_(True)
        distillation_loss(z, teacher, torch.tensor([[0, 1, 2, 3]]), t).backward()
        norms.append(z.grad.norm().item())
    assert norms[1] == pytest.approx(norms[0], rel=0.02)


def test_output_groups() -> None:
    masks = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    groups = output_groups(masks)
    assert isinstance(groups, list) and [g.tolist() for g in groups] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), [torch.tensor([0, 1])], temperature=0.0)


def test_padded_loss_is_the_kl_to_targets_with_zeros_on_the_new_outputs() -> None:
    """Van de Ven & Tolias's class-IL distillation: q over old + new classes, p over old classes padded with 0."""
    from cl_lightning.core.distill import padded_distillation_loss

    torch.manual_seed(0)
    student = torch.randn(5, 6, requires_grad=True)
    teacher = torch.randn(5, 6)
    seen = torch.tensor([True, True, True, True, False, False])
    old = torch.tensor([True, True, False, False, False, False])
    t = 2.0
    loss = padded_distillation_loss(student.masked_fill(~seen, float("-inf")), teacher, seen, old, t)
    p = torch.cat([torch.softmax(teacher[:, :2] / t, 1), torch.zeros(5, 2)], 1)
    log_q = torch.log_softmax(student[:, :4] / t, 1)
    expected = (p[:, :2] * (p[:, :2].log() - log_q[:, :2])).sum(1).mean() * t**2 - (p[:, 2:] * log_q[:, 2:]).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert (student.grad[:, 4:] == 0).all(), "outputs not trained on get no gradient"
    assert (student.grad[:, 2:4] > 0).all(), "the new classes' logits are pushed down"
    # same outputs for both: the plain distillation of one group
    same = padded_distillation_loss(student, teacher, old, old, t)
    assert same.item() == pytest.approx(distillation_loss(student, teacher, [torch.tensor([0, 1])], t).item(), rel=1e-5)


def test_class_mean_divides_each_group_and_the_padded_term_by_its_classes() -> None:
    """van de Ven & Tolias's 2019 ``loss_fn_kd`` (a mean over the batch and the classes): each group's term over
    its own classes; the padded term over the student's finite logits."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    groups = [torch.tensor([0, 1]), torch.tensor([2, 3, 4])]
    expected = distillation_loss(s, t, groups[:1]) / 2 + distillation_loss(s, t, groups[1:]) / 3
    torch.testing.assert_close(distillation_loss(s, t, groups, class_mean=True), expected)
    student = s.masked_fill(torch.tensor([False, False, False, True, True]), float("-inf"))  # 3 classes seen
    seen, old = torch.ones(5, dtype=torch.bool), torch.tensor([True, True, False, False, False])
    summed = padded_distillation_loss(student, t, seen, old, 2.0)
    torch.testing.assert_close(padded_distillation_loss(student, t, seen, old, 2.0, class_mean=True), summed / 3)
