"""``threads: auto``: one thread for small steps, the free cores for large ones (``cl_lightning/threads.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from cl_lightning import threads
from cl_lightning.errors import ConfigError
from cl_lightning.threads import SMALL_BATCH_FLOPS, auto_threads, batch_flops
from cl_lightning.train import train


def test_batch_flops_counts_the_forward_pass_of_a_batch() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 10))
    assert batch_flops(net, (1, 28, 28), 128) == 2 * (784 * 400 + 400 * 10) * 128
    assert net.training, "the network's mode is restored"


def test_small_steps_get_one_thread_whatever_the_machine(monkeypatch) -> None:
    monkeypatch.setattr(threads, "available_cores", lambda: 64)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert auto_threads(SMALL_BATCH_FLOPS / 2) == 1


@pytest.mark.parametrize(("cores", "load", "processes", "expected"), [
    (8, 1.0, 1, 8),  # idle but for this process
    (8, 3.2, 1, 6),  # two other processes busy
    (8, 20.0, 1, 1),  # overloaded: at least one
    (8, 2.0, 2, 4),  # two DDP processes share the cores
])  # fmt: skip
def test_large_steps_get_the_free_cores(monkeypatch, cores: int, load: float, processes: int, expected: int) -> None:
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert auto_threads(SMALL_BATCH_FLOPS * 10, processes) == expected


def test_the_default_run_trains_on_one_thread_and_records_it(make_cfg) -> None:
    torch.set_num_threads(2)
    try:
        results = train(make_cfg("logger=none", "max_tasks=1"))
        assert results["torch_threads"] == 1
    finally:
        torch.set_num_threads(1)


def test_bad_threads_value_is_refused(make_cfg) -> None:
    with pytest.raises(ConfigError, match="threads='many'"):
        train(make_cfg("threads=many", "logger=none"))


def test_the_command_line_makes_idle_openmp_threads_sleep() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, cl_lightning.cli; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "PASSIVE"
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "OMP_WAIT_POLICY": "ACTIVE"}).stdout  # fmt: skip
    assert kept.strip() == "ACTIVE"
