"""Gradient Episodic Memory (GEM): project the gradient so that no past task's memory loss increases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.buffer import Buffer, BufferSample
from cl_lightning.core.projection import flat_grad, gem_project, write_flat_grad
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.der import check_weight
from cl_lightning.methods.er import check_int, fill_from_task, per_task_quota

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule


class GEM(CLMethod):
    """Gradient Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017, eqs. 6-13).

    Each past task ``k`` keeps an episodic memory ``M_k``. At every step, with ``g`` the gradient of the current
    loss and ``g_k`` that of the loss on ``M_k`` (its samples use their own task's head in task-IL, the seen
    classes in class-IL), the update is ``g`` if ``<g, g_k> >= 0`` for every ``k``, else the solution of::

        min_z 1/2 ||z - g||^2   s.t.   <z, g_k> >= 0 for all k < t,

    obtained from the dual QP ``min_{v >= 0} 1/2 v^T G G^T v + g^T G^T v``, ``z = G^T v + g`` (``G``'s rows are
    the ``g_k``). The dual is a non-negative least-squares problem, solved exactly by ``scipy.optimize.nnls`` with
    the ridge ``eps`` and GEM's ``memory_strength`` margin (``v >= margin``), as in
    :func:`cl_lightning.core.projection.gem_project`.

    Memories: ``buffer_size // n_tasks`` samples per task (GEM's fixed ``n_memories`` per task), a uniform random
    subset of the task's training data chosen at task end. GEM's code instead keeps the *last* ``n_memories``
    samples of each task's stream in a ring buffer; for a shuffled task both are uniform subsets of it. Filling at
    task end needs task boundaries: refused on ``dataset.stream=online``. Mammoth's GEM, which we follow for the
    defaults, also fills at task end.

    The edit is in ``on_before_optimizer_step`` (after AMP unscaling); memory gradients are computed there with
    ``torch.autograd.grad``, so ``p.grad`` holds the current gradient until the projection is written back.

    DDP: ``p.grad`` is already all-reduced when the hook runs; memories are filled from the whole task with the
    same seeded generator and the memory gradients are computed on the plain network (``autograd.grad`` fires no
    DDP hooks), so every rank computes the same projection and the weights stay in sync.

    Args:
        buffer_size: Total memory; each task gets ``buffer_size // dataset.n_tasks`` samples.
        replay_batch_size: Samples of each task's memory per gradient, drawn anew every step; ``null`` uses the
            whole memory of each task (the paper).
        memory_strength: GEM's margin, the lower bound of the dual variables (0: the exact projection).
        eps: Ridge added to the dual's Gram matrix ``G G^T`` (GEM's code: 1e-3).
        seed: Seed of the memory's generator (task-end subsets, per-step subsamples).
    """

    name: ClassVar[str] = "gem"
    needs_task_boundaries: ClassVar[bool] = True
    gradient_edit: ClassVar[str | None] = "projection"

    def __init__(
        self,
        buffer_size: int = 500,
        replay_batch_size: int | None = None,
        memory_strength: float = 0.5,
        eps: float = 1e-3,
        seed: int = 0,
    ) -> None:
        self.buffer_size = check_int("method.buffer_size", buffer_size)
        if replay_batch_size is not None:
            check_int("method.replay_batch_size", replay_batch_size)
        self.replay_batch_size = replay_batch_size
        self.memory_strength = check_weight("method.memory_strength", memory_strength)
        self.eps = check_weight("method.eps", eps)
        self.buffer = Buffer(buffer_size, "random", seed)
        self.quota = 0
        self._filled = -1
        self._projected = self._steps = 0  # steps projected since the last log (a diagnostic)
        self._slots: dict[int, Tensor] = {}  # slots of each stored task (a cache, rebuilt when the memory changes)
        self._gathered: dict[int, BufferSample] = {}  # whole memory of each task (same lifetime)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.quota = per_task_quota(trainer, self.buffer_size, self.name)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.buffer.to(pl_module.device)  # restored state is loaded on the host
        self._slots, self._gathered = {}, {}

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id > self._filled:
            fill_from_task(self.buffer, trainer, pl_module, task_id, quota=self.quota)
            self._filled = task_id
            self._slots, self._gathered = {}, {}

    def memory_gradient(self, pl_module: CLModule, params: list[Tensor], task: int, into: Tensor) -> None:
        """Write into ``into`` the flat gradient of the loss on ``task``'s memory (``p.grad`` untouched)."""
        slots = self._slots[task]
        if self.replay_batch_size is not None and len(slots) > self.replay_batch_size:
            pick = torch.randperm(len(slots), generator=self.buffer.generator)[: self.replay_batch_size]
            memory = self.buffer.get(slots[pick.to(slots.device)])
        else:  # the whole memory of the task: gathered once, not every step
            if task not in self._gathered:
                self._gathered[task] = self.buffer.get(slots)
            memory = self._gathered[task]
        with torch.enable_grad():
            out = pl_module(pl_module.prepare(memory.x, train=True), memory.task_id)
            loss = F.cross_entropy(pl_module.training_logits(out, memory.task_id), memory.y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat_grad(grads, params, out=into)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.buffer.is_empty:
            return
        if not self._slots:
            self._slots = {t: self.buffer.slots_of_task(t) for t in self.buffer.stored_tasks()}
        module: CLModule = pl_module  # type: ignore[assignment]
        current = int(module.current_task)
        params = [p for p in module.parameters() if p.requires_grad]
        past = [t for t in self._slots if t < current]
        if not past:
            return
        g = flat_grad([p.grad for p in params], params)
        memories = g.new_empty(len(past), len(g))  # G, one row per past task, written in place
        for row, task in zip(memories, past, strict=True):
            self.memory_gradient(module, params, task, into=row)
        projected = gem_project(g, memories, self.memory_strength, self.eps)
        if projected is not g:
            write_flat_grad(params, projected)
        self._projected += projected is not g
        self._steps += 1
        if self._steps >= module.log_every_n_steps and module.logger is not None:
            rate = self._projected / self._steps
            module.logger.log_metrics({f"train/{self.name}/projection_rate": rate}, step=module.global_step)
            self._projected = self._steps = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "filled": self._filled}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "buffer" in state_dict:
            self.buffer.load_state_dict(state_dict["buffer"])
        self._filled = int(state_dict.get("filled", self._filled))
        self._slots, self._gathered = {}, {}
