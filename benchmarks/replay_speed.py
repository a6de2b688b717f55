"""What replay costs: training wall time of the replay methods relative to ``naive`` on the same protocol.

Protocol (issue "Replay methods"): Split-MNIST class-IL (5 tasks), MLP 784-100-100-10 (Buzzega et al. 2020), SGD
lr 0.03, batch 10 and 32, a fixed number of optimizer steps per task (``--steps``), buffer 500, one intra-op
thread. ``--hidden``, ``--lr`` and ``--epochs`` (passes per task instead of ``--steps``) change the protocol, e.g.
P1 (issue "One shape for every method"): ``--hidden 400 400 --lr 0.01 --epochs 1 --batch-sizes 32``. Every
method replays ``--replay-batch-size`` samples per step (default: the batch size, as Mammoth's
seq-mnist ER and DER++ do); GEM uses each past task's whole memory (100 samples per task), as the paper and
Mammoth do; ``der:128`` and ``agem:128`` rows replay 128 (the config defaults). The time is ``train_seconds`` of
``results.json`` (the sum of the ``trainer.fit`` calls, task-end selection included, not evaluation). Runs
alternate (naive, er, der, ..., naive, er, ...) ``--repeats`` times; the script prints every time, the medians
and the ratios of medians to naive's, and writes them to ``docs/results/replay_speed.md``.

``--flops`` counts each method's training FLOPs once (an extra, untimed run under
``torch.utils.flop_counter.FlopCounterMode``: matrix products of every step, replay and task-end pass): the ratio to
naive's is what the method computes, the floor its time ratio approaches where the arithmetic dominates.

``--profile`` also runs each replay method once under ``cProfile`` and records the five functions with the most
own time (``tottime``), to check that buffer insertion and sampling are not among them.

``--methods`` times a subset (``naive`` is always added: ratios are taken against it within the same run; ``ewc``,
with P1's lambda 100, and other non-replay methods can be added); with
``--out`` the table goes to another file, e.g. to merge a subset's rows into the results by hand.

Usage: ``CL_DATA_DIR=/path/with/MNIST python benchmarks/replay_speed.py [--repeats 3] [--steps 500 | --epochs 1]
[--hidden 100 100] [--lr 0.03] [--batch-sizes 10 32] [--methods naive gem] [--flops] [--profile] [--out FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import statistics
import tempfile
from datetime import date
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cl_lightning.train import CONFIG_DIR, train

BASE = [
    "dataset=split_mnist", "model=mlp", "optimizer=sgd", "logger=none", "save_checkpoints=false", "threads=1",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
]  # fmt: skip
# "name:n" replays n samples per step instead of --replay-batch-size (der:128 and agem:128 are Mammoth's seq-mnist
# values, the defaults of conf/method/der.yaml and agem.yaml; gem:50 uses 50 of each past task's 100 memories)
METHODS = ["naive", "er", "der", "derpp", "agem", "gem", "der:128", "agem:128", "gem:50"]
BARS = {"er": 2.2, "der": 2.2, "derpp": 2.2, "agem": 2.5, "gem": 4.0}
BUFFER_CODE = ("(buffer.py:",)


REPLAY = ("er", "der", "derpp", "agem", "gem", "icarl", "xder", "bic", "lucir")


def method_overrides(spec: str, replay_batch_size: int) -> list[str]:
    method, _, replay = spec.partition(":")
    if method == "ewc":  # P1's EWC: lambda 100, the exact Fisher (the default)
        return ["method=ewc", "method.lambda_=100"]
    if method not in REPLAY:
        return [f"method={method}"]
    overrides = [f"method={method}", "method.buffer_size=500"]
    if method == "lucir":  # LUCIR's cosine classifier on the benchmark's MLP
        overrides.append("+model.head=cosine")
    if method != "gem" or replay:  # GEM: each past task's whole memory (the paper) unless gem:n
        overrides.append(f"method.replay_batch_size={replay or replay_batch_size}")
    return overrides


def make_cfg(method: str, args: argparse.Namespace, out: Path, seed: int):
    overrides = [
        *BASE,
        *method_overrides(method, args.replay_batch_size),
        f"model.hidden=[{','.join(map(str, args.hidden))}]",
        f"optimizer.lr={args.lr}",
        f"batch_size={args.batch_size}",
        f"steps_per_task={'null' if args.epochs else args.steps}",
        f"epochs_per_task={args.epochs or 1}",
        f"seed={seed}",
    ]
    return compose_run(overrides, out)


def compose_run(overrides: list[str], out: Path):
    """``conf/train.yaml`` composed with ``overrides``, writing into ``out``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def run(method: str, args: argparse.Namespace, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        return train(make_cfg(method, args, Path(tmp) / "run", seed))


def training_flops(method: str, args: argparse.Namespace) -> float:
    """Matrix FLOPs of one run's training (every ``trainer.fit``: steps, replay and task-end passes; evaluation is
    ``trainer.test`` and not counted), by ``torch.utils.flop_counter.FlopCounterMode`` around each fit."""
    import lightning.pytorch as pl
    from torch.utils.flop_counter import FlopCounterMode

    total = [0.0]
    fit = pl.Trainer.fit

    def counted(self: pl.Trainer, *a: object, **k: object) -> None:
        with FlopCounterMode(display=False) as counter:
            fit(self, *a, **k)  # type: ignore[arg-type]
        total[0] += counter.get_total_flops()

    pl.Trainer.fit = counted  # type: ignore[method-assign]
    try:
        run(method, args, 0)
    finally:
        pl.Trainer.fit = fit  # type: ignore[method-assign]
    return total[0]


def profile_top(method: str, args: argparse.Namespace, n: int = 5) -> list[str]:
    profiler = cProfile.Profile()
    profiler.enable()
    run(method, args, 0)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    top = []
    for (file, line, func), (_, ncalls, tottime, _, _) in rows[:n]:
        where = f"{Path(file).name}:{line}" if line else file
        top.append(f"`{func}` ({where}): {tottime:.2f} s own time, {ncalls} calls")
    return top


def measure(args: argparse.Namespace, methods: list[str]) -> list[str]:
    """Alternating timed runs at ``args.batch_size``; the markdown table of medians and ratios."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    accs: dict[str, list[float]] = {m: [] for m in methods}
    warm_up = argparse.Namespace(**{**vars(args), "steps": 20, "epochs": None})
    for m in methods:  # not timed: first imports, first MNIST load, the allocator's first requests
        run(m, warm_up, 0)
    for r in range(args.repeats):
        for m in methods:
            results = run(m, args, r)
            times[m].append(float(results["train_seconds"]))
            accs[m].append(float(results["avg_acc"]))
            print(f"batch {args.batch_size} repeat {r} {m}: {times[m][-1]:.2f}s train, avg_acc {accs[m][-1]:.3f}")
    base = statistics.median(times["naive"])
    flops = {m: training_flops(m, args) for m in methods} if args.flops else {}
    lines = [
        f"## Batch {args.batch_size}, replay batch {args.replay_batch_size}",
        "",
        "| method | median train s | ratio to naive | bar | avg_acc (median) |"
        + (" training GFLOP | FLOPs ratio to naive |" if flops else ""),
        "|---|---|---|---|---|" + ("---|---|" if flops else ""),
    ]
    for m in methods:
        med = statistics.median(times[m])
        ratio = med / base
        bar = BARS.get(m.partition(":")[0])
        verdict = "" if bar is None else f"<= {bar} {'met' if ratio <= bar else 'NOT met'}"
        counted = f" {flops[m] / 1e9:.1f} | {flops[m] / flops['naive']:.2f} |" if flops else ""
        lines.append(f"| `{m}` | {med:.2f} | {ratio:.2f} | {verdict} | {statistics.median(accs[m]):.3f} |{counted}")
        print(f"batch {args.batch_size} {m}: median {med:.2f}s, ratio {ratio:.2f} {verdict}", flush=True)
    raw = "; ".join(f"{m} {[round(t, 2) for t in times[m]]}" for m in methods)
    return [*lines, "", f"Raw train times (s): {raw}", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per task")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task instead of --steps")
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100], help="hidden widths of the MLP")
    parser.add_argument("--lr", type=float, default=0.03, help="SGD learning rate")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--replay-batch-size", type=int, default=None, help="default: the batch size")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--bar", nargs="+", default=[], metavar="METHOD=RATIO", help="override a bar, e.g. gem=3.0")
    parser.add_argument("--profile", action="store_true", help="profile each method once at the first batch size")
    parser.add_argument(
        "--flops", action="store_true", help="count each method's training FLOPs once (an extra, untimed run)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/replay_speed.md"
    )
    args = parser.parse_args()
    BARS.update({m: float(r) for m, _, r in (spec.partition("=") for spec in args.bar)})
    torch.set_num_threads(1)
    methods = ["naive", *[m for m in args.methods if m != "naive"]]
    command = [f"--repeats {args.repeats}", f"--epochs {args.epochs}" if args.epochs else f"--steps {args.steps}"]
    command += ["--hidden " + " ".join(map(str, args.hidden)), f"--lr {args.lr}"]
    command.append("--batch-sizes " + " ".join(map(str, args.batch_sizes)))
    if args.replay_batch_size is not None:
        command.append(f"--replay-batch-size {args.replay_batch_size}")
    if methods != METHODS:
        command.append("--methods " + " ".join(methods))
    if args.bar:
        command.append("--bar " + " ".join(args.bar))
    if args.profile:
        command.append("--profile")
    if args.flops:
        command.append("--flops")
    lines = [
        "# Replay methods: training time relative to naive fine-tuning",
        "",
        f"Split-MNIST class-IL, 5 tasks, MLP 784-{'-'.join(map(str, args.hidden))}-10, SGD lr {args.lr}, "
        f"{f'{args.epochs} epoch(s)' if args.epochs else f'{args.steps} optimizer steps'} per task, buffer 500; "
        "every method replays as many samples per step as the batch holds (GEM: each past task's whole "
        "memory, 100 samples, as in the paper); a `name:n` row replays n samples (Mammoth's seq-mnist value, the "
        "default of conf/method/der.yaml and agem.yaml; `gem:50`: 50 of each past task's memories, drawn anew every "
        "step, with `method.replay_batch_size=50`). Time is `train_seconds` (all `trainer.fit` calls, "
        "task-end selection included, evaluation excluded). The bars apply to the rows with the common replay batch.",
        f"torch {torch.__version__}, 1 intra-op thread, {os.cpu_count()} CPUs (shared with other jobs), Python "
        f"{platform.python_version()}. Produced by `benchmarks/replay_speed.py {' '.join(command)}` on "
        f"{date.today().isoformat()}; runs alternate between methods; medians of {args.repeats} runs.",
        "",
    ]
    for batch_size in args.batch_sizes:
        run_args = argparse.Namespace(**vars(args))
        run_args.batch_size = batch_size
        run_args.replay_batch_size = args.replay_batch_size or batch_size
        lines += measure(run_args, methods)
    if args.profile:
        run_args = argparse.Namespace(**vars(args))
        run_args.batch_size = args.batch_sizes[0]
        run_args.replay_batch_size = args.replay_batch_size or run_args.batch_size
        lines += [
            f"## Profile (cProfile, batch {run_args.batch_size}, one run each, top five by own time)",
            "",
            "Own time (`tottime`) of each function; C functions (`~`) are listed on their own. The check asks whether "
            "a function of `cl_lightning/core/buffer.py` (insertion, sampling) is among the five.",
            "",
        ]
        for m in methods:
            if m == "naive" or ":" in m:
                continue
            top = profile_top(m, run_args)
            buffer_in_top = any(code in row for row in top for code in BUFFER_CODE)
            lines.append(f"**{m}** (buffer insertion/sampling in the top five: {'YES' if buffer_in_top else 'no'}):")
            lines.append("")
            lines += [f"{i}. {row}" for i, row in enumerate(top, start=1)]
            lines.append("")
            print(f"{m} profile top five:", *top, sep="\n  ")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
