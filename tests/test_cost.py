"""``results.json``'s ``cost``: time per task, the bytes of the network and of each method's state, training FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cl_lightning.cost import method_state_bytes, tensor_bytes, train_step_flops
from cl_lightning.threads import batch_flops
from cl_lightning.train import train

FAST = ["logger=none", "epochs_per_task=1", "threads=1"]


def test_tensor_bytes_walks_nested_state() -> None:
    state = {"x": torch.zeros(200, 1, 8, 8), "y": torch.zeros(200, dtype=torch.long), "n": 3, "more": [torch.ones(2)]}
    assert tensor_bytes(state) == 200 * 64 * 4 + 200 * 8 + 2 * 4


def test_train_step_flops_is_forward_and_backward_and_leaves_the_network_alone() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 100), nn.ReLU(), nn.Dropout(0.5), nn.Linear(100, 10))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    forward = batch_flops(net, (1, 8, 8), 32)
    rng = torch.get_rng_state()
    assert forward == 2 * 32 * (64 * 100 + 100 * 10)
    flops = train_step_flops(net, (1, 8, 8), 32, task_id=0)
    # backward: the weight gradients of both layers, the input gradient of the second only (inputs need none)
    assert flops == forward + 2 * 32 * (64 * 100 + 100 * 10) + 2 * 32 * 100 * 10
    assert all(p.grad is None for p in net.parameters()), "counted on a copy: no gradient left on the network"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()), "the run's random draws are those it makes without the count"


def test_results_have_the_cost_keys(make_cfg) -> None:
    """An ER buffer of 200 8x8 digits counts at least 200 x 64 bytes; FLOPs are the step's count x the steps."""
    cfg = make_cfg(*FAST, "method=er", "method.buffer_size=200", "save_checkpoints=false", synthetic=False)
    run = train(cfg)
    cost = run["cost"]
    n_tasks = run["n_tasks"]
    assert len(cost["train_seconds_per_task"]) == n_tasks and len(cost["eval_seconds_per_task"]) == n_tasks
    assert sum(cost["train_seconds_per_task"]) == pytest.approx(run["train_seconds"], abs=0.01)
    assert sum(cost["eval_seconds_per_task"]) == pytest.approx(run["eval_seconds"], abs=0.01)
    assert cost["method_state_bytes"]["er"] >= 200 * 64
    assert cost["method_state_bytes"] == method_state_bytes(run.methods)
    params = sum(p.numel() * p.element_size() for p in run.module.net.parameters())
    assert cost["model_bytes"] >= params
    assert sum(cost["train_steps_per_task"]) == run.trainer.global_step
    dm = run.datamodule
    per_step = train_step_flops(run.module.net, dm.input_shape, dm.batch_size, task_id=0)
    assert cost["train_flops"] == pytest.approx(per_step * run.trainer.global_step)
    assert "estimate" in cost["train_flops_note"]
    assert cost["peak_memory_bytes"] is None and cost["peak_memory_device"] == "cpu", "the CPU reports none"
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk["cost"] == cost


def test_the_cost_of_earlier_tasks_survives_a_resume(make_cfg) -> None:
    cfg = make_cfg(*FAST, "max_tasks=2")
    first = train(cfg)["cost"]
    resumed = train(make_cfg(*FAST, f"resume={cfg.paths.output_dir}"))
    cost = resumed["cost"]
    assert cost["train_seconds_per_task"][:2] == first["train_seconds_per_task"]
    assert cost["train_steps_per_task"][:2] == first["train_steps_per_task"]
    assert len(cost["train_steps_per_task"]) == resumed["n_tasks"]
    assert sum(cost["train_steps_per_task"]) == resumed.trainer.global_step
