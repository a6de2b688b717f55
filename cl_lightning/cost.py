"""What a run spent: ``results.json``'s ``cost`` (time per task, memory of the network and of each method's state,
training FLOPs, peak device memory).

Papers compare continual methods that spend very different compute and memory (Prabhu et al., "Computationally
Budgeted Continual Learning", CVPR 2023; Zhou et al., "A Model or 603 Exemplars", ICLR 2023, on stored models left
out of memory budgets). The numbers here are measured without touching the training loop:

- ``train_seconds_per_task`` / ``eval_seconds_per_task``: wall-clock seconds of each task's training and of the
  evaluations after it (the first task's also holds the evaluation of the randomly initialised network);
- ``train_steps_per_task``: optimizer steps of each task (``trainer.global_step``'s increase);
- ``model_bytes``: the tensors of the network's ``state_dict()`` (parameters and buffers) after the last task;
- ``method_state_bytes``: per method, the tensors of its ``state_dict()`` (replay buffers, Fisher information,
  anchors, masks, teachers, generators: what the method keeps beside the network);
- ``train_flops``: an **estimate** of the network's own training compute: the FLOPs of one forward and backward
  pass of the network over one training batch, counted by :class:`torch.utils.flop_counter.FlopCounterMode` once
  per task on a copy of the network (outside the training loop), times that task's optimizer steps, summed over tasks
  and processes. Methods' extra passes (replayed samples, teachers, generators, gradient projections) are not
  counted;
- ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` on a CUDA device (the peak of this process, so of the
  last invocation of a resumed run); ``None`` where the device reports none (CPU).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cl_lightning.contract import CLMethod
from cl_lightning.models.backbones import net_logits

__all__ = ["FLOPS_NOTE", "CostMeter", "method_state_bytes", "peak_memory_bytes", "tensor_bytes", "train_step_flops"]

FLOPS_NOTE = (
    "estimate: the network's own forward and backward pass over one training batch (torch.utils.flop_counter) "
    "x optimizer steps x processes; methods' extra passes (replay, teachers, generators, projections) not counted"
)


def tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a nested structure of dicts, lists and tuples (a ``state_dict()``); other leaves
    count nothing."""
    if isinstance(tree, Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, Mapping):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def method_state_bytes(methods: Iterable[CLMethod]) -> dict[str, int]:
    """Per method name, the bytes of the tensors of its ``state_dict()``."""
    return {m.name: tensor_bytes(m.state_dict()) for m in methods}


def train_step_flops(net: nn.Module, input_shape: tuple[int, ...], batch_size: int, task_id: int) -> float:
    """FLOPs of one training forward and backward pass of ``net`` over a batch of ``batch_size`` inputs.

    Counted on a copy of the network in training mode, on two zero samples (batch norm needs more than one), scaled
    to the batch; the random number generators are restored afterwards, so a run's draws are those it would make
    without the count, and the network itself is left untouched (no gradient, no batch-norm statistics).

    Args:
        net: The network.
        input_shape: One input's shape (the datamodule's ``input_shape``).
        batch_size: The training batch size (per process).
        task_id: The task whose route a network that routes by task takes.
    """
    from torch.utils.flop_counter import FlopCounterMode

    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    n = 2
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        twin = copy.deepcopy(net).train()
        x = torch.zeros(n, *input_shape, device=device)
        task = torch.full((n,), task_id, dtype=torch.long, device=device)
        with FlopCounterMode(display=False) as counter:
            net_logits(twin, x, task).float().sum().backward()
    return float(counter.get_total_flops()) * batch_size / n


def peak_memory_bytes(device: torch.device) -> int | None:
    """The peak memory allocated on ``device`` by this process, where the device reports it (CUDA); else None."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


class CostMeter:
    """Bookkeeping of a run's cost, task by task; its :meth:`state` travels in the checkpoint so that a resumed
    run keeps the earlier tasks' numbers.

    Args:
        saved: A checkpoint's :meth:`state` (resuming), or None.
    """

    def __init__(self, saved: Mapping[str, Any] | None = None) -> None:
        saved = saved or {}
        self.train_seconds: list[float | None] = list(saved.get("train_seconds_per_task", []))
        self.eval_seconds: list[float | None] = list(saved.get("eval_seconds_per_task", []))
        self.steps: list[int | None] = list(saved.get("train_steps_per_task", []))
        self.flops: list[float | None] = list(saved.get("train_flops_per_task", []))
        self.peak: int | None = saved.get("peak_memory_bytes")
        # totals as of the end of the last recorded task: the next task's share is the increase from them
        self.last = dict(saved.get("totals", {"train_seconds": 0.0, "eval_seconds": 0.0, "step": 0}))

    def task_done(
        self, task: int, train_seconds: float, eval_seconds: float, step: int, flops_per_step: float, processes: int
    ) -> None:
        """Record task ``task`` from the run's totals so far (seconds, global step) and its FLOPs per step."""
        for values in (self.train_seconds, self.eval_seconds, self.steps, self.flops):
            del values[task:]  # a task recorded again (a resumed stream re-measuring a row) replaces its entry
            values.extend([None] * (task - len(values)))  # tasks before a resume of an older checkpoint: unknown
        steps = step - int(self.last["step"])
        self.train_seconds.append(round(train_seconds - float(self.last["train_seconds"]), 3))
        self.eval_seconds.append(round(eval_seconds - float(self.last["eval_seconds"]), 3))
        self.steps.append(steps)
        self.flops.append(flops_per_step * steps * processes)
        self.last = {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "step": step}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain lists and numbers: checkpoints load with ``weights_only=True``)."""
        return {
            "train_seconds_per_task": list(self.train_seconds),
            "eval_seconds_per_task": list(self.eval_seconds),
            "train_steps_per_task": list(self.steps),
            "train_flops_per_task": list(self.flops),
            "peak_memory_bytes": self.peak,
            "totals": dict(self.last),
        }

    def results(self, net: nn.Module, methods: Iterable[CLMethod], device: torch.device) -> dict[str, Any]:
        """``results.json``'s ``cost``."""
        peak = peak_memory_bytes(device)
        if peak is not None:
            self.peak = max(peak, self.peak or 0)
        known = [f for f in self.flops if f is not None]
        return {
            "train_seconds_per_task": list(self.train_seconds),
            "eval_seconds_per_task": list(self.eval_seconds),
            "train_steps_per_task": list(self.steps),
            "model_bytes": tensor_bytes(net.state_dict()),
            "method_state_bytes": method_state_bytes(methods),
            "train_flops": float(sum(known)) if len(known) == len(self.flops) else None,
            "train_flops_per_task": list(self.flops),
            "train_flops_note": FLOPS_NOTE,
            "peak_memory_bytes": self.peak if device.type == "cuda" else None,
            "peak_memory_device": str(device),
        }
