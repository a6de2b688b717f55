"""Memory Aware Synapses: importance from the sensitivity of the output's norm, no labels needed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.importance import mas_importance, quadratic_penalty, trainable_parameters
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.ewc import (
    check_chunk,
    check_number,
    check_samples,
    scenario_outputs,
    task_importance,
    warn_if_stiff,
)

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


class MAS(CLMethod):
    """Memory Aware Synapses (Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018).

    At the end of task ``t``, over its training inputs (labels unused) and with ``z(x)`` the logits restricted to the
    scenario's training outputs (task-IL: the task's head; class-IL: the classes seen so far):

        Omega_t = E_x[ | d ||z(x)||_2^2 / d theta | ],     Omega += Omega_t,     theta* = theta

    (the absolute value taken per sample, before averaging; importances accumulate over tasks as in the paper),
    and later tasks are trained with ``L(theta) = L_task(theta) + lambda * sum_i Omega_i (theta_i - theta*_i)^2``
    (no 1/2). Per-sample gradients with ``torch.func`` in eval mode, like EWC's Fisher. The penalty is a loss
    term (``mas/penalty``) and composes with other methods.

    DDP: the importance's samples are shared out across ranks and the sums all-reduced (one collective), so every
    rank holds the same ``Omega`` and anchor.

    Args:
        lambda_: Strength ``lambda >= 0`` (config key ``lambda_``).
        samples: Training samples of the task the importance is averaged over; ``None``: all of them.
        chunk_size: Per-sample gradients computed at once (memory: ``chunk_size x n_params`` floats).
    """

    name: ClassVar[str] = "mas"
    needs_task_boundaries: ClassVar[bool] = True

    def __init__(self, lambda_: float = 1.0, samples: int | None = 200, chunk_size: int = 8) -> None:
        super().__init__()
        self.lambda_ = check_number("method.lambda_", lambda_)
        self.samples = check_samples("method.samples", samples)
        self.chunk_size = check_chunk("method.chunk_size", chunk_size)
        self.omega: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.consolidated = -1
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._on_device: tuple[list[Tensor], list[Tensor]] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = trainable_parameters(pl_module.net)  # type: ignore[arg-type]
        self._names, self._params = list(named), list(named.values())
        self._on_device = None

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id <= self.consolidated:
            return
        outputs = scenario_outputs(pl_module, task_id)

        def compute(x: Tensor, y: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
            return mas_importance(pl_module.net, x, outputs=outputs, chunk_size=self.chunk_size, reduction="sum")

        importance = task_importance(trainer, pl_module, task_id, self.samples, compute)
        for name, p in trainable_parameters(pl_module.net).items():
            new = importance[name]
            self.omega[name] = self.omega[name].to(new.device) + new if name in self.omega else new
            self.anchor[name] = p.detach().clone()
        self.consolidated = task_id
        self._on_device = None
        stiffest = max(float(o.max()) for o in self.omega.values() if o.numel())
        warn_if_stiff(trainer, self.name, "method.lambda_", 2 * self.lambda_ * stiffest)

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if not self.omega or self.lambda_ == 0:
            return {}
        if self._on_device is None:
            device = self._params[0].device
            self._on_device = (
                [self.omega[n].to(device) for n in self._names],
                [self.anchor[n].to(device) for n in self._names],
            )
        omega, anchor = self._on_device
        return {"penalty": quadratic_penalty(self._params, anchor, omega, self.lambda_)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"omega": self.omega, "anchor": self.anchor, "consolidated": self.consolidated}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.omega = dict(state_dict.get("omega", {}))
        self.anchor = dict(state_dict.get("anchor", {}))
        self.consolidated = int(state_dict.get("consolidated", -1))
        self._on_device = None
