"""Elastic Weight Consolidation: a quadratic penalty per old task, weighted by the diagonal Fisher information."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.importance import (
    FISHER_MODES,
    diagonal_fisher,
    merge_quadratics,
    quadratic_penalty,
    trainable_parameters,
)
from cl_lightning.errors import ConfigError
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.strength import AUTO, Strength, task_follows, warn_if_stiff

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

# stored samples prepared (uint8 -> float on the device) per block when estimating an importance
_BLOCK = 512

__all__ = [
    "EWC",
    "check_chunk",
    "check_number",
    "check_samples",
    "scenario_outputs",
    "task_importance",
    "warn_if_stiff",
]


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
    global RNG, which drives training, is untouched, so adding EWC does not change the data order). Under DDP every
    rank draws the same samples, computes the sum over its share (every ``world_size``-th) and the sums are
    all-reduced in one collective (``trainer.strategy.reduce``; a no-op on one process), so every rank holds the
    same importance. ``compute(x, y, generator)`` returns per-parameter sums over a block of prepared inputs.
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


def check_number(key: str, value: Any, minimum: float = 0.0) -> float:
    """A finite number >= ``minimum`` from the config, or a one-line :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value < float("inf"):
        raise ConfigError(f"{key}={value!r}: must be a number >= {minimum}")
    return float(value)


def check_samples(key: str, value: Any) -> int | None:
    """A number of samples (``None``: all of them), or a one-line :class:`ConfigError`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{key}={value!r}: must be an integer >= 1, or null for the whole task")
    return value


def check_chunk(key: str, value: Any) -> int:
    """A positive integer, or a one-line :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r}: must be an integer >= 1")
    return value


class EWC(CLMethod):
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
    ``A (theta - m)^2 + K`` (:func:`~cl_lightning.core.importance.merge_quadratics`), so a step costs the same
    however many tasks are remembered. The penalty is a loss term (``ewc/penalty``), so it composes with any other
    method's loss terms and gradient edits.

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
    needs_task_boundaries: ClassVar[bool] = True
    AUTO_LAMBDA: ClassVar[float] = 100.0  # what lambda_=auto is where plain SGD is stable on the penalty

    def __init__(
        self,
        lambda_: float | str = AUTO,
        fisher: str = "exact",
        fisher_samples: int | None = 200,
        chunk_size: int = 8,
    ) -> None:
        super().__init__()
        self.strength = Strength("method.lambda_", lambda_, self.AUTO_LAMBDA)
        if fisher not in FISHER_MODES:
            raise ConfigError(f"method.fisher={fisher!r}: choose one of {', '.join(FISHER_MODES)}")
        self.fisher = fisher
        self.fisher_samples = check_samples("method.fisher_samples", fisher_samples)
        self.chunk_size = check_chunk("method.chunk_size", chunk_size)
        self.fishers: list[dict[str, Tensor]] = []
        self.anchors: list[dict[str, Tensor]] = []
        self.consolidated = -1  # last task whose Fisher and anchor are stored
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._quadratic: tuple[list[Tensor], list[Tensor], float] | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = trainable_parameters(pl_module.net)  # type: ignore[arg-type]
        self._names, self._params = list(named), list(named.values())
        self._quadratic = None  # rebuilt lazily on the parameters' device (loaded state arrives on the CPU)

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id <= self.consolidated:
            return
        outputs = scenario_outputs(pl_module, task_id)

        def compute(x: Tensor, y: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
            return diagonal_fisher(
                pl_module.net, x, self.fisher, targets=y, outputs=outputs, chunk_size=self.chunk_size,
                generator=gen, reduction="sum",
            )  # fmt: skip

        fisher = task_importance(trainer, pl_module, task_id, self.fisher_samples, compute)
        anchor = {n: p.detach().clone() for n, p in trainable_parameters(pl_module.net).items()}
        self.consolidate(fisher, anchor)
        self.consolidated = task_id
        self._quadratic = None
        if self._params and task_follows(trainer, task_id):
            weights = self.quadratic()[0]
            stiffest = max(float(w.max()) for w in weights if w.numel())
            self.strength.consolidate(trainer, self.name, stiffest)  # the penalty's curvature is lambda * A

    @property
    def lambda_(self) -> float:
        """The strength in force (the typed value, or what ``auto`` chose for the current task)."""
        return self.strength.value

    @override
    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        return {"lambda_": self.lambda_}

    def consolidate(self, fisher: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Store a finished task's Fisher and anchor: one more penalty."""
        self.fishers.append(fisher)
        self.anchors.append(anchor)

    def quadratic(self) -> tuple[list[Tensor], list[Tensor], float]:
        """Per-parameter weights and anchors of the whole penalty (before ``lambda / 2``), and its constant."""
        if self._quadratic is None:
            device = self._params[0].device
            weights = [[f[n].to(device) for n in self._names] for f in self.fishers]
            anchors = [[a[n].to(device) for n in self._names] for a in self.anchors]
            self._quadratic = merge_quadratics(weights, anchors)
        return self._quadratic

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if not self.fishers or self.lambda_ == 0:
            return {}
        weights, anchors, constant = self.quadratic()
        return {"penalty": quadratic_penalty(self._params, anchors, weights, 0.5 * self.lambda_, constant)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "fishers": self.fishers, "anchors": self.anchors, "consolidated": self.consolidated,
            "lambda_": self.strength.state(),
        }  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fishers = list(state_dict.get("fishers", []))
        self.anchors = list(state_dict.get("anchors", []))
        self.consolidated = int(state_dict.get("consolidated", -1))
        self.strength.load(state_dict.get("lambda_"))
        self._quadratic = None
