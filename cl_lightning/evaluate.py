"""Use a run after it ran: load its trained network, evaluate it again, export it.

``python -m cl_lightning.evaluate <run dir> [--split test|val] [--checkpoint last|mid_task] [--export FILE]``
prints the accuracy on every task's test (or validation) set of the network the run's checkpoint holds; with
``--export`` it also writes that network's ``state_dict`` to ``FILE`` (a new file: an existing one is not replaced).
Nothing in the run directory is written.

From Python::

    from cl_lightning.evaluate import evaluate, load_run

    run = load_run("outputs/2026-12-01/12-00-00")
    run.net                      # the trained network (a torch.nn.Module), in eval mode
    evaluate(run)["accuracy"]    # [accuracy on task 0, task 1, ...]

The run is rebuilt from the configuration stored in its checkpoint, so the network, the tasks and every
continual method's state are those of the run (a PackNet run evaluates each task with that task's weights only).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from cl_lightning.build import build_run
from cl_lightning.contract import CLMethod
from cl_lightning.data.datamodule import TaskSequenceDataModule
from cl_lightning.errors import ConfigError, RunDirectoryError
from cl_lightning.models.module import CLModule
from cl_lightning.resume import restore

__all__ = ["LoadedRun", "evaluate", "load_run", "main"]

CHECKPOINTS = ("last", "mid_task")


@dataclass
class LoadedRun:
    """A run rebuilt from its checkpoint: the module (weights, matrices), its tasks, its methods and the config."""

    module: CLModule
    datamodule: TaskSequenceDataModule
    methods: list[CLMethod]
    trainer: pl.Trainer
    config: dict[str, Any]
    checkpoint: Path
    tasks_trained: int

    @property
    def net(self) -> nn.Module:
        """The trained network."""
        return self.module.net


def load_run(run_dir: str | Path, checkpoint: str = "last") -> LoadedRun:
    """Rebuild the run in ``run_dir`` from ``checkpoints/<checkpoint>.ckpt`` (``last``: after its last finished task;
    ``mid_task``: a checkpoint in the middle of one). The global RNG is left as it was."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint={checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
    run_dir = Path(run_dir).expanduser()
    path = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    if not path.is_file():
        raise RunDirectoryError(
            f"{run_dir}: no checkpoints/{checkpoint}.ckpt there (was it run with save_checkpoints=false?)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = state["cl_lightning"]["config"]
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same one-line answer
        raise RunDirectoryError(f"{path}: cannot load it ({type(err).__name__}: {str(err)[:160]})") from err
    cfg = OmegaConf.create(config)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.logger = None  # nothing is written into the run directory
        cfg.callbacks = {}
        cfg.checkpoint_every_n_steps = None
        cfg.eval_every_n_steps = None
        cfg.trainer.enable_progress_bar = False
    rng = torch.get_rng_state()
    try:
        module, dm, methods, trainer, _ = build_run(cfg, run_dir)
        restore(state, trainer, module, dm)
    finally:
        torch.set_rng_state(rng)
    module.eval()
    return LoadedRun(module, dm, methods, trainer, config, path, int(module.task_finished) + 1)


def evaluate(run: LoadedRun, split: str = "test") -> dict[str, Any]:
    """Accuracy of the run's network on every task's ``split`` (``test`` or ``val``), as ``results.json`` measures
    it; in class-IL also the task-IL accuracy (logits masked to the task's classes)."""
    if split not in ("test", "val"):
        raise ConfigError(f"split={split!r}: choose test or val")
    if split == "val" and any(t.val_x is None for t in run.datamodule.tasks):
        raise ConfigError("split=val: the run has no validation split (it ran with dataset.val_fraction=0)")
    module = run.module
    module.acc_matrix.reset()
    module.task_il_matrix.reset()
    module.eval_row = 0
    run.trainer.test(module, dataloaders=run.datamodule.eval_dataloaders(split), verbose=False)
    out: dict[str, Any] = {"split": split, "tasks_trained": run.tasks_trained, "checkpoint": str(run.checkpoint)}
    # rounded as results.json rounds them
    out["accuracy"] = [round(float(v), 6) for v in module.acc_matrix.compute()[0]]
    out["avg_acc"] = round(sum(out["accuracy"]) / len(out["accuracy"]), 6)
    if module.scenario == "class_il":
        out["task_il_accuracy"] = [round(float(v), 6) for v in module.task_il_matrix.compute()[0]]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cl_lightning.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--checkpoint", default="last", choices=CHECKPOINTS)
    parser.add_argument("--export", type=Path, help="write the network's state_dict to this new file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        if args.export is not None and args.export.exists():
            raise ConfigError(f"--export {args.export}: the file exists; name a new one")
        run = load_run(args.run_dir, args.checkpoint)
        result = evaluate(run, args.split)
    except (ConfigError, RunDirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.export is not None:
        torch.save({k: v.detach().cpu() for k, v in run.net.state_dict().items()}, args.export)
    if args.json:
        print(json.dumps(result))
        return
    accs = "  ".join(f"T{j} {100 * a:.2f}" for j, a in enumerate(result["accuracy"]))
    print(f"{args.run_dir} ({result['tasks_trained']} task(s) trained), {args.split} accuracy: {accs}")
    print(f"average {100 * result['avg_acc']:.2f}%" + (f"; network written to {args.export}" if args.export else ""))


if __name__ == "__main__":
    main()
