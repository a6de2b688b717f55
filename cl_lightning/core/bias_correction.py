"""BiC's bias correction (Wu et al., "Large Scale Incremental Learning", CVPR 2019), Lightning-free.

The classifier trained on many new samples and few exemplars favours the new classes. BiC corrects the logits ``o``
of the classes of task ``t`` (the new ones) with two parameters fitted after the task on a small class-balanced
validation set, leaving the other logits as they are (their eq. 4)::

    q_k = alpha_t * o_k + beta_t    for the classes k of task t,        q_k = o_k    otherwise.

Here: the per-output scale and shift of every task's layer (:func:`correction_vectors`), the fit of a new layer on
validation logits (:func:`fit_bias`, :func:`bias_loss`), and the deterministic class-balanced hold-outs of the
validation set (:func:`holdout_count`, :func:`spaced_holdout` for the exemplars, :func:`balanced_holdout` for the new
data).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["balanced_holdout", "bias_loss", "correction_vectors", "fit_bias", "holdout_count", "spaced_holdout"]


def correction_vectors(masks: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output ``(scale, shift)``: the outputs of task ``j < len(alpha)`` get ``(alpha[j], beta[j])``, every other
    output ``(1, 0)``, so that ``logits * scale + shift`` applies every task's layer to its own classes.

    Args:
        masks: ``[T, K]`` boolean, the outputs of each task (disjoint rows).
        alpha: ``[n]`` scales of the first ``n`` tasks (``1`` for a task without a layer).
        beta: ``[n]`` shifts.

    Example:
        >>> masks = torch.tensor([[True, True, False, False], [False, False, True, True]])
        >>> correction_vectors(masks, torch.tensor([1.0, 0.5]), torch.tensor([0.0, -2.0]))
        (tensor([1.0000, 1.0000, 0.5000, 0.5000]), tensor([ 0.,  0., -2., -2.]))
    """
    n = len(alpha)
    k = masks.shape[1]
    if n == 0:
        return torch.ones(k, dtype=alpha.dtype), torch.zeros(k, dtype=beta.dtype)
    rows = masks[:n].to(alpha.device)
    task_of = rows.to(torch.uint8).argmax(0)  # the task owning each output (0 where none does: masked below)
    covered = rows.any(0)
    scale = torch.where(covered, alpha[task_of], torch.ones((), dtype=alpha.dtype, device=alpha.device))
    shift = torch.where(covered, beta[task_of], torch.zeros((), dtype=beta.dtype, device=beta.device))
    return scale, shift


def bias_loss(logits: Tensor, labels: Tensor, new: Tensor, seen: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Cross-entropy over the ``seen`` outputs of the logits with the ``new`` outputs corrected by ``(alpha, beta)``
    (their eq. 5; no temperature).

    Args:
        logits: ``[V, K]`` validation logits (earlier tasks' layers already applied), constants.
        labels: ``[V]``.
        new: ``[K]`` boolean, the outputs the new layer corrects.
        seen: ``[K]`` boolean, the outputs of the classes seen so far (the others are not classes yet).
        alpha: 0-dim scale.
        beta: 0-dim shift.
    """
    q = torch.where(new, alpha * logits + beta, logits).masked_fill(~seen, float("-inf"))
    return F.cross_entropy(q, labels)


def fit_bias(
    logits: Tensor,
    labels: Tensor,
    new: Tensor,
    seen: Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """Fit ``(alpha, beta)`` of the new outputs' layer from ``(1, 0)`` by minimising :func:`bias_loss`: SGD with
    momentum, ``epochs`` passes over the ``V`` samples in shuffled batches of ``batch_size`` (shuffles drawn from
    ``generator`` on the host: the same on every device and process).

    The network is not involved: its logits are computed once by the caller (the network is frozen in this stage),
    so the fit is cheap and touches no weight of it. Returns the fitted ``(alpha, beta)``.

    Example:
        >>> z = torch.tensor([[0.0, 3.0], [0.0, 3.0], [0.0, -1.0]])  # the new class (1) is over-confident
        >>> y = torch.tensor([0, 0, 1])
        >>> new, seen = torch.tensor([False, True]), torch.tensor([True, True])
        >>> a, b = fit_bias(z, y, new, seen, 100, 3, 0.1, 0.9, torch.Generator().manual_seed(0))
        >>> bool(bias_loss(z, y, new, seen, torch.tensor(a), torch.tensor(b)) < bias_loss(z, y, new, seen, 1, 0))
        True
    """
    logits, labels = logits.detach().float(), labels.to(logits.device)
    new, seen = new.to(logits.device), seen.to(logits.device)
    alpha = torch.ones((), device=logits.device, requires_grad=True)
    beta = torch.zeros((), device=logits.device, requires_grad=True)
    optimizer = torch.optim.SGD([alpha, beta], lr=lr, momentum=momentum)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            i = idx.to(logits.device)
            loss = bias_loss(logits[i], labels[i], new, seen, alpha, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return float(alpha.detach()), float(beta.detach())


def holdout_count(m: int, fraction: float) -> int:
    """How many of a class's ``m`` exemplars are held out: ``ceil(fraction * m)``, but at least one stays for
    training (``0`` when ``m < 2`` or ``fraction == 0``).

    >>> [holdout_count(m, 0.1) for m in (50, 62, 30, 1)], holdout_count(2, 0.5)
    ([5, 7, 3, 0], 1)
    """
    if m < 2 or fraction <= 0:
        return 0
    return min(m - 1, math.ceil(fraction * m - 1e-9))  # 1e-9: 0.1 * 30 is 3.0000000000000004 in floating point


def spaced_holdout(labels: Tensor, ranks: Tensor, fraction: float) -> Tensor:
    """Boolean mask of the held-out exemplars: of each class's ``m`` exemplars, ordered by ``ranks`` (their
    position in the memory's priority order, herding's or a random one), the :func:`holdout_count` ones at positions
    ``m - 1 - floor(i * m / v)``, ``i < v``: evenly spaced through the order, the last one included. Deterministic.

    >>> labels, ranks = torch.tensor([0] * 10 + [1] * 4), torch.cat([torch.arange(10), torch.arange(4)])
    >>> spaced_holdout(labels, ranks, 0.2).nonzero().view(-1)
    tensor([ 4,  9, 13])
    """
    held = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).view(-1)
        order = idx[torch.argsort(ranks[idx], stable=True)]
        m = len(order)
        v = holdout_count(m, fraction)
        if v:
            positions = m - 1 - (torch.arange(v, device=labels.device) * m) // v
            held[order[positions]] = True
    return held


def balanced_holdout(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Sorted indices of ``per_class`` samples of each class of ``labels``, drawn uniformly without replacement with
    ``generator`` (host), classes in increasing order; at least one sample of each class is left out.

    >>> idx = balanced_holdout(torch.tensor([0, 0, 0, 1, 1, 1, 1]), 2, torch.Generator().manual_seed(0))
    >>> torch.bincount(torch.tensor([0, 0, 0, 1, 1, 1, 1])[idx]).tolist()
    [2, 2]
    """
    labels = labels.cpu()
    chosen = [torch.zeros(0, dtype=torch.long)]
    if per_class > 0:
        for c in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == c).view(-1)
            k = min(per_class, len(idx) - 1)
            chosen.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.sort(torch.cat(chosen)).values
