"""Averaged GEM (A-GEM): one projection against the gradient of a batch drawn from the whole memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from cl_lightning.core.projection import agem_project_
from cl_lightning.methods.replay import ProjectionRate, ReplayMethod

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule


class AGEM(ReplayMethod):
    """A-GEM (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019, eq. 11).

    GEM's constraints are replaced by one on the average memory loss: with ``g`` the current gradient and
    ``g_ref`` the gradient of the loss on a batch of ``replay_batch_size`` samples drawn from the memory of every
    past task (each sample with its own task's head in task-IL), the update is::

        g~ = g - (g . g_ref / g_ref . g_ref) g_ref   if g . g_ref < 0,   else g.

    Memory: like the paper's per-task episodic memories, ``buffer_size // n_tasks`` samples of each task, a uniform
    random subset of its training data chosen at task end (so A-GEM needs task boundaries: refused on
    ``dataset.stream=online``). Nothing is projected while the memory is empty (the first task). Mammoth's
    ``agem.py`` computes ``samples_per_task`` but then stores only the first *batch* of the task's loader; we
    store the ``buffer_size // n_tasks`` samples the paper and that variable describe.

    The edit is in ``on_before_optimizer_step`` (after AMP unscaling); ``g_ref`` is computed there with
    ``torch.autograd.grad``, so ``p.grad`` is untouched until the projection is written into it, in place, one
    parameter at a time (:func:`~cl_lightning.core.projection.agem_project_`).

    DDP: ``p.grad`` is all-reduced when the hook runs; memories are identical on every rank (whole task, same
    seeded generator), so is the reference batch (same generator state), and ``g_ref`` comes from the plain
    network (``autograd.grad`` fires no DDP hooks): every rank applies the same projection.

    Args:
        buffer_size: Total memory; each task gets ``buffer_size // dataset.n_tasks`` samples.
        replay_batch_size: Samples of the reference batch.
        seed: Seed of the memory's generator (task-end subsets, reference batches).
    """

    name: ClassVar[str] = "agem"
    needs_task_boundaries: ClassVar[bool] = True
    gradient_edit: ClassVar[str | None] = "projection"

    selections: ClassVar[tuple[str, ...]] = ("random",)
    memory_per_task: ClassVar[bool] = True  # buffer_size // n_tasks samples of each task, chosen at its end

    def __init__(self, buffer_size: int = 500, replay_batch_size: int = 128, seed: int = 0) -> None:
        super().__init__(buffer_size, replay_batch_size, "random", seed)
        self._rate = ProjectionRate(self.name)  # a diagnostic

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        module: CLModule = pl_module  # type: ignore[assignment]
        ref = self.draw(module)  # None while the memory is empty (the first task)
        if ref is None:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.enable_grad():
            out = module(ref.x, ref.task_id)
            loss = F.cross_entropy(module.training_logits(out, ref.task_id), ref.y)
            g_ref = torch.autograd.grad(loss, params, allow_unused=True)
        for p, r in zip(params, g_ref, strict=True):
            if p.grad is None and r is not None:  # no current gradient: a zero block the projection may change
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        self._rate.update(module, agem_project_(grads, g_ref))  # type: ignore[arg-type]
