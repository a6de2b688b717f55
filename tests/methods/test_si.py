"""SI: the path integral sees the task gradient only, the penalty reaches the optimizer (instantiation, state
round trip and resume: ``tests/test_contract.py``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_lightning.errors import ConfigError
from cl_lightning.methods.si import SI
from cl_lightning.train import train

QUICK = ["method=si", "method.c=0.5", "logger=none", "epochs_per_task=2"]


def checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize(("override", "message"), [("method.c=-1", "method.c=-1"), ("method.xi=0", "method.xi=0")])
def test_bad_values_fail_with_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg("method=si", override, "logger=none"))


def test_records_the_task_gradient_then_adds_the_penalty_gradient() -> None:
    net = nn.Linear(2, 1)
    si = SI(c=3.0, xi=0.1)
    module = SimpleNamespace(net=net, loggers=[], log_every_n_steps=50)
    trainer = SimpleNamespace(global_step=0, optimizers=[])
    si.on_fit_start(trainer, module)  # type: ignore[arg-type]
    omega = {n: torch.rand_like(p) for n, p in net.named_parameters()}
    anchor = {n: p.detach() - 0.5 for n, p in net.named_parameters()}
    si.load_state_dict({"omega": omega, "anchor": anchor, "consolidated": 0})
    si.on_fit_start(trainer, module)  # type: ignore[arg-type]
    si.on_task_start(trainer, module, 1)  # type: ignore[arg-type]
    task_grads = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.grad = task_grads[n].clone()
    si.on_before_optimizer_step(trainer, module, None)  # type: ignore[arg-type]
    for (n, p), recorded in zip(net.named_parameters(), si._path._grads, strict=True):  # type: ignore[union-attr]
        assert torch.equal(recorded, task_grads[n]), "the path integral gets the task gradient, not SI's"
        torch.testing.assert_close(p.grad, task_grads[n] + 2 * 3.0 * omega[n] * 0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    si.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
    for (n, p), integral in zip(net.named_parameters(), si._path.integral, strict=True):  # type: ignore[union-attr]
        torch.testing.assert_close(integral, -task_grads[n] * (p.detach() - before[n]))


def test_huge_c_keeps_the_weights_at_the_anchor(make_cfg) -> None:
    """The penalty must reach the optimizer (Avalanche's SI once computed it and never applied it, issue 734)."""
    adam = ["optimizer=adam", "optimizer.lr=0.01", "logger=none", "dataset.scenario=domain_il", "max_tasks=1"]
    first = make_cfg("method=si", "method.c=1e6", *adam)
    train(first)
    state = checkpoint(first)["callbacks"]["SI[si]"]
    omega, anchor = state["omega"], state["anchor"]
    train(make_cfg("resume=" + first.paths.output_dir, "logger=none", "max_tasks=1"))
    si_after = checkpoint(first)["state_dict"]
    naive = make_cfg("method=naive", *adam[:-1], "max_tasks=2")
    train(naive)
    naive_after = checkpoint(naive)["state_dict"]

    def drift(state_dict: dict[str, torch.Tensor]) -> float:
        return sum(float((omega[n] * (state_dict[f"net.{n}"] - anchor[n]) ** 2).sum()) for n in omega)

    assert all(bool((o >= 0).all()) for o in omega.values()) and sum(float(o.sum()) for o in omega.values()) > 0
    assert drift(naive_after) > 0
    assert drift(si_after) < 0.01 * drift(naive_after), (drift(si_after), drift(naive_after))


def test_omega_accumulates_over_tasks_and_the_anchor_follows(make_cfg) -> None:
    one = make_cfg(*QUICK, "max_tasks=1")
    train(one)
    omega1 = checkpoint(one)["callbacks"]["SI[si]"]["omega"]
    train(make_cfg("resume=" + one.paths.output_dir, "logger=none", "max_tasks=1"))
    ckpt = checkpoint(one)
    state = ckpt["callbacks"]["SI[si]"]
    assert state["consolidated"] == 1
    for n, o in state["omega"].items():
        assert bool((o >= omega1[n]).all())
        assert torch.equal(state["anchor"][n], ckpt["state_dict"][f"net.{n}"])


@pytest.mark.parametrize("scenario", ["task_il", "domain_il", "class_il"])
def test_runs_in_every_scenario_and_logs_its_penalty(make_cfg, scenario: str) -> None:
    cfg = make_cfg("method=si", "method.c=0.5", "epochs_per_task=2", f"dataset.scenario={scenario}",
                   "module.log_every_n_steps=1")  # fmt: skip
    results = train(cfg)
    assert results["complete"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    values = [e.value for e in events.Scalars("train/si/penalty")]
    assert values and all(v >= 0 for v in values) and max(values) > 0


def test_composes_with_replay_and_a_projection(make_cfg) -> None:
    assert SI.gradient_edit is None, "an additive penalty gradient composes like a loss term"
    for other in ("er", "agem"):
        cfg = make_cfg(*QUICK, f"+method@hybrid.{other}={other}", "max_tasks=2")
        results = train(cfg)
        assert results["method"] == f"si+{other}"
        assert checkpoint(cfg)["callbacks"]["SI[si]"]["consolidated"] == 1
