"""Peers on protocol P1: our training time against Avalanche 0.6.0's, method by method, in one process.

Protocol P1 (issue "Fast by default"): Split-MNIST class-IL, 5 tasks of 2 classes in the natural order (0-1, 2-3,
...), MLP 784-400-400-10 (ReLU), SGD lr 0.01 without momentum, batch 32, one epoch per task, buffer 500 for the
replay methods, one intra-op thread (``torch.set_num_threads(1)``; ours with ``threads=1``).

Ours runs through :func:`cl_lightning.train.train` with the overrides P1 was run with
(``benchmarks/replay_speed.py``'s ``BASE`` and ``method_overrides``: every replay method replays 32 samples per
step, GEM each past task's whole memory). Avalanche runs in the same process on the same tensors: the MNIST our
datamodule reads (``CL_DATA_DIR``), scaled to [0, 1] as ours is (pixels / 255), cut by ``nc_benchmark`` with the
natural class order; its network is our ``MLP`` built by the same calls and from the same seed as ``train(cfg)``
builds it, so both start from the same weights (checked: the initial accuracies of the two must be equal). The
Avalanche arguments of each method are chosen to give the same objective as ours (:data:`PEERS`); the settings that
cannot be matched are listed in the written results (:data:`NOT_MATCHED`).

Timing: training wall time only, summed over the tasks (ours: ``train_seconds`` of the results, the ``trainer.fit``
calls with task-end work such as buffer selection or the Fisher; Avalanche: the ``strategy.train(experience)``
calls, which include its end-of-experience work). Evaluation is timed apart (ours: ``eval_seconds``; Avalanche: the
``strategy.eval(test_stream)`` calls), with the same evaluations on both sides: every task's test set before
training and after each task. The accuracy of both is ``avg_acc``, the mean over the tasks of the final accuracy on
each task's test set (argmax over all 10 outputs); Avalanche's is computed by this script from its trained model on
the same test tensors, and compared with Avalanche's own ``Top1_Acc_Exp`` metric.

Avalanche runs under one or both evaluator settings (``--avalanche-evaluator``, both by default): ``slim``, an
evaluator of the experience accuracy without a logger (both sides compute only what the table reports: the
like-for-like comparison), and ``default``, no ``evaluator`` argument (Avalanche's default evaluation plugin and
interactive logger, what a user gets out of the box; its console output goes to the null device, every write still
made). Runs alternate (ours ``m``, Avalanche ``m`` under each setting, ours ``m2``, ...) ``--repeats`` times after an
untimed warm-up of every method on every side (20 steps per task); the medians, the ratios Avalanche / ours and the
issue's bars (ours at least 1.5x faster than Avalanche on every method, 2x on EWC, GEM and A-GEM), judged for each
setting separately, are printed and written to ``docs/results/peers.md``.

For ``naive``, ``er`` and ``derpp`` a third side, the plain PyTorch loop of ``benchmarks/step_cost.py`` (the same
network, batches, class-IL masking, loss and SGD steps, no framework at all; the current and replay batches in one
forward pass over their concatenation, as Avalanche runs them), runs right after ours: Avalanche's
time over the plain loop's is the most that any framework doing the same arithmetic could gain on Avalanche, the
ceiling of the ratio the bars ask for.

Avalanche is an optional extra (``pip install -e .[peers]``); without it the script exits with status 2 and one
line saying so. Avalanche's GEM solves its quadratic program with ``quadprog`` through ``qpsolvers``, which may
need ``pip install quadprog``; a strategy that cannot run is reported with its error, the others still run.

Usage: ``CL_DATA_DIR=/path/with/MNIST python benchmarks/peers.py [--repeats 3] [--methods naive ewc]
[--avalanche-evaluator slim default] [--out FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from torch import Tensor, nn

INSTALL_HINT = "benchmarks/peers.py needs Avalanche 0.6.0 (avalanche-lib): pip install -e .[peers]"
EXIT_NO_AVALANCHE = 2

# Protocol P1
HIDDEN = (400, 400)
LR = 0.01
BATCH = 32
BUFFER = 500
N_TASKS = 5
EVAL_BATCH = 1000  # ours: dataset.eval_batch_size
WARMUP_STEPS = 20  # optimizer steps per task of the untimed warm-up
BAR, BAR_PROJECTION = 1.5, 2.0  # the bars on Avalanche / ours
ACC_KEY = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{:03d}"
# Avalanche's evaluator: "slim", the experience accuracy without a logger (both sides compute only what the table
# reports: the like-for-like comparison); "default", no evaluator argument (what a user gets out of the box)
EVALUATORS = ("slim", "default")
EVALUATOR_ROLE = {"slim": "like-for-like", "default": "what users get"}
EVALUATOR_TEXT = {
    "slim": "`EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])`: Avalanche computes only the experience "
    "accuracy the table reports and logs nothing, as ours; the like-for-like comparison",
    "default": "the strategy built without an `evaluator` argument, what a user gets from Avalanche out of the box: "
    "its `default_evaluator()` (accuracy and loss per epoch, experience and stream, the epoch metrics updated at "
    "every training minibatch) with its `InteractiveLogger` (a tqdm progress bar refreshed at every training and "
    "evaluation iteration, the metrics printed after each epoch and evaluated experience); its console output is "
    "sent to the null device, every write still made (a terminal would only cost more)",
}


@dataclass(frozen=True)
class Peer:
    """One row: our method (overrides beyond replay_speed's ``method_overrides``) and the Avalanche strategy that
    optimises the same objective.

    Attributes:
        ours: Overrides added to ``method_overrides(<method>, 32)``.
        strategy: Name of the Avalanche strategy class (``avalanche.training``).
        kwargs: Its method arguments (the common ones, model to evaluator, are :func:`build_strategy`'s).
        storage: ER rows: the storage policy of Avalanche's ``ReplayPlugin`` (``avalanche.training.storage_policy``).
        bar: The issue's bar on Avalanche's training time over ours.
        why: How the arguments map onto ours.
    """

    ours: tuple[str, ...] = ()
    strategy: str = "Naive"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    storage: str | None = None
    bar: float = BAR
    why: str = ""

    def avalanche_call(self) -> str:
        """The Avalanche side as a call, e.g. ``EWC(ewc_lambda=50.0, mode='separate')``."""
        if self.storage is not None:
            return (
                f"{self.strategy} + ReplayPlugin(mem_size={BUFFER}, batch_size={BATCH}, batch_size_mem={BATCH}, "
                f"storage_policy={self.storage}({BUFFER}))"
            )
        return f"{self.strategy}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


PEERS: dict[str, Peer] = {
    "naive": Peer(why="fine-tuning on both sides"),
    "er": Peer(
        storage="ReservoirSamplingBuffer",
        why="ours `selection=reservoir` (the default); 32 current + 32 replayed samples per step, one cross-entropy "
        "mean over the 64 on both sides",
    ),
    "er:class_balanced": Peer(
        ours=("method.selection=class_balanced",),
        storage="ClassBalancedBuffer",
        why="ours `method.selection=class_balanced`; Avalanche's buffer is split equally over the classes seen",
    ),
    "derpp": Peer(
        strategy="DER",
        kwargs={"mem_size": BUFFER, "batch_size_mem": BATCH, "alpha": 1.0, "beta": 0.5},
        why="ours alpha 1.0 (logit MSE), beta 0.5 (replayed labels), 32 replayed samples",
    ),
    "ewc": Peer(
        strategy="EWC",
        kwargs={"ewc_lambda": 50.0, "mode": "separate"},
        bar=BAR_PROJECTION,
        why="ours lambda 100 in (lambda / 2) sum F (theta - theta*)^2, one penalty per old task; Avalanche's penalty "
        "is ewc_lambda * sum F (theta - theta*)^2, so the same coefficient is ewc_lambda = 50",
    ),
    "agem": Peer(
        strategy="AGEM",
        kwargs={"patterns_per_exp": BUFFER // N_TASKS, "sample_size": BATCH},
        bar=BAR_PROJECTION,
        why="ours buffer 500 = 100 per task, reference batch 32",
    ),
    "gem": Peer(
        strategy="GEM",
        kwargs={"patterns_per_exp": BUFFER // N_TASKS, "memory_strength": 0.5},
        bar=BAR_PROJECTION,
        why="ours 100 memories per task, all of them per step, memory_strength 0.5, ridge 1e-3 (Avalanche's fixed "
        "value)",
    ),
    "lwf": Peer(
        strategy="LwF",
        kwargs={"alpha": 4.0, "temperature": 2.0},
        why="ours alpha 1 multiplies T^2 * KL (T = 2) over the old classes; Avalanche's alpha multiplies the KL over "
        "the old classes without T^2, so alpha = 1 * 2^2 = 4; both take the batch mean of the KL and copy the model "
        "after each task as the teacher",
    ),
    "si": Peer(
        ours=("method.c=1",),
        strategy="SynapticIntelligence",
        kwargs={"si_lambda": 2.0, "eps": 0.1},
        why="ours c 1 in c * sum Omega (theta - theta*)^2 (no 1/2), damping xi 0.1; Avalanche's penalty is "
        "(si_lambda / 2) * sum Omega (theta - theta*)^2, so si_lambda = 2, eps = xi = 0.1",
    ),
}

METHODS = tuple(PEERS)
# methods that benchmarks/step_cost.py also writes as a plain PyTorch loop: the floor of any framework's time
PLAIN = ("naive", "er", "derpp", "agem", "gem", "lwf")

MATCHED = [
    "Data: the MNIST files our datamodule reads, the same uint8 tensors scaled to [0, 1] by / 255 (no normalisation, "
    "no augmentation); the same class split (natural order, 2 classes per task), training sets and test sets (sizes "
    "checked per task).",
    "Network: our `MLP` 784-400-400-10 on both sides, with the initial weights `train(cfg)` draws for the run's seed "
    "(the build steps repeated); the initial accuracies of the two networks are compared on every run.",
    "Optimisation: SGD lr 0.01, momentum 0, batch 32, one epoch per task, the last batch of a task smaller "
    "(no `drop_last` on either side), so both take the same number of optimizer steps (counted below).",
    "Evaluation: every task's test set before training and after each task on both sides, batches of 1000; "
    "`avg_acc` computed by the same code for both from the final network (argmax over all 10 outputs).",
    "Threads: one intra-op thread for both (`torch.set_num_threads(1)`, ours `threads=1`) and one BLAS thread for "
    "NumPy and SciPy (`OPENBLAS_NUM_THREADS=1`), CPU, in one process.",
]

NOT_MATCHED = [
    "**Class-IL training logits.** Ours trains on the logits of the classes seen so far (`module.train_outputs=seen`, "
    "P1 as run); Avalanche's strategies take the cross-entropy over all 10 outputs. This can change the accuracies "
    "(most for the methods without replay), not the cost.",
    "**Data pipeline.** Avalanche gathers every sample through its dataset's `__getitem__` and collates the batch "
    "(here from float tensors prepared before timing, its fastest path: no PIL, no per-sample transform); ours "
    "gathers a whole batch of uint8 with one indexing call and scales it. This is part of what is measured.",
    "**Evaluator (the `default` setting).** Avalanche's default evaluator also computes the training accuracy and "
    "loss of every epoch (updated at each minibatch) and the loss and stream metrics at each evaluation, and drives "
    "its interactive logger; ours runs as P1 ran it in both settings (`logger=none`, "
    "`trainer.enable_progress_bar=false`), not at its own defaults, and computes none of that. The `slim` setting "
    "removes this difference (both sides compute the experience accuracy only, no logger).",
    "**ER buffer filling.** Ours inserts every incoming sample into the buffer during training (reservoir, or "
    "class-balanced per step) and replays from the first task's second step on; Avalanche's storage policies are "
    "updated at the end of each experience, so it replays from the second task on (and steps of the first task "
    "carry 32 samples instead of 64).",
    "**DER++.** Ours keeps a reservoir buffer filled during training with the logits at insertion and draws two "
    "replay batches per step (one for the logit MSE, one for the labels), forwarded with the current batch in one "
    "pass over the 96 samples (`module.fused_forward=auto`: the MLP has no batch statistics); Avalanche's DER fills "
    "a class-balanced buffer at the end of each experience with the logits of the trained model, draws one replay "
    "batch for both terms, runs one forward pass over the current and the replayed batch together (64 samples: "
    "less arithmetic per step than ours), and replays only once the buffer holds 32 samples (from the second task "
    "on).",
    "**EWC Fisher.** Ours: the exact Fisher (sum over classes of p(c|x) g_c^2) over 200 samples of the task, from "
    "per-class batched gradients. Avalanche's: the squared gradient of each mini-batch's mean loss (batch 32, true "
    "labels), averaged over every mini-batch of the whole task (a pass over about 12,000 samples at each task's end); "
    "Avalanche has no setting for the sample count or the Fisher's kind. The penalty coefficient is matched "
    "(`ewc_lambda=50`), the Fisher values are not.",
    "**A-GEM reference batch.** Ours draws 32 samples from the whole memory; Avalanche draws `sample_size // "
    "(number of past tasks)` from each past task's memory (32, 16, 10, 8: 32, 32, 30, 32 samples).",
    "**GEM's quadratic program.** Ours solves the dual as a non-negative least-squares problem (scipy); Avalanche "
    "calls `quadprog` through `qpsolvers` (both with the ridge 1e-3 on the memories' Gram matrix). Avalanche computes "
    "the Gram matrix and the projection in NumPy (float64, at every step with a violated constraint); ours computes "
    "them with torch on its one intra-op thread and hands scipy only the small dual. NumPy's and SciPy's BLAS run "
    "on one thread too (`OPENBLAS_NUM_THREADS=1`, set by the script before they load).",
    "**SI importance.** Ours integrates the task loss's gradient only (the penalty's gradient is added after it is "
    "recorded) and clamps negative omega to 0; Avalanche integrates the gradient of the whole loss (penalty "
    "included) and clips the importance at 0.001 from above (fixed in its code).",
    "**Random streams.** Shuffling, buffer draws and the memories (a random subset of 100 samples of each task for "
    "A-GEM and GEM on both sides) use each framework's own generators "
    "(Avalanche's seeded with `random.seed`, `numpy.random.seed` and `torch.manual_seed` of the run's seed), so "
    "accuracies agree only in distribution.",
]


# ---------------------------------------------------------------------------------------------------------- results
@dataclass
class Measured:
    """One timed run."""

    train_s: float
    eval_s: float
    avg_acc: float
    steps: int
    init_acc: list[float] = field(default_factory=list)
    reported_acc_diff: float | None = None  # Avalanche: max |own evaluation - Top1_Acc_Exp| over tasks


@dataclass
class Row:
    """One method's runs: ours, and Avalanche's under each evaluator setting (a setting missing from ``avalanche``
    could not run: see ``errors``)."""

    method: str
    bar: float
    ours: list[Measured]
    avalanche: dict[str, list[Measured]]
    errors: dict[str, str] = field(default_factory=dict)
    plain_s: list[float] = field(default_factory=list)  # the plain PyTorch loop of the same steps (PLAIN methods)

    def ratio(self, evaluator: str) -> float | None:
        """Median of Avalanche's train time under ``evaluator`` over the median of ours (``None``: not run)."""
        runs = self.avalanche.get(evaluator)
        return median_of(runs, "train_s") / median_of(self.ours, "train_s") if runs else None

    def ceiling(self, evaluator: str) -> float | None:
        """Avalanche's median train time under ``evaluator`` over the plain loop's: the most any framework doing the
        same arithmetic through PyTorch could be faster than Avalanche (``None``: no plain loop for this method)."""
        runs = self.avalanche.get(evaluator)
        return median_of(runs, "train_s") / statistics.median(self.plain_s) if runs and self.plain_s else None


def run_plain(method: str, seed: int) -> float:
    """The plain PyTorch loop of P1's steps for ``method`` (``benchmarks/step_cost.py``'s: same network, batches,
    masking, loss and SGD steps, no framework; the current and replay batches in one forward pass, as Avalanche
    runs them); its training wall time."""
    from hydra.utils import instantiate
    from step_cost import plain  # this folder is on sys.path when the script runs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_p1(method, seed, None, Path(tmp) / "run")
    dm = instantiate(cfg.dataset)
    dm.setup("fit")
    return plain(cfg, dm, seed, fused=True)


def median_of(runs: Sequence[Measured], key: str) -> float:
    """Median of one field over runs.

    >>> median_of([Measured(1.0, 0.1, 0.5, 10), Measured(3.0, 0.3, 0.7, 10), Measured(2.0, 0.2, 0.6, 10)], "train_s")
    2.0
    """
    return float(statistics.median(getattr(r, key) for r in runs))


def verdict(ratio: float, bar: float) -> str:
    """Whether Avalanche's time over ours reaches the bar.

    >>> verdict(2.4, 2.0), verdict(1.2, 1.5)
    ('met', 'NOT met')
    """
    return "met" if ratio >= bar else "NOT met"


def markdown_table(rows: Sequence[Row], evaluators: Sequence[str]) -> list[str]:
    """The results table: medians of ours and of Avalanche under each evaluator setting, the ratio of medians
    Avalanche / ours with the bar's verdict per setting."""
    both = " / ".join(evaluators)
    header = ["method", "bar", "ours train s"]
    for e in evaluators:
        header += [f"Avalanche train s, {e}", f"Avalanche / ours, {e}"]
    header += ["plain loop train s", f"Avalanche / plain loop ({both})"]
    header += [
        "ours eval s", f"Avalanche eval s ({both})", "ours avg_acc", f"Avalanche avg_acc ({both})",
        f"steps (ours / {both})",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row.method}`", f">= {row.bar}x", f"{median_of(row.ours, 'train_s'):.2f}"]
        evals, accs, steps = [], [], [str(row.ours[0].steps)]
        for e in evaluators:
            runs, ratio = row.avalanche.get(e), row.ratio(e)
            if runs and ratio is not None:
                cells += [f"{median_of(runs, 'train_s'):.2f}", f"{ratio:.2f} {verdict(ratio, row.bar)}"]
                evals.append(f"{median_of(runs, 'eval_s'):.2f}")
                accs.append(f"{median_of(runs, 'avg_acc'):.3f}")
                steps.append(str(runs[0].steps))
            else:
                cells += ["not run", "not measured"]
                evals.append("-")
                accs.append("-")
                steps.append("-")
        ceilings = [row.ceiling(e) for e in evaluators]
        cells += [
            f"{statistics.median(row.plain_s):.2f}" if row.plain_s else "-",
            " / ".join("-" if c is None else f"{c:.2f}" for c in ceilings),
        ]
        cells += [
            f"{median_of(row.ours, 'eval_s'):.2f}", " / ".join(evals), f"{median_of(row.ours, 'avg_acc'):.3f}",
            " / ".join(accs), " / ".join(steps),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def bars_summary(rows: Sequence[Row], evaluator: str) -> str:
    """One line: on how many methods the bars are met against Avalanche under one evaluator setting.

    >>> ok = Row("naive", 1.5, [Measured(1.0, 0, 0, 1)], {"slim": [Measured(2.0, 0, 0, 1)]})
    >>> bars_summary([ok, Row("gem", 2.0, [Measured(1.0, 0, 0, 1)], {}, {"slim": "boom"})], "slim")
    'Evaluator `slim` (like-for-like): bars met on 1 of 2 methods (not met: none; not measured: gem).'
    """
    met, missed, absent = [], [], []
    for row in rows:
        ratio = row.ratio(evaluator)
        (absent if ratio is None else met if ratio >= row.bar else missed).append(row.method)
    return (
        f"Evaluator `{evaluator}` ({EVALUATOR_ROLE[evaluator]}): bars met on {len(met)} of {len(rows)} methods "
        f"(not met: {', '.join(missed) or 'none'}; not measured: {', '.join(absent) or 'none'})."
    )


# ------------------------------------------------------------------------------------------------------ availability
def avalanche_version() -> str | None:
    """Avalanche's version, or ``None`` where it cannot be imported (not installed, or blocked)."""
    try:
        if importlib.util.find_spec("avalanche") is None:
            return None
    except (ImportError, ValueError):  # ValueError: a module entry set to None (an import blocked on purpose)
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import avalanche
    except ImportError:
        return None
    return str(getattr(avalanche, "__version__", "unknown"))


# -------------------------------------------------------------------------------------------------------------- ours
def ours_revision() -> str:
    """The code measured as ours: the package's version and, in a git checkout, its commit, and whether the checkout
    differs from it (``git status``; and whether the package's own files do)."""
    import subprocess

    import cl_lightning

    package = Path(cl_lightning.__file__).resolve().parent
    version = f"cl_lightning {getattr(cl_lightning, '__version__', 'unknown')}"

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=package, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain")
        dirty_package = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return version
    if not dirty:
        return f"{version} at commit {commit}"
    where = "the package's files among them" if dirty_package else "none to the package's files"
    return f"{version} at commit {commit} with uncommitted changes ({where})"


def compose_p1(method: str, seed: int, steps_per_task: int | None, out: Path) -> DictConfig:
    """Our config of P1 for a row of :data:`PEERS` (``steps_per_task``: the warm-up's short tasks)."""
    from replay_speed import BASE, compose_run, method_overrides  # this folder is on sys.path when the script runs

    overrides = [
        *BASE,
        *method_overrides(method.partition(":")[0], BATCH),
        *PEERS[method].ours,
        f"model.hidden=[{','.join(map(str, HIDDEN))}]",
        f"optimizer.lr={LR}",
        f"batch_size={BATCH}",
        f"steps_per_task={steps_per_task or 'null'}",
        "epochs_per_task=1",
        f"seed={seed}",
    ]
    return compose_run(overrides, out)


def run_ours(method: str, seed: int, warm_up: bool = False) -> Measured:
    """One run of ours: ``train(cfg)``'s own timings and accuracy."""
    from cl_lightning.train import train

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        results = train(compose_p1(method, seed, WARMUP_STEPS if warm_up else None, Path(tmp) / "run"))
    return Measured(
        train_s=float(results["train_seconds"]),
        eval_s=float(results["eval_seconds"]),
        avg_acc=float(results["avg_acc"]),
        steps=int(sum(results["cost"]["train_steps_per_task"])),
        init_acc=[float(a) for a in results["init_acc"]],
    )


# --------------------------------------------------------------------------------------------------------- Avalanche
def initial_network(cfg: DictConfig) -> tuple[nn.Module, Any]:
    """The network ``train(cfg)`` starts from, and the datamodule: the calls of ``train`` up to the network, in its
    order, from the same seed (the methods and the datamodule are built first, as the run builds them)."""
    import lightning.pytorch as pl

    from cl_lightning.build import build_methods, build_model, instantiate_node

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    build_methods(cfg)
    dm = instantiate_node(cfg.dataset, "dataset")
    dm.setup("fit")
    return build_model(cfg, dm), dm


def avalanche_benchmark(dm: Any, train_limit: int | None = None) -> Any:
    """Split-MNIST for Avalanche from our datamodule's source tensors, scaled as ours (``/ 255``), cut by
    ``nc_benchmark`` in the natural class order; each experience checked against our task of the same index.

    ``train_limit`` keeps the first samples of the training set only (the warm-up)."""
    import torch
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    data = dm.source()

    def dataset(x: Tensor, y: Tensor) -> TensorDataset:
        ds = TensorDataset(x.float().div_(255.0), y)
        ds.targets = y.tolist()  # type: ignore[attr-defined]  # what Avalanche reads the class of each sample from
        return ds

    train_x, train_y = data.train_x, data.train_y
    if train_limit is not None:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench = nc_benchmark(
            dataset(train_x, train_y), dataset(data.test_x, data.test_y), n_experiences=N_TASKS, task_labels=False,
            shuffle=False, fixed_class_order=list(range(data.n_classes)),
        )  # fmt: skip
    for task, train_exp, test_exp in zip(dm.tasks, bench.train_stream, bench.test_stream, strict=True):
        if sorted(test_exp.classes_in_this_experience) != sorted(torch.unique(task.test_y).tolist()):
            raise RuntimeError(f"experience {task.task_id}: classes differ from our task's")
        if len(test_exp.dataset) != len(task.test_y) or (
            train_limit is None and len(train_exp.dataset) != len(task.train_y)
        ):
            raise RuntimeError(f"experience {task.task_id}: sizes differ from our task's")
    return bench


def accuracies(net: nn.Module, dm: Any) -> list[float]:
    """Accuracy of ``net`` on each of our tasks' test sets, argmax over all outputs, as ours evaluates class-IL."""
    import torch

    was_training = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for task in dm.tasks:
            correct = 0
            for x, y in zip(task.test_x.split(EVAL_BATCH), task.test_y.split(EVAL_BATCH), strict=True):
                correct += int((net(x.float().div_(255.0)).argmax(1) == y).sum())
            out.append(correct / len(task.test_y))
    net.train(was_training)
    return out


def build_strategy(peer: Peer, net: nn.Module, evaluator: str) -> Any:
    """The Avalanche strategy of a row, with P1's common arguments and the evaluator setting (:data:`EVALUATORS`):
    ``slim`` passes an evaluator of the experience accuracy without a logger, ``default`` passes none (Avalanche's
    ``default_evaluator``, its logger writing to the ``sys.stdout`` of the moment the strategy is built)."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator {evaluator!r}: one of {', '.join(EVALUATORS)}")
    import torch
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import storage_policy, supervised
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

    if peer.strategy == "GEM":
        import qpsolvers

        if "quadprog" not in qpsolvers.available_solvers:
            raise RuntimeError("Avalanche's GEM solves its QP with quadprog, not installed: pip install quadprog")
    plugins: list[Any] = []
    if peer.storage is not None:
        policy = getattr(storage_policy, peer.storage)(BUFFER)
        plugins.append(ReplayPlugin(mem_size=BUFFER, batch_size=BATCH, batch_size_mem=BATCH, storage_policy=policy))
    kwargs = dict(peer.kwargs)
    if evaluator == "slim":
        kwargs["evaluator"] = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    return getattr(supervised, peer.strategy)(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR, momentum=0.0),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=BATCH, train_epochs=1, eval_mb_size=EVAL_BATCH,
        device="cpu", plugins=plugins, **kwargs,
    )  # fmt: skip


def run_avalanche(method: str, seed: int, evaluator: str, warm_up: bool = False) -> Measured:
    """One run of Avalanche under an evaluator setting: ``strategy.train`` per experience and ``strategy.eval`` on
    the test stream before training and after each experience, each timed; the accuracy from our evaluation of its
    final model. Its console output (the default evaluator's interactive logger, its deprecation notices) goes to
    the null device: every write is still made, none reaches the terminal."""
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        net, dm = initial_network(compose_p1(method, seed, None, Path(tmp) / "run"))
    bench = avalanche_benchmark(dm, train_limit=WARMUP_STEPS * BATCH * N_TASKS if warm_up else None)
    init_acc = accuracies(net, dm)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Avalanche prints its deprecation notices itself (it resets the warning filters): kept out of the log
    with (
        open(os.devnull, "w") as null,
        warnings.catch_warnings(),
        contextlib.redirect_stdout(null),
        contextlib.redirect_stderr(null),
    ):
        warnings.simplefilter("ignore")
        strategy = build_strategy(PEERS[method], net, evaluator)
        train_s = 0.0
        start = time.perf_counter()
        metrics = strategy.eval(bench.test_stream)
        eval_s = time.perf_counter() - start
        for experience in bench.train_stream:
            start = time.perf_counter()
            strategy.train(experience)
            train_s += time.perf_counter() - start
            start = time.perf_counter()
            metrics = strategy.eval(bench.test_stream)
            eval_s += time.perf_counter() - start
    final = accuracies(strategy.model, dm)
    reported = [float(metrics[ACC_KEY.format(j)]) for j in range(N_TASKS)]
    return Measured(
        train_s=train_s,
        eval_s=eval_s,
        avg_acc=sum(final) / len(final),
        steps=int(strategy.clock.train_iterations),
        init_acc=init_acc,
        reported_acc_diff=max(abs(a - b) for a, b in zip(final, reported, strict=True)),
    )


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# -------------------------------------------------------------------------------------------------------------- main
def measure(methods: Sequence[str], repeats: int, evaluators: Sequence[str]) -> list[Row]:
    """Warm-up, then alternating timed runs (per repeat and method: ours, then Avalanche under each evaluator
    setting in turn); one :class:`Row` per method."""
    errors: dict[str, dict[str, str]] = {m: {} for m in methods}

    def avalanche(m: str, seed: int, e: str, label: str, warm_up: bool = False) -> Measured | None:
        try:
            return run_avalanche(m, seed, e, warm_up=warm_up)
        except Exception as err:  # noqa: BLE001 - a strategy that cannot run is reported, the others go on
            errors[m][e] = one_line(err)
            print(f"{label} {m}: Avalanche ({e}) failed: {errors[m][e]}", flush=True)
            return None

    for m in methods:  # not timed: first imports, first data loads, the allocator's first requests
        run_ours(m, 0, warm_up=True)
        if m in PLAIN:
            run_plain(m, 0)
        for e in evaluators:
            avalanche(m, 0, e, "warm-up", warm_up=True)
    ours: dict[str, list[Measured]] = {m: [] for m in methods}
    plain_s: dict[str, list[float]] = {m: [] for m in methods}
    peer: dict[str, dict[str, list[Measured]]] = {m: {e: [] for e in evaluators} for m in methods}
    for r in range(repeats):
        for m in methods:
            ours[m].append(run_ours(m, r))
            o = ours[m][-1]
            print(f"repeat {r} {m} ours: {o.train_s:.2f}s train, {o.eval_s:.2f}s eval, avg_acc {o.avg_acc:.3f}")
            if m in PLAIN:
                plain_s[m].append(run_plain(m, r))
                print(f"repeat {r} {m} plain loop: {plain_s[m][-1]:.2f}s train", flush=True)
            for e in evaluators:
                if e in errors[m]:
                    continue
                a = avalanche(m, r, e, f"repeat {r}")
                if a is None:
                    continue
                peer[m][e].append(a)
                print(
                    f"repeat {r} {m} Avalanche ({e}): {a.train_s:.2f}s train, {a.eval_s:.2f}s eval, avg_acc "
                    f"{a.avg_acc:.3f} (ratio {a.train_s / o.train_s:.2f})",
                    flush=True,
                )
    return [
        Row(m, PEERS[m].bar, ours[m], {e: peer[m][e] for e in evaluators if e not in errors[m]}, errors[m], plain_s[m])
        for m in methods
    ]


def checks(rows: Sequence[Row]) -> list[str]:
    """What the runs confirm: same initial weights, same steps, our evaluation equal to Avalanche's metric, and
    (both settings run) the evaluator setting leaving Avalanche's training unchanged."""
    pairs = [
        (o, a) for row in rows for runs in row.avalanche.values() for o, a in zip(row.ours, runs, strict=True)
    ]  # fmt: skip
    if not pairs:
        return []
    init = max(abs(x - y) for o, a in pairs for x, y in zip(o.init_acc, a.init_acc, strict=True))
    steps = all(o.steps == a.steps for o, a in pairs)
    reported = max(a.reported_acc_diff or 0.0 for _, a in pairs)
    lines = [
        f"- Same initial network: the largest difference between the initial per-task accuracies of ours and of "
        f"the Avalanche copy, over all {len(pairs)} paired runs (ours against each Avalanche run of the same method "
        f"and repeat), is {init:.6f} (0: the same weights).",
        f"- Same number of optimizer steps in every paired run: {'yes' if steps else 'NO'}.",
        f"- Our evaluation of Avalanche's final model against Avalanche's own `Top1_Acc_Exp`: largest difference "
        f"{reported:.6f}.",
    ]
    same = [
        abs(a.avg_acc - b.avg_acc)
        for row in rows
        if len(row.avalanche) == len(EVALUATORS)
        for a, b in zip(*(row.avalanche[e] for e in EVALUATORS), strict=True)
    ]
    if same:
        lines.append(
            f"- The evaluator does not change Avalanche's training: the largest difference between the avg_acc of "
            f"its `slim` and `default` runs of the same method and seed, over {len(same)} pairs, is {max(same):.6f}."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    parser.add_argument(
        "--avalanche-evaluator", nargs="+", default=list(EVALUATORS), choices=EVALUATORS, dest="evaluators",
        help="slim: experience accuracy, no logger (like-for-like); default: no evaluator argument (out of the box)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/peers.md")
    args = parser.parse_args()
    version = avalanche_version()
    if version is None:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(EXIT_NO_AVALANCHE)
    # one thread for NumPy's and SciPy's BLAS too (Avalanche's GEM works in NumPy, ours hands SciPy its dual):
    # set before either is imported, since OpenBLAS reads it when it loads
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import torch

    torch.set_num_threads(1)
    methods = list(dict.fromkeys(args.methods))
    evaluators = [e for e in EVALUATORS if e in args.evaluators]
    command = [f"--repeats {args.repeats}"]
    if tuple(methods) != METHODS:
        command.append("--methods " + " ".join(methods))
    if tuple(evaluators) != EVALUATORS:
        command.append("--avalanche-evaluator " + " ".join(evaluators))
    revision = ours_revision()
    print(f"Avalanche {version}, torch {torch.__version__}, methods {' '.join(methods)}, evaluators "
          f"{' '.join(evaluators)}; ours: {revision}", flush=True)  # fmt: skip
    rows = measure(methods, args.repeats, evaluators)
    revision_end = ours_revision()
    if revision_end != revision:
        revision += f" at the start of the run, {revision_end} at its end"
    order = ", ".join(["ours", *(f"Avalanche {e}" for e in evaluators)])
    settings = [f"- `{e}`: {EVALUATOR_TEXT[e]}." for e in evaluators]
    lines = [
        "# Peers on protocol P1: ours against Avalanche",
        "",
        "Split-MNIST class-IL, 5 tasks of 2 classes (0-1, 2-3, ...), MLP 784-400-400-10 (ReLU), SGD lr 0.01 without "
        "momentum, batch 32, one epoch per task, buffer 500 for the replay methods. Train s: wall time of training "
        "only, summed over the tasks (ours: `train_seconds`, the `trainer.fit` calls; Avalanche: the "
        "`strategy.train(experience)` calls; both with their task-end work). Eval s: the evaluations, timed apart "
        "(every task's test set before training and after each task, on both sides). avg_acc: the mean final "
        "accuracy over the tasks, computed by the same code for both. The bar is the issue's: ours at least 1.5x "
        "faster than Avalanche on every method, at least 2x on EWC, GEM and A-GEM (Avalanche / ours >= bar), judged "
        "for each Avalanche evaluator setting separately.",
        "",
        "Avalanche's evaluator settings (`--avalanche-evaluator`):",
        "",
        *settings,
        "",
        "Ours runs the same way against both (P1's settings: `logger=none`, no progress bar); each run of ours is "
        "timed once and its time is the denominator of every ratio of its method and repeat.",
        "",
        "Plain loop (naive, ER, DER++, A-GEM, GEM, LwF): the same steps written as a plain PyTorch loop "
        "(`benchmarks/step_cost.py`: the same network, batches, masking, loss and SGD steps, no framework; the "
        "current and replay batches in one forward pass over their concatenation, as Avalanche runs them), run "
        "right after ours. Avalanche / "
        "plain loop is the most any framework doing the same arithmetic could be faster than Avalanche: the ceiling "
        "of the bar's ratio.",
        "",
        f"Ours: {revision}. Avalanche {version}, torch {torch.__version__}, 1 intra-op thread on both sides "
        f"(`torch.set_num_threads(1)`, ours `threads=1`), {os.cpu_count()} CPU cores shared with other jobs (times "
        f"vary from run to run with their load), Python {platform.python_version()}. Produced by "
        f"`python benchmarks/peers.py {' '.join(command)}` (MNIST in `$CL_DATA_DIR`, Avalanche from "
        f"`pip install -e .[peers]`) on {date.today().isoformat()}; runs alternate ({order}, per method and repeat) "
        f"after an untimed warm-up; medians of {args.repeats} runs.",
        "",
        "## Results",
        "",
        *markdown_table(rows, evaluators),
        "",
        *[f"- {bars_summary(rows, e)}" for e in evaluators],
        "",
        *checks(rows),
        "",
        "Raw train times (s): "
        + "; ".join(
            f"{r.method} ours {[round(m.train_s, 2) for m in r.ours]}"
            + "".join(
                f", {e} " + (str([round(m.train_s, 2) for m in r.avalanche[e]]) if e in r.avalanche else "-")
                for e in evaluators
            )
            for r in rows
        ),
        "",
    ]
    failed = [(r, e, err) for r in rows for e, err in r.errors.items()]
    if failed:
        lines += ["## Avalanche strategies that could not run", ""]
        lines += [f"- `{r.method}` ({PEERS[r.method].avalanche_call()}, `{e}`): `{err}`" for r, e, err in failed]
        lines.append("")
    lines += ["## The Avalanche side of each row", ""]
    lines += [f"- `{m}`: `{PEERS[m].avalanche_call()}`; {PEERS[m].why}." for m in methods]
    lines += ["", "## Settings matched", "", *[f"- {s}" for s in MATCHED]]
    lines += ["", "## Settings that could not be matched", "", *[f"- {s}" for s in NOT_MATCHED], ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(markdown_table(rows, evaluators)))
    for e in evaluators:
        print(bars_summary(rows, e))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
