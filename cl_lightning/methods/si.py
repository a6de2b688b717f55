"""Synaptic Intelligence: importance from each parameter's contribution to the drop of the loss along its path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.importance import PathIntegral, trainable_parameters
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.ewc import check_number
from cl_lightning.methods.strength import AUTO, Strength, task_follows

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule


class SI(CLMethod):
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
    needs_task_boundaries: ClassVar[bool] = True
    AUTO_C: ClassVar[float] = 1.0  # what c=auto is where plain SGD is stable on the penalty

    def __init__(self, c: float | str = AUTO, xi: float = 0.1) -> None:
        super().__init__()
        self.strength = Strength("method.c", c, self.AUTO_C)
        self.xi = check_number("method.xi", xi)
        if self.xi <= 0:
            raise ConfigError(f"method.xi={xi!r}: must be a number > 0")
        self.omega: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.consolidated = -1  # last task added to omega
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._path: PathIntegral | None = None
        self._loaded_path: dict[str, dict[str, Tensor]] | None = None
        self._on_device: tuple[list[Tensor], list[Tensor]] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = trainable_parameters(pl_module.net)  # type: ignore[arg-type]
        self._names, self._params = list(named), list(named.values())
        self._on_device = None
        if self._loaded_path is not None:
            # resumed in the middle of a task (no task start will come): continue its path integral
            self._path = PathIntegral(self._params)
            for field in ("start", "integral"):
                torch._foreach_copy_(getattr(self._path, field), [self._loaded_path[field][n] for n in self._names])
            self._loaded_path = None

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        self._path = PathIntegral(self._params)

    def _state_on_device(self) -> tuple[list[Tensor], list[Tensor]]:
        if self._on_device is None:
            device = self._params[0].device
            self._on_device = (
                [self.omega[n].to(device) for n in self._names],
                [self.anchor[n].to(device) for n in self._names],
            )
        return self._on_device

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._path is not None:
            self._path.before_step(self._params, [p.grad for p in self._params])
        if not self.omega or self.c == 0:
            return
        omega, anchor = self._state_on_device()
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        params = [p.detach() for p in self._params]
        diffs = torch._foreach_sub(params, anchor)
        torch._foreach_addcmul_([p.grad for p in self._params], omega, diffs, value=2.0 * self.c)  # type: ignore[misc]
        module: CLModule = pl_module  # type: ignore[assignment]
        if module.logger is not None and trainer.global_step % module.log_every_n_steps == 0:
            value = sum(float(torch.dot((o * d).reshape(-1), d.reshape(-1))) for o, d in zip(omega, diffs, strict=True))
            module.logger.log_metrics({f"train/{self.name}/penalty": self.c * value}, step=trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._path is not None:
            self._path.after_step(self._params)

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id <= self.consolidated or self._path is None:
            return
        omega = self._path.omega(self._params, self.xi)
        for name, o, p in zip(self._names, omega, self._params, strict=True):
            self.omega[name] = self.omega[name].to(o.device) + o if name in self.omega else o
            self.anchor[name] = p.detach().clone()
        self.consolidated = task_id
        self._path = None
        self._on_device = None
        if task_follows(trainer, task_id):
            stiffest = max(float(o.max()) for o in self.omega.values() if o.numel())
            self.strength.consolidate(trainer, self.name, 2 * stiffest)  # the penalty's curvature is 2 c Omega

    @property
    def c(self) -> float:
        """The strength in force (the typed value, or what ``auto`` chose for the current task)."""
        return self.strength.value

    @override
    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        return {"c": self.c}

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "omega": self.omega, "anchor": self.anchor, "consolidated": self.consolidated, "c": self.strength.state(),
        }  # fmt: skip
        if self._path is not None:
            # a mid-task checkpoint (taken after the step's change was added: no step is pending)
            state["path"] = {
                field: {n: t.detach().clone() for n, t in zip(self._names, getattr(self._path, field), strict=True)}
                for field in ("start", "integral")
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.omega = dict(state_dict.get("omega", {}))
        self.anchor = dict(state_dict.get("anchor", {}))
        self.consolidated = int(state_dict.get("consolidated", -1))
        self.strength.load(state_dict.get("c"))
        self._on_device = None
        self._loaded_path = state_dict.get("path")
