"""Online EWC: one running Fisher decayed by gamma, one anchor (the latest weights) (instantiation, state round
trip and resume: ``tests/test_contract.py``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_lightning.errors import ConfigError
from cl_lightning.methods.online_ewc import OnlineEWC
from cl_lightning.train import train

QUICK = ["method=online_ewc", "method.lambda_=10", "logger=none", "epochs_per_task=2"]


def checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize("gamma", ["-0.1", "1.5"])
def test_gamma_outside_the_unit_interval_is_refused(make_cfg, gamma: str) -> None:
    with pytest.raises(ConfigError, match=f"method.gamma={gamma}: must be a number in"):
        train(make_cfg("method=online_ewc", f"method.gamma={gamma}", "logger=none"))


def test_running_fisher_is_decayed_and_summed_with_one_anchor() -> None:
    net = nn.Linear(2, 2)
    ewc = OnlineEWC(lambda_=4.0, gamma=0.5)
    ewc.on_fit_start(None, SimpleNamespace(net=net))  # type: ignore[arg-type]
    fishers = [{n: torch.rand_like(p) for n, p in net.named_parameters()} for _ in range(3)]
    anchors = [{n: torch.randn_like(p) for n, p in net.named_parameters()} for _ in range(3)]
    for f, a in zip(fishers, anchors, strict=True):
        ewc.consolidate(f, a)
    state = ewc.state_dict()
    assert len(state["fishers"]) == len(state["anchors"]) == 1
    for n in fishers[0]:
        expected = 0.25 * fishers[0][n] + 0.5 * fishers[1][n] + fishers[2][n]
        torch.testing.assert_close(state["fishers"][0][n], expected)
        assert torch.equal(state["anchors"][0][n], anchors[2][n])
    # penalty: (lambda / 2) sum F* (theta - theta*)^2, zero at the latest anchor
    expected = 2.0 * sum(
        float((state["fishers"][0][n] * (p.detach() - anchors[2][n]) ** 2).sum()) for n, p in net.named_parameters()
    )
    assert ewc.penalty().item() == pytest.approx(expected, rel=1e-5)  # type: ignore[arg-type]
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(anchors[2][n])
    assert ewc.penalty().item() == 0.0  # type: ignore[arg-type]


def test_end_to_end_state_holds_one_fisher_and_the_last_weights(make_cfg) -> None:
    cfg = make_cfg(*QUICK, "max_tasks=3", "dataset.scenario=task_il")
    train(cfg)
    ckpt = checkpoint(cfg)
    state = ckpt["callbacks"]["OnlineEWC[online_ewc]"]
    assert state["consolidated"] == 2 and len(state["fishers"]) == 1
    head = state["fishers"][0]["head.bias"]
    assert bool((head[:6] > 0).all()) and bool((head[6:] == 0).all()), "three tasks' heads, nothing else"
    for name, anchor in state["anchors"][0].items():
        assert torch.equal(anchor, ckpt["state_dict"][f"net.{name}"])


@pytest.mark.parametrize("scenario", ["task_il", "domain_il", "class_il"])
def test_runs_in_every_scenario(make_cfg, scenario: str) -> None:
    results = train(make_cfg(*QUICK, f"dataset.scenario={scenario}", "method.fisher=empirical"))
    assert results["complete"] and results["scenario"] == scenario
