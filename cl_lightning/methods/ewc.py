"""Elastic Weight Consolidation: a quadratic penalty per old task, weighted by the diagonal Fisher information."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.importance import FISHER_MODES, diagonal_fisher
from cl_lightning.methods.regularizer import QuadraticRegularizer, scenario_outputs, task_importance
from cl_lightning.methods.strength import AUTO
from cl_lightning.validation import check_choice, check_int, check_optional_int

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule

__all__ = ["EWC"]


class EWC(QuadraticRegularizer):
    """Elastic Weight Consolidation (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
    PNAS 2017), with one penalty per old task (Kirkpatrick et al.'s reply to Huszár, PNAS 2018):

        L(theta) = L_task(theta) + (lambda / 2) * sum_{t < current} sum_i F_{t,i} (theta_i - theta*_{t,i})^2

    where ``theta*_t`` are the parameters at the end of task ``t`` and ``F_t`` the diagonal of the Fisher
    information of task ``t``'s training data at ``theta*_t``. ``lambda`` is the strength *with the 1/2 written
    out*, as in the paper and in van de Ven & Tolias (2019), so their values carry over.

    The Fisher is computed at each task's end, in eval mode (BatchNorm statistics untouched), on ``fisher_samples``
    un-augmented training samples of the task, from per-sample gradients (``torch.func``) of ``log p(c|x)`` over
    the scenario's training outputs (the task's head in task-IL, the classes seen so far in class-IL, the shared
    head in domain-IL) -- not from the square of a batch-mean gradient, as many copied implementations do, which
    underestimates it by about the batch size and mixes samples. ``fisher`` chooses the expectation over labels:
    ``exact`` (``sum_c p(c|x) g_c^2``, the true Fisher; one gradient per sample *and* output, so its cost grows
    with the classes seen in class-IL), ``sampled`` (``c ~ p(.|x)``, one gradient per sample) or ``empirical``
    (true labels); see :func:`~cl_lightning.core.importance.diagonal_fisher`. van de Ven (2025, "On the
    computation of the Fisher information in continual learning") finds the exact Fisher on a subset of the data
    the best choice, hence the defaults.

    Each task keeps its own Fisher and anchor (state ``fishers``/``anchors``, never an accumulated Fisher counted
    again); at every step the sum of the per-task quadratics is evaluated as the single equivalent quadratic
    ``A (theta - m)^2 + K`` (:class:`~cl_lightning.methods.regularizer.QuadraticRegularizer`), so a step costs the
    same however many tasks are remembered. The penalty's gradient is added right after the backward pass (the base's
    ``backward`` door: what a loss term would give, for a third of the cost), so it composes with any other method's
    loss terms and gradient edits; its value is logged as ``train/ewc/penalty``.

    **Strength and plain SGD.** SGD with learning rate ``lr`` and momentum ``mu`` diverges on the penalty when
    ``lr * lambda * max_i A_i > 2 (1 + mu)``, ``A`` the summed Fishers (:mod:`~cl_lightning.methods.strength`).
    Strengths tuned with Adam are far past that: van de Ven & Tolias's ``1e7`` (Split-MNIST task-IL; ``1e6``
    domain-IL, ``1e8`` class-IL, in ``experiment=vdv_split_mnist``) is about 4,000 times the bound on the embedded
    default. The default ``lambda_=auto`` is :attr:`AUTO_LAMBDA` (100; on the embedded default with SGD lr 0.1 its
    stiffest step ``lr * lambda * max A`` measured at most 0.5 in class-IL, 0.87 in domain-IL, and 1.7 on
    Split-MNIST, against the bound 2) unless that is past half the bound, in which case the strength for the next
    task is capped there and the capping logged; a typed value is used as typed, and the method warns at a task end
    when SGD cannot be stable on it, naming the largest value that is. The strength in force is reported as
    ``diagnostics.ewc.lambda_``.

    DDP: the Fisher's samples are shared out across ranks and the sums all-reduced, so every rank holds the same
    Fisher and anchors (parameters are identical across ranks) and computes the same penalty.

    Args:
        lambda_: Strength ``lambda >= 0`` (config key ``lambda_``: ``lambda`` is a Python keyword), or ``"auto"``
            (the default: :attr:`AUTO_LAMBDA`, capped where plain SGD would not be stable; see above).
        fisher: ``exact``, ``sampled`` or ``empirical``.
        fisher_samples: Training samples of the task the Fisher is averaged over; ``None``: all of them.
        chunk_size: Per-sample gradients computed at once (memory: ``chunk_size x n_params`` floats).
    """

    name: ClassVar[str] = "ewc"
    AUTO_LAMBDA: ClassVar[float] = 100.0  # what lambda_=auto is where plain SGD is stable on the penalty
    penalty_factor: ClassVar[float] = 0.5  # the paper's lambda / 2
    importance_key: ClassVar[str] = "fishers"  # and "anchors": one of each per task

    def __init__(
        self,
        lambda_: float | str = AUTO,
        fisher: str = "exact",
        fisher_samples: int | None = 200,
        chunk_size: int = 8,
    ) -> None:
        super().__init__(lambda_, self.AUTO_LAMBDA)
        self.fisher = check_choice("method.fisher", fisher, FISHER_MODES)
        self.fisher_samples = check_optional_int("method.fisher_samples", fisher_samples)
        self.chunk_size = check_int("method.chunk_size", chunk_size)

    @property
    def lambda_(self) -> float:
        """The strength in force (the typed value, or what ``auto`` chose for the current task)."""
        return self.strength.value

    @override
    def importance(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> dict[str, Tensor]:
        """The diagonal Fisher of ``task_id`` at the current parameters, over its training outputs."""
        outputs = scenario_outputs(pl_module, task_id)

        def compute(x: Tensor, y: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
            return diagonal_fisher(
                pl_module.net, x, self.fisher, targets=y, outputs=outputs, chunk_size=self.chunk_size,
                generator=gen, reduction="sum",
            )  # fmt: skip

        return task_importance(trainer, pl_module, task_id, self.fisher_samples, compute)
