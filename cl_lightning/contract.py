"""The contract between a continual method and the training loop.

A method changes training through four doors only (``CONVENTIONS.md``, rule 3):

1. **loss terms** -- :meth:`CLMethod.loss_terms` returns named extra losses; :class:`~cl_lightning.models.CLModule`
   adds them to the task loss and logs each by name (no callback hook can replace the loss). Inputs a method's
   terms forward through the network (replay batches) it gives beforehand in :meth:`CLMethod.step_inputs`, and the
   module forwards them with the current batch (one pass where that is exact);
2. **gradient edits** -- Lightning's ``on_before_optimizer_step`` (after AMP unscaling);
3. **task events** -- :meth:`CLMethod.on_task_start` / :meth:`CLMethod.on_task_end`, called by the module from
   inside ``trainer.fit`` (so the strategy, the optimizer and the process group exist), at most once per task even
   across a resume;
4. **a model of its own** -- :meth:`CLMethod.auxiliary_step`, called by the module in every training step, where a
   method trains a model that is not the network (deep generative replay's generator) with its own optimizer.

and evaluation through one more:

5. **a classifier of its own** -- :meth:`CLMethod.eval_scores`, the scores the module predicts from at evaluation in
   place of the network's logits (iCaRL's nearest-mean-of-exemplars classifier).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from cl_lightning.data.scenarios import SCENARIOS
from cl_lightning.errors import ConfigError

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


class CLMethod(pl.Callback):
    """Base class of every continual-learning method.

    Subclasses declare what they support with class attributes and are checked at ``setup``, before any training.

    Attributes:
        name: The method's name, as in ``conf/method/<name>.yaml`` and ``results.json``.
        supported_scenarios: Scenarios the method is defined for.
        needs_task_boundaries: The method acts at task boundaries and cannot run on an online stream.
        gradient_edit: What the method does to gradients in ``on_before_optimizer_step`` (e.g. ``"projection"``,
            ``"mask"``), or ``None``. Two methods that both edit gradients cannot be combined: the second would undo
            the guarantee of the first.

    Three hooks let the one method that needs them change what the run does, with defaults that change nothing:
    :meth:`training_tasks` (joint training's union of tasks), :meth:`extra_epochs` (PackNet's retraining) and
    :meth:`replaces_task_loss` (online meta-learning's outer objective).
    """

    name: ClassVar[str] = "method"
    supported_scenarios: ClassVar[tuple[str, ...]] = SCENARIOS
    needs_task_boundaries: ClassVar[bool] = False
    gradient_edit: ClassVar[str | None] = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None:
            return
        scenario = getattr(dm, "scenario", None)
        if scenario is not None and scenario not in self.supported_scenarios:
            raise ConfigError(
                f"method={self.name} does not support dataset.scenario={scenario}; "
                f"use one of {', '.join(self.supported_scenarios)}"
            )
        if self.needs_task_boundaries and getattr(dm, "stream", "tasks") == "online":
            raise ConfigError(
                f"method={self.name} needs task boundaries and cannot run with dataset.stream=online; "
                "use dataset.stream=tasks or a task-free method"
            )

    @property
    @override
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.name}]"

    def training_tasks(self, task_id: int) -> Sequence[int]:
        """The tasks whose training data the run trains on while it learns ``task_id`` (default: that task alone).

        Joint training returns every task seen so far. With several methods the run trains on the union.
        """
        return (task_id,)

    def extra_epochs(self) -> int:
        """Epochs the run trains after each task's ``epochs_per_task`` (PackNet's retraining after pruning).

        Read once, when the run is built; with several methods the run takes the largest.
        """
        return 0

    def replaces_task_loss(self) -> bool:
        """Whether this method's loss terms are the whole objective, so the module does not add the plain
        cross-entropy of the current batch (it still logs it). At most one method in a combination may do so."""
        return False

    def auxiliary_step(self, pl_module: CLModule, batch: Batch) -> None:
        """Train a model of the method's own (not the network) on this training batch: its forward, backward and
        optimizer step (default: none; the module calls only the methods that override it).

        Called by the module once per training step, after :meth:`loss_terms` and before the network's backward
        pass, outside autocast. The method's backward must not reach the network's parameters (train separate
        parameters; use frozen copies or ``torch.no_grad()`` for anything of the network's). Its model and
        optimizer state go in :meth:`state_dict`. Taken inside the step, the update is in every checkpoint written
        after the step (a mid-task one included), so a resumed run continues exactly.
        """

    def eval_scores(self, pl_module: CLModule, inputs: Tensor, task_id: int, logits: Tensor) -> Tensor:
        """Scores over the outputs, ``[B, n_outputs]``, that evaluation predicts from (their argmax) instead of
        ``logits`` (default: ``logits``; the module calls only the methods that override it, at most one).

        Called by :meth:`CLModule.eval_logits`, the one evaluation path (task-end tests and periodic evaluation),
        inside :meth:`task_view`, without gradients; the module then masks the scores like logits (task-IL: the
        task's outputs). Outputs the method cannot score get ``-inf``.

        Args:
            pl_module: The module (``pl_module.net.features`` gives the network's features of ``inputs``).
            inputs: Network inputs (``pl_module.prepare(x)`` of the evaluated batch, un-augmented).
            task_id: The task whose data is evaluated.
            logits: The network's raw logits of ``inputs``.
        """
        return logits

    def on_task_start(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        """Called once when training on ``task_id`` begins.

        Not called again when a run resumes in the middle of the task: what it sets up must be in ``state_dict``
        or be recomputed in ``on_fit_start`` (which every fit, resumed or not, goes through).
        """

    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        """Called once when training on ``task_id`` has finished, before it is evaluated."""

    def step_inputs(self, pl_module: CLModule, batch: Batch) -> Sequence[tuple[Tensor, Tensor]]:
        """Network inputs and their per-sample task ids that this step's :meth:`loss_terms` needs the network's
        logits of, such as replay batches (default: none; the module calls only the methods that override it).

        Called by the module in every training step before it forwards the current batch, after it has prepared
        (augmented) that batch; the parameters are those the step's gradient is taken at. The module forwards the
        inputs with the current batch, in one pass over their concatenation when that gives each sample the logits
        of its own pass (:attr:`CLModule.fuses_forward`: no layer normalises with batch statistics), and otherwise
        one pass each, in order. :meth:`loss_terms` reads the logits, in the order given, from
        ``pl_module.step_outputs(self)``: part of the autograd graph.
        """
        return ()

    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        """Extra loss terms for this training step, by name (summed with the task loss by the module).

        Args:
            pl_module: The module; ``pl_module.net``, ``pl_module.prepare(x, train=True)`` (stored inputs to network
                inputs) and ``pl_module.training_logits(logits, task_id)`` (the scenario's masking) are the tools.
            batch: The current batch, un-augmented, inputs as stored (``uint8`` for image datasets).
            logits: The network's raw (unmasked) logits on the augmented batch, part of the autograd graph.
        """
        return {}

    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        """What the method reports after each task (e.g. PackNet's free capacity, a PNN's parameters per task).

        JSON-able values only (numbers, strings, lists of them). They are written to ``results.json`` under
        ``diagnostics.<method name>`` after every task, and the numbers among them are logged as
        ``diagnostics/<method name>/<key>``. Called on every process after the task's evaluation.
        """
        return {}

    @contextmanager
    def task_view(self, pl_module: CLModule, task_id: int) -> Iterator[None]:
        """Context in which the network is evaluated as the model of ``task_id`` (default: no change).

        Entered by :meth:`CLModule.task_view` around every evaluation forward pass (task-end tests and periodic
        evaluation); PackNet hides the weights of later tasks in it. Must restore everything on exit.
        """
        yield

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


def check_combination(methods: list[CLMethod]) -> None:
    """Refuse combinations that cannot work together, with the reason (``CONVENTIONS.md``, rule 3).

    Methods combine when they use different doors or doors that add up (loss terms add; task events run in order);
    at most one may edit gradients, at most one may replace the task loss or the evaluation classifier, and names
    must be distinct (they prefix the logged loss terms and key the state).
    """
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"method {duplicates[0]} is listed twice; each method may appear once in a combination")
    owners = [m.name for m in methods if m.replaces_task_loss()]
    if len(owners) > 1:
        raise ConfigError(
            f"methods {' and '.join(owners)} both replace the task loss with their own objective and cannot be "
            "combined; keep one of them"
        )
    scorers = [m.name for m in methods if type(m).eval_scores is not CLMethod.eval_scores]
    if len(scorers) > 1:
        raise ConfigError(
            f"methods {' and '.join(scorers)} both bring their own classifier for evaluation and cannot be combined; "
            "keep one of them"
        )
    editors = [m for m in methods if m.gradient_edit is not None]
    if len(editors) > 1:
        described = " and ".join(f"{m.name} ({m.gradient_edit})" for m in editors)
        raise ConfigError(
            f"methods {described} both edit gradients before the optimizer step and cannot be combined; "
            "keep one of them"
        )
