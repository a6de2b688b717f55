"""A frozen copy of the network taken at a task end (the "old model" of LwF, iCaRL and other distillation methods).

Lightning-free. :class:`Teacher` owns the copy, its freezing, and its state: a checkpoint holds the copy's tensors
(CPU, by name, loadable with ``torch.load(weights_only=True)``) and the task it was taken after; a restored teacher
is rebuilt lazily from a copy of the live network's structure (:meth:`Teacher.attach`), because the structure is
not in the state.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

__all__ = ["Teacher"]


def freeze(net: nn.Module) -> nn.Module:
    """``net`` in evaluation mode with every parameter frozen (returned for chaining)."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class Teacher:
    """A frozen copy of a network and the task at whose end it was copied.

    Attributes:
        net: The frozen copy (``None`` before the first :meth:`take`, and after a restore until :meth:`attach`).
        task: The task it was copied after (``-1``: none).
    """

    def __init__(self) -> None:
        self.net: nn.Module | None = None
        self.task = -1
        self._loaded: dict[str, Tensor] | None = None  # restored tensors, waiting for a structure to load into

    @property
    def ready(self) -> bool:
        """Whether a copy exists (taken, or restored and attached)."""
        return self.net is not None

    def take(self, net: nn.Module, task: int) -> bool:
        """Copy and freeze ``net`` as the model of ``task``, once per task (a second call for the same or an
        earlier task, e.g. after a resume, changes nothing). Returns whether it copied."""
        if task <= self.task:
            return False
        self.net, self.task, self._loaded = freeze(copy.deepcopy(net)), task, None
        return True

    def attach(self, net: nn.Module) -> None:
        """Rebuild a restored copy from ``net``'s structure, or move the existing one to ``net``'s device.

        Call when the live network is on its device (``on_fit_start``); idempotent.
        """
        if self._loaded is not None:
            teacher = copy.deepcopy(net)
            teacher.load_state_dict(self._loaded)
            self.net, self._loaded = freeze(teacher), None
        elif self.net is not None:
            param = next(net.parameters(), None)
            if param is not None:
                self.net.to(param.device)

    def state_dict(self) -> dict[str, Any]:
        """``{"teacher": tensors by name (CPU), "teacher_task": int}``."""
        tensors = self.net.state_dict() if self.net is not None else self._loaded
        return {"teacher": {k: v.detach().cpu() for k, v in (tensors or {}).items()}, "teacher_task": self.task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (read with ``.get``: a state without a teacher leaves none)."""
        self.task = int(state_dict.get("teacher_task", -1))
        loaded = state_dict.get("teacher") or None
        self._loaded = dict(loaded) if loaded else None
        self.net = None
