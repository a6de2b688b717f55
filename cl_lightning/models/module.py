"""``CLModule``: the LightningModule that trains one network through a task sequence."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from cl_lightning.contract import CLMethod
from cl_lightning.data.batch import Batch
from cl_lightning.errors import ConfigError, DivergenceError
from cl_lightning.loggers import log_metrics
from cl_lightning.metrics import AccuracyMatrix
from cl_lightning.models.backbones import net_logits, uses_batch_statistics

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


class CLModule(pl.LightningModule):
    """Trains ``net`` on the current task; the loss is the task loss plus every active method's loss terms.

    Logit masking by scenario (see :mod:`cl_lightning.data.scenarios`):

    - ``task_il``: logits outside the sample's task are masked, in training and evaluation (a multi-head model);
    - ``class_il``: in training, logits of classes not yet seen are masked (``train_outputs="seen"``, the "active
      classes" of van de Ven & Tolias 2019; on an online stream, the labels the stream has shown so far, this
      batch's included: no boundary needed) or all are used (``"all"``, as Mammoth does); evaluation uses every
      logit. The task-IL accuracy of a class-IL run (logits masked to the evaluated task, as Mammoth reports) is
      kept in a second matrix;
    - ``domain_il``: one shared head, nothing masked.

    Evaluation fills row ``eval_row`` of :attr:`acc_matrix` (row ``-1``: the randomly initialised model, the
    baseline of forward transfer). The matrices, the output masks and the task counters are persistent state, so a
    checkpoint holds everything a resumed run needs.

    Args:
        net: Backbone with a ``head``; maps inputs to logits over all outputs.
        optimizer: Factory ``params -> Optimizer`` (a Hydra ``_partial_``).
        scenario: ``class_il``, ``task_il`` or ``domain_il``.
        task_outputs: Logit indices of each task.
        n_outputs: Number of logits.
        scheduler: Optional factory ``optimizer -> LRScheduler``, stepped every epoch.
        reset_optimizer: Fresh optimizer state at each task (Adam's moments of the previous task are not carried).
        train_outputs: Class-IL training logits: ``seen`` or ``all``.
        log_every_n_steps: Training losses reach the logger every this many optimizer steps.
        hide_task_boundaries: Online stream: one fit over the whole stream, methods get no task events, class-IL
            masks the labels not yet seen in the stream.
        preprocess: ``(x, train) -> x``: turns stored inputs (``uint8``) into network inputs on the device
            (scaling, training-time augmentation, normalisation); the datamodule's ``preprocess``.
        augments: Whether ``preprocess(x, train=True)`` draws random augmentations. When it does not, methods may
            prepare a fixed set of stored inputs once and reuse it (GEM's episodic memories).
        gradient_clip_val: Clip the gradients to this norm (or value) before every optimizer step, after the
            methods' gradient edits (``trainer.gradient_clip_val``, handed over by the run).
        gradient_clip_algorithm: ``norm`` or ``value`` (``trainer.gradient_clip_algorithm``).
        fused_forward: How the inputs methods give in :meth:`CLMethod.step_inputs` (replay batches) go through the
            network with the current batch: ``"auto"`` in one forward pass over their concatenation unless a layer
            of ``net`` uses batch statistics (:func:`~cl_lightning.models.backbones.uses_batch_statistics`: batch
            norm would normalise the samples of all the batches together, a different method), else one pass per
            batch; ``True`` always in one pass (with batch norm, the concatenation normalised together, as
            Mammoth's ER and Avalanche's replay do); ``False`` always one pass per batch. Without batch statistics
            the one pass gives every sample the logits of its own pass (the same arithmetic in larger kernels: the
            sums may round differently; a dropout mask is drawn over the concatenation, from the same
            distribution). :attr:`fuses_forward` is the outcome.

    Optimization is manual (Lightning's ``automatic_optimization = False``): :meth:`training_step` takes the
    step itself, ``zero_grad``, :meth:`manual_backward`, ``optimizer.step()``, which is how Lightning runs the
    same hooks (``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``, gradient unscaling
    under mixed precision) without its closure machinery: at batch 10 on a small MLP the automatic loop costs
    about a tenth of a step more (``benchmarks/step_cost.py``). The LR scheduler is stepped at every epoch's end.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scenario: str,
        task_outputs: Sequence[Tensor],
        n_outputs: int,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        reset_optimizer: bool = True,
        train_outputs: str = "seen",
        log_every_n_steps: int = 50,
        hide_task_boundaries: bool = False,
        preprocess: Callable[[Tensor, bool], Tensor] | None = None,
        augments: bool = False,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        fused_forward: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if gradient_clip_algorithm not in (None, "norm", "value"):
            raise ConfigError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}: choose 'norm' or 'value'")
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm or "norm"
        if train_outputs not in ("seen", "all"):
            raise ConfigError(f"module.train_outputs={train_outputs!r}: choose 'seen' or 'all'")
        if log_every_n_steps < 1:
            raise ConfigError(f"module.log_every_n_steps={log_every_n_steps}: must be >= 1")
        if not isinstance(fused_forward, bool) and fused_forward != "auto":
            raise ConfigError(f"module.fused_forward={fused_forward!r}: must be auto, true or false")
        self.net = net
        #: Whether methods' step inputs are forwarded with the current batch in one pass (``fused_forward``).
        self.fuses_forward = fused_forward is True or (fused_forward == "auto" and not uses_batch_statistics(net))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scenario, self.reset_optimizer, self.train_outputs = scenario, reset_optimizer, train_outputs
        self.log_every_n_steps, self.hide_task_boundaries = log_every_n_steps, hide_task_boundaries
        self.preprocess, self.augments = preprocess, augments
        n_tasks = len(task_outputs)
        self.n_tasks = n_tasks
        masks = torch.zeros(n_tasks, n_outputs, dtype=torch.bool)
        for t, outputs in enumerate(task_outputs):
            masks[t, outputs] = True
        self.register_buffer("output_masks", masks)
        self.register_buffer("current_task", torch.tensor(0))
        self.register_buffer("task_started", torch.tensor(-1))
        self.register_buffer("task_finished", torch.tensor(-1))
        # online class-IL: the labels the stream has shown so far (the training mask needs no task boundary)
        self.register_buffer("seen_labels", torch.zeros(n_outputs, dtype=torch.bool))
        self.acc_matrix = AccuracyMatrix(n_tasks)
        self.task_il_matrix = AccuracyMatrix(n_tasks)
        # Row 0 holds the accuracy of the randomly initialised model (FWT's baseline b_j); a matrix so that it is
        # sum-reduced across processes like the others.
        self.init_matrix = AccuracyMatrix(n_tasks)
        self.eval_row = -1
        self._optimizer: torch.optim.Optimizer | None = None
        self._methods: list[CLMethod] = []
        self._replaces_task_loss = False
        self._loss_methods: list[CLMethod] = []  # methods with loss terms of their own
        self._input_methods: list[CLMethod] = []  # methods that give inputs to forward with the batch
        self._step_outputs: dict[int, list[Tensor]] = {}  # their logits in this step, by id(method)
        self._auxiliary: list[CLMethod] = []  # methods that train a model of their own each step
        self._scorer: CLMethod | None = None  # the method whose classifier evaluation predicts from, if any
        self._unseen: Tensor | None = None  # class-IL training mask of the current task, set at its start
        # set by a resume when the optimizer is kept across tasks; loaded into the optimizer when it is built
        self.pending_optimizer_state: dict[str, Any] | None = None
        # set by a mid-task resume: the LR scheduler's position, loaded into the scheduler when it is built
        self.pending_scheduler_state: dict[str, Any] | None = None
        # off the host (accelerators): non-finite losses seen since the last check, read every log_every_n_steps
        self._finite: Tensor | None = None
        # the run's resolved config and timings, stored in every checkpoint so a resume needs nothing else
        self.run_info: dict[str, Any] = {}

    @override
    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning names the running hook on the module (a string or None) at every hook call, some 40 times per
        # step; nn.Module's checks for parameters, buffers and submodules cost more than a small network's step.
        # A name already in __dict__ is a plain attribute (nn.Module removes it from there when it registers a
        # parameter, buffer or submodule), and a str/int/float/bool/None value is none of those: the same effect.
        if type(value) in _PLAIN_TYPES and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ forward and masks
    @override
    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor:
        """Logits of the network inputs ``x``; ``task_id`` (per sample, or one task for all) reaches networks that
        route by task (``net.task_conditioned``, e.g. progressive networks) and is ignored by the others.

        Methods call ``pl_module(pl_module.prepare(x, train=True), task_id)`` rather than ``pl_module.net`` so they
        work with either kind of network.
        """
        return net_logits(self.net, x, task_id)

    @contextmanager
    def task_view(self, task_id: int) -> Iterator[None]:
        """Evaluate as the model of task ``task_id``: every method's :meth:`CLMethod.task_view` is entered.

        PackNet uses it to hide the weights of later tasks; for the other methods it does nothing. Evaluation
        (task-end and periodic) runs inside it.
        """
        with ExitStack() as stack:
            for method in self._methods:
                stack.enter_context(method.task_view(self, task_id))
            yield

    def prepare(self, x: Tensor, train: bool = False) -> Tensor:
        """Network inputs from stored inputs: ``uint8`` scaled to [0, 1], augmented when ``train``, normalised.

        Batches reach ``training_step`` un-augmented, so methods can store ``batch.x`` and call ``prepare(x,
        train=True)`` when they replay it.
        """
        if self.preprocess is not None:
            return self.preprocess(x, train)
        return x.float().div(255.0) if x.dtype == torch.uint8 else x

    def seen_mask(self) -> Tensor:
        """Outputs of every task up to the current one."""
        return self.output_masks[: int(self.current_task) + 1].any(0)

    def training_logits(self, logits: Tensor, task_id: Tensor) -> Tensor:
        """Mask the logits a sample may not use in training (see the class docstring)."""
        if self.scenario == "task_il":
            return logits.masked_fill(~self.output_masks[task_id], float("-inf"))
        if self.scenario == "class_il" and self.train_outputs == "seen":
            if self.hide_task_boundaries:  # online: the labels seen so far in the stream
                return logits.masked_fill(~self.seen_labels, float("-inf"))
            unseen = self._unseen if self._unseen is not None else ~self.seen_mask()
            return logits.masked_fill(unseen, float("-inf"))
        return logits

    @property
    def methods(self) -> list[CLMethod]:
        """The continual methods among the trainer's callbacks."""
        return self._methods

    # ------------------------------------------------------------------ training
    @override
    def setup(self, stage: str) -> None:
        # every fit and every test (the initial evaluation comes before any fit)
        self._methods = [cb for cb in self.trainer.callbacks if isinstance(cb, CLMethod)]  # type: ignore[attr-defined]
        self._replaces_task_loss = any(m.replaces_task_loss() for m in self._methods)
        # only the methods that override a per-step door are called at each step: a step costs the same whatever
        # number of methods that do nothing then is combined
        self._loss_methods = [m for m in self._methods if type(m).loss_terms is not CLMethod.loss_terms]
        self._auxiliary = [m for m in self._methods if type(m).auxiliary_step is not CLMethod.auxiliary_step]
        self._input_methods = [m for m in self._methods if type(m).step_inputs is not CLMethod.step_inputs]
        self._scorer = next((m for m in self._methods if type(m).eval_scores is not CLMethod.eval_scores), None)

    @override
    def on_train_start(self) -> None:
        # once per task, not per step: reading the task counter would synchronise host and device every step
        self._unseen = ~self.seen_mask()
        t = int(self.current_task)
        if int(self.task_started) < t:
            if not self.hide_task_boundaries:
                for method in self._methods:
                    method.on_task_start(self.trainer, self, t)
            self.task_started.fill_(t)

    @override
    def on_train_end(self) -> None:
        self._unseen = None
        self._read_finite_flag()
        self.check_weights()
        t = int(self.current_task)
        if int(self.task_finished) < t:
            if not self.hide_task_boundaries:
                for method in self._methods:
                    method.on_task_end(self.trainer, self, t)
            self.task_finished.fill_(t)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.training_loss(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss.detach()

    def training_loss(self, batch: Batch) -> Tensor:
        """The objective of one training step: the task loss plus every method's loss terms (or only the terms of a
        method that replaces the task loss); checked finite, logged every ``log_every_n_steps`` steps.
        :meth:`training_step` then takes the optimizer step on it."""
        if self.hide_task_boundaries and self.scenario == "class_il":
            # every process's labels, so that the mask (and the buffer) is the same on all of them
            labels = self.all_gather(batch.y).reshape(-1) if self.trainer.world_size > 1 else batch.y
            self.seen_labels[labels] = True
        logits = self.step_forward(batch)
        task_loss = F.cross_entropy(self.training_logits(logits, batch.task_id), batch.y)
        terms: dict[str, Tensor] = {}
        for method in self._loss_methods:
            # methods see the un-augmented batch and the raw (unmasked) logits of its augmented version
            for key, value in method.loss_terms(self, batch, logits).items():
                terms[f"{method.name}/{key}"] = value
        if self._replaces_task_loss:
            # a method whose loss terms are the whole objective (e.g. online meta-learning's outer loss)
            loss = sum(terms.values())  # type: ignore[assignment]
        else:
            loss = task_loss + sum(terms.values()) if terms else task_loss
        self._step_outputs.clear()  # the step's logits are in the loss now
        self.check_finite(loss)
        if self._auxiliary:
            with torch.autocast(self.device.type, enabled=False):
                for method in self._auxiliary:
                    method.auxiliary_step(self, batch)
        if self.loggers and self.global_step % self.log_every_n_steps == 0:
            # Straight to the logger, every n steps: `self.log` on every step costs as much as a small model's
            # forward pass (measured in benchmarks/overhead.py).
            values = {"train/loss": loss, "train/task_loss": task_loss, **{f"train/{k}": v for k, v in terms.items()}}
            metrics = {k: float(v.detach()) for k, v in values.items()} | {"task": int(self.current_task)}
            log_metrics(self, metrics, self.global_step)
        return loss

    def step_forward(self, batch: Batch) -> Tensor:
        """The network's raw logits of the augmented current batch; the methods' :meth:`CLMethod.step_inputs` are
        forwarded with it (one pass where :attr:`fuses_forward`) and kept for :meth:`step_outputs`."""
        x = self.prepare(batch.x, train=True)
        given = [(m, list(m.step_inputs(self, batch))) for m in self._input_methods]
        pairs = [pair for _, inputs in given for pair in inputs]
        if not pairs:
            return self(x, batch.task_id)
        if self.fuses_forward:
            sizes = [len(x)] + [len(xi) for xi, _ in pairs]
            xs, tids = torch.cat([x, *(xi for xi, _ in pairs)]), torch.cat([batch.task_id, *(t for _, t in pairs)])
            logits, *outs = self(xs, tids).split(sizes)
        else:
            logits, outs = self(x, batch.task_id), [self(xi, t) for xi, t in pairs]
        for method, inputs in given:
            self._step_outputs[id(method)], outs = outs[: len(inputs)], outs[len(inputs) :]
        return logits

    def step_outputs(self, method: CLMethod) -> list[Tensor]:
        """The logits of the inputs ``method`` gave in :meth:`CLMethod.step_inputs` this step, in their order (for
        its :meth:`CLMethod.loss_terms`)."""
        return self._step_outputs.get(id(method), [])

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # after every callback's hook (the methods' gradient edits), as Lightning's automatic clipping comes after
        # them; under mixed precision the gradients are unscaled by now
        if self.gradient_clip_val is not None:
            clip, algorithm = self.gradient_clip_val, self.gradient_clip_algorithm
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)

    @override
    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]

    def check_finite(self, loss: Tensor) -> None:
        """Stop the run (:class:`DivergenceError`) on a non-finite loss, before its backward pass touches the weights.

        On the CPU the check costs nothing and runs every step. On an accelerator a per-step check would make the
        host wait for the device every step, so the steps' results are folded into a flag on the device and read
        every ``log_every_n_steps`` steps (and at the task's end, :meth:`on_train_end`): the run stops at most that
        many steps late, and the weights may then already be non-finite; the checkpoints of finished tasks are
        kept either way.
        """
        if loss.is_cpu:
            value = loss.item()  # a Python float: ~20x cheaper per step than bool(torch.isfinite(loss))
            if not math.isfinite(value):
                self._diverged("nan" if math.isnan(value) else "inf", "the loss")
            return
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        if self.global_step % self.log_every_n_steps == 0:
            self._read_finite_flag()

    def _read_finite_flag(self) -> None:
        if self._finite is not None and not bool(self._finite):
            self._finite = None
            self._diverged("nan or inf", f"the loss (within the last {self.log_every_n_steps} steps)")
        self._finite = None

    def check_weights(self) -> None:
        """Stop the run (:class:`DivergenceError`) when a parameter of the network is not finite."""
        if not all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):
            self._diverged("weights", "a weight of the network")

    def _diverged(self, value: str, what: str) -> None:
        step, task = int(self.global_step), int(self.current_task)
        lr = [group.get("lr") for group in self._optimizer.param_groups] if self._optimizer is not None else []
        hint = f"lower optimizer.lr (now {lr[0]:g})" if lr and isinstance(lr[0], int | float) else "lower optimizer.lr"
        names = " or ".join(f"method={m.name}'s strength" for m in self._methods if m.name not in ("naive", "joint"))
        raise DivergenceError(
            f"training diverged: {what} is {value} at step {step} (task {task}); {hint}"
            + (f" or {names}" if names else "")
            + ", or use optimizer=adam",
            step=step, task=task, value=value,
        )  # fmt: skip

    @override
    def configure_optimizers(self) -> Any:
        # A kept optimizer holds every parameter, also those frozen now and trainable later (a progressive network's
        # next column): torch optimizers skip parameters without a gradient, and a resumed run rebuilds the same
        # parameter list whatever is frozen at that moment.
        params = [p for p in self.parameters() if p.requires_grad] if self.reset_optimizer else list(self.parameters())
        if self._optimizer is None or self.reset_optimizer:
            self._optimizer = self.optimizer_factory(params)
            if self.pending_optimizer_state is not None:
                self._optimizer.load_state_dict(self.pending_optimizer_state)
                self.pending_optimizer_state = None
        if self.scheduler_factory is None:
            return self._optimizer
        scheduler = self.scheduler_factory(self._optimizer)
        if self.pending_scheduler_state is not None:
            scheduler.load_state_dict(self.pending_scheduler_state)
            self.pending_scheduler_state = None
        return {"optimizer": self._optimizer, "lr_scheduler": scheduler}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the global RNG drives augmentation and dropout: a resumed run draws what the uninterrupted one would
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        checkpoint["cl_lightning"] = self.run_info

    # ------------------------------------------------------------------ evaluation
    def eval_logits(self, x: Tensor, task_id: int) -> tuple[Tensor, Tensor]:
        """Evaluation logits of stored inputs ``x`` of task ``task_id``: the scenario's prediction logits and the
        logits masked to the task's outputs (task-IL's, and a class-IL run's task-IL view).

        The one evaluation path: task-end tests and periodic evaluation both call it. A method with a classifier of
        its own (:meth:`CLMethod.eval_scores`) replaces the logits with its scores here.
        """
        with self.task_view(task_id):
            inputs = self.prepare(x)
            logits = self(inputs, task_id)
            if self._scorer is not None:
                logits = self._scorer.eval_scores(self, inputs, task_id, logits)
        masked = logits.masked_fill(~self.output_masks[task_id], float("-inf"))
        return (masked if self.scenario == "task_il" else logits), masked

    @override
    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        j = dataloader_idx
        preds, masked = self.eval_logits(batch.x, j)
        if self.eval_row < 0:
            self.init_matrix.update(preds, batch.y, 0, j)
            return
        self.acc_matrix.update(preds, batch.y, self.eval_row, j)
        if self.scenario == "class_il":
            self.task_il_matrix.update(masked, batch.y, self.eval_row, j)
