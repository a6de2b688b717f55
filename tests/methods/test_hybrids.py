"""Combinations of methods: any list composes when the methods use different doors, and each keeps its own state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cl_lightning.train import train

QUICK = ["logger=none", "epochs_per_task=2", "max_tasks=2", "dataset.scenario=class_il", "optimizer=adam"]


def checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize(
    ("overrides", "name", "state_keys"),
    [
        # a penalty (loss term) + replay (loss term): EWC + experience replay
        (["method=ewc", "+method@hybrid.er=er", "hybrid.er.buffer_size=40"], "ewc+er", ["EWC[ewc]", "ER[er]"]),
        # a gradient-path regulariser + logit replay: SI + DER
        (["method=si", "+method@hybrid.der=der", "hybrid.der.buffer_size=40"], "si+der", ["SI[si]", "DER[der]"]),
        # three at once: a penalty, distillation and a projection (the one gradient editor)
        (
            ["method=online_ewc", "+method@hybrid.lwf=lwf", "+method@hybrid.agem=agem", "hybrid.agem.buffer_size=40"],
            "online_ewc+lwf+agem",
            ["OnlineEWC[online_ewc]", "LwF[lwf]", "AGEM[agem]"],
        ),
    ],
)
def test_methods_on_different_doors_compose(make_cfg, overrides: list[str], name: str, state_keys: list[str]) -> None:
    cfg = make_cfg(*QUICK, *overrides)
    results = train(cfg)
    assert results["method"] == name and results["tasks_completed"] == 2
    saved = checkpoint(cfg)["callbacks"]
    for key in state_keys:
        assert_state_after_two_tasks(key, saved[key])


def buffer_tasks(state: dict) -> list[int]:
    buffer = state["buffer"]
    return sorted(set(buffer["task_id"][: buffer["size"]].tolist()))


def assert_state_after_two_tasks(key: str, state: dict) -> None:
    """``state`` is what the method builds over two tasks on its own: every member of a combination got its task
    events and its training steps (a state dict is never empty, so its mere presence proves nothing)."""
    if key == "EWC[ewc]":
        assert state["consolidated"] == 1 and len(state["fishers"]) == len(state["anchors"]) == 2, key
    elif key == "OnlineEWC[online_ewc]":
        assert state["consolidated"] == 1 and len(state["fishers"]) == len(state["anchors"]) == 1, key
        assert any(bool((f > 0).any()) for f in state["fishers"][0].values()), key
    elif key == "SI[si]":
        assert state["consolidated"] == 1 and any(bool((o > 0).any()) for o in state["omega"].values()), key
    elif key in ("ER[er]", "DER[der]"):  # reservoir buffers of 40 slots, filled every step, over both tasks
        assert state["task"] == 1 and state["buffer"]["size"] == 40 and buffer_tasks(state) == [0, 1], key
        if key == "DER[der]":
            assert state["buffer"]["logits"].abs().sum() > 0, "DER stores the logits with the samples"
    elif key == "LwF[lwf]":
        assert state["teacher_task"] == 1 and state["teacher"], key
    elif key == "AGEM[agem]":  # an episodic memory of buffer_size // n_tasks = 8 samples per finished task
        assert state["filled"] == 1 and state["buffer"]["size"] == 16 and buffer_tasks(state) == [0, 1], key
    else:
        raise AssertionError(f"no expectation for {key}")


def test_each_hybrid_member_adds_its_logged_loss_term(make_cfg) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(
        "epochs_per_task=2", "max_tasks=2", "module.log_every_n_steps=1", "method=si", "+method@hybrid.der=der",
        "hybrid.der.buffer_size=40",
    )  # fmt: skip
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/si/penalty", "train/der/logit_mse", "train/task_loss"} <= tags
