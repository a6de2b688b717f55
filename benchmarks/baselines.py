"""The floor and the ceiling on Split-MNIST class-IL: ``naive`` and ``joint`` over seeds.

Protocol (van de Ven & Tolias 2019, ``experiment=vdv_split_mnist``): MLP 784-400-400-10, Adam lr 1e-3, batch 128,
2000 optimizer steps per task. Runs the sweep through the command line users type (``python -m cl_lightning -m
...``), then writes the sweep's summary table, with the protocol and the accuracy matrices, to
``docs/results/baselines.md``. Threads: ``threads=1`` per run (runs are sequential).

Usage: ``CL_DATA_DIR=/path/with/MNIST python benchmarks/baselines.py [--seeds 0 1 2] [--scenario class_il]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenario", default="class_il")
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/baselines.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "cl_lightning", "-m", "experiment=vdv_split_mnist", "method=naive,joint",
            f"seed={','.join(map(str, args.seeds))}", f"dataset.scenario={args.scenario}", "threads=1",
            "logger=none", "save_checkpoints=false",
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "CL_OUTPUT_DIR": tmp}, cwd=tmp)
        wall = time.perf_counter() - start
        (summary,) = Path(tmp).glob("*/*/summary.md")
        runs = sorted(summary.parent.glob("*/results.json"))
        lines = [
            f"# naive and joint on Split-MNIST ({args.scenario})",
            "",
            "Protocol: `experiment=vdv_split_mnist` (van de Ven & Tolias 2019): MLP 784-400-400-10, Adam lr 1e-3, "
            "batch 128, 2000 steps per task, 5 tasks; seeds " + ", ".join(map(str, args.seeds)) + "; `threads=1`.",
            f"Produced by `benchmarks/baselines.py` in {wall:.0f} s of wall time (sweep through the CLI).",
            "",
            summary.read_text().strip(),
            "",
            "## Accuracy matrices (percent; row i: after task i, column j: task j)",
        ]
        for path in runs:
            res = json.loads(path.read_text())
            lines += [
                "",
                f"**{res['method']}, seed {res['seed']}**: avg_acc {100 * res['avg_acc']:.2f}, "
                f"forgetting {100 * res['forgetting']:.2f}",
                "",
            ]
            lines.append("| after | " + " | ".join(f"T{j}" for j in range(res["n_tasks"])) + " |")
            lines.append("|---" * (res["n_tasks"] + 1) + "|")
            for i, row in enumerate(res["acc_matrix"]):
                lines.append(f"| T{i} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
