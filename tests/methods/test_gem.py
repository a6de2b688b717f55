"""GEM: config, episodic memories, the projection inside training, state and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.methods import assert_resume_parity
from hydra.utils import instantiate

from cl_lightning.core.projection import LinearGroupGradients, flat_grad
from cl_lightning.errors import ConfigError
from cl_lightning.methods.gem import GEM, StepMemory
from cl_lightning.train import train

SMALL = ["method=gem", "method.buffer_size=50", "logger=none"]


def test_config_instantiates(make_cfg) -> None:
    method = instantiate(make_cfg("method=gem").method)
    assert isinstance(method, GEM) and method.name == "gem" and method.gradient_edit == "projection"
    assert method.needs_task_boundaries and method.replay_batch_size is None
    assert (method.buffer.capacity, method.memory_strength, method.eps) == (500, 0.5, 1e-3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.buffer_size=3"], "method.buffer_size=3: gem keeps buffer_size // dataset.n_tasks samples per task"),
        (["method.memory_strength=-1"], "method.memory_strength=-1"),
        (["method.replay_batch_size=0"], "method.replay_batch_size=0"),
        (["dataset.stream=online", "epochs_per_task=1"], "method=gem needs task boundaries"),
    ],
)
def test_refuses_bad_values_and_online_streams(make_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg("method=gem", *overrides, "logger=none"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_memories_hold_buffer_size_over_n_tasks_samples_of_each_task(make_cfg, monkeypatch) -> None:
    methods: list[GEM] = []
    original = GEM.on_fit_start

    def record(self, trainer, pl_module) -> None:
        methods.append(self)
        original(self, trainer, pl_module)

    monkeypatch.setattr(GEM, "on_fit_start", record)
    train(make_cfg(*SMALL))
    buf = methods[-1].buffer
    assert buf.stored_tasks() == [0, 1, 2, 3, 4]
    for t in range(5):
        slots = buf.slots_of_task(t)
        assert len(slots) == 10
        assert set((buf.y[slots] // 2).tolist()) == {t}, "a task's memory holds its own samples"


def test_projected_gradient_increases_no_memory_loss(make_cfg, monkeypatch) -> None:
    # exact projection (no margin, no ridge); after the hook, <p.grad, g_k> >= 0 for every past task k
    checked = {"steps": 0, "projected": 0}
    original = GEM.on_before_optimizer_step

    def checked_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        before = flat_grad([p.grad for p in params], params).clone()
        original(self, trainer, pl_module, optimizer)
        after = flat_grad([p.grad for p in params], params)
        past = [t for t in self.buffer.stored_tasks() if t < int(pl_module.current_task)]
        if not past:
            assert torch.equal(before, after), "nothing to protect on the first task"
            return
        for t in past:
            mem = self.buffer.get(self.buffer.slots_of_task(t))
            loss = F.cross_entropy(
                pl_module.training_logits(pl_module.net(pl_module.prepare(mem.x)), mem.task_id), mem.y
            )
            g_k = flat_grad(torch.autograd.grad(loss, params, allow_unused=True), params)
            assert float(after @ g_k) >= -1e-6 * float(after.norm() * g_k.norm())
        checked["steps"] += 1
        checked["projected"] += int(not torch.equal(before, after))

    monkeypatch.setattr(GEM, "on_before_optimizer_step", checked_step)
    train(make_cfg(*SMALL, "method.memory_strength=0", "method.eps=0"))
    assert checked["steps"] > 0 and checked["projected"] > 0, "the constraints were active in this run"


def expected_rows(memory: StepMemory, module, params: list, tasks: list[int]) -> torch.Tensor:
    """Autograd on each task's memory alone (its own task's training logits), in the layout of ``memory``."""
    grouped, rows, start = memory.grouped, [], 0
    for task, n in zip(tasks, memory.sizes, strict=True):
        part = slice(start, start + n)
        start += n
        task_id = memory.sample.task_id[part]
        assert bool((task_id == task).all()), "row k holds task k's memory"
        logits = module.training_logits(module(memory.x[part], task_id), task_id)
        grads = torch.autograd.grad(F.cross_entropy(logits, memory.sample.y[part]), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        if grouped is not None and grouped.columns is not None:  # the first layer's unused input columns
            i = grouped.first_weight
            dropped = torch.ones(grads[i].shape[1], dtype=torch.bool)
            dropped[grouped.columns] = False
            assert bool((grads[i][:, dropped] == 0).all()), "a feature zero in every memory sample: zero gradient"
            grads[i] = grads[i][:, grouped.columns]
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("scenario", "grouped", "replay", "pad"),
    [
        ("class_il", True, "null", 0),
        ("class_il", True, "null", 1),
        ("task_il", True, "null", 1),
        ("class_il", True, "4", 1),
        ("task_il", False, "4", 0),
    ],
)
def test_memory_gradients_equal_one_backward_per_past_task(
    make_cfg, monkeypatch, scenario: str, grouped: bool, replay: str, pad: int
) -> None:
    # each row of G against autograd on that task's memory alone; the one-pass path (MLP), with the first layer's
    # unused input columns left out (zero-padded images, whole memories) or not, and the one-pass-per-task path
    # (grouped=False) alike; p.grad is left alone
    if not grouped:
        monkeypatch.setattr(LinearGroupGradients, "build", classmethod(lambda cls, *args: None))
    original = GEM.memory_gradients
    checked, narrowed = [], []

    def checked_gradients(self, pl_module, params, memory, out) -> bool:
        before = [p.grad.clone() for p in params]
        assert original(self, pl_module, params, memory, out)
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True)), "p.grad untouched"
        assert (memory.grouped is not None) == grouped
        assert torch.equal(memory.x, pl_module.prepare(memory.sample.x, train=True)), "the memory's network inputs"
        tasks = sorted(set(memory.sample.task_id.tolist()))
        torch.testing.assert_close(out, expected_rows(memory, pl_module, params, tasks), rtol=1e-5, atol=1e-6)
        checked.append(len(tasks))
        narrowed.append(memory.grouped is not None and memory.grouped.columns is not None)
        return True

    monkeypatch.setattr(GEM, "memory_gradients", checked_gradients)
    train(
        make_cfg(
            *SMALL, f"dataset.scenario={scenario}", f"method.replay_batch_size={replay}", f"+dataset.source.pad={pad}"
        )
    )
    assert checked and max(checked) == 4, "every past task, up to four at the last task"
    assert any(narrowed) == (pad > 0 and replay == "null"), "columns left out for fixed memories with unused inputs"


def test_forgets_less_than_naive_in_class_il(make_cfg) -> None:
    naive = train(make_cfg("logger=none"))
    gem = train(make_cfg(*SMALL))
    assert gem["avg_acc"] > naive["avg_acc"] + 0.3


@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
def test_runs_in_every_scenario(make_cfg, scenario: str) -> None:
    assert train(make_cfg(*SMALL, f"dataset.scenario={scenario}", "method.replay_batch_size=4"))["avg_acc"] > 0.8


def test_state_round_trip(make_cfg) -> None:
    cfg = make_cfg(*SMALL, "max_tasks=2")
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["callbacks"]["GEM[gem]"]
    assert state["filled"] == 1 and state["buffer"]["size"] == 20
    fresh = GEM(50)
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert again["filled"] == 1
    for key, value in again["buffer"].items():
        ref = state["buffer"][key]
        assert torch.equal(value, ref) if isinstance(value, torch.Tensor) else value == ref, key


def test_resume_after_a_task_equals_the_uninterrupted_run(make_cfg) -> None:
    assert_resume_parity(make_cfg, *SMALL, "method.replay_batch_size=4")


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_memory_inputs_are_prepared_once_per_task_unless_augmented(make_cfg, monkeypatch, augment: str) -> None:
    # a fixed memory is prepared once and reused; with augmentation every step draws new inputs
    seen: list[tuple[list[int], torch.Tensor]] = []
    original = GEM._memory

    def record(self, module, tasks):
        memory = original(self, module, tasks)
        assert module.augments == (augment != "none")
        seen.append((list(tasks), memory.x))
        return memory

    monkeypatch.setattr(GEM, "_memory", record)
    train(make_cfg(*SMALL, f"+dataset.augment={augment}"))
    pairs = [(a, b) for (ta, a), (tb, b) in zip(seen, seen[1:], strict=False) if ta == tb]
    assert pairs, "several steps with the same past tasks"
    if augment == "none":
        assert all(a is b for a, b in pairs), "the same prepared tensor every step"
    else:
        assert all(a is not b and not torch.equal(a, b) for a, b in pairs), "new augmentations every step"
