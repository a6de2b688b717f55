"""Training throughput on CIFAR-shaped data (issue 14): cl_lightning against a plain PyTorch loop, on a GPU or the CPU.

The DER paper's Split CIFAR-10 setting (``experiment=der_split_cifar10``: SGD, batch 32, random crop and flip,
CIFAR-10's normalisation, every logit trained; DER++ with Mammoth's seq-cifar10 values, buffer 500, two replay
batches of 32) on random ``uint8`` images of CIFAR-10's shape (3 x 32 x 32, 10 classes; no data needed), for
``naive`` and ``derpp``, with the reduced ResNet-18 (``model=resnet18_reduced``, nf 20) and the full one
(``model=resnet18``, nf 64). Sides, each over the same number of steps on the first task:

- **plain**: a hand-written loop over the same tensors, kept on the device: gather a batch by index, the
  datamodule's own preprocessing (scale, crop and flip, normalise: the same arithmetic on both sides), forward,
  cross-entropy, ``zero_grad``, backward, SGD step; DER++ with a reservoir buffer on the device, both replay
  batches drawn before the current batch is inserted and forwarded on their own, as cl_lightning does;
- **plain compiled**: the same loop with the network compiled (``nn.Module.compile``);
- **ours**: ``train()`` on the composed config (``max_tasks=1``, ``steps_per_task``), ``trainer.accelerator`` set
  to the device;
- **ours compiled**: the same with ``compile=true``.

Throughput is the current batch's images per second (replayed images are extra work of the method, not counted)
over the steps after the first ``--warmup`` of the run (compilation, cuDNN's autotuning and allocations fall in
those), timed from the start of the first timed step to the end of the last one with the device synchronised at
both ends only, so that the CPU may run ahead of the GPU as it would. On our side a callback takes these two
timestamps at Lightning's batch-start and batch-end hooks, so every piece of Lightning's and our loop between
steps is inside the window. Runs alternate (plain, plain compiled, ours, ours compiled) ``--repeats`` times; the
table gives medians. On the CPU: ``--threads`` intra-op threads on every side (default 1).

Bars (issue 14): with the reduced ResNet-18, ours naive at most 1.2x the plain loop's time per step and ours DER++
at most 3.3x the plain *naive* loop's (its three forward passes per step; the ratio to the plain DER++ loop is
given too); on a GPU, ours naive at least 0.67x the images per second of the plain compiled loop on the full
ResNet-18.

Usage: ``python benchmarks/gpu.py [--device cuda] [--steps 60] [--warmup 10] [--repeats 3] [--models reduced full]
[--methods naive derpp] [--no-compile] [--out docs/results/gpu.md]``; ``--tiny`` is the CI setting (a few steps of
batch 8, compiled sides with ``--compile-backend aot_eager``, which traces without generating code).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from replay_speed import compose_run
from step_cost import Reservoir, revision

from cl_lightning.build import build_model
from cl_lightning.data.files import SourceData
from cl_lightning.train import train

MODELS = {"reduced": "resnet18_reduced", "full": "resnet18"}
SIDES = ("plain", "plain compiled", "ours", "ours compiled")
BARS = {  # (model, method) -> (what is compared, bar)
    ("reduced", "naive"): ("ours / plain naive, s per step", 1.2),
    ("reduced", "derpp"): ("ours / plain naive, s per step", 3.3),
}
GPU_BAR = 0.67  # full ResNet-18, naive: ours' images/s over the plain compiled loop's, on a GPU


def cifar_shaped(
    data_dir: object = None, download: bool = False, seed: int = 0, per_class: int = 200, test_per_class: int = 20
) -> SourceData:
    """Random ``uint8`` images of CIFAR-10's shape, 10 classes told apart by a colour offset (a source for
    ``dataset.source._target_``; ``data_dir`` and ``download``, which the dataset's node passes, have no files to
    point at)."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for n in (per_class, test_per_class):
        y = torch.arange(10).repeat_interleave(n)
        tint = (y.view(-1, 1, 1, 1) * 20).expand(-1, 3, 32, 32)
        noise = torch.randint(0, 56, (len(y), 3, 32, 32), generator=gen)
        xs.append((tint + noise).to(torch.uint8))
        ys.append(y)
    return SourceData("cifar_shaped", xs[0], ys[0], xs[1], ys[1], 10, tuple(str(c) for c in range(10)))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Wall time from the start of training batch ``warmup`` to the end of batch ``last``, the device synchronised
    at both ends only."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last = warmup, last
        self.start: float | None = None
        self.seconds: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:  # fmt: skip
        if idx == self.last and self.start is not None:
            synchronize(pl_module.device)
            self.seconds = time.perf_counter() - self.start


