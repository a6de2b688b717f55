"""``cl_lightning.results``: the files a run leaves are readable by colleagues, and runs are judged before pooling."""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cl_lightning.results import run_status, write_json_atomic


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process's umask after a test changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
@pytest.mark.usefixtures("umask")
def test_json_files_get_the_mode_of_any_new_file(tmp_path: Path, mask: int, mode: int) -> None:
    os.umask(mask)
    for name in ("results.json", "failed.json"):
        write_json_atomic(tmp_path / name, {"a": 1})
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    write_json_atomic(tmp_path / "results.json", {"a": 2})  # rewritten after every task: same mode
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed.json", "results.json"], "no temporary file left"


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "results.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "results.json", {"a": object()})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


COMPLETE = {"n_tasks": 2, "tasks_completed": 2, "complete": True, "acc_matrix": [[0.9, 0.1], [0.5, 0.9]]}
COMPLETE |= {"avg_acc": 0.7, "forgetting": 0.4, "bwt": -0.4, "fwt": None}


def test_run_status() -> None:
    assert run_status(COMPLETE).complete and run_status(COMPLETE).describe() == ""
    stopped = COMPLETE | {"tasks_completed": 1, "complete": False, "acc_matrix": COMPLETE["acc_matrix"][:1]}
    assert (run_status(stopped).kind, run_status(stopped).reason) == ("incomplete", "stopped after 1/2 tasks")
    no_key = {k: v for k, v in stopped.items() if k != "complete"}
    assert run_status(no_key).kind == "incomplete", "an older file without `complete` is judged by its rows"
    diverged = stopped | {"diverged": {"step": 57, "task": 1, "value": "inf", "message": "the loss is\ninf"}}
    status = run_status(diverged)
    assert status.kind == "diverged" and status.describe() == "diverged at step 57 of task 1 (inf): the loss is inf"
    assert run_status(COMPLETE | {"diverged": {"step": 9, "task": 1}}).kind == "diverged", "the record wins"
    assert run_status(COMPLETE | {"diverged": None}).complete
    nan = run_status(COMPLETE | {"forgetting": math.nan})
    assert nan.kind == "diverged" and nan.reason == "diverged (non-finite forgetting in results.json)"
    assert run_status(COMPLETE | {"acc_matrix": [[0.9, 0.1], [math.nan, 0.9]]}).kind == "diverged"
