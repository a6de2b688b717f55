"""Synaptic Intelligence: importance from each parameter's contribution to the drop of the loss along its path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.importance import PathIntegral
from cl_lightning.methods.regularizer import QuadraticRegularizer
from cl_lightning.methods.strength import AUTO
from cl_lightning.validation import check_number

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule


class SI(QuadraticRegularizer):
    """Synaptic Intelligence (Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017).

    During task ``t`` every optimizer step ``s`` adds to the path integral ``w_k += -g_k(s) * delta_k(s)``, with
    ``g`` the gradient of the task loss before the step and ``delta = theta(s+1) - theta(s)`` the change the
    optimizer actually made. At the task's end, with ``Delta_k`` the parameter's total change
    over the task and damping ``xi``:

        omega_k = max(0, w_k / (Delta_k^2 + xi)),     Omega_k += omega_k,     theta*_k = theta_k

    and the following tasks are trained with ``L(theta) = L_task(theta) + c * sum_k Omega_k (theta_k - theta*_k)^2``
    (no 1/2). ``Omega`` accumulates over tasks, the anchor is the latest parameters.

    **The penalty is applied as a gradient edit, not as a loss term.** The module backpropagates the task loss and
    every loss term in one backward pass, so a penalty returned from ``loss_terms`` would already be inside
    ``p.grad`` when the step is recorded, and the path integral would credit the penalty's own pull with the task
    (the gradient Zenke et al. integrate is that of the unregularised loss; the common shortcut of reading
    ``p.grad`` after backpropagating loss + penalty integrates the wrong one). So in ``on_before_optimizer_step``
    (after AMP unscaling, before gradient clipping and the step) SI first records ``p.grad`` (the task loss plus
    other methods' loss terms, e.g. replay, none of them SI's), then adds its penalty's gradient
    ``2 c Omega (theta - theta*)`` to ``p.grad``, so the optimizer (SGD, momentum, Adam) sees exactly what a loss
    term would give it (test: a huge ``c`` keeps the weights at the anchor; Avalanche's SI once never applied its
    penalty, issue 734). ``on_train_batch_end`` (after ``optimizer.step()``) records the change. The penalty's value
    is not in the logged ``train/loss``; it is logged as ``train/si/penalty`` every ``module.log_every_n_steps``.

    ``gradient_edit`` stays ``None``: adding a penalty's gradient is additive and composes with any other method,
    like a loss term would. With a projecting method (GEM, A-GEM), the order of the callbacks decides whether the
    projection sees SI's pull: put SI first (``method=si +method@hybrid.gem=gem``) to have it projected, as a loss
    term would be.

    **Strength and plain SGD.** SGD with learning rate ``lr`` and momentum ``mu`` diverges on the penalty when
    ``lr * 2 c max_k Omega_k > 2 (1 + mu)`` (:mod:`~cl_lightning.methods.strength`); van de Ven & Tolias's Adam
    values (``c`` 50 task-IL, 500 domain-IL, 0.5 class-IL, in ``experiment=vdv_split_mnist``) can be past that. The
    default ``c=auto`` is :attr:`AUTO_C` (1; on the embedded default with SGD lr 0.1 the stiffest step
    ``lr * 2 c max Omega`` measured at most 0.21 in class-IL and 0.52 in domain-IL, 0.5 on Split-MNIST, against the
    bound 2) unless that is past half the bound, in which case ``c`` for the next task is capped there and the
    capping logged; a typed value is used as typed, and the method warns at a task end when SGD cannot be stable on
    it. The ``c`` in force is reported as ``diagnostics.si.c``.

    Zenke et al.'s omega is not clamped; here a negative ``w`` (the parameter's
    steps raised the task loss on balance: noise, or other loss terms fighting the task) gives no protection
    instead of a repulsion.

    DDP: gradients are already all-reduced when ``on_before_optimizer_step`` runs and parameters are identical across
    ranks, so every rank accumulates the same path integral and ``Omega``; nothing is communicated.

    Args:
        c: Strength ``c >= 0``, or ``"auto"`` (the default: :attr:`AUTO_C`, capped where plain SGD would not be
            stable; see above).
        xi: Damping ``xi > 0`` of the normalisation (Zenke et al.'s ``xi``, van de Ven & Tolias's ``epsilon``).
    """

    name: ClassVar[str] = "si"
    AUTO_C: ClassVar[float] = 1.0  # what c=auto is where plain SGD is stable on the penalty
    importance_key: ClassVar[str] = "omega"
    anchor_key: ClassVar[str] = "anchor"
    listed_state: ClassVar[bool] = False  # one running Omega and anchor
    strength_key: ClassVar[str] = "c"
    # the path integral sees the task gradient alone: the penalty's is added after it is recorded
    penalty_door: ClassVar[Literal["backward", "loss", "gradient"]] = "gradient"

    def __init__(self, c: float | str = AUTO, xi: float = 0.1) -> None:
        super().__init__(c, self.AUTO_C)
        self.xi = check_number("method.xi", xi, strict=True)
        self._path: PathIntegral | None = None
        self._loaded_path: dict[str, dict[str, Tensor]] | None = None

    @property
    def c(self) -> float:
        """The strength in force (the typed value, or what ``auto`` chose for the current task)."""
        return self.strength.value

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._loaded_path is not None:
            # resumed in the middle of a task (no task start will come): continue its path integral
            self._path = PathIntegral(self.params)
            for field in ("start", "integral"):
                saved = self._loaded_path[field]
                loaded = [saved[n].to(p.device) for n, p in zip(self.param_names, self.params, strict=True)]
                torch._foreach_copy_(getattr(self._path, field), loaded)
            self._loaded_path = None

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        self._path = PathIntegral(self.params)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._path is not None:  # first the gradient of the task loss (and other methods' terms), then SI's
            self._path.before_step(self.params, [p.grad for p in self.params])
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._path is not None:
            self._path.after_step(self.params)

    @override
    def importance(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> dict[str, Tensor] | None:
        """``omega`` of the task's path integral (``None``: no path was recorded, the task did not start here)."""
        if self._path is None:
            return None
        omega = self._path.omega(self.params, self.xi)
        self._path = None
        return dict(zip(self.param_names, omega, strict=True))

    @override
    def consolidate(self, importance: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """``Omega += omega_t``; the anchor becomes the current parameters."""
        self.keep_running(importance, anchor)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._path is not None:
            # a mid-task checkpoint (taken after the step's change was added: no step is pending)
            state["path"] = {
                field: {
                    n: t.detach().to("cpu", copy=True)
                    for n, t in zip(self.param_names, getattr(self._path, field), strict=True)
                }
                for field in ("start", "integral")
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._loaded_path = state_dict.get("path")