@dataclass
class Setting:
    model: str
    method: str
    args: argparse.Namespace

    def overrides(self, out_of_band: list[str] | None = None) -> list[str]:
        a = self.args
        return [
            "experiment=der_split_cifar10", f"method={self.method}", f"model={MODELS[self.model]}",
            f"dataset.source._target_={__name__}.cifar_shaped",
            "dataset.name=cifar_shaped", f"batch_size={a.batch_size}",
            f"steps_per_task={a.steps}", "max_tasks=1", "logger=none", "save_checkpoints=false",
            "trainer.enable_progress_bar=false", f"trainer.accelerator={a.device}", f"threads={a.threads}",
            f"method.replay_batch_size={a.batch_size}" if self.method == "derpp" else "",
            *(out_of_band or []),
        ]  # fmt: skip


def ours(setting: Setting, compiled: bool, seed: int) -> float:
    """Seconds of the timed steps of ``train()`` on the setting's config."""
    a = setting.args
    extra = [f"+callbacks.timer._target_={__name__}.StepTimer", f"+callbacks.timer.warmup={a.warmup}",
             f"+callbacks.timer.last={a.steps - 1}", f"seed={seed}"]  # fmt: skip
    if compiled:
        extra.append(f"compile={a.compile_backend}")
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        cfg = compose_run([o for o in setting.overrides(extra) if o], Path(tmp) / "run")
        run = train(cfg)
    timer = next(c for c in run.trainer.callbacks if isinstance(c, StepTimer))
    assert timer.seconds is not None, "the timed steps ran"
    return timer.seconds


def plain(setting: Setting, compiled: bool, seed: int) -> float:
    """Seconds of the timed steps of the setting written as a plain PyTorch loop."""
    a = setting.args
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run([o for o in setting.overrides([f"seed={seed}"]) if o], Path(tmp) / "run")
    dm = instantiate(cfg.dataset)
    dm.setup("fit")
    torch.manual_seed(seed)
    net = build_model(cfg, dm).to(device)
    if compiled:
        net.compile(backend=a.compile_backend)
    opt = torch.optim.SGD(net.parameters(), lr=float(cfg.optimizer.lr))
    task = dm.tasks[0]
    x_all, y_all = task.train_x.to(device), task.train_y.to(device)
    derpp = setting.method == "derpp"
    buffer = Reservoir(int(cfg.method.buffer_size), x_all, dm.n_outputs, seed, device) if derpp else None
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(len(y_all), generator=gen) for _ in range(a.steps * a.batch_size // len(y_all) + 1)]
    )
    start = 0.0
    for step in range(a.steps):
        if step == a.warmup:
            synchronize(device)
            start = time.perf_counter()
        idx = order[step * a.batch_size : (step + 1) * a.batch_size].to(device)
        x_raw, y = x_all[idx], y_all[idx]
        logits = net(dm.preprocess(x_raw, train=True))
        loss = F.cross_entropy(logits, y)
        if buffer is not None:
            if buffer.seen:
                xa, _, za = buffer.sample(int(cfg.method.replay_batch_size))
                loss = loss + float(cfg.method.alpha) * F.mse_loss(net(dm.preprocess(xa, train=True)), za)
                xb, yb, _ = buffer.sample(int(cfg.method.replay_batch_size))
                loss = loss + float(cfg.method.beta) * F.cross_entropy(net(dm.preprocess(xb, train=True)), yb)
            buffer.add(x_raw, y, logits.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Row:
    setting: Setting
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, side: str) -> float | None:
        runs = self.seconds.get(side)
        return statistics.median(runs) if runs else None

    def images_per_s(self, side: str) -> float | None:
        s = self.median(side)
        a = self.setting.args
        return None if s is None else (a.steps - a.warmup) * a.batch_size / s


