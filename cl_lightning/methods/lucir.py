"""LUCIR: a cosine-normalised classifier, less-forget feature distillation and a margin ranking loss on exemplars."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.core.nme import class_means
from cl_lightning.errors import ConfigError
from cl_lightning.methods.exemplar import ExemplarMethod
from cl_lightning.methods.replay import task_features
from cl_lightning.models.backbones import CosineLinear
from cl_lightning.validation import check_choice, check_int, check_number

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["LUCIR"]


class LUCIR(ExemplarMethod):
    """LUCIR (Hou, Pan, Loy, Wang & Lin, "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019).

    The network's head is cosine-normalised (:class:`~cl_lightning.models.backbones.CosineLinear`, their eq. 4:
    ``z_c = sigma <w_c / ||w_c||, f / ||f||>``, ``model=mlp_cosine`` or ``model.head=cosine``). While training task
    ``t`` on the current batch and exemplars (the herding memory, as iCaRL's), with ``f`` the normalised features,
    ``f*`` those of the frozen network of the previous task end (the teacher) on the same inputs::

        L = CE(z, y) + lambda * (1 - <f*(x), f(x)>) + L_mr,
        lambda = lambda_base * sqrt(|C_old| / |C_new|),
        L_mr = sum_{k=1..K} max(0, m - <w_y, f(x)> + <w_k, f(x)>)   for samples of old classes,

    the cross-entropy over the classes seen so far, the less-forget constraint (their eq. 6, weighted as their
    code's ``lamda * sqrt(num_old_classes / num_new_classes)``: the more old classes, the stronger) averaged over
    all samples, and the margin ranking loss (eq. 8) with the ``K`` new classes of highest cosine as hard
    negatives and cosines ``<w, f>`` without the scale ``sigma``, averaged over the old-class samples. At each task
    start (``t > 0``) the new classes' weights are imprinted with the normalised mean feature of their training
    data, scaled to the old weights' mean norm, and the old classes' weights stay fixed while task ``t`` trains
    (their code trains them with learning rate 0: here their gradients are zeroed and their values written back
    after each optimizer step, so no optimizer state or weight decay moves them). ``sigma`` is learnt throughout.

    Classification: ``cnn`` (default, their "CNN" results) takes the cosine logits over the classes seen so far
    (LUCIR's classifier has weights for those only; the random model's evaluation, the baseline of forward
    transfer, uses all); ``nme`` the nearest mean of exemplars (:mod:`~cl_lightning.core.nme`). The other
    classifier's accuracy on each task seen is in :meth:`diagnostics`.

    Deviations, with reasons: the union of new data and exemplars is approximated as iCaRL's is
    (:func:`~cl_lightning.methods.replay.proportional_replay` exemplars added to each batch); the module's logits of
    the current batch are not used (the method needs the features too and runs its own forward pass over the
    batch and the exemplars: one forward pass more per step); the class-balanced finetuning of their ImageNet
    experiments is not done.

    Defined where every task brings classes of its own (class-IL; in task-IL the module masks the scores to the
    task's classes); needs task boundaries.

    Args:
        buffer_size: Exemplar budget shared by the classes seen.
        replay_batch_size: Exemplars added to each batch; ``null``: in proportion.
        lambda_base: ``lambda_base`` of the less-forget constraint (their CIFAR-100 value: 5).
        margin: ``m`` of the margin ranking loss (theirs: 0.5).
        hard_negatives: ``K`` (theirs: 2).
        classifier: ``cnn`` or ``nme`` (see above).
        seed: Seed of the buffer's generator.
    """

    name: ClassVar[str] = "lucir"
    gradient_edit: ClassVar[str | None] = "freeze the old classes' weights"

    def __init__(
        self,
        buffer_size: int = 2000,
        replay_batch_size: int | None = None,
        lambda_base: float = 5.0,
        margin: float = 0.5,
        hard_negatives: int = 2,
        classifier: str = "cnn",
        seed: int = 0,
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, seed)
        self.lambda_base = check_number("method.lambda_base", lambda_base)
        self.margin = check_number("method.margin", margin)
        self.hard_negatives = check_int("method.hard_negatives", hard_negatives)
        self.classifier = check_choice("method.classifier", classifier, ("cnn", "nme"))
        self._seen: Tensor | None = None  # [n_outputs] bool, classes seen so far (of the current task)
        self._old_classes: Tensor | None = None  # [n_outputs] bool, classes of earlier tasks
        self._new_idx: Tensor | None = None  # indices of the current task's classes
        self._frozen: Tensor | None = None  # the old classes' weights, held fixed during the task
        self._lambda = 0.0

    @staticmethod
    def head(pl_module: pl.LightningModule) -> CosineLinear:
        """The network's cosine classifier."""
        return pl_module.net.head  # type: ignore[attr-defined,return-value]

    # ------------------------------------------------------------------ setup and task events
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(getattr(pl_module.net, "head", None), CosineLinear):  # type: ignore[attr-defined]
            raise ConfigError(
                "method=lucir needs the network's cosine classifier, not a linear head; use model=mlp_cosine "
                "(or +model.head=cosine with model=cnn or model=resnet18)"
            )

    @override
    def prepare_task(self, trainer: pl.Trainer, pl_module: CLModule) -> None:
        # the old weights are fixed, so those of the network now (at a fit start, also a resumed one) are the ones
        # to hold; imprinting at the task start changes only the new classes' rows
        super().prepare_task(trainer, pl_module)
        t = int(pl_module.current_task)
        masks = pl_module.output_masks
        self._seen, self._old_classes = pl_module.seen_mask(), masks[:t].any(0)
        self._new_idx = torch.nonzero(masks[t] & ~self._old_classes).view(-1)
        n_old, n_new = int(self._old_classes.sum()), max(1, len(self._new_idx))
        self._lambda = self.lambda_base * math.sqrt(n_old / n_new)
        self._frozen = self.head(pl_module).weight.detach()[self._old_classes].clone() if n_old else None

    @override
    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        super().on_task_start(trainer, pl_module, task_id)
        if task_id > 0:
            self._imprint(trainer, pl_module, task_id)

    @torch.no_grad()
    def _imprint(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        """New classes' weights: the normalised mean feature of their training data, at the old weights' mean norm."""
        data = trainer.datamodule.tasks[task_id]  # type: ignore[attr-defined]
        feats = task_features(pl_module, data.train_x.to(pl_module.device))
        y = data.train_y.to(feats.device)
        weight = self.head(pl_module).weight
        old = pl_module.output_masks[:task_id].any(0)
        norm = weight[old].norm(dim=1).mean()
        means, has_mean = class_means(feats, y, weight.shape[0])
        new = has_mean & ~old
        weight[new] = (means[new] * norm).to(weight.dtype)

    # ------------------------------------------------------------------ training
    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        assert self._seen is not None and self._old_classes is not None and self._new_idx is not None
        net, head = pl_module.net, self.head(pl_module)
        stored, labels, tid = batch.x, batch.y, batch.task_id
        r = 0 if self.buffer.is_empty else self.replay_count(len(labels))
        if r > 0:
            replay = self.buffer.sample(r)
            stored, labels = torch.cat([stored, replay.x]), torch.cat([labels, replay.y])
            tid = torch.cat([tid, replay.task_id])
        inputs = pl_module.prepare(stored, train=True)
        feats = net.features(inputs)
        z = head(feats)
        masked = pl_module.training_logits(z, tid) if pl_module.scenario == "task_il" else z
        terms = {"ce": F.cross_entropy(masked.masked_fill(~self._seen, float("-inf")), labels)}
        if self.old.net is None:
            return terms
        with torch.no_grad():
            old_feats = F.normalize(self.old.net.features(inputs).float(), dim=1)
        unit = F.normalize(feats.float(), dim=1)
        terms["less_forget"] = self._lambda * (1.0 - (unit * old_feats).sum(1)).mean()
        is_old = self._old_classes[labels]
        if bool(is_old.any()) and len(self._new_idx) > 0:
            cos = F.linear(unit[is_old], F.normalize(head.weight.float(), dim=1))
            terms["margin"] = self.margin_loss(cos, labels[is_old], self._new_idx, self.margin, self.hard_negatives)
        return terms

    @staticmethod
    def margin_loss(cos: Tensor, labels: Tensor, new_classes: Tensor, margin: float, k: int) -> Tensor:
        """Their eq. 8: ``mean_i sum_{k hardest new classes} max(0, m - cos_{i, y_i} + cos_{i, k})``, with
        ``cos`` ``[N, n_outputs]`` the unscaled cosines of old-class samples and ``labels`` their classes."""
        positive = cos.gather(1, labels.unsqueeze(1))
        negatives = cos.index_select(1, new_classes).topk(min(k, len(new_classes)), dim=1).values
        return (margin - positive + negatives).clamp(min=0).sum(1).mean()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grad = self.head(pl_module).weight.grad
        if self._frozen is not None and grad is not None and self._old_classes is not None:
            grad[self._old_classes] = 0.0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._frozen is not None and self._old_classes is not None:
            with torch.no_grad():
                self.head(pl_module).weight[self._old_classes] = self._frozen

    # ------------------------------------------------------------------ evaluation
    @override
    def eval_scores(self, pl_module: CLModule, inputs: Tensor, task_id: int, logits: Tensor) -> Tensor:
        scores = self.nme_scores(pl_module, inputs) if self.classifier == "nme" else None
        if scores is not None:
            return scores.to(logits.dtype)
        if pl_module.eval_row < 0:
            return logits  # the random network: every output (forward transfer's baseline)
        return logits.masked_fill(~pl_module.seen_mask(), float("-inf"))

    @override
    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        """The other classifier's accuracy on each task seen (fractions): ``nme_acc`` with ``classifier=cnn``,
        ``cnn_acc`` with ``classifier=nme``."""
        other = "nme" if self.classifier == "cnn" else "cnn"
        return {f"{other}_acc": self.classifier_accuracies(pl_module, nme=other == "nme")}
