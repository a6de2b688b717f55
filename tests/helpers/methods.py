"""Checks every method's tests share: which instances a run built, and resume parity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cl_lightning.train import train


def capture(monkeypatch: pytest.MonkeyPatch, cls: type) -> list:
    """Instances of ``cls`` that train() builds, recorded when their fit starts."""
    seen: list = []
    original = cls.on_fit_start

    def record(self, trainer, pl_module) -> None:
        if self not in seen:
            seen.append(self)
        original(self, trainer, pl_module)

    monkeypatch.setattr(cls, "on_fit_start", record)
    return seen


def assert_resume_parity(make_cfg: Callable[..., Any], *overrides: str) -> None:
    """A run stopped after two tasks and resumed ends exactly as the uninterrupted run (matrix and diagnostics)."""
    whole = train(make_cfg(*overrides))
    cfg = make_cfg(*overrides, "max_tasks=2")
    assert train(cfg)["tasks_completed"] == 2
    resumed = train(make_cfg("resume=" + cfg.paths.output_dir, "logger=none"))
    assert resumed["complete"] and resumed["acc_matrix"] == whole["acc_matrix"], "bit-identical on CPU"
    assert resumed.get("diagnostics") == whole.get("diagnostics")
