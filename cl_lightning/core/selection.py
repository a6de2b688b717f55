"""Exemplar selection by features, Lightning-free: herding (iCaRL) and greedy k-center (coreset), as priority orders.

:class:`~cl_lightning.core.buffer.Buffer` uses them for its task-end selections (``herding``, ``kcenter``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["herding_selection", "kcenter_selection"]


def herding_selection(features: Tensor, k: int) -> Tensor:
    """iCaRL's herding: indices of ``k`` distinct rows whose running mean stays closest to the mean of all rows.

    Step ``i`` (1-based) picks ``argmin_x || mu - (s + f_x) / i ||`` over rows not yet chosen, ``s`` being the sum
    of the rows already chosen. The result is a priority order: its first ``m`` entries are herding's choice of
    ``m`` exemplars.

    >>> herding_selection(torch.tensor([[3.0], [0.5], [-3.5]]), 2).tolist()
    [1, 2]
    """
    n = features.shape[0]
    k = min(k, n)
    feats = features.double()
    mu = feats.mean(0)
    running = torch.zeros_like(mu)
    available = torch.ones(n, dtype=torch.bool, device=features.device)
    chosen = []
    for i in range(1, k + 1):
        dist = (mu - (running + feats) / i).norm(dim=1).masked_fill(~available, float("inf"))
        j = int(dist.argmin())
        chosen.append(j)
        running += feats[j]
        available[j] = False
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def kcenter_selection(features: Tensor, k: int) -> Tensor:
    """Greedy k-center (farthest-first traversal): indices of ``k`` rows, a 2-approximation of the k-center cover.

    The first center is the row nearest the mean of all rows (a deterministic, central start); each next one is the
    row farthest from its nearest chosen center. The result is a priority order.

    >>> kcenter_selection(torch.tensor([[0.0], [1.0], [2.0], [10.0], [-7.0]]), 3).tolist()
    [1, 3, 4]
    """
    n = features.shape[0]
    k = min(k, n)
    feats = features.double()
    first = int((feats - feats.mean(0)).norm(dim=1).argmin())
    chosen = [first]
    nearest = (feats - feats[first]).norm(dim=1)
    for _ in range(1, k):
        j = int(nearest.argmax())
        chosen.append(j)
        nearest = torch.minimum(nearest, (feats - feats[j]).norm(dim=1))
    return torch.tensor(chosen, dtype=torch.long, device=features.device)
