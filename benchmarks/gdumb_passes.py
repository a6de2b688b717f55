"""GDumb's reported number is the best test accuracy over its training passes; ours is the accuracy after the last.

Runs ``experiment=gdumb_split_mnist method=gdumb`` (seed ``--seed``) and, during the from-scratch training at the
last task's end, measures the test accuracy on all tasks after every pass. Prints the accuracy after the last pass
(what ``results.json`` reports), the best over passes (what GDumb's code reports: ``best_prec1``) and the pass it
was reached at, so the two ways of reporting can be compared on the same run.

Usage: ``CL_DATA_DIR=/path/with/MNIST python benchmarks/gdumb_passes.py [--seed 0]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import cl_lightning.methods.gdumb as gdumb
from cl_lightning.train import CONFIG_DIR, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    curve: list[float] = []
    original = gdumb.train_from_scratch
    holder: dict[str, object] = {}

    def with_curve(*a, **k):  # the last task's training records the test accuracy after every pass
        module, dm = holder["module"], holder["dm"]
        if int(module.current_task) != dm.n_tasks - 1:  # type: ignore[attr-defined]
            return original(*a, **k)

        def evaluate(epoch: int) -> None:
            module.eval()  # type: ignore[attr-defined]
            per_task = []  # the mean over tasks of each task's accuracy, as avg_acc
            with torch.no_grad():
                for j, loader in enumerate(dm.eval_dataloaders()):  # type: ignore[attr-defined]
                    correct = total = 0
                    for batch in loader:
                        preds, _ = module.eval_logits(batch.x, j)  # type: ignore[attr-defined]
                        correct += int((preds.argmax(1) == batch.y).sum())
                        total += len(batch.y)
                    per_task.append(correct / total)
            module.train()  # type: ignore[attr-defined]
            curve.append(sum(per_task) / len(per_task))

        return original(*a, **k, on_epoch_end=evaluate)

    gdumb.train_from_scratch = with_curve  # type: ignore[assignment]
    on_task_end = gdumb.GDumb.on_task_end

    def remember(self, trainer, pl_module, task_id):
        holder["module"], holder["dm"] = pl_module, trainer.datamodule
        return on_task_end(self, trainer, pl_module, task_id)

    gdumb.GDumb.on_task_end = remember  # type: ignore[method-assign]
    overrides = ["experiment=gdumb_split_mnist", "method=gdumb", f"seed={args.seed}", "logger=none", "threads=1",
                 "save_checkpoints=false", "trainer.enable_progress_bar=false"]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(tmp) / "run")
        results = train(cfg)
    best = max(range(len(curve)), key=curve.__getitem__)
    print(f"seed {args.seed}: results.json avg_acc {100 * results['avg_acc']:.2f} (after the last pass); "
          f"test accuracy after the last pass {100 * curve[-1]:.2f}, best over the {len(curve)} passes "
          f"{100 * curve[best]:.2f} (pass {best})")  # fmt: skip


if __name__ == "__main__":
    main()
