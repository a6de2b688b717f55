"""Deep generative replay (DGR): a VAE learns the inputs of every task so far; its samples, labelled by the previous
model, are replayed while the next task is learned."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from cl_lightning.core.vae import VAE, VAELoss
from cl_lightning.errors import ConfigError
from cl_lightning.loggers import log_metrics
from cl_lightning.methods.base import CLMethod
from cl_lightning.methods.replay import gather
from cl_lightning.models.backbones import net_logits, routes_by_task
from cl_lightning.validation import check_bool, check_int, check_number

if TYPE_CHECKING:
    from cl_lightning.data.batch import Batch
    from cl_lightning.models.module import CLModule


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class DGR(CLMethod):
    """Deep generative replay (Shin et al., "Continual Learning with Deep Generative Replay", NeurIPS 2017) with a
    VAE generator, as van de Ven & Tolias implement it ("Generative replay with feedback connections as a general
    strategy for continual learning", 2018; "Three scenarios for continual learning", 2019), and their DGR+distill.

    While task ``t`` (``t`` tasks before it) is learned, every step draws ``x' = G_{t-1}(z)``, ``z ~ N(0, I)``, from
    the generator as it was at the end of the previous task, labels it with the solver ``f_{t-1}`` of that moment,
    and trains the solver ``f`` on ::

        L = CE(f(x), y) + w * L_replay(f(x'), f_{t-1}(x')),      w = t by default

    ``L_replay`` is ``CE(f(x'), argmax f_{t-1}(x'))`` (hard targets, Shin et al.) or, with ``distill``, the soft
    cross-entropy ``-T^2 (1/K) sum_k p_k log q_k`` with ``p = softmax(f_{t-1}(x')/T)``, ``q = softmax(f(x')/T)``
    over the student's ``K`` outputs (van de Ven & Tolias's DGR+distill; it differs from ``T^2 KL(p || q) / K`` by
    the teacher's entropy, a constant). The mean over the ``K`` classes (``class_mean``, the default) is their
    ``utils.loss_fn_kd`` at the commit their 2019 paper ran (86802a8: ``(-targets_norm * log_scores_norm).mean()``
    over the batch and the classes); their later code sums over the classes (``class_mean=false``). The logits
    each target ranges over follow van de Ven & Tolias: class-IL, the classes of the previous tasks (those ``f_{t-1}``
    was trained on; the student's softmax runs over every class seen, targets zero on the current task's);
    domain-IL, every output; task-IL, ``x'`` is replayed once per previous task ``j`` with task ``j``'s head for the
    target and the student, and the per-task losses are averaged.

    Weighting: van de Ven & Tolias minimise ``1/(t+1) * L_current + (1 - 1/(t+1)) * L_replay`` with ``t + 1`` tasks
    seen. The module sums ``L_current`` (weight 1) and the loss terms, so the default ``replay_weight`` ``w = t``
    gives exactly ``t + 1`` times their objective; Adam's steps do not depend on a constant factor of the loss (up to
    its ``eps``). A number for ``replay_weight`` fixes ``w`` instead. Each step replays ``round(replay_ratio *
    batch_size)`` samples (1: a replayed batch as large as the current one, as van de Ven & Tolias). The previous
    solver labels them un-augmented (``prepare(x')``), the solver trains on them as on a current batch
    (``prepare(x', train=True)``).

    The generator ``G`` (:class:`~cl_lightning.core.vae.VAE`, fully connected ``D-400-400-z100`` and mirror, Bernoulli
    output, loss per element) is trained one Adam step per training step (the contract's
    :meth:`~cl_lightning.contract.CLMethod.auxiliary_step`: in the solver's step, on parameters of its own, so the
    order of the two updates does not matter; van de Ven & Tolias take it after the solver's), with the same
    weighting on the current batch and the same replayed samples: ``L_G = L_VAE(x) + w * L_VAE(x')`` (``G`` learns
    the previous tasks from ``G_{t-1}``'s samples). Its optimizer is kept across tasks (van de Ven & Tolias's
    default). The generator sees the batch as stored, scaled to ``[0, 1]`` (no augmentation, no normalisation);
    its samples reach the solver through ``prepare`` like stored inputs, so they are augmented and normalised as
    real batches are. At every task end ``G`` and ``f`` are copied and frozen for the next task, and ``sample_grid``
    samples of ``G``, ordered by the solver's predicted class, go to TensorBoard as an image grid
    (``dgr/generator_samples``, one image per task end; the same latent codes every time).

    State: the generator, its optimizer, the frozen copies, the task they were copied after, and the host generator
    of every random draw the method makes (latent codes and reparameterisation noise), all tensors. The generator
    is initialised from ``seed`` without touching the global RNG.

    DDP: ranks stay identical without communicating the generator's gradients: every rank trains ``G`` on the
    all-gathered current batch and on the same replayed samples, with the same noise (the method's host generator,
    seeded alike), so its weights and optimizer state are bit-identical on every rank. Each step draws
    ``world_size`` replayed batches (identical everywhere) and rank ``r`` replays the ``r``-th to the solver, whose
    gradients DDP averages as usual: the global step is that of one process with the global batch.

    Args:
        distill: Soft targets at temperature ``temperature`` instead of the previous solver's hard labels.
        temperature: ``T > 0`` of the soft targets.
        class_mean: With ``distill``, average the soft cross-entropy over the student's classes (``K``) instead of
            summing it (see above).
        replay_ratio: Replayed samples per current sample (per process), ``> 0``.
        replay_weight: ``w >= 0``; ``None``: the number of previous tasks (van de Ven & Tolias's weighting).
        hidden: Widths of the generator's encoder (the decoder mirrors them).
        z_dim: Size of the generator's latent code.
        generator_lr: Adam learning rate of the generator.
        sample_grid: Generator samples logged at each task end (0: none).
        seed: Seeds the generator's initialisation and the method's random draws.
    """

    name: ClassVar[str] = "dgr"
    needs_task_boundaries: ClassVar[bool] = True

    def __init__(
        self,
        distill: bool = False,
        temperature: float = 2.0,
        class_mean: bool = True,
        replay_ratio: float = 1.0,
        replay_weight: float | None = None,
        hidden: tuple[int, ...] | list[int] = (400, 400),
        z_dim: int = 100,
        generator_lr: float = 0.001,
        sample_grid: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.distill = check_bool("method.distill", distill)
        self.temperature = check_number("method.temperature", temperature, strict=True)
        self.class_mean = check_bool("method.class_mean", class_mean)
        self.replay_ratio = check_number("method.replay_ratio", replay_ratio, strict=True)
        self.replay_weight = None if replay_weight is None else check_number("method.replay_weight", replay_weight)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ConfigError(f"method.hidden={list(hidden)}: give one or more integer widths >= 1, e.g. [400, 400]")
        self.hidden = [int(h) for h in hidden]
        self.z_dim = check_int("method.z_dim", z_dim)
        self.generator_lr = check_number("method.generator_lr", generator_lr, strict=True)
        self.sample_grid, self.seed = check_int("method.sample_grid", sample_grid, minimum=0), int(seed)
        self.generator: VAE | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.prev_generator: VAE | None = None
        self.prev_solver: nn.Module | None = None
        self.copied = -1  # the task at whose end the frozen copies were made
        self.rng = torch.Generator().manual_seed(self.seed)
        self._loaded: dict[str, Any] = {}
        self._shape: tuple[int, ...] = ()
        self._n_replay = 0  # per process and step
        self._groups: list[tuple[int, Tensor]] = []  # (student task id, teacher's logit mask) of the current task
        self._weight = 0.0
        self._replay_x: Tensor | None = None  # this step's replayed samples (all ranks'), for the generator's step
        self._last: VAELoss | None = None

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        dm = trainer.datamodule  # type: ignore[attr-defined]
        stored = dm.tasks[0].train_x.dtype if getattr(dm, "tasks", None) else torch.uint8
        if stored != torch.uint8:
            raise ConfigError(
                f"method=dgr trains a Bernoulli VAE on pixels in [0, 1] and needs uint8 image inputs; dataset "
                f"{dm.name} stores {stored}: use an image dataset"
            )
        self._shape = tuple(dm.input_shape)
        self._n_replay = max(1, round(self.replay_ratio * int(dm.batch_size)))
        if self.generator is None:
            with torch.random.fork_rng(devices=[]):  # a seeded initialisation that leaves the global RNG alone
                torch.manual_seed(self.seed)
                self.generator = VAE(math.prod(self._shape), self.hidden, self.z_dim)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.generator is not None
        self.generator.to(pl_module.device)
        loaded, self._loaded = self._loaded, {}
        if loaded.get("generator"):
            self.generator.load_state_dict(loaded["generator"])
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr, betas=(0.9, 0.999))
        if loaded.get("optimizer"):
            self.optimizer.load_state_dict(loaded["optimizer"])  # Adam moves its state to the parameters' device
        if loaded.get("prev_generator"):
            self.prev_generator = _frozen(copy.deepcopy(self.generator))
            self.prev_generator.load_state_dict(loaded["prev_generator"])
        if loaded.get("prev_solver"):
            self.prev_solver = _frozen(copy.deepcopy(pl_module.net))  # type: ignore[arg-type]
            self.prev_solver.load_state_dict(loaded["prev_solver"])
        for frozen in (self.prev_generator, self.prev_solver):
            if frozen is not None:
                frozen.to(pl_module.device)
        # here, not at the task start: a run resumed in the middle of a task gets no task start
        self._groups, self._weight = self._replay_groups(pl_module)  # type: ignore[arg-type]

    def _replay_groups(self, pl_module: CLModule) -> tuple[list[tuple[int, Tensor]], float]:
        """Student task ids and teacher logit masks of the current task's replay; the replay weight."""
        t = int(pl_module.current_task)
        masks = pl_module.output_masks
        weight = float(t) if self.replay_weight is None else self.replay_weight
        if t == 0:
            return [], weight
        if pl_module.scenario == "task_il":
            return [(j, masks[j]) for j in range(t)], weight
        if pl_module.scenario == "class_il":
            return [(-1, masks[:t].any(0))], weight
        return [(-1, torch.ones_like(masks[0]))], weight

    # ------------------------------------------------------------------ replay (the solver's loss term)
    def _target_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Loss of masked student logits against masked teacher logits (``-inf`` outside the allowed outputs)."""
        if not self.distill:
            return F.cross_entropy(student, teacher.argmax(1))
        t = self.temperature
        p = F.softmax(teacher.float() / t, 1)
        log_q = F.log_softmax(student.float() / t, 1)
        loss = -torch.where(p > 0, p * log_q, 0.0).sum(1).mean() * t**2
        # K: the outputs the student's softmax covers (its training logits mask the others with -inf)
        return loss / torch.isfinite(student[0]).sum() if self.class_mean else loss

    @override
    def loss_terms(self, pl_module: CLModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
        self._replay_x = None
        if self.prev_generator is None or self.prev_solver is None or not self._groups:
            return {}
        trainer, n = pl_module.trainer, self._n_replay
        # every rank draws every rank's samples (identical everywhere) and replays its own share to the solver
        drawn = self.prev_generator.sample(n * trainer.world_size, self.rng).view(-1, *self._shape)
        self._replay_x = drawn
        x = drawn[trainer.global_rank * n : (trainer.global_rank + 1) * n]
        conditioned = routes_by_task(pl_module.net)
        teacher_in, student_in = pl_module.prepare(x), pl_module.prepare(x, train=True)
        losses, student, teacher = [], None, None
        for task, mask in self._groups:
            tid = torch.full((n,), task, dtype=torch.long, device=x.device)
            if student is None or conditioned:
                with torch.no_grad():
                    teacher = net_logits(self.prev_solver, teacher_in, tid)
                student = pl_module(student_in, tid)
            assert teacher is not None
            losses.append(
                self._target_loss(pl_module.training_logits(student, tid), teacher.masked_fill(~mask, float("-inf")))
            )
        return {"replay": self._weight * torch.stack(losses).mean()}

    # ------------------------------------------------------------------ the generator's step
    @override
    def auxiliary_step(self, pl_module: CLModule, batch: Batch) -> None:
        assert self.generator is not None and self.optimizer is not None
        trainer = pl_module.trainer
        (x,) = gather(trainer, batch.x)  # every rank trains on every rank's batch: identical generators
        self.generator.train()
        current = self.generator.loss(x.float().div(255.0), self.rng)
        loss = current.total
        if self._replay_x is not None:
            loss = loss + self._weight * self.generator.loss(self._replay_x, self.rng).total
            self._replay_x = None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._last = VAELoss(current.recon.detach(), current.kl.detach())
        step = trainer.global_step  # the step the module logs its losses at
        if pl_module.loggers and step % pl_module.log_every_n_steps == 0:
            values = {"train/dgr/generator_recon": self._last.recon, "train/dgr/generator_kl": self._last.kl}
            log_metrics(pl_module, {k: float(v) for k, v in values.items()}, step)

    # ------------------------------------------------------------------ task end
    @override
    def on_task_end(self, trainer: pl.Trainer, pl_module: CLModule, task_id: int) -> None:
        if task_id <= self.copied:
            return
        assert self.generator is not None
        self.prev_generator = _frozen(copy.deepcopy(self.generator))
        self.prev_solver = _frozen(copy.deepcopy(pl_module.net))
        self.copied = task_id
        experiments = [getattr(lg, "experiment", None) for lg in trainer.loggers] if trainer.is_global_zero else []
        experiment = next((e for e in experiments if hasattr(e, "add_image")), None)  # TensorBoard's, if any
        if self.sample_grid > 0 and experiment is not None:
            from torchvision.utils import make_grid

            # a generator of its own: logging changes no draw of the run
            fixed = torch.Generator().manual_seed(self.seed)
            images = self.prev_generator.sample(self.sample_grid, fixed).view(-1, *self._shape)
            if not routes_by_task(pl_module.net):
                with torch.no_grad():
                    predicted = self.prev_solver(pl_module.prepare(images)).argmax(1)
                images = images[predicted.argsort(stable=True)]
            grid = make_grid(images.float().cpu(), nrow=math.ceil(math.sqrt(self.sample_grid)), pad_value=1.0)
            experiment.add_image("dgr/generator_samples", grid, global_step=trainer.global_step)  # type: ignore[union-attr]

    @override
    def diagnostics(self, pl_module: CLModule) -> dict[str, Any]:
        if self._last is None:
            return {}
        return {
            "generator_recon": float(self._last.recon),  # per-pixel BCE of the last current batch
            "generator_kl": float(self._last.kl),  # per-pixel KL of the last current batch
            "replayed_per_step": self._n_replay if self.prev_generator is not None else 0,
        }

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        def weights(module: nn.Module | None) -> dict[str, Tensor]:
            return module.state_dict() if module is not None else {}

        if self._loaded:  # restored and not yet applied (no fit since): hand back what was loaded
            state = dict(self._loaded)
        else:
            state = {
                "generator": weights(self.generator),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
                "prev_generator": weights(self.prev_generator),
                "prev_solver": weights(self.prev_solver),
            }
        return state | {"copied": self.copied, "rng": self.rng.get_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_fit_start, once the generator and the module's network exist on their device
        keys = ("generator", "optimizer", "prev_generator", "prev_solver")
        self._loaded = {k: state_dict.get(k) or {} for k in keys}
        self.prev_generator = self.prev_solver = None
        self.copied = int(state_dict.get("copied", -1))
        if "rng" in state_dict:
            self.rng.set_state(state_dict["rng"].cpu())
