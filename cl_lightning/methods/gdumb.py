"""GDumb: a class-balanced memory filled greedily from the stream, and a network trained from scratch on it."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.from_scratch import reinitialise, train_from_scratch
from cl_lightning.methods.replay import ReplayMethod
from cl_lightning.validation import check_int, check_number

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["GDumb"]


class GDumb(ReplayMethod):
    """GDumb (Prabhu, Torr & Dokania, "GDumb: A Simple Approach that Questions Our Progress in Continual Learning",
    ECCV 2020).

    The stream only fills a memory of ``buffer_size`` samples with the greedy class-balancing sampler (their Alg. 1,
    the buffer's ``gdumb`` policy: a sample enters while its class holds fewer than ``buffer_size / (classes seen)``
    slots, evicting a random sample of the largest class); the network is not trained on the stream (the method's
    objective is zero, :meth:`replaces_task_loss`). Whenever the model is to be evaluated, here at the end of every
    task, the network is re-initialised and trained from scratch on the memory alone::

        min_theta  E_{(x, y) in M}  CE(f_theta(aug(x)), y)

    for ``epochs`` passes with their schedule (:func:`~cl_lightning.core.from_scratch.train_from_scratch`: SGD,
    momentum 0.9, weight decay 1e-6, batch 16, a warm-start epoch at ``max_lr / 10``, then cosine annealing with
    warm restarts from ``max_lr`` to ``min_lr``, gradients clipped to norm 10). The loss uses the run's masking
    (class-IL: the classes seen, all of them in the memory; task-IL: each sample's own head).

    Differences from their code, with reasons: they report the best test accuracy over the passes (a choice on the
    test set); here the network after the last pass is evaluated. Their MNIST MLP batch-normalises the logits too;
    ``model.batch_norm=true`` normalises the hidden layers only. Their runs use half precision on a GPU. Their
    MNIST training images are randomly cropped (4-pixel padding); the preset sets ``dataset.augment=crop``, and
    each pass draws new crops of the memory (``prepare(x, train=True)``). The
    re-initialisation is PyTorch's (every submodule's ``reset_parameters``), from ``seed`` and the task.

    Needs task boundaries: the from-scratch training happens at each task end (on an online stream no evaluation
    point is known to the method). DDP: the memory is identical on every rank (gathered inserts) and every rank
    trains the same network with the same seeded shuffles.

    Args:
        buffer_size: Memory slots ``k``.
        epochs: Passes over the memory per training (their MNIST runs: 128).
        batch_size: Batch of the from-scratch training (theirs: 16).
        max_lr: Largest learning rate (theirs: 0.05).
        min_lr: Smallest, at the end of each cosine cycle (theirs: 0.0005).
        clip: Gradient-norm clip (theirs: 10).
        seed: Seeds the memory's decisions, the re-initialisation and the shuffles.
    """

    name: ClassVar[str] = "gdumb"
    selections: ClassVar[tuple[str, ...]] = ("gdumb",)
    needs_task_boundaries: ClassVar[bool] = True

    def __init__(
        self,
        buffer_size: int = 500,
        epochs: int = 128,
        batch_size: int = 16,
        max_lr: float = 0.05,
        min_lr: float = 0.0005,
        clip: float = 10.0,
        seed: int = 0,
    ) -> None:
        super().__init__(buffer_size, 1, "gdumb", seed)
        self.epochs = check_int("method.epochs", epochs)
        self.batch_size = check_int("method.batch_size", batch_size)
        self.max_lr = check_number("method.max_lr", max_lr, strict=True)
        self.min_lr = check_number("method.min_lr", min_lr)
        self.clip = check_number("method.clip", clip, strict=True)
        self.seed = seed
        self._trained = -1  # the last task at whose end the network was trained (never twice across a resume)

    @override
    def replaces_task_loss(self) -> bool:
        return True  # the stream trains nothing: it fills the memory

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        return {"none": logits.sum() * 0.0}

    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        super().on_task_end(trainer, pl_module, task_id)
        if task_id <= self._trained or self.buffer.is_empty:
            return
        buf = self.buffer
        assert buf.x is not None and buf.y is not None and buf.task_id is not None
        x, y, tid = buf.x[: buf.size], buf.y[: buf.size], buf.task_id[: buf.size]
        net = pl_module.net
        reinitialise(net, self.seed * 1_000_003 + task_id)
        params = [p for p in net.parameters() if p.requires_grad]
        was_training = net.training
        net.train()

        def loss_of(idx: Tensor) -> Tensor:
            i = idx.to(x.device)
            out = pl_module(pl_module.prepare(x[i], train=True), tid[i])
            return F.cross_entropy(pl_module.training_logits(out, tid[i]), y[i])

        with torch.enable_grad():
            generator = torch.Generator().manual_seed(self.seed * 7_919 + task_id)
            train_from_scratch(
                params, len(y), loss_of, self.epochs, self.batch_size, self.max_lr, self.min_lr, clip=self.clip,
                generator=generator,
            )  # fmt: skip
        net.train(was_training)
        self._trained = task_id

    @override
    def state_dict(self) -> dict:
        return super().state_dict() | {"trained": self._trained}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._trained = int(state_dict.get("trained", self._trained))
