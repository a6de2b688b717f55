"""The nearest-mean-of-exemplars classifier (iCaRL; also LUCIR's NME evaluation), Lightning-free.

Class means are the L2-normalised means of the exemplars' L2-normalised features; a sample is assigned the class
whose mean is nearest to its normalised feature vector.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClassMeans", "class_means", "nme_scores"]


def class_means(features: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """``(means [n_classes, D], has_mean [n_classes] bool)``: ``mu_y = normalise(mean_{i: y_i = y} f_i /
    ||f_i||)``; classes without samples get a zero row and ``has_mean`` false.

    >>> means, has = class_means(torch.tensor([[2.0, 0.0], [5.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 0, 2]), 3)
    >>> means.tolist(), has.tolist()
    ([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], [True, False, True])
    """
    feats = F.normalize(features.float(), dim=1)
    sums = torch.zeros(n_classes, feats.shape[1], device=feats.device).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=n_classes)
    return F.normalize(sums / counts.clamp(min=1).unsqueeze(1), dim=1), counts > 0


def nme_scores(features: Tensor, means: Tensor, has_mean: Tensor) -> Tensor:
    """``-|| f / ||f|| - mu_y ||`` for every class ``y`` (``-inf`` where ``has_mean`` is false): the argmax is the
    nearest mean, and the direction of ``f`` alone decides it.

    >>> means, has = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), torch.tensor([True, True, False])
    >>> nme_scores(torch.tensor([[3.0, 1.0], [0.0, 0.1]]), means, has).argmax(1).tolist()
    [0, 1]
    """
    scores = -torch.cdist(F.normalize(features.float(), dim=1), means.float())
    return scores.masked_fill(~has_mean, float("-inf"))


class ClassMeans:
    """The class means of a nearest-mean classifier, the task end they were computed at, and their state.

    Attributes:
        means: ``[n_classes, D]`` (``None`` before the first :meth:`update`).
        has_mean: ``[n_classes]`` bool.
        task: The task at whose end they were computed (``-1``: never).
    """

    def __init__(self) -> None:
        self.means: Tensor | None = None
        self.has_mean: Tensor | None = None
        self.task = -1

    @property
    def ready(self) -> bool:
        """Whether there are means to classify with."""
        return self.means is not None and self.has_mean is not None

    def update(self, features: Tensor, labels: Tensor, n_classes: int, task: int) -> None:
        """Recompute from exemplars' features at the end of ``task`` (:func:`class_means`), once per task."""
        if task > self.task:
            self.means, self.has_mean = class_means(features, labels, n_classes)
            self.task = task

    def scores(self, features: Tensor) -> Tensor:
        """:func:`nme_scores` of ``features`` (requires :attr:`ready`)."""
        assert self.means is not None and self.has_mean is not None
        return nme_scores(features, self.means, self.has_mean)

    def to(self, device: torch.device | str) -> None:
        """Move the means to ``device``."""
        if self.means is not None and self.has_mean is not None:
            self.means, self.has_mean = self.means.to(device), self.has_mean.to(device)

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and the task: ``{"means", "has_mean", "means_task"}`` (no tensors before an update)."""
        state: dict[str, Any] = {"means_task": self.task}
        if self.means is not None and self.has_mean is not None:
            state |= {"means": self.means.detach().cpu(), "has_mean": self.has_mean.cpu()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.task = int(state.get("means_task", -1))
        means, has_mean = state.get("means"), state.get("has_mean")
        self.means = None if means is None else means.clone()
        self.has_mean = None if has_mean is None else has_mean.clone()
