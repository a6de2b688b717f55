"""MAS: unlabelled importance over the scenario's outputs, accumulated; the anchor holds (instantiation, state
round trip and resume: ``tests/test_contract.py``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_lightning.errors import ConfigError
from cl_lightning.methods.mas import MAS
from cl_lightning.train import train

QUICK = ["method=mas", "method.lambda_=0.01", "logger=none", "epochs_per_task=2"]


def checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize(
    ("override", "message"), [("method.lambda_=-2", "method.lambda_=-2"), ("method.samples=0", "method.samples=0")]
)
def test_bad_values_fail_with_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg("method=mas", override, "logger=none"))


def test_penalty_is_lambda_omega_squared_distance_zero_at_the_anchor() -> None:
    net = nn.Linear(3, 2)
    mas = MAS(lambda_=2.0)
    mas.on_fit_start(None, SimpleNamespace(net=net))  # type: ignore[arg-type]
    omega = {n: torch.rand_like(p) for n, p in net.named_parameters()}
    mas.load_state_dict({"omega": omega, "anchor": {n: p.detach().clone() for n, p in net.named_parameters()}})
    assert mas.penalty().item() == 0.0  # type: ignore[arg-type]
    with torch.no_grad():
        net.bias += 0.5
    expected = 2.0 * float((omega["bias"] * 0.25).sum())  # no 1/2 in MAS's penalty
    assert mas.penalty().item() == pytest.approx(expected, rel=1e-6)  # type: ignore[arg-type]


def test_importance_covers_the_task_head_and_accumulates(make_cfg) -> None:
    one = make_cfg(*QUICK, "dataset.scenario=task_il", "max_tasks=1")
    train(one)
    omega1 = checkpoint(one)["callbacks"]["MAS[mas]"]["omega"]
    assert bool((omega1["head.bias"][:2] > 0).all()) and bool((omega1["head.bias"][2:] == 0).all())
    train(make_cfg("resume=" + one.paths.output_dir, "logger=none", "max_tasks=1"))
    ckpt = checkpoint(one)
    state = ckpt["callbacks"]["MAS[mas]"]
    head = state["omega"]["head.bias"]
    assert torch.equal(head[:2], omega1["head.bias"][:2]), "task 0's head gets no importance from task 1's outputs"
    assert bool((head[2:4] > 0).all()) and bool((head[4:] == 0).all())
    for n, o in state["omega"].items():
        assert bool((o >= omega1[n]).all()), "Omega accumulates"
        assert torch.equal(state["anchor"][n], ckpt["state_dict"][f"net.{n}"])


def test_huge_lambda_keeps_the_weights_at_the_anchor(make_cfg) -> None:
    adam = ["optimizer=adam", "optimizer.lr=0.01", "logger=none", "dataset.scenario=domain_il"]
    first = make_cfg("method=mas", "method.lambda_=1e6", *adam, "max_tasks=1")
    train(first)
    state = checkpoint(first)["callbacks"]["MAS[mas]"]
    omega, anchor = state["omega"], state["anchor"]
    train(make_cfg("resume=" + first.paths.output_dir, "logger=none", "max_tasks=1"))
    mas_after = checkpoint(first)["state_dict"]
    naive = make_cfg("method=naive", *adam, "max_tasks=2")
    train(naive)
    naive_after = checkpoint(naive)["state_dict"]

    def drift(state_dict: dict[str, torch.Tensor]) -> float:
        return sum(float((omega[n] * (state_dict[f"net.{n}"] - anchor[n]) ** 2).sum()) for n in omega)

    assert drift(naive_after) > 0
    assert drift(mas_after) < 0.01 * drift(naive_after), (drift(mas_after), drift(naive_after))


@pytest.mark.parametrize("scenario", ["task_il", "domain_il", "class_il"])
def test_runs_in_every_scenario(make_cfg, scenario: str) -> None:
    results = train(make_cfg(*QUICK, f"dataset.scenario={scenario}"))
    assert results["complete"] and results["scenario"] == scenario
