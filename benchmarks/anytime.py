"""Anytime accuracy on an online stream: what it costs, and what blur does to it.

Protocol: Split-MNIST class-IL as one online stream (``dataset.stream=online``), MLP 784-100-100-10, SGD lr 0.1,
batch 10, ER (reservoir, buffer 500, 10 replayed per step), seed 0, one thread. Runs:

- ``blur=0``, no periodic evaluation (the training time it is compared with);
- ``blur=0`` and ``blur=0.5`` with ``eval_every_n_steps=--every`` on ``eval_max_samples_per_task=--samples`` test
  images per task.

For each: ``train_seconds`` (periodic evaluation runs inside the fit, so it is counted there), the evaluation's
share of it, ``avg_anytime_acc``, and the highest accuracy any task reaches at an evaluation before its nominal
start (after the first task's end: before that the untrained head's random logits win on some inputs). Medians over
``--repeats`` alternating runs. Writes ``docs/results/anytime.md``.

Usage: ``CL_DATA_DIR=/path/with/MNIST python benchmarks/anytime.py [--repeats 3] [--every 50] [--samples 200]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from datetime import date
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cl_lightning.train import CONFIG_DIR, train

BASE = [
    "dataset=split_mnist", "dataset.stream=online", "epochs_per_task=1", "model=mlp", "model.hidden=[100,100]",
    "optimizer=sgd", "optimizer.lr=0.1", "batch_size=10", "method=er", "method.buffer_size=500",
    "method.replay_batch_size=10", "logger=none", "save_checkpoints=false", "threads=1",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "seed=0",
]  # fmt: skip


def run(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, *overrides])
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(tmp) / "run")
        return dict(train(cfg))


def early_max(results: dict) -> float:
    """The highest accuracy a task has at an evaluation before its nominal start (after the first task's end)."""
    starts = results["task_start_step"]
    steps, rows = results["anytime"]["step"], results["anytime"]["acc_matrix"]
    pairs = zip(steps, rows, strict=True)
    early = [row[t] for step, row in pairs for t in range(len(starts)) if starts[1] <= step < starts[t]]
    return max(early, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/anytime.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    evaluated = [f"eval_every_n_steps={args.every}", f"eval_max_samples_per_task={args.samples}"]
    settings = {
        "blur 0, no periodic evaluation": ["dataset.blur=0.0"],
        f"blur 0, every {args.every} steps": ["dataset.blur=0.0", *evaluated],
        f"blur 0.5, every {args.every} steps": ["dataset.blur=0.5", *evaluated],
    }
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    run(["dataset.max_samples_per_task=200"])  # warm-up, not timed: imports, the first MNIST load
    for r in range(args.repeats):
        for name, overrides in settings.items():
            runs[name].append(run(overrides))
            print(f"repeat {r} {name}: {runs[name][-1]['train_seconds']:.2f} s", flush=True)
    base = statistics.median(float(x["train_seconds"]) for x in runs["blur 0, no periodic evaluation"])
    lines = [
        "# Anytime accuracy on an online stream: cost and blur",
        "",
        f"Split-MNIST class-IL as one online stream, MLP 784-100-100-10, SGD lr 0.1, batch 10, ER (buffer 500, 10 "
        f"replayed per step), seed 0, one thread; periodic evaluation every {args.every} steps on the first "
        f"{args.samples} test images of each task. Produced by `benchmarks/anytime.py --repeats {args.repeats} "
        f"--every {args.every} --samples {args.samples}` on {date.today().isoformat()}; medians of {args.repeats} "
        "alternating runs. Training time includes the periodic evaluation (it runs inside the fit); its share is "
        'the difference to the run without it. "Before its start": the highest accuracy of a task at an '
        "evaluation before its nominal start, after the first task's end.",
        "",
        "| setting | median train s | evaluation's share | avg_anytime_acc | final avg_acc "
        "| best accuracy before its start |",
        "|---|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        secs = statistics.median(float(x["train_seconds"]) for x in results)
        share = f"{(secs - base) / secs:.0%}" if "every" in name else "-"
        anytime = f"{statistics.median(x['avg_anytime_acc'] for x in results):.4f}" if "every" in name else "-"
        final = statistics.median(x["avg_acc"] for x in results)
        before = f"{statistics.median(early_max(x) for x in results):.4f}" if "every" in name else "-"
        lines.append(f"| {name} | {secs:.2f} | {share} | {anytime} | {final:.4f} | {before} |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
