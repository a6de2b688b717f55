"""EWC: bad values, Fisher over the scenario's outputs, one penalty per task, the anchor holds (instantiation,
state round trip and resume: ``tests/test_contract.py``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_lightning.core.importance import quadratic_penalty
from cl_lightning.errors import ConfigError
from cl_lightning.methods.ewc import EWC
from cl_lightning.train import train

# SGD lr 0.1 (the default optimizer) is stable for lambda * F * lr < 2
QUICK = ["method=ewc", "method.lambda_=10", "logger=none", "epochs_per_task=2"]


def checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)


def net_params(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.lambda_=-1", "method.lambda_=-1"),
        ("method.fisher=fast", "method.fisher='fast'"),
        ("method.fisher_samples=0", "method.fisher_samples=0"),
        ("method.chunk_size=0", "method.chunk_size=0"),
    ],
)
def test_bad_values_fail_at_setup_with_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg("method=ewc", override, "logger=none"))
    assert message in str(info.value) and "\n" not in str(info.value)


def tiny_ewc(lambda_: float = 2.0) -> tuple[EWC, nn.Linear]:
    net = nn.Linear(3, 2)
    ewc = EWC(lambda_=lambda_)
    ewc.on_fit_start(None, SimpleNamespace(net=net))  # type: ignore[arg-type]
    return ewc, net


def test_penalty_is_zero_at_the_anchor_and_positive_away() -> None:
    ewc, net = tiny_ewc()
    assert ewc.penalty() is None, "no penalty before the first task ends"  # type: ignore[arg-type]
    anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    ewc.consolidate({n: torch.rand_like(p) + 0.1 for n, p in anchor.items()}, anchor)
    assert ewc.penalty().item() == 0.0  # type: ignore[arg-type]
    with torch.no_grad():
        net.weight[0, 0] += 0.1
    assert ewc.penalty().item() > 0  # type: ignore[arg-type]


def test_one_penalty_per_task_with_the_half_written_out() -> None:
    ewc, net = tiny_ewc(lambda_=3.0)
    tasks = []
    for _ in range(3):
        fisher = {n: torch.rand_like(p) for n, p in net.named_parameters()}
        anchor = {n: torch.randn_like(p) for n, p in net.named_parameters()}
        ewc.consolidate(fisher, anchor)
        tasks.append((fisher, anchor))
    value = ewc.penalty()  # type: ignore[arg-type]
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    expected = sum(quadratic_penalty(params, [a[n] for n in names], [f[n] for n in names]) for f, a in tasks) * (
        3.0 / 2
    )
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert len(ewc.state_dict()["fishers"]) == 3, "three Fishers, none accumulated"


@pytest.mark.parametrize("scenario", ["task_il", "class_il", "domain_il"])
def test_fisher_covers_the_outputs_the_scenario_trains(make_cfg, scenario: str) -> None:
    cfg = make_cfg(*QUICK, f"dataset.scenario={scenario}", "max_tasks=2")
    train(cfg)
    state = checkpoint(cfg)["callbacks"]["EWC[ewc]"]
    assert state["consolidated"] == 1 and len(state["fishers"]) == len(state["anchors"]) == 2
    head = [f["head.bias"] for f in state["fishers"]]
    if scenario == "domain_il":
        assert bool((head[0] > 0).all()) and bool((head[1] > 0).all())
    elif scenario == "task_il":  # each task's own two outputs
        assert bool((head[0][:2] > 0).all()) and bool((head[0][2:] == 0).all())
        assert bool((head[1][2:4] > 0).all()) and bool((head[1][:2] == 0).all()) and bool((head[1][4:] == 0).all())
    else:  # class-IL: classes seen so far
        assert bool((head[0][:2] > 0).all()) and bool((head[0][2:] == 0).all())
        assert bool((head[1][:4] > 0).all()) and bool((head[1][4:] == 0).all())
    for name, value in net_params(checkpoint(cfg)).items():
        if name in state["anchors"][1]:
            assert torch.equal(state["anchors"][1][name], value), "the anchor is the end-of-task weights"


def test_huge_lambda_keeps_the_weights_at_the_anchor(make_cfg) -> None:
    adam = ["optimizer=adam", "optimizer.lr=0.01", "logger=none", "max_tasks=2", "dataset.scenario=domain_il"]
    naive_cfg = make_cfg("method=naive", *adam)
    train(naive_cfg)
    # blobs are so separable that the trained model is near-certain and its Fisher tiny (~1e-9): "huge" is 1e13.
    # Adam's steps stay bounded whatever the penalty's curvature.
    ewc_cfg = make_cfg("method=ewc", "method.lambda_=1e13", *adam)
    train(ewc_cfg)
    state = checkpoint(ewc_cfg)["callbacks"]["EWC[ewc]"]
    fisher, anchor = state["fishers"][0], state["anchors"][0]
    naive, ewc = net_params(checkpoint(naive_cfg)), net_params(checkpoint(ewc_cfg))

    def drift(params: dict[str, torch.Tensor]) -> float:
        return sum(float((fisher[n] * (params[n] - anchor[n]) ** 2).sum()) for n in fisher)

    assert drift(naive) > 0
    assert drift(ewc) < 0.01 * drift(naive), (drift(ewc), drift(naive))


def test_sgd_too_stiff_for_the_penalty_is_reported(make_cfg) -> None:
    with pytest.warns(UserWarning, match="lower method.lambda_"):
        train(make_cfg("method=ewc", "method.lambda_=1e7", "logger=none", "max_tasks=1", "epochs_per_task=1"))


def test_runs_in_domain_il_and_composes_with_another_loss_term(make_cfg) -> None:
    results = train(make_cfg(*QUICK, "dataset.scenario=domain_il", "+method@hybrid.lwf=lwf"))
    assert results["method"] == "ewc+lwf" and results["complete"]
