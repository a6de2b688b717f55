"""GEM: config, episodic memories, the projection inside training, state and resume."""

from __future__ import annotations

import ast
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.methods import assert_resume_parity
from hydra.utils import instantiate
from torch import nn

import cl_lightning
from cl_lightning.core.projection import flat_grad
from cl_lightning.errors import ConfigError
from cl_lightning.methods.gem import GEM
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


class UserMLP(nn.Module):
    """A user's own fully connected network (not the package's ``MLP``): tanh units, layers held in attributes."""

    def __init__(self, input_shape: tuple[int, int, int], n_outputs: int, width: int = 24) -> None:
        super().__init__()
        self.first = nn.Linear(math.prod(input_shape), width)
        self.second = nn.Linear(width, width)
        self.head = nn.Linear(width, n_outputs)
        self.feature_dim = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.second(torch.tanh(self.first(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


USER_MLP = [f"model._target_={__name__}.UserMLP", "~model.hidden", "~model.dropout", "~model.init"]
CNN = ["model=cnn", "model.channels=[4]", "model.hidden=8", "model.batch_norm=true"]


@pytest.mark.parametrize(
    ("model", "scenario", "replay"),
    [
        ([], "class_il", "null"),
        (USER_MLP, "class_il", "null"),
        (USER_MLP, "task_il", "4"),
        (CNN, "class_il", "null"),
        (CNN, "task_il", "4"),
    ],
)
def test_memory_gradients_equal_one_backward_per_past_task(
    make_cfg, monkeypatch, model: list[str], scenario: str, replay: str
) -> None:
    # row k of G against autograd on task k's memory alone (its own task's training logits), for the package's MLP,
    # a user's own MLP class and a CNN with batch norm alike; p.grad is left alone
    original = GEM.memory_gradients
    checked = []

    def checked_gradients(self, pl_module, params, memories, out):
        before = [p.grad.clone() for p in params]
        G = original(self, pl_module, params, memories, out)
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True)), "p.grad untouched"
        past = [t for t in self.buffer.stored_tasks() if t < int(pl_module.current_task)]
        assert len(memories) == len(past) == G.shape[0]
        for t, memory, row in zip(past, memories, G, strict=True):
            assert bool((memory.task_id == t).all()), "row k holds task k's memory"
            slots = self.buffer.slots_of_task(t)
            if replay == "null":  # the whole memory, from the buffer itself
                assert torch.equal(memory.slots, slots)
            else:  # a subsample of it, drawn anew
                assert len(memory.slots) == min(int(replay), len(slots)) and bool(torch.isin(memory.slots, slots).all())
            sample = self.buffer.get(memory.slots)
            x = pl_module.prepare(sample.x, train=True)
            loss = F.cross_entropy(pl_module.training_logits(pl_module(x, sample.task_id), sample.task_id), sample.y)
            expected = flat_grad(torch.autograd.grad(loss, params, allow_unused=True), params)
            torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
        checked.append(len(past))
        return G

    monkeypatch.setattr(GEM, "memory_gradients", checked_gradients)
    train(make_cfg(*SMALL, *model, f"dataset.scenario={scenario}", f"method.replay_batch_size={replay}"))
    assert checked and max(checked) == 4, "every past task, up to four at the last task"


def test_the_package_uses_no_private_torch_api_and_gem_names_no_network_class() -> None:
    # memory gradients come from public autograd on any network: no private torch entry points anywhere in the
    # package, and GEM never looks at the network's class
    package = Path(cl_lightning.__file__).parent
    private = re.compile(r"torch\.ops\.aten|torch\._C\b|_global_\w*_hooks|threshold_backward")
    offenders = [
        f"{path.relative_to(package)}:{i}"
        for path in sorted(package.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), start=1)
        if private.search(line)
    ]
    assert not offenders, offenders
    tree = ast.parse(Path(inspect.getfile(GEM)).read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not names & {"isinstance", "type", "MLP"} and "cl_lightning.models.backbones" not in imported


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
    seen: list[tuple[list[int], list[torch.Tensor]]] = []
    original = GEM.memories

    def record(self, module, tasks):
        memories = original(self, module, tasks)
        assert module.augments == (augment != "none")
        seen.append((list(tasks), [m.x for m in memories]))
        return memories

    monkeypatch.setattr(GEM, "memories", record)
    train(make_cfg(*SMALL, f"+dataset.augment={augment}"))
    pairs = [(a, b) for (ta, a), (tb, b) in zip(seen, seen[1:], strict=False) if ta == tb]
    assert pairs, "several steps with the same past tasks"
    for a, b in pairs:
        if augment == "none":
            assert all(x is y for x, y in zip(a, b, strict=True)), "the same prepared tensors every step"
        else:
            assert all(x is not y and not torch.equal(x, y) for x, y in zip(a, b, strict=True)), "new augmentations"
