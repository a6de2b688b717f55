"""Gradient Episodic Memory (GEM): project the gradient so that no past task's memory loss increases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.buffer import Buffer, BufferSample
from cl_lightning.core.projection import LinearGroupGradients, flat_grad, gem_stacked_dual, write_flat_grad
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.der import check_weight
from cl_lightning.methods.er import ProjectionRate, check_int, fill_from_task, per_task_quota
from cl_lightning.models.backbones import MLP, routes_by_task

if TYPE_CHECKING:
    from cl_lightning.models.module import CLModule


class StepMemory(NamedTuple):
    """The memories a GEM step uses: the samples, their network inputs, how many of each past task, and the
    one-pass helper (``None``: one pass per task) with its inputs (possibly reduced to the features it keeps)."""

    sample: BufferSample
    x: Tensor
    sizes: list[int]
    grouped: LinearGroupGradients | None
    grouped_x: Tensor


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
    defaults, also fills at task end: the first batch of ``buffer_size // n_tasks`` samples of a shuffled loader
    over the task, i.e. a uniform random subset, as here.

    Compared with the paper and Mammoth's ``models/gem.py`` (checked for the Buzzega et al. 2020 reproduction):
    constraints are the past tasks only, the current batch's gradient being the proposed ``g`` (same in both);
    every trainable parameter enters ``g`` and ``G`` (same); memory and current gradients are taken at the same
    weights before the step (same); ``eps = 1e-3`` is added to ``G G^T`` (GEM's and Mammoth's code). The margin:
    the paper's text adds a constant ``gamma`` to the dual solution ``v*``, while GEM's code and Mammoth solve the
    dual with ``v >= gamma`` (not the same update when the bound is active); we follow the code, which produced the
    published numbers. Mammoth solves the dual with ``quadprog`` on a float64 Gram matrix; ours is formed in
    float32 and solved in float64 (on recorded 18-constraint steps of Permuted-MNIST the two updates differ by
    under 1e-5 in norm). The one difference found that moves results is outside GEM: Mammoth's ``MNISTMLP``
    initialises weights Glorot-uniform with zero biases (``model.init=xavier``, which the ``der_*`` experiment
    presets set; PyTorch's default otherwise); see ``NOTES`` in ``benchmarks/reproduce.py``.

    The edit is in ``on_before_optimizer_step`` (after AMP unscaling); memory gradients are computed there without
    writing ``p.grad``, which holds the current gradient until the correction ``G^T v`` is added to it. On a
    network of ``nn.Linear`` layers and per-sample modules (the MLPs of the MNIST protocols) all past tasks' memory
    gradients come from one forward over the concatenated memories and one backward, per-task weight gradients
    being batched products ``D_k^T A_k`` (:class:`cl_lightning.core.projection.LinearGroupGradients`): the same
    arithmetic as one backward per task, in larger kernels. Other networks (convolutions, batch norm, task-routed
    networks) get one forward and backward per past task. ``G G^T`` and ``G g`` come from one product of the rows
    ``[G; g]`` (:func:`cl_lightning.core.projection.gem_stacked_dual`). The memory is fixed during a task, so its
    network inputs are prepared once per task, unless the preprocessing augments (then every step draws anew), and
    on the one-pass path the first layer's weight columns of input features that are zero in every memory sample
    (MNIST's border pixels) are left out of ``G``: those entries of every ``g_k`` are exactly zero, so the
    projection is unchanged (:meth:`~cl_lightning.core.projection.LinearGroupGradients.restricted`).

    DDP: ``p.grad`` is already all-reduced when the hook runs; memories are filled from the whole task with the
    same seeded generator and the memory gradients are computed on the plain network (``torch.autograd.grad`` or
    the written-out pass: no DDP hook fires, no ``p.grad`` is written), so every rank computes the same projection
    and the weights stay in sync.

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
        self._rate = ProjectionRate(self.name)  # a diagnostic
        # caches, rebuilt when the memory changes (task end, restore) or at fit start (parameters may change)
        self._slots: dict[int, Tensor] = {}  # slots of each stored task
        # (tasks, their whole memories, samples per task, what a step needs of them or None when preprocessing
        # augments)
        self._whole: tuple[list[int], BufferSample, list[int], StepMemory | None] | None = None
        self._params: list[Tensor] | None = None  # trainable parameters, in flat-gradient order
        self._grouped: LinearGroupGradients | None = None  # one-pass memory gradients, None: one pass per task
        self._rows: Tensor | None = None  # workspace: G's rows, then g

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.quota = per_task_quota(trainer, self.buffer_size, self.name)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.buffer.to(pl_module.device)  # restored state is loaded on the host
        self._forget()
        self._params = self._grouped = self._rows = None

    def _forget(self) -> None:
        self._slots, self._whole = {}, None

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id > self._filled:
            fill_from_task(self.buffer, trainer, pl_module, task_id, quota=self.quota)
            self._filled = task_id
            self._forget()

    def _memory(self, module: CLModule, tasks: list[int]) -> StepMemory:
        """The memory samples of ``tasks`` for this step, task after task: each task's whole memory (gathered,
        prepared unless the preprocessing augments, and reduced for the one-pass helper, once per task), or
        ``replay_batch_size`` samples of it drawn anew."""
        r = self.replay_batch_size
        if r is None or all(len(self._slots[t]) <= r for t in tasks):  # whole memories: gathered once
            if self._whole is None or self._whole[0] != tasks:
                sample = self.buffer.get(torch.cat([self._slots[t] for t in tasks]))
                sizes = [len(self._slots[t]) for t in tasks]
                cached = None
                if not module.augments:
                    x = module.prepare(sample.x, train=True)
                    grouped, grouped_x = self._one_pass(sizes), x
                    if grouped is not None:  # the memory is fixed: drop the input features it never uses
                        grouped, grouped_x = grouped.restricted(x)
                    cached = StepMemory(sample, x, sizes, grouped, grouped_x)
                self._whole = (tasks, sample, sizes, cached)
            _, sample, sizes, cached = self._whole
            if cached is not None:
                return cached
        else:
            picks = []
            for t in tasks:  # a fresh subsample of each task's memory, in task order
                slots = self._slots[t]
                if len(slots) > r:
                    slots = slots[torch.randperm(len(slots), generator=self.buffer.generator)[:r].to(slots.device)]
                picks.append(slots)
            sample, sizes = self.buffer.get(torch.cat(picks)), [len(s) for s in picks]
        x = module.prepare(sample.x, train=True)
        return StepMemory(sample, x, sizes, self._one_pass(sizes), x)

    def _one_pass(self, sizes: list[int]) -> LinearGroupGradients | None:
        return self._grouped if len(set(sizes)) == 1 else None

    def memory_gradients(self, module: CLModule, params: list[Tensor], memory: StepMemory, out: Tensor) -> bool:
        """Write into row ``k`` of ``out`` the flat gradient of the loss on the ``k``-th task's memory (``p.grad``
        untouched): the mean cross-entropy of its samples, each with its own task's training logits. The flat
        layout is ``memory.grouped``'s when it is set (one pass for all tasks), else :func:`flat_grad`'s (one pass
        per task). Returns ``False`` (``out`` unspecified) when the one-pass helper stepped aside."""
        y, task_id = memory.sample.y, memory.sample.task_id
        if memory.grouped is not None:
            size = memory.sizes[0]

            def loss(logits: Tensor) -> Tensor:  # the sum over tasks of each task's mean loss
                return F.cross_entropy(module.training_logits(logits, task_id), y, reduction="sum") / size

            return memory.grouped(memory.grouped_x, loss, size, out)
        start = 0
        for row, n in zip(out, memory.sizes, strict=True):  # one forward and backward per task
            part = slice(start, start + n)
            with torch.enable_grad():
                logits = module.training_logits(module(memory.x[part], task_id[part]), task_id[part])
                grads = torch.autograd.grad(F.cross_entropy(logits, y[part]), params, allow_unused=True)
            flat_grad(grads, params, out=row)
            start += n
        return True

    def _workspace(self, k: int, n: int, like: Tensor) -> Tensor:
        """``[k + 1, n]``: G's rows, then g; reused across steps."""
        if self._rows is None or self._rows.shape != (k + 1, n) or self._rows.dtype != like.dtype:
            self._rows = torch.empty(k + 1, n, dtype=like.dtype, device=like.device)
        return self._rows

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
        past = [t for t in self._slots if t < current]
        if not past:
            return
        if self._params is None:
            self._params = [p for p in module.parameters() if p.requires_grad]
            routed = routes_by_task(module.net)
            self._grouped = None if routed else LinearGroupGradients.build(module.net, self._params, (MLP,))
            self._whole = None
        params = self._params
        memory = self._memory(module, past)
        grouped = memory.grouped
        if grouped is not None:
            rows = self._workspace(len(past), grouped.n_params, params[0])
            grouped.gather(params, rows[-1])
            if not self.memory_gradients(module, params, memory, rows[:-1]):
                # the network did not run as a chain of layers: one pass per task from now on
                self._grouped = grouped = self._whole = None
                memory = self._memory(module, past)
        if grouped is None:
            rows = self._workspace(len(past), sum(p.numel() for p in params), params[0])
            flat_grad([p.grad for p in params], params, out=rows[-1])
            self.memory_gradients(module, params, memory, rows[:-1])
        v = gem_stacked_dual(rows, self.memory_strength, self.eps)
        if v is not None:  # z = g + G^T v
            if grouped is not None:
                grouped.add_to_grads(params, torch.mv(rows[:-1].T, v))
            else:
                write_flat_grad(params, torch.addmv(rows[-1], rows[:-1].T, v))
        self._rate.update(module, v is not None)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "filled": self._filled}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "buffer" in state_dict:
            self.buffer.load_state_dict(state_dict["buffer"])
        self._filled = int(state_dict.get("filled", self._filled))
        self._forget()
