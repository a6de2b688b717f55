"""Knowledge distillation between a frozen teacher's logits and a student's, over groups of outputs (Lightning-free).

Learning without Forgetting (Li & Hoiem 2017) keeps the network's answers on old tasks close to those of the network
as it was before the new task, measured with Hinton et al.'s (2015) temperature-softened distributions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distillation_loss", "output_groups", "padded_distillation_loss"]


def output_groups(masks: Tensor) -> Tensor | list[Tensor]:
    """Logit indices of each row of a boolean ``[G, K]`` mask: a ``[G, k]`` tensor when every group has ``k``
    outputs (one vectorised softmax over all groups), else a list of 1-D index tensors.

    >>> output_groups(torch.tensor([[True, True, False, False], [False, False, True, True]]))
    tensor([[0, 1],
            [2, 3]])
    >>> output_groups(torch.tensor([[True, False, False], [False, True, True]]))
    [tensor([0]), tensor([1, 2])]
    """
    groups = [row.nonzero().squeeze(1) for row in masks]
    if groups and all(len(g) == len(groups[0]) for g in groups):
        return torch.stack(groups)
    return groups


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    groups: Tensor | Sequence[Tensor],
    temperature: float = 2.0,
    class_mean: bool = False,
) -> Tensor:
    """``T^2 * sum_g KL(softmax(teacher_g / T) || softmax(student_g / T))``, averaged over the batch.

    With ``class_mean`` each group's term is divided by its number of classes ``|g|`` (van de Ven & Tolias's
    ``loss_fn_kd`` in the code of their 2019 paper: a mean over the batch and the classes).

    Each group ``g`` (a set of logit indices: an old task's head, or the old classes) is its own distribution. The
    ``T^2`` factor keeps the gradient's scale independent of ``T`` (Hinton et al. 2015, section 2: the soft targets'
    gradients scale as ``1/T^2``). KL rather than the soft cross-entropy ``-sum p_teacher log p_student`` of Li &
    Hoiem: they differ by the teacher's entropy, a constant, so the gradients are the same and the loss is 0 when
    the student agrees with the teacher.

    Args:
        student_logits: ``[B, K]``, in the autograd graph.
        teacher_logits: ``[B, K]``, constants.
        groups: ``[G, k]`` index tensor (equal groups, vectorised) or a sequence of 1-D index tensors.
        temperature: ``T > 0``.
        class_mean: Divide each group's term by its number of classes.

    Example:
        >>> z = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
        >>> distillation_loss(z, z, torch.tensor([[0, 1], [2, 3]])).item()
        0.0
        >>> distillation_loss(z, torch.zeros(1, 4), [torch.tensor([0, 1])], temperature=1.0).item() > 0
        True
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if class_mean:
        return sum(distillation_loss(student_logits, teacher_logits, [g], temperature) / len(g) for g in groups)
    teacher_logits = teacher_logits.detach()
    if isinstance(groups, Tensor) and groups.dim() == 2:
        groups = groups.to(student_logits.device)
        student = student_logits[:, groups] / temperature  # [B, G, k]
        teacher = teacher_logits[:, groups].to(student.dtype) / temperature
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
        total = kl.sum((1, 2))
    else:
        total = student_logits.new_zeros(student_logits.shape[0])
        for g in groups:
            g = g.to(student_logits.device)
            student = student_logits[:, g] / temperature
            teacher = teacher_logits[:, g].to(student.dtype) / temperature
            kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
            total = total + kl.sum(1)
    return total.mean() * temperature**2


def padded_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_outputs: Tensor,
    teacher_outputs: Tensor,
    temperature: float,
    class_mean: bool = False,
) -> Tensor:
    """``T^2 * KL(p || q)`` with ``q`` the student's softmax over ``student_outputs`` and ``p`` the teacher's softmax
    over ``teacher_outputs`` (a subset), padded with zero probability on the student's other outputs; batch mean.
    With ``class_mean``, divided by the number of classes ``q`` covers (its finite logits inside
    ``student_outputs``), as van de Ven & Tolias's ``loss_fn_kd`` in the code of their 2019 paper.

    Van de Ven & Tolias's (2019) class-incremental distillation (their ``loss_fn_kd`` appends zeros to the targets):
    the student's distribution covers every class seen so far, the current task's included, and the targets put no
    mass on the current task's classes, so the term also pulls those classes' probabilities down on the new data.
    With ``student_outputs == teacher_outputs`` it is :func:`distillation_loss` of one group.

    Args:
        student_logits: ``[B, K]``, in the autograd graph (entries outside ``student_outputs`` may be ``-inf``).
        teacher_logits: ``[B, K]``, constants.
        student_outputs: ``[K]`` boolean mask.
        teacher_outputs: ``[K]`` boolean mask, contained in ``student_outputs``.
        temperature: ``T > 0``.
        class_mean: Divide by the number of the student's classes.

    Example:
        >>> z = torch.tensor([[2.0, 0.0, 5.0]])
        >>> seen, old = torch.tensor([True, True, True]), torch.tensor([True, True, False])
        >>> padded_distillation_loss(z, z, old, old, 1.0).item()
        0.0
        >>> padded_distillation_loss(z, z, seen, old, 1.0).item() > 0  # the new class's mass is penalised
        True
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    t = temperature
    log_q = F.log_softmax(student_logits.masked_fill(~student_outputs, float("-inf")) / t, -1)
    log_p = F.log_softmax(teacher_logits.detach().to(log_q.dtype).masked_fill(~teacher_outputs, float("-inf")) / t, -1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(1)
    loss = kl.mean() * t**2
    return loss / torch.isfinite(log_q[0]).sum() if class_mean else loss
