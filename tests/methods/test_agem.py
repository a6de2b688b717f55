"""A-GEM: config, per-task memories, the projection inside training, state and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.methods import assert_resume_parity
from hydra.utils import instantiate

from cl_lightning.core.projection import flat_grad
from cl_lightning.errors import ConfigError
from cl_lightning.methods.agem import AGEM
from cl_lightning.train import train

SMALL = ["method=agem", "method.buffer_size=50", "method.replay_batch_size=16", "logger=none"]


def test_config_instantiates(make_cfg) -> None:
    method = instantiate(make_cfg("method=agem").method)
    assert isinstance(method, AGEM) and method.name == "agem" and method.gradient_edit == "projection"
    assert method.needs_task_boundaries and (method.buffer.capacity, method.replay_batch_size) == (500, 128)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.buffer_size=4"], "method.buffer_size=4: agem keeps buffer_size // dataset.n_tasks"),
        (["method.replay_batch_size=0"], "method.replay_batch_size=0"),
        (["dataset.stream=online", "epochs_per_task=1"], "method=agem needs task boundaries"),
        (["+method@hybrid.gem=gem"], "both edit gradients"),
    ],
)
def test_refuses_bad_values_online_streams_and_a_second_projection(
    make_cfg, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg("method=agem", *overrides, "logger=none"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_projected_gradient_never_conflicts_with_the_reference(make_cfg, monkeypatch) -> None:
    stats = {"first_task": 0, "kept": 0, "projected": 0}
    original = AGEM.on_before_optimizer_step

    def checked_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        before = flat_grad([p.grad for p in params], params).clone()
        draw = torch.Generator()
        draw.set_state(self.buffer.generator.get_state())  # replays the reference batch the hook will draw
        original(self, trainer, pl_module, optimizer)
        after = flat_grad([p.grad for p in params], params)
        if self.buffer.is_empty:
            stats["first_task"] += 1
            assert int(pl_module.current_task) == 0 and torch.equal(before, after)
            return
        ref = self.buffer.sample(self.replay_batch_size, draw)
        assert bool((ref.task_id < int(pl_module.current_task)).all()), "the memory holds past tasks only"
        out = pl_module.net(pl_module.prepare(ref.x, train=True))
        loss = F.cross_entropy(pl_module.training_logits(out, ref.task_id), ref.y)
        g_ref = flat_grad(torch.autograd.grad(loss, params, allow_unused=True), params)
        assert float(after @ g_ref) >= -1e-5 * float(after.norm() * g_ref.norm())
        if float(before @ g_ref) >= 0:
            assert torch.equal(before, after), "no conflict: the gradient is left alone"
            stats["kept"] += 1
        else:
            stats["projected"] += 1

    monkeypatch.setattr(AGEM, "on_before_optimizer_step", checked_step)
    train(make_cfg(*SMALL))
    assert stats["first_task"] == 20 and stats["kept"] > 0 and stats["projected"] > 0


def test_memories_hold_buffer_size_over_n_tasks_samples_of_each_task(make_cfg) -> None:
    cfg = make_cfg(*SMALL, "max_tasks=3")
    train(cfg)
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    buf = state["callbacks"]["AGEM[agem]"]["buffer"]
    size = buf["size"]
    assert size == 30 and torch.bincount(buf["task_id"][:size]).tolist() == [10, 10, 10]
    assert torch.equal(buf["y"][:size] // 2, buf["task_id"][:size])


@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
def test_runs_in_every_scenario(make_cfg, scenario: str) -> None:
    assert train(make_cfg(*SMALL, f"dataset.scenario={scenario}"))["avg_acc"] > 0.8


def test_state_round_trip(make_cfg) -> None:
    cfg = make_cfg(*SMALL, "max_tasks=2")
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["callbacks"]["AGEM[agem]"]
    fresh = AGEM(50, 16)
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert again["filled"] == state["filled"] == 1
    for key, value in again["buffer"].items():
        ref = state["buffer"][key]
        assert torch.equal(value, ref) if isinstance(value, torch.Tensor) else value == ref, key


def test_resume_after_a_task_equals_the_uninterrupted_run(make_cfg) -> None:
    assert_resume_parity(make_cfg, *SMALL)


def test_projection_rate_reaches_tensorboard(make_cfg) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cl_lightning.train import train

    cfg = make_cfg("method=agem", "module.log_every_n_steps=5")
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    rates = [e.value for e in events.Scalars("train/agem/projection_rate")]
    assert rates and all(0.0 <= r <= 1.0 for r in rates)
