"""Memory Aware Synapses: importance from the sensitivity of the output's norm, no labels needed."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.importance import mas_importance
from cl_lightning.methods.regularizer import QuadraticRegularizer, scenario_outputs, task_importance
from cl_lightning.methods.strength import AUTO
from cl_lightning.validation import check_int, check_optional_int

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule


class MAS(QuadraticRegularizer):
    """Memory Aware Synapses (Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018).

    At the end of task ``t``, over its training inputs (labels unused) and with ``z(x)`` the logits restricted to the
    scenario's training outputs (task-IL: the task's head; class-IL: the classes seen so far):

        Omega_t = E_x[ | d ||z(x)||_2^2 / d theta | ],     Omega += Omega_t,     theta* = theta

    (the absolute value taken per sample, before averaging; importances accumulate over tasks as in the paper),
    and later tasks are trained with ``L(theta) = L_task(theta) + lambda * sum_i Omega_i (theta_i - theta*_i)^2``
    (no 1/2). Per-sample gradients with ``torch.func`` in eval mode, like EWC's Fisher. The penalty's gradient is
    added right after the backward pass (the base's ``backward`` door, as a loss term would give it; its value logged
    as ``train/mas/penalty``) and composes with other methods.

    **Strength and plain SGD.** ``Omega`` scales with the logits' size and accumulates, and SGD with learning rate
    ``lr`` and momentum ``mu`` diverges on the penalty when ``lr * 2 lambda max_i Omega_i > 2 (1 + mu)``
    (:mod:`~cl_lightning.methods.strength`): the common ``lambda = 1`` (FACIL's MAS, Masana et al. 2022) does so on
    the embedded default. The default ``lambda_=auto`` is :attr:`AUTO_LAMBDA` (0.03; on the embedded default with
    SGD lr 0.1 the stiffest step measured at most 0.27 in class-IL and 0.17 in domain-IL, 0.32 on Split-MNIST,
    against the bound 2; 0.1 already keeps class-IL from learning the last task in one epoch) unless that is past
    half the bound, in which case the strength for the next task is capped there and the capping logged; a typed
    value is used as typed, and the method warns at a task end when SGD cannot be stable on it. The strength in
    force is reported as ``diagnostics.mas.lambda_``.

    DDP: the importance's samples are shared out across ranks and the sums all-reduced (one collective), so every
    rank holds the same ``Omega`` and anchor.

    Args:
        lambda_: Strength ``lambda >= 0`` (config key ``lambda_``), or ``"auto"`` (the default: :attr:`AUTO_LAMBDA`,
            capped where plain SGD would not be stable; see above).
        samples: Training samples of the task the importance is averaged over; ``None``: all of them.
        chunk_size: Per-sample gradients computed at once (memory: ``chunk_size x n_params`` floats).
    """

    name: ClassVar[str] = "mas"
    AUTO_LAMBDA: ClassVar[float] = 0.03  # what lambda_=auto is where plain SGD is stable on the penalty
    importance_key: ClassVar[str] = "omega"
    anchor_key: ClassVar[str] = "anchor"
    listed_state: ClassVar[bool] = False  # one running Omega and anchor

    def __init__(self, lambda_: float | str = AUTO, samples: int | None = 200, chunk_size: int = 8) -> None:
        super().__init__(lambda_, self.AUTO_LAMBDA)
        self.samples = check_optional_int("method.samples", samples)
        self.chunk_size = check_int("method.chunk_size", chunk_size)

    @property
    def lambda_(self) -> float:
        """The strength in force (the typed value, or what ``auto`` chose for the current task)."""
        return self.strength.value

    @override
    def importance(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> dict[str, Tensor]:
        """``Omega_t``: the mean absolute per-sample gradient of the squared norm of the task's training outputs."""
        outputs = scenario_outputs(pl_module, task_id)

        def compute(x: Tensor, y: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
            return mas_importance(pl_module.net, x, outputs=outputs, chunk_size=self.chunk_size, reduction="sum")

        return task_importance(trainer, pl_module, task_id, self.samples, compute)

    @override
    def consolidate(self, importance: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """``Omega += Omega_t``; the anchor becomes the current parameters."""
        self.keep_running(importance, anchor)
