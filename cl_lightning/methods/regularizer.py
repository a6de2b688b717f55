"""The base of the quadratic regularizers (EWC, online EWC, SI, MAS): anchors, importances, one penalty.

A quadratic regularizer pulls every trainable parameter towards where it was at the end of earlier tasks, in
proportion to how much it mattered there. :class:`QuadraticRegularizer` does the plumbing they share -- the anchors
and importances keyed by parameter name, the penalty, consolidation once per task, the strength (a number or
``auto``, :mod:`~cl_lightning.methods.strength`), a portable state -- so that a method's file holds only its own
math: how a task's importance is computed and how it is consolidated with the earlier ones.

A new regularizer is a subclass that implements :meth:`~QuadraticRegularizer.importance` (and, for one running
quadratic instead of one per task, :meth:`~QuadraticRegularizer.consolidate`)::

    class L2(QuadraticRegularizer):  # L = L_task + lambda * sum_i (theta_i - theta*_i)^2, theta*: the last task's end
        name = "l2"

        def __init__(self, lambda_: float | str = "auto") -> None:
            super().__init__(lambda_, reference=1.0)

        def importance(self, trainer, pl_module, task_id):
            return {n: torch.ones_like(p) for n, p in zip(self.param_names, self.params)}

        def consolidate(self, importance, anchor):
            self.keep_running(importance, anchor, decay=0.0)

Tasks' importances are averaged over training samples with :func:`task_importance` (seeded, shared out across DDP
ranks, one all-reduce), over the logits the scenario trains (:func:`scenario_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.importance import merge_quadratics, quadratic_penalty, trainable_parameters
from cl_lightning.loggers import log_metrics
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.strength import Strength, task_follows

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["QuadraticRegularizer", "scenario_outputs", "task_importance"]

# stored samples prepared (uint8 -> float on the device) per block when estimating an importance
_BLOCK = 512


def scenario_outputs(pl_module: CLModule, task_id: int) -> Tensor:
    """Logit indices a training sample of ``task_id`` may use, by the module's own masking
    (``training_logits``): the task's head in task-IL, the classes seen so far in class-IL, all in domain-IL."""
    tid = task_id if pl_module.scenario == "task_il" else -1
    probe = torch.zeros(1, pl_module.output_masks.shape[1], device=pl_module.device)
    masked = pl_module.training_logits(probe, torch.full((1,), tid, dtype=torch.long, device=pl_module.device))
    return torch.isfinite(masked[0]).nonzero().squeeze(1)


def task_importance(
    trainer: pl.Trainer,
    pl_module: CLModule,
    task_id: int,
    n_samples: int | None,
    compute: Callable[[Tensor, Tensor, torch.Generator], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """Mean of a per-sample importance over ``n_samples`` training samples of ``task_id`` (all if ``None``).

    The samples are drawn without replacement by a generator seeded from the datamodule's seed and the task (the
    global RNG, which drives training, is untouched, so adding a regularizer does not change the data order). Under
    DDP every rank draws the same samples, computes the sum over its share (every ``world_size``-th) and the sums are
    all-reduced in one collective (``trainer.strategy.reduce``; a no-op on one process), so every rank holds the
    same importance.

    Args:
        trainer: Gives the datamodule (its ``tasks`` and ``seed``), the rank and the strategy.
        pl_module: Its ``net`` is differentiated; ``prepare`` turns stored inputs into network inputs.
        task_id: The task whose training samples are used.
        n_samples: How many; ``None``: the whole task.
        compute: ``compute(x, y, generator)``: per-parameter *sums* over a block of prepared inputs ``x`` with
            labels ``y`` (e.g. :func:`~cl_lightning.core.importance.diagonal_fisher` with ``reduction="sum"``).

    Returns:
        ``{name: importance}`` for each trainable parameter, shaped and typed like it, on its device.
    """
    task = trainer.datamodule.tasks[task_id]  # type: ignore[attr-defined]
    n_total = len(task.train_y)
    n = n_total if n_samples is None else min(n_samples, n_total)
    seed = int(getattr(trainer.datamodule, "seed", 0))  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (task_id + 1))
    chosen = torch.randperm(n_total, generator=gen)[:n].sort().values
    mine = chosen[trainer.global_rank :: trainer.world_size]
    params = trainable_parameters(pl_module.net)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for block in mine.split(_BLOCK):
        x = pl_module.prepare(task.train_x[block].to(pl_module.device), train=False)
        part = compute(x, task.train_y[block].to(pl_module.device), gen)
        for name, value in part.items():
            sums[name] += value
    flat = torch.cat([v.reshape(-1) for v in sums.values()])
    flat = trainer.strategy.reduce(flat, reduce_op="sum") / max(n, 1)
    return {
        name: chunk.view_as(p).to(p.dtype)
        for (name, p), chunk in zip(params.items(), flat.split([p.numel() for p in params.values()]), strict=True)
    }


def _on_cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().cpu() for name, t in tensors.items()}