def measure(setting: Setting, repeats: int, sides: tuple[str, ...]) -> Row:
    row = Row(setting)
    runners = {
        "plain": lambda s: plain(setting, False, s), "plain compiled": lambda s: plain(setting, True, s),
        "ours": lambda s: ours(setting, False, s), "ours compiled": lambda s: ours(setting, True, s),
    }  # fmt: skip
    for r in range(repeats):
        for side in sides:
            seconds = runners[side](r)
            row.seconds.setdefault(side, []).append(seconds)
            print(f"{setting.model:8s} {setting.method:6s} {side:15s} repeat {r}: {seconds:.3f} s", flush=True)
    return row


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def markdown(rows: list[Row], args: argparse.Namespace, device_name: str) -> list[str]:
    lines = [
        "| model | method | plain img/s | plain compiled img/s | ours img/s | ours compiled img/s | ours / plain "
        "(time) | ours compiled / plain compiled (time) | ours / plain naive (time) | bar |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    naive_plain = {r.setting.model: r.median("plain") for r in rows if r.setting.method == "naive"}
    for row in rows:
        s = row.setting
        own = ratio(row.median("ours"), row.median("plain"))
        own_c = ratio(row.median("ours compiled"), row.median("plain compiled"))
        vs_naive = ratio(row.median("ours"), naive_plain.get(s.model))
        bar = ""
        if (s.model, s.method) in BARS:
            limit = BARS[(s.model, s.method)][1]
            bar = f"<= {limit}: {'met' if vs_naive is not None and vs_naive <= limit else 'not met'}"
        if (s.model, s.method) == ("full", "naive") and args.device == "cuda":
            share = ratio(row.images_per_s("ours"), row.images_per_s("plain compiled"))
            verdict = "met" if share is not None and share >= GPU_BAR else "not met"
            bar = f"ours >= {GPU_BAR} x plain compiled img/s: {fmt(share)}, {verdict}"
        lines.append(
            f"| {s.model} | {s.method} | {fmt(row.images_per_s('plain'), 1)} "
            f"| {fmt(row.images_per_s('plain compiled'), 1)} | {fmt(row.images_per_s('ours'), 1)} "
            f"| {fmt(row.images_per_s('ours compiled'), 1)} | {fmt(own)} "
            f"| {fmt(own_c)} | {fmt(vs_naive)} | {bar} |"
        )
    lines += ["", "Raw seconds of the timed steps, in run order:", ""]
    for row in rows:
        parts = "; ".join(f"{side} {[round(v, 3) for v in vals]}" for side, vals in row.seconds.items())
        lines.append(f"- {row.setting.model} {row.setting.method}: {parts}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=60, help="steps per run (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads on the CPU, every side")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["naive", "derpp"], choices=["naive", "derpp"])
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled sides")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--tiny", action="store_true", help="CI: 4 steps of batch 8, 1 warm-up, 1 repeat, aot_eager")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/gpu.md")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.batch_size, args.repeats, args.compile_backend = 4, 1, 8, 1, "aot_eager"
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup}: must be >= 0 and below --steps {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    device_name = (
        torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    sides = SIDES if not args.no_compile else ("plain", "ours")
    rows = [
        measure(Setting(model, method, args), args.repeats, sides) for model in args.models for method in args.methods
    ]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    threads = "" if args.device == "cuda" else f", {args.threads} intra-op thread(s) on every side"
    compiled = "no compiled sides" if args.no_compile else f"compiled sides: backend {args.compile_backend}"
    head = [
        "# Training throughput on CIFAR-shaped data: cl_lightning against a plain PyTorch loop",
        "",
        f"Measured {when} on {device_name}{threads}; torch {torch.__version__}, Lightning {pl.__version__}, "
        f"Python {platform.python_version()}; cl_lightning at {revision()}. Produced by `python benchmarks/gpu.py "
        f"--device {args.device} --steps {args.steps} --warmup {args.warmup} --batch-size {args.batch_size} "
        f"--repeats {args.repeats}{' --tiny' if args.tiny else ''}`; {compiled}.",
        "",
        f"`experiment=der_split_cifar10` (SGD, crop and flip, every logit trained; DER++: buffer 500, alpha 0.2, beta "
        f"0.5, two replay batches of {args.batch_size}) on random CIFAR-shaped images, first task, {args.steps} steps "
        f"of batch {args.batch_size}, the first {args.warmup} untimed; images/s count the current batch only; medians "
        f"of {args.repeats} alternating runs. The reduced ResNet-18 has nf 20, the full one nf 64.",
        "",
    ]
    lines = head + markdown(rows, args, device_name) + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
