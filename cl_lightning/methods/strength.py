"""The strength of a quadratic penalty (EWC, online EWC, SI, MAS) and plain SGD's stability bound on it.

Gradient descent on ``h/2 (theta - a)^2`` with learning rate ``lr`` and momentum ``mu`` diverges when
``lr * h > 2 (1 + mu)`` (heavy-ball iteration on a quadratic). A penalty ``strength * sum_i w_i (theta_i - a_i)^2``
has largest curvature ``h = strength * u`` with ``u`` its *unit curvature* (``max_i w_i`` times 1 or 2, depending on
whether the method writes the 1/2), so with plain SGD the strength is bounded by ``2 (1 + mu) / (lr * u)``.
Strengths tuned with Adam (van de Ven & Tolias's ``1e7`` for EWC) are thousands of times past that bound; the
importances grow from task to task, so a strength stable after the first task may not be after the fourth.

A strength from the config is either

- a number: used exactly as typed, whatever the optimizer (nothing the user typed is replaced); at every task end,
  when it is past SGD's bound, a warning says so with the largest stable value; or
- ``auto`` (every method's default): a reference value (the class's ``AUTO_*`` constant, documented in
  ``conf/method/<name>.yaml``) unless that is past *half* of SGD's bound, ``lr * h = 1 + mu``, in which case the
  strength for the next task is that half-bound value, recomputed at every task end from the accumulated
  importance and announced in one log line. Half rather than the bound itself: at the bound SGD oscillates on the
  stiffest weight without converging, at half it lands on the anchor in one step, and the task loss's own curvature
  adds to the penalty's. With an optimizer other than plain SGD (Adam's steps are bounded by its learning rate)
  ``auto`` is the reference. The strength in force is in the method's state and in ``results.json`` under
  ``diagnostics.<method>.<key>``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cl_lightning.errors import ConfigError

__all__ = ["AUTO", "Strength", "sgd_strength_bound", "sgd_steps", "task_follows", "warn_if_stiff"]

AUTO: Final = "auto"

log = logging.getLogger(__name__)


def task_follows(trainer: pl.Trainer, task_id: int) -> bool:
    """Whether the run trains a task after ``task_id`` (the strength chosen or checked at its end is then used)."""
    n_tasks = getattr(getattr(trainer, "datamodule", None), "n_tasks", None)
    return n_tasks is None or task_id + 1 < int(n_tasks)


def sgd_steps(trainer: pl.Trainer) -> list[tuple[float, float]]:
    """``(lr, momentum)`` of every parameter group of the trainer's plain-SGD optimizers (others are not checked).

    The larger of the group's ``lr`` and ``initial_lr`` (set by LR schedulers): a new task's optimizer starts from
    the initial rate again.
    """
    steps = []
    for optimizer in getattr(trainer, "optimizers", []):
        if type(optimizer) is not torch.optim.SGD:
            continue
        for group in optimizer.param_groups:
            lr = max(float(group["lr"]), float(group.get("initial_lr", 0.0)))
            steps.append((lr, float(group.get("momentum", 0.0))))
    return steps


def sgd_strength_bound(steps: list[tuple[float, float]], unit_curvature: float, fraction: float = 1.0) -> float:
    """Largest strength with ``lr * strength * unit_curvature <= fraction * 2 (1 + momentum)`` for every group
    (``inf`` when there is no SGD group or the penalty is flat).

    >>> sgd_strength_bound([(0.1, 0.0)], unit_curvature=1.0)
    20.0
    >>> sgd_strength_bound([(0.1, 0.5), (0.2, 0.0)], unit_curvature=1.0, fraction=0.5)
    5.0
    """
    bounds = [fraction * 2.0 * (1.0 + mu) / (lr * unit_curvature) for lr, mu in steps if lr * unit_curvature > 0]
    return min(bounds, default=math.inf)


def warn_if_stiff(trainer: pl.Trainer, method: str, key: str, curvature: float, value: float | None = None) -> None:
    """Warn when plain SGD cannot be stable on a quadratic penalty of this curvature (its largest second derivative).

    Gradient descent on ``h/2 (theta - a)^2`` with learning rate ``lr`` and momentum ``mu`` diverges when
    ``lr * h > 2 (1 + mu)``; strengths tuned with Adam (van de Ven & Tolias's) are far past that for SGD. Adaptive
    optimizers are not checked (their steps are bounded by their learning rate). With ``value``, the strength that
    gave ``curvature``, the message also names the largest stable value.
    """
    for lr, momentum in sgd_steps(trainer):
        limit = 2.0 * (1.0 + momentum)
        if lr * curvature > limit:
            named = key if value is None else f"{key}={value:g}"
            stable = "" if value is None else f" (at most {value * limit / (lr * curvature):.3g})"
            rank_zero_warn(
                f"method={method}: {named}: SGD lr {lr:g} x the penalty's largest curvature {curvature:.3g} = "
                f"{lr * curvature:.3g} > {limit:g}, so SGD diverges on the penalty; lower {key} about "
                f"{lr * curvature / limit:.2g}-fold or more{stable}, or use optimizer=adam"
            )
            return


class Strength:
    """A penalty's strength as configured: a number used as typed, or ``auto`` (see the module docstring).

    Args:
        key: The config key, for messages (``method.lambda_``).
        value: A number ``>= 0`` or ``"auto"``.
        reference: What ``auto`` stands for where plain SGD is stable (the method's ``AUTO_*`` constant).

    Attributes:
        auto: Whether the strength is chosen by the method.
        value: The strength in force.
    """

    def __init__(self, key: str, value: float | str, reference: float) -> None:
        self.key, self.reference = key, float(reference)
        self.auto = value == AUTO
        if not self.auto and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < math.inf
        ):
            raise ConfigError(f"{key}={value!r}: must be a number >= 0 or {AUTO}")
        self.value = self.reference if self.auto else float(value)

    def consolidate(self, trainer: pl.Trainer, method: str, unit_curvature: float) -> float:
        """At a task end, with the penalty's new unit curvature: choose (``auto``) or check (typed) the strength.

        Args:
            trainer: Its optimizers give the learning rates and momenta.
            method: The method's name, for messages.
            unit_curvature: The penalty's largest second derivative per unit of strength.

        Returns:
            The strength for the next task.
        """
        if not self.auto:
            warn_if_stiff(trainer, method, self.key, self.value * unit_curvature, self.value)
            return self.value
        steps = sgd_steps(trainer)
        capped = sgd_strength_bound(steps, unit_curvature, fraction=0.5)
        self.value = min(self.reference, capped)
        if capped < self.reference and getattr(trainer, "is_global_zero", True):
            lr, mu = min(steps, key=lambda s: (1.0 + s[1]) / s[0])
            log.info(
                f"method={method}: {self.key}={AUTO} -> {self.value:.3g} for the next task, not {self.reference:g}: "
                f"with SGD lr {lr:g} the penalty's stiffest step lr x {self.value:.3g} x {unit_curvature:.3g} is then "
                f"{1.0 + mu:g}, half of SGD's stability bound (type {self.key} to choose the value yourself)"
            )
        return self.value

    def state(self) -> float:
        """The strength in force (for the method's ``state_dict``)."""
        return self.value

    def load(self, value: Any) -> None:
        """Restore the strength an ``auto`` run chose; a typed value stays the config's."""
        if self.auto and value is not None:
            self.value = float(value)
