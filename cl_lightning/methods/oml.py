"""Online meta-learning with replay: a MAML-style outer update on the current batch and a replayed batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.meta import MetaBatch, meta_loss
from cl_lightning.errors import ConfigError
from cl_lightning.methods.replay import ReplayMethod
from cl_lightning.models.backbones import routes_by_task
from cl_lightning.validation import check_bool, check_choice, check_int, check_number

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

ADAPT = ("all", "head")
INNER_BATCH = ("split", "full")


class OML(ReplayMethod):
    """Online meta-learning with replay: C-MAML of Gupta, Yadav & Paull, "La-MAML: Look-ahead Meta Learning for
    Continual Learning" (NeurIPS 2020, section 4): La-MAML's algorithm without its learned learning rates.

    For each incoming batch ``b``, draw ``b_m = Sample(M) ∪ b`` from a reservoir buffer ``M``, take ``k`` inner SGD
    steps on ``b`` from the current weights ``theta_0`` and minimise the loss of ``b_m`` at the adapted weights::

        theta_i = theta_{i-1} - inner_lr * grad l(theta_{i-1}; b_i),    i = 1 .. k
        L(theta_0) = CE(mask(f_{theta_k}(b_m)), y_m)

    ``L`` is the whole objective (:meth:`replaces_task_loss`); the module's optimizer takes the outer step on
    ``dL/dtheta_0`` with ``optimizer.lr`` (Gupta et al.'s ``beta``; plain SGD in the paper). The meta-gradient
    is second order (through the inner gradients) or, with ``first_order``, ``grad L(theta_k)`` (FOMAML); see
    :mod:`cl_lightning.core.meta`. For one step, ``L(theta_0) ~ L_m(theta_0) - inner_lr * <grad L_m, grad l_b>`` to
    first order in ``inner_lr``: minimising it aligns the gradients of the incoming batch and of ``b_m``, the
    quantity MER maximises (the connection Gupta et al. draw). ``b_m`` is drawn before ``b`` is inserted; ``mask``
    is the scenario's training masking (task-IL: each sample's own task's head).

    Inner batches: ``inner_batch=split`` (the default) cuts ``b`` into ``inner_steps`` consecutive parts, one step
    on each, as the paper's algorithm does (one sample per step there: ``inner_steps`` equal to the batch size; a batch
    smaller than ``inner_steps`` takes one step per sample); ``full`` takes every step on the whole of ``b``
    (MAML's ``k`` steps on one support set).

    Where it differs from the paper and its code (montrealrobotics/La-MAML): the learning rates are fixed, not
    learned (that is La-MAML proper); the outer loss is that of ``theta_k`` only, as in the paper (the code
    averages the outer losses after every inner step); each batch is seen once per epoch (the code's ``glances``
    repeat a batch); no gradient clipping (set ``trainer.gradient_clip_val``). As in the code, replay draws from
    the reservoir as it is (every step's batch inserted), so no task boundary is needed: ``dataset.stream=online``
    works.

    Related work: OML (Javed & White, "Meta-Learning Representations for Continual Learning", NeurIPS 2019)
    adapts only the prediction network in the inner loop and meta-trains offline before a frozen-representation
    continual phase; ``adapt=head`` gives its inner loop (only ``net.head`` adapts; the outer update still trains
    every parameter, online). MER (Riemer et al., "Learning to Learn without Forgetting by Maximizing Transfer and
    Minimizing Interference", ICLR 2019) is first-order and Reptile-style (steps on samples mixed with memories,
    then interpolation of the weights), a different update from this gradient of an outer loss.

    The functional calls use ``pl_module.net`` with its own buffers (no copy of the model): batch norm in training
    mode updates its running statistics at every inner and outer forward. A network that routes by task
    (``net.task_conditioned``) gets each sample's task id, as in :meth:`CLModule.forward`.

    DDP: the outer loss is a function of the module's parameters themselves, so its backward fills their
    ``.grad`` and fires DDP's all-reduce hooks as an ordinary backward does (checked by a two-process test);
    ``torch.autograd.grad`` of the inner steps accumulates nothing and triggers no reduction. Each rank adapts on
    its own shard of the batch and the ranks' meta-gradients are averaged (a meta-batch of one task per rank, as
    in MAML). The current batch is all-gathered before insertion (:class:`~cl_lightning.methods.replay.ReplayMethod`),
    so buffers and replay batches are identical on every rank.

    Args:
        inner_steps: SGD steps of the inner loop, ``k``.
        inner_lr: Their learning rate (Gupta et al.'s ``alpha``); 0 makes the objective plain replay of ``b_m``.
        first_order: Detach the inner gradients (first-order MAML) instead of differentiating through them.
        adapt: ``all`` parameters or only the ``head`` in the inner steps.
        inner_batch: ``split`` the current batch across the inner steps or take each on the ``full`` batch.
        buffer_size: Slots of the reservoir buffer.
        replay_batch_size: Samples replayed per step (fewer while the buffer holds fewer).
        seed: Seed of the buffer's generator.
    """

    name: ClassVar[str] = "oml"

    @override
    def replaces_task_loss(self) -> bool:
        return True  # the outer loss over the batch and the replay is the whole objective

    def __init__(
        self,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        first_order: bool = False,
        adapt: str = "all",
        inner_batch: str = "split",
        buffer_size: int = 200,
        replay_batch_size: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, "reservoir", seed)
        self.inner_steps = check_int("method.inner_steps", inner_steps)
        self.inner_lr = check_number("method.inner_lr", inner_lr)
        self.first_order = check_bool("method.first_order", first_order)
        self.adapt = check_choice("method.adapt", adapt, ADAPT)
        self.inner_batch = check_choice("method.inner_batch", inner_batch, INNER_BATCH)
        self._adapted: set[str] | None = None  # parameter names the inner steps update (None: all)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.adapt == "head":
            names = {n for n, p in pl_module.net.named_parameters() if p.requires_grad}  # type: ignore[union-attr]
            self._adapted = {n for n in names if n.startswith("head.")}
            if not self._adapted:
                raise ConfigError(
                    f"method.adapt=head: the model {type(pl_module.net).__name__} has no trainable `head` "
                    "parameters; use method.adapt=all"
                )

    def inner_batches(self, x: Tensor, y: Tensor, task_id: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The ``(x, y, task_id)`` of each inner step."""
        if self.inner_batch == "full":
            return [(x, y, task_id)] * self.inner_steps
        n = min(self.inner_steps, len(y))
        return list(zip(x.tensor_split(n), y.tensor_split(n), task_id.tensor_split(n), strict=True))

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        net = pl_module.net
        routed = routes_by_task(net)

        def step(x: Tensor, y: Tensor, task_id: Tensor) -> MetaBatch:
            return MetaBatch((x, task_id) if routed else (x,), (y, task_id))

        def loss_fn(out: Tensor, target: tuple[Tensor, Tensor]) -> Tensor:
            y, task_id = target
            return F.cross_entropy(pl_module.training_logits(out, task_id), y)

        x, y, tid = pl_module.prepare(batch.x, train=True), batch.y, batch.task_id
        inner = [step(*part) for part in self.inner_batches(x, y, tid)]
        replay = self.draw(pl_module)  # b_m = Sample(M) ∪ b, before b is inserted
        if replay is None:
            outer = step(x, y, tid)
        else:
            outer = step(torch.cat([replay.x, x]), torch.cat([replay.y, y]), torch.cat([replay.task_id, tid]))
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        result = meta_loss(net, params, loss_fn, inner, outer, self.inner_lr, self.first_order, self._adapted)
        return {"meta": result.outer}
