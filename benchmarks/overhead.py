"""Lightning's cost: cl_lightning's training wall time against a hand-written PyTorch loop doing the same steps.

Protocol (issue "Core"): Split-MNIST class-IL, ``method=naive``, MLP 784-400-400-10, SGD (lr 0.1), one epoch per
task, batch 128 and batch 10. Both sides train on the same in-memory ``uint8`` tensors of the same
``TaskSequenceDataModule``, convert batches to float the same way, mask logits to the classes seen so far, and take
the same number of optimizer steps. cl_lightning's time is ``train_seconds`` of ``results.json``: the sum of the
``trainer.fit`` calls, one per task (so it includes Lightning's per-fit set-up), not evaluation.

Runs alternate (plain, lightning, plain, ...) ``--repeats`` times; the script prints every time, the medians and
the ratio of medians, and writes them to ``docs/results/overhead.md``. Threads: ``torch.set_num_threads(1)``.

Usage: ``CL_DATA_DIR=/path/with/MNIST python benchmarks/overhead.py [--repeats 5] [--batch-sizes 128 10]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cl_lightning.models.backbones import MLP
from cl_lightning.train import CONFIG_DIR, train

OVERRIDES = [
    "dataset=split_mnist", "method=naive", "model=mlp", "model.hidden=[400,400]", "optimizer=sgd",
    "optimizer.lr=0.1", "epochs_per_task=1", "logger=none", "save_checkpoints=false", "threads=1",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
]  # fmt: skip


def make_cfg(batch_size: int, out: Path, seed: int):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*OVERRIDES, f"batch_size={batch_size}", f"seed={seed}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def lightning_run(batch_size: int, seed: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        results = train(make_cfg(batch_size, Path(tmp) / "run", seed))
    return float(results["train_seconds"])


def plain_run(batch_size: int, seed: int, dm) -> float:
    """The same training written as a plain PyTorch loop."""
    torch.manual_seed(seed)
    net = MLP(dm.input_shape, dm.n_outputs, hidden=(400, 400))
    masks = torch.zeros(dm.n_tasks, dm.n_outputs, dtype=torch.bool)
    for t, outputs in enumerate(dm.task_outputs):
        masks[t, outputs] = True
    start = time.perf_counter()
    for t, task in enumerate(dm.tasks):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        seen = masks[: t + 1].any(0)
        gen = torch.Generator().manual_seed(seed * 100_003 + t)
        order = torch.randperm(len(task.train_y), generator=gen)
        for idx in order.split(batch_size):
            x = task.train_x[idx].float().div_(255.0)
            y = task.train_y[idx]
            logits = net(x).masked_fill(~seen, float("-inf"))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 10])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/overhead.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from hydra.utils import instantiate

    dm = instantiate(make_cfg(128, Path(tempfile.gettempdir()) / "unused", 0).dataset)
    dm.setup()
    lines = [
        "# Lightning overhead: cl_lightning vs a plain PyTorch loop",
        "",
        "Split-MNIST class-IL, `method=naive`, MLP 784-400-400-10, SGD lr 0.1, 1 epoch per task, 5 tasks.",
        f"torch {torch.__version__}, 1 intra-op thread (`torch.set_num_threads(1)`), "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}. Produced by `benchmarks/overhead.py "
        f"--repeats {args.repeats}`; runs alternate plain / cl_lightning.",
        "",
        "| batch | steps | plain PyTorch median s | cl_lightning median s | ratio | bar |",
        "|---|---|---|---|---|---|",
    ]
    raw: list[str] = []
    for bs in args.batch_sizes:
        steps = sum(-(-len(t.train_y) // bs) for t in dm.tasks)
        plain, light = [], []
        for r in range(args.repeats):
            plain.append(plain_run(bs, r, dm))
            light.append(lightning_run(bs, r))
            print(f"batch {bs} repeat {r}: plain {plain[-1]:.2f}s  cl_lightning {light[-1]:.2f}s", flush=True)
        p, q = statistics.median(plain), statistics.median(light)
        bar = 1.3 if bs >= 128 else 2.0
        verdict = "met" if q / p <= bar else "NOT met"
        print(f"batch {bs}: {steps} steps, median plain {p:.2f}s, cl_lightning {q:.2f}s, ratio {q / p:.2f}")
        lines.append(f"| {bs} | {steps} | {p:.2f} | {q:.2f} | {q / p:.2f} | <= {bar} {verdict} |")
        raw.append(f"- batch {bs}: plain {[round(v, 2) for v in plain]}, cl_lightning {[round(v, 2) for v in light]}")
    lines += ["", "Raw times (s), in run order:", "", *raw]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
