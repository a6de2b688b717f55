"""BiC: exemplars, distillation weighted by the class ratio, and a bias-correction layer fitted on held-out data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.bias_correction import (
    balanced_holdout,
    correction_vectors,
    fit_bias,
    holdout_count,
    spaced_holdout,
)
from cl_lightning.core.teacher import Teacher
from cl_lightning.errors import ConfigError
from cl_lightning.methods.replay import ReplayMethod
from cl_lightning.models.backbones import routes_by_task
from cl_lightning.validation import check_fraction, check_int, check_number

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["BiC"]


class BiC(ReplayMethod):
    """BiC (Wu, Chen, Wang, Ye, Liu, Guo & Fu, "Large Scale Incremental Learning", CVPR 2019).

    **Memory and validation split.** Exemplars under a total budget ``K`` (``herding`` per class, as iCaRL, or
    ``random``: a uniform subset of each task), rebalanced at each task end. While task ``t`` trains, a fraction
    ``val_fraction`` of each old class's exemplars (the paper's 9:1 split) is held out as ``val_old``: the
    :func:`~cl_lightning.core.bias_correction.holdout_count` ones evenly spaced through the class's priority order
    (deterministic from the memory). The same number ``v`` of samples of each new class is held out of task ``t``'s
    training data as ``val_new`` (drawn with a generator seeded by ``seed`` and ``t``; the indices are saved). Neither
    is trained on: the replayed exemplars are drawn from the others only, and the held-out new samples, which the
    loader still serves, get weight 0 in the loss by their ``batch.index`` (zero gradient; with batch-norm layers
    they still enter the batch statistics of the module's forward pass). Task 0 has no old classes: nothing is held
    out and no layer is fitted (the paper corrects from the second step on).

    **Stage 1** (their eq. 1-3), on the new batch (held-out samples excluded) and the replayed exemplars, with ``q``
    the bias-corrected logits (below) of the network and ``q_old`` those of the frozen network of the previous task
    end (:class:`~cl_lightning.core.teacher.Teacher`), ``n`` old and ``m`` new classes::

        L = lambda * L_d + (1 - lambda) * L_c,        lambda = n / (n + m),
        L_d = - sum_{k old} softmax(q_old / T)_k * log softmax(q / T)_k        (over the n old classes, T = 2),
        L_c = CE(q, y)                                                        (over the n + m seen classes),

    averaged over the samples (the paper's soft cross-entropy, without Hinton's ``T^2``). In task-IL ``L_c`` uses
    the module's task masking; in class-IL it is over the seen classes whatever ``module.train_outputs`` says (the
    paper's network has n + m outputs). :meth:`replaces_task_loss`: this is the whole objective.

    **Stage 2** (eq. 4-5), at the end of task ``t >= 1``, before the memory is updated: the network is frozen (its
    logits of ``val_old`` and ``val_new`` are computed once, in eval mode, un-augmented) and the layer of task ``t``,
    ``q_k = alpha_t * o_k + beta_t`` for the new classes only, is fitted from ``(1, 0)`` by minimising the validation
    cross-entropy over the seen classes (:func:`~cl_lightning.core.bias_correction.fit_bias`).

    **Earlier tasks' layers are kept, frozen, and applied.** Each layer is fitted once, at its task's end, and never
    changed again; ``q = o * scale + shift`` applies every layer fitted so far, ``(alpha_j, beta_j)`` to task ``j``'s
    outputs (task 0 has none, ``(1, 0)``): in stage 1 of task ``t`` (layers ``1 .. t-1``; task ``t``'s is the
    identity until its stage 2) to the network being trained, so its old classes' logits are learnt through the
    layers fitted for them, and to the teacher; in stage 2 beneath the new layer; and at evaluation and in the next
    task's teacher (layers ``1 .. t``, :meth:`eval_scores`, which also scores the outputs of classes not seen yet
    ``-inf``: they are not outputs of the paper's growing network). FACIL's reading of the authors' code applies
    them the same way. The uncorrected head's accuracy and every ``alpha``, ``beta`` are in :meth:`diagnostics`.

    Deviations, with reasons. Stage 2's optimiser and schedule are ours, after FACIL's reading of the authors' code
    (200 epochs, SGD with momentum 0.9): SGD with momentum ``bias_momentum`` for ``bias_epochs`` passes in batches of
    ``bias_batch_size`` at ``bias_lr`` (0.01: at 0.1 ``alpha`` overshoots on small validation sets), shuffled with a
    generator seeded by ``seed`` and ``t``; that code's small L2 on ``beta`` is left out, as the paper has none. The
    held-out exemplars count against the budget ``K``; at the next task the reduced memory is split anew, so an
    exemplar held out once may be trained on later. The paper trains on the union of new data and exemplars; here
    each step adds ``r`` exemplars to the current batch of ``B`` samples, ``r`` chosen so that the running total
    after ``s`` steps is ``floor(s B E / N)`` for ``E`` training exemplars and ``N`` non-held-out new samples
    (``replay_batch_size=null``): an epoch replays each exemplar once in expectation, as the union would, even when
    ``B E / N < 1/2`` (iCaRL's rounding would replay none); an explicit ``replay_batch_size`` fixes ``r``. The teacher
    sees the current batch un-augmented (the module's augmented inputs are not passed to methods).

    Defined where every task brings classes of its own: class-IL (the paper) and task-IL (where a layer with
    ``alpha > 0`` changes no prediction within a task, so BiC is replay with distillation there); refused for
    domain-IL. Needs task boundaries and a network that does not route by task (``features`` too, for herding). DDP:
    memory, hold-outs, teacher and the fitted layers are computed from the whole task on every rank alike.

    Args:
        buffer_size: The memory budget ``K``, shared by all classes seen.
        replay_batch_size: Exemplars added to each step's batch; ``null``: in proportion (see above).
        selection: ``herding`` (per class) or ``random`` (per task).
        val_fraction: Fraction of each old class's exemplars held out for stage 2, in [0, 1) (the paper: 0.1;
            0 fits no layer).
        temperature: ``T`` of the distillation (the paper: 2).
        bias_epochs: Passes of stage 2 over the validation set.
        bias_batch_size: Batch of stage 2.
        bias_lr: Learning rate of stage 2.
        bias_momentum: Momentum of stage 2.
        seed: Seeds the memory's generator (selection, replay draws), the new data's hold-out and stage 2's shuffles.
    """

    name: ClassVar[str] = "bic"
    selections: ClassVar[tuple[str, ...]] = ("herding", "random")
    supported_scenarios: ClassVar[tuple[str, ...]] = ("class_il", "task_il")
    needs_task_boundaries: ClassVar[bool] = True

    def __init__(
        self,
        buffer_size: int = 2000,
        replay_batch_size: int | None = None,
        selection: str = "herding",
        val_fraction: float = 0.1,
        temperature: float = 2.0,
        bias_epochs: int = 200,
        bias_batch_size: int = 128,
        bias_lr: float = 0.01,
        bias_momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        fixed = None if replay_batch_size is None else check_int("method.replay_batch_size", replay_batch_size)
        super().__init__(buffer_size, fixed or 1, selection, seed)
        self.fixed_replay = fixed
        self.val_fraction = check_fraction("method.val_fraction", val_fraction, high_open=True)
        self.temperature = check_number("method.temperature", temperature, strict=True)
        self.bias_epochs = check_int("method.bias_epochs", bias_epochs)
        self.bias_batch_size = check_int("method.bias_batch_size", bias_batch_size)
        self.bias_lr = check_number("method.bias_lr", bias_lr, strict=True)
        self.bias_momentum = check_fraction("method.bias_momentum", bias_momentum, high_open=True)
        self.seed = seed
        self.old = Teacher()
        self.alpha = torch.ones(0)  # [tasks fitted so far + 1]: each task's layer (task 0 and skipped tasks: 1, 0)
        self.beta = torch.zeros(0)
        self.corrected = -1  # the last task end at which stage 2 ran (never twice across a resume)
        self.held = torch.zeros(0, dtype=torch.long)  # val_new: indices into the training data of task `held_task`
        self.held_task = -1
        self.carry = 0  # proportional replay: sum of B * E over the task's steps not yet replayed (units of 1/N)
        self._correction: tuple[Tensor, Tensor] | None = None  # (scale, shift) on the module's device
        self._held_mask: Tensor | None = None  # [N_t] bool: held-out new samples of the current task
        self._train_slots = torch.zeros(0, dtype=torch.long)  # memory slots trained on in this task
        self._val_slots = torch.zeros(0, dtype=torch.long)  # memory slots held out (val_old)
        self._old_idx = torch.zeros(0, dtype=torch.long)  # outputs of the old classes
        self._seen: Tensor | None = None  # [n_outputs] bool: outputs of the classes seen so far
        self.lam = 0.0  # n / (n + m)
        self._n_new = 1  # training samples of the current task that are not held out

    @override
    def replaces_task_loss(self) -> bool:
        return True

    # ------------------------------------------------------------------ setup and task events
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(getattr(trainer, "datamodule", None), "scenario", None) == "domain_il":
            raise ConfigError(
                "method=bic does not support dataset.scenario=domain_il: its bias layer rescales the new classes' "
                "outputs against the old ones', and domain-IL tasks share all outputs; use class_il or task_il"
            )
        super().setup(trainer, pl_module, stage)
        if bool((pl_module.output_masks.sum(0) > 1).any()):  # type: ignore[attr-defined]
            raise ConfigError("method=bic needs tasks with classes of their own; use dataset.scenario=class_il")
        net = pl_module.net  # type: ignore[attr-defined]
        needs_features = self.selection == "herding" and not callable(getattr(net, "features", None))
        if needs_features or routes_by_task(net):
            raise ConfigError(
                f"method=bic needs a network that does not route by task (with features() for herding), not "
                f"{type(net).__name__}; use model=mlp, cnn or resnet18"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.old.attach(pl_module.net)  # type: ignore[arg-type]
        self._prepare_task(trainer, pl_module)  # type: ignore[arg-type]

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        super().on_task_start(trainer, pl_module, task_id)
        self.carry = 0  # not in on_fit_start: a run resumed mid-task continues the task's count
        self._prepare_task(trainer, pl_module)

    def _prepare_task(self, trainer: pl.Trainer, pl_module: CLModule) -> None:
        """The task's classes, lambda and hold-outs, on the module's device (every fit: a mid-task resume gets no
        task start). The memory does not change during a task, so its split is recomputed identically."""
        t, dev = int(pl_module.current_task), pl_module.device
        masks = pl_module.output_masks
        old, new = masks[:t].any(0), masks[t]
        self._seen, self._old_idx = old | new, torch.nonzero(old).view(-1)
        n_old, n_new = int(old.sum()), int(new.sum())
        self.lam = n_old / (n_old + n_new)
        buf = self.buffer
        v = 0
        if buf.is_empty:
            self._train_slots = self._val_slots = torch.zeros(0, dtype=torch.long, device=dev)
        else:
            assert buf.y is not None and buf.rank is not None
            y = buf.y[: buf.size]
            held = spaced_holdout(y, buf.rank[: buf.size], self.val_fraction)
            self._val_slots, self._train_slots = torch.nonzero(held).view(-1), torch.nonzero(~held).view(-1)
            v = max(holdout_count(int(m), self.val_fraction) for m in torch.bincount(y).tolist() if m > 0)
        labels = trainer.datamodule.tasks[t].train_y  # type: ignore[attr-defined]
        if self.held_task != t:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
            self.held, self.held_task = balanced_holdout(labels, v, generator), t
        self._held_mask = torch.zeros(len(labels), dtype=torch.bool, device=dev)
        self._held_mask[self.held.to(dev)] = True
        self._n_new = max(1, len(labels) - len(self.held))

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id > self.corrected:
            self._fit_layer(trainer, pl_module, task_id)  # on the memory of the task, before its update
            self.corrected = task_id
        super().on_task_end(trainer, pl_module, task_id)  # the memory: new classes in, old ones reduced
        self.old.take(pl_module.net, task_id)

    def _fit_layer(self, trainer: pl.Trainer, pl_module: CLModule, t: int) -> None:
        """Stage 2: ``(alpha_t, beta_t)`` on ``val_old`` and ``val_new`` with the network frozen."""
        alpha, beta = 1.0, 0.0
        if t > 0 and len(self._val_slots) > 0 and len(self.held) > 0:
            buf, data = self.buffer, trainer.datamodule.tasks[t]  # type: ignore[attr-defined]
            assert buf.x is not None and buf.y is not None
            dev = pl_module.device
            x = torch.cat([buf.x[self._val_slots], data.train_x[self.held].to(dev)])
            y = torch.cat([buf.y[self._val_slots], data.train_y[self.held].to(dev)])
            net = pl_module.net
            was_training = net.training
            net.eval()
            try:
                with torch.no_grad():
                    z = torch.cat([pl_module(pl_module.prepare(part)) for part in x.split(1024)]).float()
            finally:
                net.train(was_training)
            with torch.enable_grad():
                generator = torch.Generator().manual_seed(self.seed * 7_919 + t)
                alpha, beta = fit_bias(
                    self.correct(z, pl_module.output_masks), y, pl_module.output_masks[t], pl_module.seen_mask(),
                    self.bias_epochs,
                    self.bias_batch_size, self.bias_lr, self.bias_momentum, generator,
                )  # fmt: skip
        n = max(t + 1, len(self.alpha))
        self.alpha = torch.cat([self.alpha, torch.ones(n - len(self.alpha))])
        self.beta = torch.cat([self.beta, torch.zeros(n - len(self.beta))])
        self.alpha[t], self.beta[t] = alpha, beta
        self._correction = None

    # ------------------------------------------------------------------ the corrected logits
    def correct(self, logits: Tensor, masks: Tensor) -> Tensor:
        """``logits * scale + shift``: every fitted layer applied to its task's outputs (``masks``: the module's
        ``output_masks``), the other outputs unchanged."""
        if len(self.alpha) == 0:
            return logits
        cached = self._correction
        stale = cached is None or cached[0].device != logits.device
        # built under evaluation's inference mode, the vectors cannot enter a training step's graph
        if stale or (cached[0].is_inference() and not torch.is_inference_mode_enabled()):  # type: ignore[index]
            scale, shift = correction_vectors(masks.cpu(), self.alpha, self.beta)
            self._correction = (scale.to(logits.device), shift.to(logits.device))
        scale, shift = self._correction
        return logits * scale + shift

    # ------------------------------------------------------------------ training
    def replay_count(self, batch_size: int) -> int:
        """Exemplars added to a batch of ``batch_size`` new samples (see the class docstring); advances the count."""
        if self.fixed_replay is not None:
            return self.fixed_replay if len(self._train_slots) else 0
        self.carry += batch_size * len(self._train_slots)
        r, self.carry = divmod(self.carry, self._n_new)
        return r

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        assert self._held_mask is not None and self._seen is not None
        stored, labels, tid, z = batch.x, batch.y, batch.task_id, logits
        weights = (~self._held_mask[batch.index.to(self._held_mask.device)]).to(logits.dtype)
        r = self.replay_count(len(batch.y))
        if r > 0:
            perm = torch.randperm(len(self._train_slots), generator=self.buffer.generator)[:r]
            replay = self.buffer.get(self._train_slots[perm.to(self._train_slots.device)])
            replay_z = pl_module(pl_module.prepare(replay.x, train=True), replay.task_id)
            stored, labels = torch.cat([stored, replay.x]), torch.cat([labels, replay.y])
            tid, z = torch.cat([tid, replay.task_id]), torch.cat([z, replay_z])
            weights = torch.cat([weights, weights.new_ones(len(replay.y))])
        q = self.correct(z, pl_module.output_masks)
        if pl_module.scenario == "task_il":
            ce_logits = pl_module.training_logits(q, tid)
        else:
            ce_logits = q.masked_fill(~self._seen, float("-inf"))
        total = weights.sum().clamp(min=1.0)
        ce = (weights * F.cross_entropy(ce_logits, labels, reduction="none")).sum() / total
        terms = {"ce": (1.0 - self.lam) * ce}
        if self.old.net is not None and len(self._old_idx) > 0:
            t = self.temperature
            with torch.no_grad():
                old_z = self.old.net(pl_module.prepare(stored, train=False)).float()
                q_old = self.correct(old_z, pl_module.output_masks)
                target = F.softmax(q_old.index_select(1, self._old_idx) / t, dim=1)
            log_p = F.log_softmax(q.index_select(1, self._old_idx).float() / t, dim=1)
            distill = -(target * log_p).sum(1)
            terms["distill"] = self.lam * (weights * distill).sum() / total
        return terms

    # ------------------------------------------------------------------ evaluation
    @override
    def eval_scores(self, pl_module: CLModule, inputs: Tensor, task_id: int, logits: Tensor) -> Tensor:
        scores = self.correct(logits, pl_module.output_masks)
        return scores.masked_fill(~pl_module.seen_mask(), float("-inf")).to(logits.dtype)

    @override
    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        """Every seen task's layer (``alpha``, ``beta``; ``1, 0``: none) and the accuracy (fractions, on the run's
        evaluation split) of the uncorrected head among the seen classes on each seen task (``uncorrected_acc``)."""
        dm = pl_module.trainer.datamodule  # type: ignore[attr-defined]
        seen = pl_module.seen_mask()
        n_seen = int(pl_module.current_task) + 1
        accs = []
        net = pl_module.net
        was_training = net.training
        net.eval()
        try:
            for j in range(n_seen):
                task = dm.tasks[j]
                x, y = (task.val_x, task.val_y) if dm.eval_split == "val" else (task.test_x, task.test_y)
                allowed = pl_module.output_masks[j] if pl_module.scenario == "task_il" else seen
                correct = 0
                for part_x, part_y in zip(x.split(1024), y.split(1024), strict=True):
                    with torch.no_grad(), pl_module.task_view(j):
                        scores = pl_module(pl_module.prepare(part_x.to(pl_module.device)), j)
                    pred = scores.masked_fill(~allowed, float("-inf")).argmax(1)
                    correct += int((pred == part_y.to(pred.device)).sum())
                accs.append(round(correct / max(1, len(y)), 6))
        finally:
            net.train(was_training)
        alpha = torch.cat([self.alpha, torch.ones(max(0, n_seen - len(self.alpha)))])[:n_seen]
        beta = torch.cat([self.beta, torch.zeros(max(0, n_seen - len(self.beta)))])[:n_seen]
        return {
            "alpha": [round(a, 6) for a in alpha.tolist()], "beta": [round(b, 6) for b in beta.tolist()],
            "uncorrected_acc": accs,
        }  # fmt: skip

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return (
            super().state_dict()
            | self.old.state_dict()
            | {
                "alpha": self.alpha.clone(), "beta": self.beta.clone(), "corrected": self.corrected,
                "held": self.held.cpu(), "held_task": self.held_task, "carry": self.carry,
            }
        )  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.old.load_state_dict(state_dict)
        self.alpha = state_dict.get("alpha", self.alpha).clone().float().cpu()
        self.beta = state_dict.get("beta", self.beta).clone().float().cpu()
        self.corrected = int(state_dict.get("corrected", self.corrected))
        self.held = state_dict.get("held", self.held).clone().long().cpu()
        self.held_task = int(state_dict.get("held_task", self.held_task))
        self.carry = int(state_dict.get("carry", self.carry))
        self._correction = None
