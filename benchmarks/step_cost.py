"""Per-step cost at small batches (issue 16): cl_lightning against a plain PyTorch loop of the same steps.

Protocols, each trained by ``train()`` on a composed config and by a hand-written loop over the same in-memory
``uint8`` tensors of the same ``TaskSequenceDataModule``:

- the DER protocol (``experiment=der_split_mnist dataset.scenario=class_il``: Split-MNIST class-IL, MLP
  784-100-100-10 with Glorot weights, SGD, batch 10, 1 epoch per task, every logit trained as Mammoth does) for
  ``naive``, ``er`` and ``derpp``, with the values of ``conf/experiment_method/der_split_mnist/<method>.yaml``
  (buffer 500, replay batch 10; ER lr 0.1; DER++ lr 0.03, alpha 1.0, beta 0.5);
- ``naive`` on the protocol of ``benchmarks/overhead.py`` (MLP 784-400-400-10, lr 0.1, classes not yet seen masked)
  at batch 10 and batch 128.

The plain loop gathers each batch by index from a shuffled order, converts ``uint8`` to float, forwards, takes the
cross-entropy with the same class-IL masking, then ``zero_grad``, backward and an SGD step. ER and DER++ keep a
reservoir buffer of 500 (Vitter's algorithm R), draw their replay batches of 10 from it *before* inserting the
current batch, and forward each replay batch on its own, as cl_lightning does: ER's loss is the mean over batch and
replay, ``(b CE_b + r CE_r) / (b + r)``; DER++'s is ``CE_b + alpha MSE(f(x'), z') + beta CE(f(x''), y'')`` with
the logits ``z'`` stored at insertion. cl_lightning's time is ``train_seconds`` of ``results.json``: the sum of
the ``trainer.fit`` calls, one per task (Lightning's per-fit set-up included, evaluation not).

For the naive protocols a third side, **bare Lightning**, takes the plain loop's steps in the smallest
LightningModule (forward, the same masked cross-entropy, manual SGD step) over the same batches, one
``Trainer.fit`` per task with no callback, logger, progress bar or checkpoint: what Lightning's own loop costs per
step before any code of ours, the floor of any framework that trains through ``Trainer.fit``.

Runs alternate (plain, bare Lightning, cl_lightning, plain, ...) ``--repeats`` times per protocol, so that the load
of a shared machine falls on every side; the table gives medians, the ratio of medians, and the best of the first
two runs of each side with its ratio (the issue's bars are stated on the best of 2). One intra-op thread on both sides
(``torch.set_num_threads(1)``, ``threads=1``).

``--profile`` also runs ``naive`` on the DER protocol once under ``cProfile``: the 15 functions with the most own
time (``tottime``), each labelled with where it comes from (Lightning's loop and hooks, our module's training
step, callbacks and methods, the optimizer, torch), and the inclusive time of the step's parts.

Usage: ``CL_DATA_DIR=/path/with/MNIST python benchmarks/step_cost.py [--repeats 3] [--profile]
[--protocols naive-der derpp-der ...] [--out FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import os
import platform
import pstats
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from overhead import OVERRIDES as OVERHEAD_OVERRIDES  # benchmarks/overhead.py: the MLP 2x400 protocol
from replay_speed import compose_run

from cl_lightning.core.projection import add_to_grads_, agem_project_, flat_grad, gem_stacked_dual
from cl_lightning.models.backbones import MLP
from cl_lightning.train import train

QUIET = ["logger=none", "save_checkpoints=false", "threads=1", "trainer.enable_progress_bar=false"]
DER = ["experiment=der_split_mnist", "dataset.scenario=class_il", "trainer.accelerator=cpu", *QUIET]


@dataclass(frozen=True)
class Protocol:
    key: str
    label: str
    overrides: tuple[str, ...]
    bar: float | None  # the bar on ours / plain (best of 2), if any


PROTOCOLS = [
    Protocol("naive-der", "naive, DER protocol (batch 10)", (*DER, "method=naive"), 1.5),
    Protocol("er-der", "ER, DER protocol (batch 10, replay 10)", (*DER, "method=er"), None),
    Protocol("derpp-der", "DER++, DER protocol (batch 10, 2 x replay 10)", (*DER, "method=derpp"), 1.3),
    Protocol("naive-400-b10", "naive, MLP 2x400, batch 10", (*OVERHEAD_OVERRIDES, "batch_size=10"), 1.5),
    Protocol("naive-400-b128", "naive, MLP 2x400, batch 128", (*OVERHEAD_OVERRIDES, "batch_size=128"), 1.15),
]


def make_cfg(protocol: Protocol, out: Path, seed: int) -> DictConfig:
    return compose_run([*protocol.overrides, f"seed={seed}"], out)


def ours(protocol: Protocol, seed: int) -> float:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        results = train(make_cfg(protocol, Path(tmp) / "run", seed))
    return float(results["train_seconds"])


# ---------------------------------------------------------------------- the plain loop
class Reservoir:
    """A plain reservoir buffer (Vitter's algorithm R) of stored inputs (as given), labels and, optionally, logits,
    on ``device``; the draws on the host."""

    def __init__(self, capacity: int, x: torch.Tensor, n_outputs: int, seed: int, device: str | torch.device = "cpu"):
        self.capacity, self.seen, self.device = capacity, 0, torch.device(device)
        self.x = torch.zeros((capacity, *x.shape[1:]), dtype=x.dtype, device=self.device)
        self.y = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.z = torch.zeros(capacity, n_outputs, device=self.device)
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None) -> None:
        slots, src = [], []
        for k, u in enumerate(torch.rand(len(y), generator=self.gen, dtype=torch.float64).tolist()):
            j = self.seen if self.seen < self.capacity else int(u * (self.seen + 1))  # uniform in [0, seen]
            if j < self.capacity:
                slots.append(j)
                src.append(k)
            self.seen += 1
        if slots:
            dst, idx = torch.tensor(slots, device=self.device), torch.tensor(src, device=self.device)
            self.x[dst], self.y[dst] = x[idx], y[idx]
            if z is not None:
                self.z[dst] = z[idx]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` stored samples (inputs as stored), their labels and logits."""
        idx = torch.randperm(len(self), generator=self.gen)[:n].to(self.device)
        return self.x[idx], self.y[idx], self.z[idx]


def plain(cfg: DictConfig, dm, seed: int, fused: bool = False) -> float:
    """The run of ``cfg`` (naive, ER, DER++, A-GEM, GEM or LwF) as a plain PyTorch loop; its training wall time.

    ``fused``: the current batch and the replay batches go through the network in one forward pass over their
    concatenation (as Avalanche's replay and DER do), the same arithmetic in fewer, larger kernels; the same
    outputs for a network without batch statistics, such as this MLP.

    A-GEM: at each task end a random ``buffer_size // n_tasks`` of the task's training samples join the memory;
    from the second task on, every step draws ``replay_batch_size`` distinct memories, takes the gradient of their
    masked cross-entropy with ``torch.autograd.grad`` after the current batch's backward, and, where the two
    gradients conflict, projects the gradient in place (``cl_lightning.core.projection.agem_project_``, the
    arithmetic ours runs). LwF: a frozen copy of the network after each task; from the second
    task on, ``alpha * T^2 * KL`` between its softmax and the network's over the old classes (batch mean) is added
    to the loss, the copy forwarding the batch without a graph. GEM: the same memories, kept per task (as float
    inputs); every step takes the gradient of each past task's whole memory (its masked cross-entropy) after the
    current batch's backward and, where one conflicts with the current gradient, solves the dual and adds ``G^T v``
    to the gradients (``gem_stacked_dual`` and ``add_to_grads_`` of ``cl_lightning.core.projection``, as ours).
    """
    method = cfg.method._target_.rsplit(".", 1)[-1].lower()
    torch.manual_seed(seed)
    net = MLP(dm.input_shape, dm.n_outputs, hidden=tuple(cfg.model.hidden), init=cfg.model.init)
    lr, bs = float(cfg.optimizer.lr), int(cfg.batch_size)
    masks = torch.zeros(dm.n_tasks, dm.n_outputs, dtype=torch.bool)
    for t, outputs in enumerate(dm.task_outputs):
        masks[t, outputs] = True
    buffer = None
    if method in ("er", "derpp", "agem"):
        r = int(cfg.method.replay_batch_size)
    if method in ("er", "derpp"):
        buffer = Reservoir(int(cfg.method.buffer_size), dm.tasks[0].train_x, dm.n_outputs, seed)
    memory: tuple[torch.Tensor, torch.Tensor] | None = None  # A-GEM's episodic memories of the finished tasks
    per_task: list[tuple[torch.Tensor, torch.Tensor]] = []  # GEM's: each finished task's, its inputs as floats
    draws = torch.Generator().manual_seed(seed)
    teacher: torch.nn.Module | None = None  # LwF's copy of the network after the last task
    params = list(net.parameters())
    start = time.perf_counter()
    for t, task in enumerate(dm.tasks):
        opt = torch.optim.SGD(params, lr=lr)
        unseen = ~masks[: t + 1].any(0) if cfg.module.train_outputs == "seen" else None
        old = masks[:t].any(0).nonzero().squeeze(1)  # LwF's old classes
        gen = torch.Generator().manual_seed(seed * 100_003 + t)
        for idx in torch.randperm(len(task.train_y), generator=gen).split(bs):
            x_raw, y = task.train_x[idx], task.train_y[idx]
            x = x_raw.float().div_(255.0)
            replays = (
                [] if buffer is None or not len(buffer) else [buffer.sample(r) for _ in range(1 + (method == "derpp"))]
            )
            replays = [(xr.float().div_(255.0), yr, zr) for xr, yr, zr in replays]
            if fused and replays:
                outs = net(torch.cat([x, *(rep[0] for rep in replays)])).split(
                    [len(y), *(len(rep[1]) for rep in replays)]
                )
            else:
                outs = [net(x), *(net(rep[0]) for rep in replays)]
            logits = outs[0]
            masked = logits if unseen is None else logits.masked_fill(unseen, float("-inf"))
            loss = F.cross_entropy(masked, y)
            if replays and method == "er":
                (_, yr, _), out = replays[0], outs[1]
                ce_r = F.cross_entropy(out if unseen is None else out.masked_fill(unseen, float("-inf")), yr)
                loss = (len(y) * loss + len(yr) * ce_r) / (len(y) + len(yr))
            elif replays:
                (_, _, za), (_, yb, _) = replays
                loss = loss + float(cfg.method.alpha) * F.mse_loss(outs[1], za)
                loss = loss + float(cfg.method.beta) * F.cross_entropy(outs[2], yb)
            if teacher is not None:
                temperature = float(cfg.method.temperature)
                with torch.no_grad():
                    target = F.log_softmax(teacher(x)[:, old] / temperature, -1)
                student = F.log_softmax(logits[:, old] / temperature, -1)
                kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
                loss = loss + float(cfg.method.alpha) * temperature**2 * kl
            if buffer is not None:  # after the draws: a batch is never replayed in its own step
                buffer.add(x_raw, y, logits.detach() if method == "derpp" else None)
            opt.zero_grad()
            loss.backward()
            if memory is not None:
                pick = torch.randperm(len(memory[1]), generator=draws)[:r]
                out = net(memory[0][pick].float().div_(255.0))
                out = out if unseen is None else out.masked_fill(unseen, float("-inf"))
                g_ref = torch.autograd.grad(F.cross_entropy(out, memory[1][pick]), params)
                agem_project_([p.grad for p in params], g_ref)
            if per_task:
                rows = torch.stack(
                    [
                        *(_flat_grad(net, params, unseen, xm, ym) for xm, ym in per_task),
                        flat_grad([p.grad for p in params], params),
                    ]
                )  # [G; g]
                v = gem_stacked_dual(rows, float(cfg.method.memory_strength), float(cfg.method.eps))
                if v is not None:
                    add_to_grads_(params, rows[:-1], v)
            opt.step()
        if method in ("agem", "gem"):  # task end: a random quota of the finished task joins the memory
            keep = torch.randperm(len(task.train_y), generator=draws)[: int(cfg.method.buffer_size) // dm.n_tasks]
            kept = (task.train_x[keep], task.train_y[keep])
            if method == "gem":
                per_task.append((kept[0].float().div_(255.0), kept[1]))
            else:
                memory = kept if memory is None else (torch.cat([memory[0], kept[0]]), torch.cat([memory[1], kept[1]]))
        if method == "lwf":
            teacher = copy.deepcopy(net).requires_grad_(False).eval()
    return time.perf_counter() - start


def _flat_grad(
    net: torch.nn.Module, params: list[torch.Tensor], unseen: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """The flat gradient of the masked cross-entropy of ``net`` on ``(x, y)`` (GEM's memory gradient)."""
    out = net(x)
    out = out if unseen is None else out.masked_fill(unseen, float("-inf"))
    return flat_grad(torch.autograd.grad(F.cross_entropy(out, y), params), params)


# ---------------------------------------------------------------------- Lightning's own floor
class _Batches:
    """The plain loop's batches (one task, shuffled, gathered by index) as an iterable Lightning can fit on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator) -> None:
        self.x, self.y, self.order = x, y, torch.randperm(len(y), generator=gen).split(batch_size)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for idx in self.order:
            yield self.x[idx], self.y[idx]


class BareModule(pl.LightningModule):
    """The smallest LightningModule taking the plain loop's naive steps (manual optimization, as ours)."""

    def __init__(self, net: torch.nn.Module, lr: float, unseen: torch.Tensor | None) -> None:
        super().__init__()
        self.net, self.lr, self.unseen = net, lr, unseen
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x.float().div_(255.0))
        masked = logits if self.unseen is None else logits.masked_fill(self.unseen, float("-inf"))
        loss = F.cross_entropy(masked, y)
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=self.lr)


def bare(cfg: DictConfig, dm, seed: int) -> float:
    """Naive's steps of ``cfg`` in the smallest Lightning run: one ``Trainer.fit`` per task, no callback, logger,
    progress bar or checkpoint; the wall time of the fits. What Lightning's loop costs before any code of ours."""
    torch.manual_seed(seed)
    net = MLP(dm.input_shape, dm.n_outputs, hidden=tuple(cfg.model.hidden), init=cfg.model.init)
    masks = torch.zeros(dm.n_tasks, dm.n_outputs, dtype=torch.bool)
    for t, outputs in enumerate(dm.task_outputs):
        masks[t, outputs] = True
    total = 0.0
    for t, task in enumerate(dm.tasks):
        unseen = ~masks[: t + 1].any(0) if cfg.module.train_outputs == "seen" else None
        batches = _Batches(task.train_x, task.train_y, int(cfg.batch_size), torch.Generator().manual_seed(seed + t))
        trainer = pl.Trainer(
            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(BareModule(net, float(cfg.optimizer.lr), unseen), train_dataloaders=batches)
        total += time.perf_counter() - start
    return total


# ---------------------------------------------------------------------- the profile
SOURCES = [  # (label, path fragments of the function's file), first match wins
    ("callbacks and methods", ("/cl_lightning/callbacks/", "/cl_lightning/methods/", "/lightning/pytorch/callbacks/")),
    ("our module's training step", ("/cl_lightning/models/", "/cl_lightning/data/")),
    ("optimizer", ("/torch/optim/",)),
    ("Lightning loop and hooks", ("/lightning/", "/lightning_fabric/", "/lightning_utilities/", "/torchmetrics/")),
    ("torch", ("/torch/",)),
]
PARTS = [  # (label, file fragment, function name): inclusive (cumulative) time of the step's parts
    ("whole fit (all tasks)", "/lightning/pytorch/trainer/trainer.py", "_run_stage"),
    ("training_step (ours: forward, masking, loss terms, logging)", "/cl_lightning/models/module.py", "training_step"),
    ("  of which the forward pass", "/torch/nn/modules/module.py", "_call_impl"),
    ("backward", "/torch/_tensor.py", "backward"),
    ("optimizer.step (closure included)", "/torch/optim/optimizer.py", "wrapper"),
    ("zero_grad", "/torch/optim/optimizer.py", "zero_grad"),
    ("callback hooks (all)", "/lightning/pytorch/trainer/call.py", "_call_callback_hooks"),
    ("LightningModule hooks (all, training_step included)", "/lightning/pytorch/trainer/call.py",
     "_call_lightning_module_hook"),
    ("batch gathering (TensorBatchLoader.__iter__)", "/cl_lightning/data/loader.py", "__iter__"),
]  # fmt: skip


def source(file: str, func: str) -> str:
    if file == "~":  # a C function
        return "torch (C)" if "torch" in func else "Python built-ins"
    for label, fragments in SOURCES:
        if any(f in file for f in fragments):
            return label
    return "other Python"


def where(file: str, line: int) -> str:
    if "site-packages/" in file:
        return f"{file.split('site-packages/', 1)[1]}:{line}"
    if "/cl_lightning/" in file:
        return f"cl_lightning/{file.split('/cl_lightning/', 1)[1]}:{line}"
    return f"{Path(file).name}:{line}" if line else file


def profile(level: str, n_top: int = 15) -> list[str]:
    protocol = next(p for p in PROTOCOLS if p.key == "naive-der")
    ours(protocol, 0)  # not profiled: first imports and data loading
    profiler = cProfile.Profile()
    profiler.enable()
    wall = ours(protocol, 0)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)
    lines = [
        f"{level} Profile: one `naive` run on the DER protocol under cProfile ({wall:.2f} s train time, profiled)",
        "",
        "cProfile's own cost per Python call inflates Python-heavy code relative to C; read shares, not seconds.",
        "",
        f"Top {n_top} by own time (`tottime`):",
        "",
        "| # | function | where | from | own s | calls |",
        "|---|---|---|---|---|---|",
    ]
    print(f"profile ({wall:.2f}s train under cProfile), top {n_top} by own time:")
    for i, ((file, line, func), (_, ncalls, tottime, _, _)) in enumerate(rows[:n_top], start=1):
        src = source(file, func)
        name = func.replace("|", "\\|")
        lines.append(f"| {i} | `{name}` | {where(file, line)} | {src} | {tottime:.3f} | {ncalls} |")
        print(f"  {i:2d}. {tottime:6.3f}s {ncalls:8d}  [{src}] {func} ({where(file, line)})")
    by_source: dict[str, float] = defaultdict(float)
    for (file, _, func), (_, _, tottime, _, _) in stats.items():
        by_source[source(file, func)] += tottime
    total = sum(by_source.values())
    lines += ["", "Own time of every profiled function, by where it comes from:", "", "| from | own s | share |"]
    lines.append("|---|---|---|")
    print("own time by source:")
    for src, secs in sorted(by_source.items(), key=lambda kv: kv[1], reverse=True):
        lines.append(f"| {src} | {secs:.3f} | {secs / total:.0%} |")
        print(f"  {src:30s} {secs:7.3f}s {secs / total:5.0%}")
    lines += ["", "Inclusive time of the step's parts (they nest: shares of the whole fit):", ""]
    lines += ["| part | inclusive s | calls |", "|---|---|---|"]
    print("inclusive time of the step's parts:")
    for label, fragment, name in PARTS:
        hits = [(v[3], v[0]) for (file, _, func), v in stats.items() if func == name and fragment in file]
        if not hits:
            continue
        cum, calls = sum(h[0] for h in hits), sum(h[1] for h in hits)
        lines.append(f"| {label} | {cum:.3f} | {calls} |")
        print(f"  {label:60s} {cum:7.3f}s {calls:8d}")
    return [*lines, ""]


# ---------------------------------------------------------------------- the table
def revision() -> str:
    """The commit, and whether the working tree differs from it."""
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "cl_lightning"], cwd=root, capture_output=True, text=True
        )
        return f"commit {head.stdout.strip()}" + (" plus uncommitted changes to cl_lightning/" if dirty.stdout else "")
    except OSError:
        return "an unknown commit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side and protocol (0: none)")
    parser.add_argument(
        "--protocols", nargs="+", default=[p.key for p in PROTOCOLS], choices=[p.key for p in PROTOCOLS]
    )
    parser.add_argument("--profile", action="store_true", help="also profile one naive DER-protocol run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/step_cost.md")
    parser.add_argument("--heading", default=None, help="put this run's figures under a heading of this text")
    parser.add_argument("--append", action="store_true", help="append this run to --out instead of rewriting it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    protocols = [p for p in PROTOCOLS if p.key in args.protocols]
    command = f"--repeats {args.repeats}"
    if len(protocols) < len(PROTOCOLS):
        command += " --protocols " + " ".join(p.key for p in protocols)
    command += " --profile" if args.profile else ""
    lines = [] if args.append else [
        "# Per-step cost: cl_lightning against a plain PyTorch loop of the same steps",
        "",
        "Split-MNIST class-IL, 5 tasks, 1 epoch per task. DER protocol: `experiment=der_split_mnist "
        "dataset.scenario=class_il` (MLP 784-100-100-10, SGD, batch 10, all logits trained; ER and DER++ with "
        "buffer 500 and replay batches of 10, the values of `conf/experiment_method/der_split_mnist/`). MLP 2x400: "
        "the protocol of `benchmarks/overhead.py` (lr 0.1, classes not yet seen masked). The plain loop gathers "
        "each batch by index, converts it to float, forwards, takes the masked cross-entropy, zero_grad, backward, "
        "SGD step; ER and DER++ keep a reservoir of 500 and draw their replay batches before inserting the current "
        "one, each forwarded on its own as cl_lightning does. cl_lightning's time is `train_seconds` (the sum of "
        "the per-task `trainer.fit` calls, evaluation excluded). The issue's bars are on the best of 2 (the "
        "minimum of each side's first two runs); the medians are the steadier figure on a shared machine.",
        "",
    ]  # fmt: skip
    if args.heading:
        lines += [f"## {args.heading}", ""]
        command += f" --heading '{args.heading}'" + (" --append" if args.append else "")
    lines += [
        f"torch {torch.__version__}, one intra-op thread on both sides (`torch.set_num_threads(1)`, `threads=1`), "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, shared with other jobs), Python "
        f"{platform.python_version()}, code at {revision()}. Produced by `benchmarks/step_cost.py {command}` on "
        f"{date.today().isoformat()}; runs alternate plain / bare Lightning (naive protocols) / cl_lightning, "
        f"{args.repeats} of each per protocol.",
        "",
    ]
    raw: list[str] = []
    verdicts: list[str] = []
    if args.repeats > 0:
        lines += [
            "| protocol | steps | plain median s | ours median s | ratio of medians | plain best of 2 s "
            "| ours best of 2 s | ratio, best of 2 | ours - plain per step (median) | bar (best of 2) "
            "| bare Lightning median s | bare / plain (medians) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        first = make_cfg(protocols[0], Path(tempfile.gettempdir()) / "unused", 0)
        dm = instantiate(first.dataset)
        dm.setup()
        for protocol in protocols:  # not timed: first imports and data loading, the allocator's first requests
            ours(protocol, 0)
        for protocol in protocols:
            cfg = make_cfg(protocol, Path(tempfile.gettempdir()) / "unused", 0)
            steps = sum(-(-len(t.train_y) // int(cfg.batch_size)) for t in dm.tasks)
            p_times, o_times, b_times = [], [], []
            floor = cfg.method._target_.endswith(".Naive")  # the bare Lightning run takes naive's steps only
            for r in range(args.repeats):
                p_times.append(plain(make_cfg(protocol, Path(tempfile.gettempdir()) / "unused", r), dm, r))
                if floor:
                    b_times.append(bare(cfg, dm, r))
                o_times.append(ours(protocol, r))
                print(f"{protocol.key} repeat {r}: plain {p_times[-1]:.2f}s  ours {o_times[-1]:.2f}s"
                      + (f"  bare Lightning {b_times[-1]:.2f}s" if floor else ""), flush=True)  # fmt: skip
            p, o = statistics.median(p_times), statistics.median(o_times)
            pb, ob = min(p_times[:2]), min(o_times[:2])
            per_step = (o - p) / steps * 1e3
            if protocol.bar is None:
                verdict = "-"
            else:
                verdict = f"<= {protocol.bar}: {'met' if ob / pb <= protocol.bar else 'NOT met'}"
                verdicts.append(f"{protocol.label}: ratio {ob / pb:.2f} (best of 2), {o / p:.2f} (medians), {verdict}")
            lines.append(
                f"| {protocol.label} | {steps} | {p:.2f} | {o:.2f} | {o / p:.2f} | {pb:.2f} | {ob:.2f} | "
                f"{ob / pb:.2f} | {per_step:.2f} ms | {verdict} | "
                + (f"{statistics.median(b_times):.2f} | {statistics.median(b_times) / p:.2f} |" if floor else "- | - |")
            )
            print(f"{protocol.key}: median plain {p:.2f}s ours {o:.2f}s ratio {o / p:.2f}; best of 2 ratio "
                  f"{ob / pb:.2f}; {per_step:.2f} ms/step more; bar {verdict}", flush=True)  # fmt: skip
            raw.append(
                f"- {protocol.key}: plain {[round(v, 2) for v in p_times]}, ours {[round(v, 2) for v in o_times]}"
                + (f", bare Lightning {[round(v, 2) for v in b_times]}" if floor else "")
            )
        lines += ["", "Raw times (s), in run order:", "", *raw, ""]
        print("bars:", *verdicts, sep="\n  ")
    if args.profile:
        lines += profile("###" if args.heading else "##")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    before = args.out.read_text().rstrip() + "\n\n" if args.append and args.out.exists() else ""
    args.out.write_text(before + "\n".join(lines).rstrip() + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
