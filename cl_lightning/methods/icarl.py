"""iCaRL: herding exemplars, sigmoid distillation of the old network, and the nearest-mean-of-exemplars classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from cl_lightning.methods.exemplar import ExemplarMethod
from cl_lightning.validation import check_choice, check_number

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule

__all__ = ["ICaRL"]


class ICaRL(ExemplarMethod):
    """iCaRL (Rebuffi, Kolesnikov, Sperl & Lampert, "iCaRL: Incremental Classifier and Representation Learning",
    CVPR 2017).

    **Representation learning** (their Alg. 3). While training task ``t``, on the current batch and exemplars drawn
    from the memory ``P``, with ``z`` the network's logits over the classes seen so far (the "active" ones)::

        L = sum_y BCE(sigmoid(z_y), target_y),
        target_y = 1[y = label]                     for the classes of task t (the new ones),
        target_y = sigmoid(z_old_y / T)             for the classes of earlier tasks,

    summed over the active classes and averaged over the samples, ``z_old`` being the frozen network of the previous
    task end (the teacher, :class:`~cl_lightning.core.teacher.Teacher`, fed the stored inputs un-augmented: the
    ``q_i`` their Alg. 3 records before training). Old classes are learnt only through the teacher, also on their
    exemplars. ``T = 1`` is the paper; van de Ven & Tolias (2019), whose Split-MNIST number the preset reproduces,
    divide the teacher's logits by their distillation temperature (2). This loss replaces the cross-entropy of the
    current batch (:meth:`replaces_task_loss`).

    **Exemplars** (Alg. 4 and 5): at each task end, with the network just trained, each new class gets
    ``buffer_size // classes seen`` exemplars chosen by herding on L2-normalised features, and every older class
    keeps the head of its herding order (the buffer's ``herding`` policy).

    **Classification** (Alg. 1): nearest mean of exemplars. After the exemplars are chosen, each class's mean
    ``mu_y`` is the normalised mean of its exemplars' normalised features, and a sample is assigned
    ``argmin_y || phi(x) / ||phi(x)|| - mu_y ||`` (:meth:`eval_scores` gives ``-distance``; classes without
    exemplars score ``-inf``). Before the first task end there are no means, and the network's head predicts
    (the random network's accuracy, the baseline of forward transfer, is the head's). ``classifier=head`` evaluates
    with the network's head instead; the other classifier's accuracy on each seen task is in :meth:`diagnostics`
    (``head_acc`` / ``nme_acc``; the head predicting among the classes seen so far).

    Deviation, with the reason: the paper trains on the union of the new data and the exemplars, drawn together
    in mini-batches; here each step adds ``r`` exemplars to the current batch of ``B`` samples, ``r = round(B
    |P| / N_t)`` for the ``N_t`` training samples of task ``t`` (``replay_batch_size=null``), so that an epoch sees
    each new sample and, in expectation, each exemplar once, as the union would (an explicit
    ``replay_batch_size`` fixes ``r``). The run's epochs and steps count the new data only.

    Defined where every task brings classes of its own (class-IL, the paper's setting, and task-IL, where the
    module then masks the scores to the evaluated task's classes): its targets split the outputs into new classes
    (labels) and old classes (the teacher), which domain-IL's shared outputs do not have. Needs task boundaries
    (exemplar selection and the teacher copy happen at task ends) and a network with ``features`` that does not
    route by task.

    DDP: the exemplars are chosen from the whole task, the means computed from them and the teacher copied from
    synchronised weights, identically on every rank; exemplar draws use the buffer's seeded generator.

    Args:
        buffer_size: The memory budget ``K``, shared by all classes seen.
        replay_batch_size: Exemplars added to each step's batch; ``null``: in proportion (see above).
        temperature: ``T`` dividing the teacher's logits in the distillation targets (the paper: 1).
        classifier: ``nme`` (the paper) or ``head``: which classifier fills the accuracy matrix.
        seed: Seed of the buffer's generator.
    """

    name: ClassVar[str] = "icarl"

    def __init__(
        self,
        buffer_size: int = 2000,
        replay_batch_size: int | None = None,
        temperature: float = 1.0,
        classifier: str = "nme",
        seed: int = 0,
    ) -> None:
        super().__init__(buffer_size, replay_batch_size, seed)
        self.temperature = check_number("method.temperature", temperature, strict=True)
        self.classifier = check_choice("method.classifier", classifier, ("nme", "head"))
        self._active: Tensor | None = None  # indices of the classes seen so far (of the current task)
        self._old_classes: Tensor | None = None  # [n_outputs] bool: classes of earlier tasks

    @override
    def prepare_task(self, trainer: pl.Trainer, pl_module: CLModule) -> None:
        super().prepare_task(trainer, pl_module)
        t = int(pl_module.current_task)
        self._active = torch.nonzero(pl_module.seen_mask()).view(-1)
        self._old_classes = pl_module.output_masks[:t].any(0)

    @override
    def replay_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        assert self._active is not None and self._old_classes is not None
        stored, labels, z = batch.x, batch.y, logits
        r = self.replay_count(len(batch.y)) if not self.buffer.is_empty else 0
        if r > 0:
            replay = self.buffer.sample(r)
            replay_z = pl_module(pl_module.prepare(replay.x, train=True), replay.task_id)
            stored, labels = torch.cat([stored, replay.x]), torch.cat([labels, replay.y])
            z = torch.cat([z, replay_z])
        targets = F.one_hot(labels, z.shape[1]).to(z.dtype)
        if self.old.net is not None:
            with torch.no_grad():
                q = torch.sigmoid(self.old.net(pl_module.prepare(stored, train=False)).float() / self.temperature)
            targets = torch.where(self._old_classes, q.to(z.dtype), targets)
        z, targets = z.index_select(1, self._active), targets.index_select(1, self._active)
        loss = F.binary_cross_entropy_with_logits(z, targets, reduction="none").sum(1).mean()
        return {"bce": loss}

    # ------------------------------------------------------------------ evaluation
    @override
    def eval_scores(self, pl_module: CLModule, inputs: Tensor, task_id: int, logits: Tensor) -> Tensor:
        if self.classifier == "head":
            return logits
        scores = self.nme_scores(pl_module, inputs)
        return logits if scores is None else scores.to(logits.dtype)

    @override
    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        """The accuracy of the classifier not in the accuracy matrix on each task seen (fractions), on the run's
        evaluation split: ``head_acc`` (the network's head among the classes seen so far) with ``classifier=nme``,
        ``nme_acc`` with ``classifier=head``."""
        other = "head" if self.classifier == "nme" else "nme"
        return {f"{other}_acc": self.classifier_accuracies(pl_module, nme=other == "nme")}
