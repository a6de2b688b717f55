"""MIR: experience replay that retrieves the stored samples the coming update would hurt most."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad
from typing_extensions import override

from cl_lightning.core.buffer import BufferSample
from cl_lightning.methods.replay import ReplayMethod
from cl_lightning.models.backbones import routes_by_task
from cl_lightning.validation import check_int

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["MIR"]


class MIR(ReplayMethod):
    """Maximally Interfered Retrieval, ER-MIR (Aljundi et al., "Online Continual Learning with Maximally Interfered
    Retrieval", NeurIPS 2019, section 3.1 and their ``retrieve_replay_update``).

    Each step, with ``g`` the gradient of the incoming batch's loss at the weights ``theta`` and ``lr`` the
    optimizer's learning rate, the virtual update ``theta_v = theta - lr * g`` scores ``subsample`` candidates drawn
    at random from the buffer by how much it would raise their loss::

        s(x, y) = CE(f_{theta_v}(x), y) - CE(f_theta(x), y)

    and the ``replay_batch_size`` candidates with the highest scores are replayed::

        L = CE(f(x_b), y_b) + CE(f(x_r), y_r)          (x_r, y_r): the top-scored candidates

    (the sum of the two means, as their code does). Both losses use the run's masking
    (``pl_module.training_logits``). The scores are computed without gradients and without side effects on the
    network: ``g`` comes from ``torch.func.grad`` of a functional copy, and batch norm's running statistics are
    updated on copies that are thrown away.

    Differences from their code, each for a stated reason: candidates come from the whole buffer (theirs exclude the
    current task's samples, which needs task boundaries; MIR is task-free); the virtual step is a plain SGD step with
    the optimizer's ``lr`` whatever the optimizer (theirs is SGD, as the protocol's); their MNIST runs'
    ``--compare_to_old_logits`` variant (scores against the lowest loss seen at the sample's earlier retrievals) is
    not implemented. Under DDP the virtual gradient is averaged over the ranks (one all-reduce per step), so every
    rank scores the same candidates with the global batch's gradient, retrieves the same samples and the run
    matches one process with the global batch (theirs run on one process).

    Cost per step: one extra forward and backward of the incoming batch (the virtual gradient), two forwards of the
    candidates without gradients, and the replayed batch's forward and backward (in one pass with the incoming
    batch's when the network has no batch statistics, ``module.fused_forward=auto``). The candidates are scored
    before the step's forward pass, at the same weights.

    Args:
        buffer_size: Slots of the reservoir buffer.
        replay_batch_size: Samples replayed per step (their ``buffer_batch_size``: 10).
        subsample: Candidates scored per step (their ``subsample``: 50), at least ``replay_batch_size``.
        seed: Seed of the buffer's generator (insertion decisions, candidate draws).
    """

    name: ClassVar[str] = "mir"

    def __init__(self, buffer_size: int = 500, replay_batch_size: int = 10, subsample: int = 50, seed: int = 0) -> None:
        super().__init__(buffer_size, replay_batch_size, "reservoir", seed)
        self.subsample = check_int("method.subsample", subsample, minimum=replay_batch_size)

    @staticmethod
    def learning_rate(pl_module: CLModule) -> float:
        optimizer = pl_module.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        return float(optimizer.param_groups[0]["lr"])  # type: ignore[union-attr]

    def scores(self, pl_module: CLModule, batch: Batch, candidates_x: Tensor, candidates: object) -> Tensor:
        """``CE(f_{theta - lr g}(x), y) - CE(f_theta(x), y)`` per candidate (no gradient, no side effect)."""
        net = pl_module.net
        params = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in net.named_parameters() if not p.requires_grad}
        buffers = {n: b.clone() for n, b in net.named_buffers()}  # batch norm's updates go to copies
        routed = routes_by_task(net)

        def logits(p: dict[str, Tensor], bufs: dict[str, Tensor], x: Tensor, tid: Tensor) -> Tensor:
            args = (x, tid) if routed else (x,)
            return functional_call(net, ({**p, **frozen}, bufs), args)

        x_b = pl_module.prepare(batch.x, train=True)

        def incoming(p: dict[str, Tensor], bufs: dict[str, Tensor]) -> Tensor:
            z = logits(p, bufs, x_b, batch.task_id)
            return F.cross_entropy(pl_module.training_logits(z, batch.task_id), batch.y)

        g = grad(incoming)(params, buffers)
        trainer = pl_module.trainer
        if trainer.world_size > 1:  # the global batch's gradient: every rank scores and retrieves alike
            flat = trainer.strategy.reduce(torch.cat([v.reshape(-1) for v in g.values()]), reduce_op="mean")
            chunks = flat.split([v.numel() for v in g.values()])
            g = {name: chunk.view_as(v) for (name, v), chunk in zip(g.items(), chunks, strict=True)}
        lr = self.learning_rate(pl_module)
        virtual = {n: p - lr * g[n] for n, p in params.items()}
        y, tid = candidates.y, candidates.task_id  # type: ignore[attr-defined]
        with torch.no_grad():
            z_before = pl_module.training_logits(logits(params, buffers, candidates_x, tid), tid)
            z_after = pl_module.training_logits(logits(virtual, buffers, candidates_x, tid), tid)
            before = F.cross_entropy(z_before, y, reduction="none")
            after = F.cross_entropy(z_after, y, reduction="none")
        return after - before

    @override
    def replay_draws(self, pl_module: CLModule, batch: Batch) -> list[BufferSample]:
        candidates = self.draw(pl_module, self.subsample)
        if candidates is None:
            return []
        k = min(self.replay_batch_size, len(candidates.y))
        chosen = self.scores(pl_module, batch, candidates.x, candidates).topk(k).indices
        return [BufferSample(*(None if v is None else v[chosen] for v in candidates))]

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        if not (replayed := self.replayed(pl_module)):
            return {}
        ((replay, out),) = replayed
        return {"replay": F.cross_entropy(pl_module.training_logits(out, replay.task_id), replay.y)}