class QuadraticRegularizer(CLMethod):
    """A penalty pulling each trainable parameter ``theta_i`` towards its anchors, weighted by its importances:

        L(theta) = L_task(theta) + s * c * sum_t sum_i W_{t,i} (theta_i - theta*_{t,i})^2

    with ``s`` the strength (config key :attr:`strength_key`; a number, or ``auto``: see
    :mod:`~cl_lightning.methods.strength`), ``c`` the :attr:`penalty_factor` (``1/2`` where the paper writes the
    half out, as EWC does; 1 for SI and MAS), and ``(W_t, theta*_t)`` the importance and anchor of quadratic ``t``.
    EWC keeps one quadratic per finished task (:meth:`consolidate`'s default); online EWC, SI and MAS keep a single
    running one (:meth:`keep_running`). The sum is evaluated as the single equivalent quadratic
    ``A (theta - m)^2 + K`` (:func:`~cl_lightning.core.importance.merge_quadratics`), so a step costs the same
    however many quadratics there are.

    What the base does:

    - **task end** (once per task, also across a resume: the state holds the last consolidated task): the task's
      importance from :meth:`importance` (the subclass's math), the anchor (the trainable parameters, cloned),
      :meth:`consolidate`; then the strength for the next task is chosen (``auto``) or checked (a typed value) against
      plain SGD's stability bound, from the penalty's largest curvature per unit of strength, ``2 c max_i A_i``;
    - **the penalty**, by one of three doors (:attr:`penalty_door`):

      - ``"backward"`` (the default; EWC, online EWC, MAS): its gradient ``2 s c A (theta - m)`` is added to
        ``p.grad`` in ``on_after_backward``, right after the backward pass of the step's loss, so that every later
        gradient edit (a projection, a mask, clipping) sees what a loss term would have given it, for a third of a
        loss term's cost (two fused passes over the parameters instead of a forward, a backward and autograd's
        accumulation). Under a gradient scaler (``trainer.precision=16-mixed``) the gradients are scaled at that
        point, and the penalty is then a loss term instead;
      - ``"loss"``: a loss term ``<name>/penalty``, part of the loss the module checks for divergence;
      - ``"gradient"``: its gradient added in ``on_before_optimizer_step`` (SI, whose path integral must see the
        gradient of the task loss alone: it records the gradient there first);

      by the two gradient doors (:meth:`add_penalty_gradient`) its value is logged as ``train/<name>/penalty`` every
      ``module.log_every_n_steps`` and is not part of ``train/loss`` (a non-finite penalty shows as non-finite
      weights: the loss of the next step and the task end's weight check stop the run);
    - **state**: importances and anchors (CPU tensors keyed by parameter name, under :attr:`importance_key` and
      :attr:`anchor_key`), the last consolidated task and the strength in force; loaded tensors stay on the CPU until
      the penalty is first needed, then are moved to the parameters' device;
    - ``diagnostics.<name>.<strength_key>``: the strength in force.

    Args:
        strength: The configured strength: a number ``>= 0`` or ``"auto"``.
        reference: What ``auto`` stands for where plain SGD is stable (the subclass's ``AUTO_*`` constant).

    Attributes:
        strength_key: The strength's config key, also its key in the state and the diagnostics.
        penalty_factor: ``c`` above.
        penalty_door: ``"backward"`` (added to the gradients after the backward pass), ``"loss"`` (a loss term) or
            ``"gradient"`` (added to the gradients before the optimizer step).
        importance_key: State key of the importances.
        anchor_key: State key of the anchors.
        listed_state: The state holds a list of importances and one of anchors, one entry per quadratic (EWC;
            online EWC's lists hold one); ``False``: the single running quadratic's two dicts (SI, MAS).
        importances: ``[{name: W_t}]``, one dict per quadratic.
        anchors: ``[{name: theta*_t}]``, likewise.
        consolidated: The last task consolidated (``-1``: none).
    """

    needs_task_boundaries: ClassVar[bool] = True
    strength_key: ClassVar[str] = "lambda_"
    penalty_factor: ClassVar[float] = 1.0
    penalty_door: ClassVar[Literal["backward", "loss", "gradient"]] = "backward"
    importance_key: ClassVar[str] = "importances"
    anchor_key: ClassVar[str] = "anchors"
    listed_state: ClassVar[bool] = True

    def __init__(self, strength: float | str, reference: float) -> None:
        super().__init__()
        self.strength = Strength(f"method.{self.strength_key}", strength, reference)
        self.importances: list[dict[str, Tensor]] = []
        self.anchors: list[dict[str, Tensor]] = []
        self.consolidated = -1
        self.param_names: list[str] = []
        self.params: list[Tensor] = []
        self._quadratic: tuple[list[Tensor], list[Tensor], float] | None = None
        self._door: str = self.penalty_door  # the door of this fit (see the class docstring)

    # ------------------------------------------------------------------------------------- what a subclass provides
    def importance(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> dict[str, Tensor] | None:
        """The importance ``W`` of each trainable parameter for the task that just ended, by name, or ``None`` when
        there is nothing to consolidate (the task is then not counted as consolidated)."""
        raise NotImplementedError(f"{type(self).__name__} must implement importance()")

    def consolidate(self, importance: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Add a finished task's importance and anchor to the penalty. Default: one more quadratic (EWC)."""
        self.importances.append(importance)
        self.anchors.append(anchor)

    def keep_running(self, importance: dict[str, Tensor], anchor: dict[str, Tensor], decay: float = 1.0) -> None:
        """Keep a single running quadratic: ``W <- W_t + decay * W`` and ``theta* <- theta`` (for
        :meth:`consolidate`: ``decay`` 1 sums the importances, as SI and MAS do; online EWC decays by ``gamma``)."""
        previous = self.importances[0] if self.importances else {}
        self.importances = [
            {n: w + decay * previous[n].to(w.device) if n in previous else w for n, w in importance.items()}
        ]
        self.anchors = [anchor]

    # ------------------------------------------------------------------------------------------------- the plumbing
    @property
    def penalty_scale(self) -> float:
        """``s * c``: what multiplies ``sum_t sum_i W_{t,i} (theta_i - theta*_{t,i})^2``."""
        return self.penalty_factor * self.strength.value

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = trainable_parameters(pl_module.net)  # type: ignore[arg-type]
        self.param_names, self.params = list(named), list(named.values())
        self._quadratic = None  # rebuilt lazily on the parameters' device (loaded state arrives on the CPU)
        # a gradient scaler's gradients are scaled after the backward pass: there the penalty goes into the loss
        scaled = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None
        self._door = "loss" if self.penalty_door == "backward" and scaled else self.penalty_door

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id <= self.consolidated:
            return
        importance = self.importance(trainer, pl_module, task_id)
        if importance is None:
            return
        anchor = {n: p.detach().clone() for n, p in trainable_parameters(pl_module.net).items()}
        self.consolidate(importance, anchor)
        self.consolidated = task_id
        self._quadratic = None
        if self.params and task_follows(trainer, task_id):
            stiffest = max((float(w.max()) for w in self.quadratic()[0] if w.numel()), default=0.0)
            # the penalty s c A (theta - m)^2 has curvature 2 c A per unit of strength
            self.strength.consolidate(trainer, self.name, 2 * self.penalty_factor * stiffest)

    def quadratic(self) -> tuple[list[Tensor], list[Tensor], float]:
        """The whole penalty as one quadratic on the parameters' device: per-parameter weights ``A`` and anchors
        ``m`` (in the order of :attr:`params`) and the constant ``K`` (before the strength and ``c``)."""
        if self._quadratic is None:
            device = self.params[0].device
            weights = [[w[n].to(device) for n in self.param_names] for w in self.importances]
            anchors = [[a[n].to(device) for n in self.param_names] for a in self.anchors]
            self._quadratic = merge_quadratics(weights, anchors)
        return self._quadratic

    def penalty(self) -> Tensor | None:
        """The penalty ``s c sum_t sum_i W_{t,i} (theta_i - theta*_{t,i})^2``, differentiable in the parameters
        (whatever the door); ``None`` before the first consolidation or at strength 0."""
        if not self.importances or self.strength.value == 0:
            return None
        weights, anchors, constant = self.quadratic()
        return quadratic_penalty(self.params, anchors, weights, self.penalty_scale, constant)

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        value = self.penalty() if self._door == "loss" else None
        return {} if value is None else {"penalty": value}

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._door == "backward":
            self.add_penalty_gradient(trainer, pl_module)  # type: ignore[arg-type]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._door == "gradient":
            self.add_penalty_gradient(trainer, pl_module)  # type: ignore[arg-type]

    def add_penalty_gradient(self, trainer: pl.Trainer, pl_module: CLModule) -> None:
        """``p.grad += 2 s c A (theta - m)``, the penalty's gradient, so the optimizer (SGD, momentum, Adam) sees
        what a loss term would give it; the penalty's value is logged every ``module.log_every_n_steps``."""
        if not self.importances or self.strength.value == 0:
            return
        weights, anchors, constant = self.quadratic()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        diffs = torch._foreach_sub([p.detach() for p in self.params], anchors)
        grads = [p.grad for p in self.params]
        torch._foreach_addcmul_(grads, weights, diffs, value=2.0 * self.penalty_scale)  # type: ignore[arg-type]
        if pl_module.loggers and trainer.global_step % pl_module.log_every_n_steps == 0:
            value = sum(
                float(torch.dot((w * d).reshape(-1), d.reshape(-1))) for w, d in zip(weights, diffs, strict=True)
            )
            log_metrics(
                pl_module, {f"train/{self.name}/penalty": self.penalty_scale * (value + constant)}, trainer.global_step
            )

    @override
    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        return {self.strength_key: self.strength.value}

    @override
    def state_dict(self) -> dict[str, Any]:
        if not self.listed_state and len(self.importances) > 1:
            raise RuntimeError(
                f"method={self.name}: listed_state=False stores one running quadratic, but there are "
                f"{len(self.importances)}; consolidate with keep_running() or set listed_state=True"
            )
        importances = [_on_cpu(w) for w in self.importances]
        anchors = [_on_cpu(a) for a in self.anchors]
        return {
            self.importance_key: importances if self.listed_state else (importances[0] if importances else {}),
            self.anchor_key: anchors if self.listed_state else (anchors[0] if anchors else {}),
            "consolidated": self.consolidated,
            self.strength_key: self.strength.state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        importances = state_dict.get(self.importance_key) or []
        anchors = state_dict.get(self.anchor_key) or []
        if not self.listed_state:
            importances, anchors = [importances] if importances else [], [anchors] if anchors else []
        if len(importances) != len(anchors):
            raise ValueError(
                f"method={self.name}: the state holds {len(importances)} {self.importance_key} but {len(anchors)} "
                f"{self.anchor_key}; it is not a state this method saved"
            )
        self.importances = [dict(w) for w in importances]
        self.anchors = [dict(a) for a in anchors]
        self.consolidated = int(state_dict.get("consolidated", -1))
        self.strength.load(state_dict.get(self.strength_key))
        self._quadratic = None
