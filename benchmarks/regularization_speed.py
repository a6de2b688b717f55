"""Cost of the regularization methods: training wall time relative to ``naive`` on the same protocol.

Protocol: Split-MNIST (5 tasks), van de Ven & Tolias's setting (``experiment=vdv_split_mnist``: MLP 784-400-400-10,
Adam lr 1e-3, batch 128) shortened to ``--steps`` optimizer steps per task, each method with its default
configuration (``conf/method/<name>.yaml``), one intra-op thread, no logger, no checkpoints, CPU. The time is
``train_seconds`` of ``results.json``: the sum of the ``trainer.fit`` calls (so it includes every task-end
computation: Fisher, MAS importance, the teacher copy), not evaluation.

Each repeat runs ``naive`` and then every method, so the runs alternate and drift in the machine's speed hits all of
them alike; the script prints every time, the medians and the ratio of medians to ``naive``, and writes them to
``docs/results/regularization_speed.md``. Timing uses ``time.perf_counter`` (inside ``train``).

The bars (EWC, online EWC, SI, MAS at most 1.3x naive; LwF at most 1.7x) are set on task-IL. In class-IL the exact
Fisher takes one gradient per sample and *seen class* (2 to 10 here), so EWC's task-end cost grows with the classes;
``--scenarios task_il class_il`` measures both.

Usage: ``CL_DATA_DIR=/path/with/MNIST python benchmarks/regularization_speed.py [--repeats 3] [--steps 300]
[--scenarios task_il class_il]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cl_lightning.train import CONFIG_DIR, train

BARS = {"ewc": 1.3, "online_ewc": 1.3, "si": 1.3, "mas": 1.3, "lwf": 1.7}
OVERRIDES = [
    "experiment=vdv_split_mnist", "logger=none", "save_checkpoints=false", "threads=1",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
]  # fmt: skip


def run(spec: str, steps: int, scenario: str, seed: int) -> float:
    """``train_seconds`` of one run of ``spec``: a method name, optionally ``:``-followed by comma-separated
    overrides (``ewc:method.fisher=sampled``)."""
    method, _, extra = spec.partition(":")
    overrides = [*OVERRIDES, f"method={method}", f"steps_per_task={steps}", f"dataset.scenario={scenario}"]
    overrides += [o for o in extra.split(",") if o]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"seed={seed}"])
    with tempfile.TemporaryDirectory() as tmp:
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(tmp) / "run")
        results = train(cfg)
    return float(results["train_seconds"])


def measure(scenario: str, methods: list[str], repeats: int, steps: int) -> tuple[list[str], dict[str, list[float]]]:
    """Alternate naive and every method ``repeats`` times; return the markdown section and the raw times."""
    names = ["naive", *methods]
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(repeats):
        for m in names:
            times[m].append(run(m, steps, scenario, seed=r))
            print(f"{scenario} repeat {r} {m}: {times[m][-1]:.2f}s", flush=True)
    base = statistics.median(times["naive"])
    n_tasks = 5
    lines = [
        f"## Split-MNIST {scenario}",
        "",
        "| method | median train s | per task s | ratio to naive | bar | |",
        "|---|---|---|---|---|---|",
        f"| naive | {base:.2f} | {base / n_tasks:.2f} | 1.00 | | |",
    ]
    for m in methods:
        med = statistics.median(times[m])
        bar = BARS.get(m.partition(":")[0])
        verdict = "" if bar is None else ("met" if med / base <= bar else "NOT met")
        print(f"{scenario} {m}: median {med:.2f}s vs naive {base:.2f}s, ratio {med / base:.2f}")
        lines.append(
            f"| `{m}` | {med:.2f} | {med / n_tasks:.2f} | {med / base:.2f} | "
            f"{'' if bar is None else f'<= {bar}'} | {verdict} |"
        )
    lines += ["", "Raw train seconds per repeat:", ""]
    lines += [f"- {m}: {[round(v, 2) for v in times[m]]}" for m in names]
    return [*lines, ""], times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per task")
    parser.add_argument(
        "--scenarios", nargs="+", default=["task_il"], choices=["task_il", "class_il", "domain_il"],
        help="the bars are set on task_il; class_il shows the exact Fisher's cost growing with the classes seen",
    )  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", default=list(BARS), help="names, or name:override,... (e.g. ewc:method.fisher=sampled)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/results/regularization_speed.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "# Regularization methods: training time relative to naive",
        "",
        f"Split-MNIST (5 tasks), `experiment=vdv_split_mnist` (MLP 784-400-400-10, Adam lr 1e-3, batch 128), "
        f"{args.steps} steps per task, each method's default config (`conf/method/<name>.yaml`). "
        f"torch {torch.__version__}, 1 intra-op thread, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        f"Produced by `benchmarks/regularization_speed.py --repeats {args.repeats} --steps {args.steps} --scenarios "
        f"{' '.join(args.scenarios)} --methods {' '.join(args.methods)}`; each repeat runs naive then every method. "
        "Time: `train_seconds` (all "
        "`trainer.fit` calls, task-end computations included, evaluation excluded); medians over repeats.",
        "",
        "The bars (EWC, online EWC, SI, MAS <= 1.3x naive, LwF <= 1.7x) are set on task-IL. In class-IL the exact "
        "Fisher takes one per-sample gradient per *seen class* (2, 4, ..., 10 here) instead of 2, so EWC's task-end "
        "cost grows with the classes; `method.fisher=sampled` (one gradient per sample) or a smaller "
        "`method.fisher_samples` brings it back.",
        "",
    ]
    for scenario in args.scenarios:
        section, _ = measure(scenario, args.methods, args.repeats, args.steps)
        lines += section
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
