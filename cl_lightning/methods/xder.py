"""X-DER: DER++ whose stored logits are rewritten for the heads learned after the sample was stored."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.errors import ConfigError
from cl_lightning.methods.replay import ReplayMethod, gather
from cl_lightning.validation import check_fraction, check_number

if TYPE_CHECKING:
    from cl_lightning.core.buffer import BufferSample
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["XDER", "rewrite_logits"]


def rewrite_logits(stored: Tensor, new: Tensor, y: Tensor, columns: Tensor, gamma: float) -> Tensor:
    """``stored`` with its ``columns`` replaced by ``new``'s, kept below the ground-truth logit (X-DER's rho).

    With ``g = stored[i, y_i]`` and ``v = new[i, columns]``: ``v`` is kept if ``max v <= g``; otherwise it is
    scaled by ``gamma * g / max v`` when ``g > 0`` (the paper: the largest rewritten logit becomes ``gamma * g``,
    and the factor lies in ``(0, gamma)`` because ``max v > g > 0``), and shifted by a constant so that
    ``max v = g - (1 - gamma) * |g|`` when ``g <= 0`` (the guard: the paper's factor is negative there, or
    unbounded as ``max v`` nears 0, and would flip or blow up the logits). Both branches put the largest
    rewritten logit at ``g - (1 - gamma) * |g|``; the shift keeps the logits' differences. Finite inputs give
    finite outputs. The other columns are ``stored``'s.

    Args:
        stored: The stored logits, ``[B, C]``.
        new: The current network's logits of the same samples, ``[B, C]``.
        y: Labels, ``[B]`` (output indices).
        columns: Boolean ``[C]``: the outputs to rewrite (never the sample's own class).
        gamma: The paper's ``gamma`` in ``(0, 1]``.

    >>> stored, new = torch.tensor([[2.0, 0.0], [-1.0, 0.0]]), torch.tensor([[0.0, 4.0], [0.0, 0.5]])
    >>> rewrite_logits(stored, new, torch.tensor([0, 0]), torch.tensor([False, True]), 0.5)
    tensor([[ 2.0000,  1.0000],
            [-1.0000, -1.5000]])
    """
    out = stored.clone()
    v = new[:, columns].to(stored.dtype)
    if v.shape[1] == 0:
        return out
    g = stored.gather(1, y.view(-1, 1)).squeeze(1)
    top = v.amax(1)
    over = top > g
    scale = over & (g > 0)
    factor = gamma * g / torch.where(scale, top, torch.ones_like(top))  # the denominator is > g > 0 where used
    shift = top - (g - (1 - gamma) * g.abs())
    rewritten = torch.where(scale[:, None], v * factor[:, None], v - shift[:, None])
    out[:, columns] = torch.where(over[:, None], rewritten, v)
    return out


def _positive_mean(hinge: Tensor) -> Tensor:
    """Mean of the positive entries (0 when none), without a host sync."""
    return hinge.clamp(min=0).sum() / (hinge > 0).sum().clamp(min=1)


class XDER(ReplayMethod):
    """eXtended Dark Experience Replay, X-DER (Boschini, Bonicelli, Buzzega, Porrello & Calderara, "Class-Incremental
    Continual Learning into the eXtended DER-verse", IEEE TPAMI 2022), without its future-preparation loss.

    With ``C_t`` the outputs of the current task ``t``, ``C_<t`` / ``C_>t`` those of earlier / later tasks, ``M``
    the buffer (samples of tasks ``< t`` only, empty in the first task, with stored logits ``z``) and ``A``, ``B``
    two independent replay batches drawn from it, each step minimises::

        L = CE(f(x)|C_t, y)                                          separated CE: the current head only
          + alpha * E_{(x', z') ~ A} ||f(x') - z'||^2                DER: all heads
          + beta  * E_{(x'', y'') ~ B} CE(f(x'')|C_<t, y'')          DER++: the past heads only
          + eta * mean+[ sg(max_{C_<t} p(x)) + m - max_{C_t} p(x) ]  past constraint, p = softmax over C_<=t
          + eta * mean+[ max_{C_>t} f(u) + m - max_{C_task(u)} f(u) ] future constraint, u in x, A and B

    (``mean+``: the mean over positive entries, 0 if none; ``sg``: no gradient; the constraints are dropped at the
    first / last task). The stored logits are rewritten, always through :func:`rewrite_logits` ``rho``, which keeps
    the largest rewritten logit at most ``g - (1 - gamma) * |g|`` (``gamma * g`` for a positive ground-truth logit
    ``g``, as in the paper), so the stored target still ranks the sample's own class first:

    - at the end of task ``t`` the buffer keeps ``buffer_size // classes seen`` random samples of every class seen
      (those of older classes: the head of their earlier random order), the new ones stored with
      ``z = f(x)`` whose past heads are ``rho(f(x)|C_<t)``; every sample of an earlier task gets its logits of the
      finished task's head rewritten, ``z|C_t = rho(f(x)|C_t)``, its other logits (its past) kept;
    - during task ``t``, a replayed sample (``A`` and ``B``, duplicates once) gets ``z|C_>=t = rho(f(x)|C_>=t)``
      with probability ``1 / k`` at its ``k``-th replay in the task (a reservoir over its replays).

    The objective replaces the module's task loss (:meth:`replaces_task_loss`), so ``module.train_outputs`` does not
    change it. In task-IL (``B``'s cross-entropy over its own task's head, as DER++ here) the heads are separate at
    evaluation and X-DER is DER++ with rewritten stored logits and the two constraints; domain-IL has one head
    shared by all tasks, so there are no past or future heads to separate: refused at setup. The buffer is filled
    at task ends: needs task boundaries (refused on ``dataset.stream=online``). ``x``, ``A`` and ``B`` go through the
    network in one pass over their concatenation when it has no batch statistics (``module.fused_forward=auto``),
    else one pass each, as in Mammoth.

    Deviations from the paper and Mammoth's ``models/xder.py``, with their reasons:

    - **No future preparation** (the paper's SupCon loss on the future heads over strongly augmented views,
      ``lambd``): this is X-DER without that term, the simplest faithful variant, because its augmentations (crops,
      flips, colour jitter of natural images) have no counterpart on the MNIST-like protocols. Mammoth's
      ``xder_ce`` drops it too, but puts the future heads in the current CE; here the CE is the paper's separated
      one, and the future constraint alone keeps the future heads low.
    - **The guard in rho** for ``g <= 0`` (above): the paper's factor ``gamma * g / max v`` is meant for ``g > 0``;
      on small MLPs the ground-truth logit can be negative, where it flips the rewritten logits' order or grows
      without bound as ``max v`` nears 0.
    - **Task-end logits** of the network in evaluation mode on un-augmented inputs (Mammoth: training mode without
      batch-norm tracking, augmented inputs): deterministic and without draws from the global generator, so a
      resumed run repeats them; the same on the MNIST presets, which do not augment.
    - **Leftover slots**: ``buffer_size mod classes seen`` slots stay empty (Mammoth gives them to the newest
      classes); the per-class quota is that of every class, new or old.
    - **Task ids stay the samples' own** (Mammoth overwrites them to mark updated samples): task-IL's heads need
      them, and nothing here reads a mark.
    - **DDP**: the rewrite during a task takes rank 0's logits (all-gathered), so every rank's buffer is the same.

    Args:
        buffer_size: Slots of the buffer; at least the number of classes (every class keeps one sample or more).
        replay_batch_size: Samples in each of the replay batches ``A`` and ``B``.
        alpha: Weight of the logit matching on ``A``.
        beta: Weight of the past-head cross-entropy on ``B``.
        gamma: The rescaling of the rewritten logits, in ``(0, 1]``.
        eta: Weight of the past and future constraints.
        m: Margin of the constraints.
        seed: Seed of the buffer's generator (selection, replay draws, rewrite decisions).
    """

    name: ClassVar[str] = "xder"
    supported_scenarios: ClassVar[tuple[str, ...]] = ("class_il", "task_il")
    needs_task_boundaries: ClassVar[bool] = True
    selections: ClassVar[tuple[str, ...]] = ("random",)

    def __init__(
        self,
        buffer_size: int = 500,
        replay_batch_size: int = 32,
        alpha: float = 0.3,
        beta: float = 0.8,
        gamma: float = 0.85,
        eta: float = 0.1,
        m: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, "random", seed)
        self.alpha = check_number("method.alpha", alpha)
        self.beta = check_number("method.beta", beta)
        self.gamma = check_fraction("method.gamma", gamma, low_open=True)
        self.eta = check_number("method.eta", eta)
        self.m = check_number("method.m", m)
        self._replays: Tensor | None = None  # replays of each slot in the current task (the rewrite's 1 / k)

    @override
    def replaces_task_loss(self) -> bool:
        return True  # the separated cross-entropy replaces the module's CE over all (or all seen) classes

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(getattr(trainer, "datamodule", None), "scenario", None) == "domain_il":
            raise ConfigError(
                "method=xder does not support dataset.scenario=domain_il: its losses and logit rewriting separate "
                "the heads of past, current and future tasks, and domain-IL shares one head; use class_il or task_il"
            )
        super().setup(trainer, pl_module, stage)
        masks = getattr(pl_module, "output_masks", None)
        n_classes = 0 if masks is None else int(masks.any(0).sum())
        if self.buffer_size < n_classes:
            raise ConfigError(
                f"method.buffer_size={self.buffer_size}: xder keeps buffer_size // classes seen samples per class, "
                f"0 for {n_classes} classes; use method.buffer_size >= {n_classes}"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._replays is not None:
            self._replays = self._replays.to(pl_module.device)

    # ------------------------------------------------------------------ the loss
    @override
    def replay_draws(self, pl_module: CLModule, batch: Batch) -> list[BufferSample]:
        if (a := self.draw(pl_module)) is not None and (b := self.draw(pl_module)) is not None:
            return [a, b]
        return []

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        t, masks = self._task, pl_module.output_masks
        current = masks[t]
        terms = {"stream": F.cross_entropy(logits.masked_fill(~current, float("-inf")), batch.y)}
        outputs, own = [logits], [current.expand_as(logits)]
        if len(replayed := self.replayed(pl_module)) == 2:
            (a, out_a), (b, out_b) = replayed
            assert a.logits is not None and b.logits is not None
            terms["logit_mse"] = self.alpha * F.mse_loss(out_a.float(), a.logits)
            heads = masks[b.task_id] if pl_module.scenario == "task_il" else masks[:t].any(0)
            terms["replay"] = self.beta * F.cross_entropy(out_b.masked_fill(~heads, float("-inf")), b.y)
            slots = torch.cat([a.slots, b.slots])
            first = ~(slots[:, None] == slots[None, :]).tril(-1).any(1)  # each slot once (A's copy first)
            out = torch.cat([out_a, out_b])[first]
            tid = torch.cat([a.task_id, b.task_id])[first]
            stored = torch.cat([a.logits, b.logits])[first]
            self._rewrite_future(pl_module, slots[first], stored, torch.cat([a.y, b.y])[first], tid, out.detach())
            outputs.append(out)
            own.append(masks[tid])
        if t > 0:
            p = F.softmax(logits.float().masked_fill(~masks[: t + 1].any(0), float("-inf")), 1)
            good = p.masked_fill(~current, 0).amax(1)
            bad = p.masked_fill(~masks[:t].any(0), 0).amax(1).detach()
            terms["past_margin"] = self.eta * _positive_mean(bad + self.m - good)
        if t < pl_module.n_tasks - 1:
            z, mine = torch.cat(outputs).float(), torch.cat(own)
            future = z.masked_fill(~masks[t + 1 :].any(0), float("-inf")).amax(1)
            terms["future_margin"] = self.eta * _positive_mean(
                future + self.m - z.masked_fill(~mine, float("-inf")).amax(1)
            )
        return terms

    @torch.no_grad()
    def _rewrite_future(
        self, pl_module: CLModule, slots: Tensor, stored: Tensor, y: Tensor, tid: Tensor, out: Tensor
    ) -> None:
        """Rewrite the current and future heads of replayed samples, each with probability 1 / (its replays)."""
        (everyone,) = gather(pl_module.trainer, out)
        out = everyone[: len(out)].float()  # rank 0's (ranks concatenated in order): the buffers stay identical
        if self._replays is None or len(self._replays) < self.buffer.size:
            self._replays = torch.zeros(self.buffer.size, device=stored.device)
        eligible = tid < self._task  # always, as the buffer holds earlier tasks only; kept for safety
        self._replays[slots] += eligible
        draw = torch.rand(len(slots), generator=self.buffer.generator, dtype=torch.float64).to(stored.device)
        chosen = eligible & (draw * self._replays[slots] < 1)
        new = rewrite_logits(stored, out, y, pl_module.output_masks[self._task :].any(0), self.gamma)
        assert self.buffer.logits is not None
        self.buffer.logits.index_copy_(0, slots, torch.where(chosen[:, None], new, stored))

    # ------------------------------------------------------------------ the task end
    @torch.no_grad()
    def _logits(self, pl_module: CLModule, x: Tensor, tid: Tensor, chunk: int = 1024) -> Tensor:
        """The network's logits of stored inputs, un-augmented, in evaluation mode."""
        net = pl_module.net
        was_training = net.training
        net.eval()
        try:
            parts = [
                pl_module(pl_module.prepare(xs, train=False), ts).float()
                for xs, ts in zip(x.split(chunk), tid.split(chunk), strict=True)
            ]
            return torch.cat(parts)
        finally:
            net.train(was_training)

    @override
    @torch.no_grad()
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id <= self._filled:
            return  # already done before a resume
        masks, dev = pl_module.output_masks, pl_module.device
        data = trainer.datamodule.tasks[task_id]  # type: ignore[attr-defined]
        x, y = data.train_x.to(dev), data.train_y.to(dev)
        z = self._logits(pl_module, x, torch.full_like(y, task_id))
        z = rewrite_logits(z, z, y, masks[:task_id].any(0), self.gamma)  # the new samples' past heads
        for c in torch.unique(y).tolist():  # one group per class: each keeps buffer_size // classes seen
            idx = torch.nonzero(y == c).view(-1)
            self.buffer.add_task(x[idx], y[idx], task_id, logits=z[idx])
        assert self.buffer.task_id is not None and self.buffer.logits is not None
        old = torch.nonzero(self.buffer.task_id[: self.buffer.size] < task_id).view(-1)
        if len(old):  # the finished task's head of the earlier tasks' samples; their past logits kept
            s = self.buffer.get(old)
            assert s.logits is not None
            new = self._logits(pl_module, s.x, s.task_id)
            self.buffer.logits.index_copy_(0, s.slots, rewrite_logits(s.logits, new, s.y, masks[task_id], self.gamma))
        self._replays = torch.zeros(self.buffer.size, device=dev)
        self._filled = task_id

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._replays is not None:
            state["replays"] = self._replays.cpu()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "replays" in state_dict:
            self._replays = state_dict["replays"].clone()
