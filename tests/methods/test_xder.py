"""X-DER: stored logits rewritten for later heads only, the guarded rescaling, the separated cross-entropy, the
class-balanced task-end buffer, state and resume (instantiation, state round trip, mid-task resume and DDP:
``tests/test_contract.py``)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.methods import assert_resume_parity, capture
from torch import Tensor, nn

from cl_lightning.core.buffer import Buffer
from cl_lightning.data.batch import Batch
from cl_lightning.errors import ConfigError
from cl_lightning.methods.xder import XDER, rewrite_logits
from cl_lightning.train import train

SMALL = ["method=xder", "method.buffer_size=50", "method.replay_batch_size=16", "logger=none"]


class FakeModule(nn.Module):
    """The parts of ``CLModule`` X-DER reads: a linear network, 3 tasks of 2 classes, one process."""

    def __init__(self, scenario: str = "class_il") -> None:
        super().__init__()
        self.net = nn.Linear(4, 6)
        self.output_masks = torch.eye(3, dtype=torch.bool).repeat_interleave(2, 1)  # task t owns 2t, 2t + 1
        self.n_tasks, self.scenario = 3, scenario
        self.trainer = SimpleNamespace(world_size=1)

    def forward(self, x: Tensor, task_id: Tensor | None = None) -> Tensor:
        return self.net(x)

    def prepare(self, x: Tensor, train: bool = False) -> Tensor:
        return x

    def step_outputs(self, method: XDER) -> list[Tensor]:
        return self.outputs


def filled(task: int, scenario: str = "class_il") -> tuple[XDER, FakeModule]:
    """An X-DER in ``task`` whose buffer holds 8 samples of each earlier task, stored with random logits."""
    torch.manual_seed(0)
    method, module = XDER(buffer_size=24, replay_batch_size=8, m=5.0), FakeModule(scenario)
    for t in range(task):
        y = torch.arange(2 * t, 2 * t + 2).repeat(4)
        method.buffer.add_task(torch.randn(8, 4), y, t, logits=torch.randn(8, 6))
    method._task = task
    return method, module


def replay_terms(method: XDER, module: FakeModule, batch: Batch, logits: Tensor) -> dict[str, Tensor]:
    """The step's terms as the module gets them: the draws forwarded, then the terms."""
    module.outputs = [module(x, t) for x, t in method.step_inputs(module, batch)]  # type: ignore[arg-type]
    return method.replay_terms(module, batch, logits)  # type: ignore[arg-type]


def batch_of(task: int, n: int = 8) -> Batch:
    y = torch.arange(2 * task, 2 * task + 2).repeat(n // 2)
    return Batch(torch.randn(n, 4), y, torch.full_like(y, task), torch.arange(n))


# ---------------------------------------------------------------------------------------------- the rescaling rho
def test_rescaling_is_the_papers_where_the_ground_truth_logit_is_positive() -> None:
    stored = torch.tensor([[3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    new = torch.tensor([[9.0, 9.0, 6.0, -2.0], [9.0, 9.0, 1.0, 2.0]])
    columns = torch.tensor([False, False, True, True])
    out = rewrite_logits(stored, new, torch.tensor([0, 0]), columns, 0.5)
    assert torch.equal(out[:, :2], stored[:, :2]), "the columns not rewritten are the stored ones"
    torch.testing.assert_close(out[0, 2:], torch.tensor([6.0, -2.0]) * (0.5 * 3.0 / 6.0))  # gamma * g / max v
    assert torch.equal(out[1, 2:], torch.tensor([1.0, 2.0])), "kept as they are when already below g"


@pytest.mark.parametrize(
    ("g", "v"),
    [(0.0, [1.0, -3.0]), (0.0, [0.0, -1.0]), (-2.0, [1e-30, -5.0]), (-2.0, [-1e-30, -9.0]), (-5.0, [-1.0, -4.0]),
     (-1.0, [0.0, 0.0])],
)  # fmt: skip
def test_the_guard_keeps_the_rewrite_finite_and_below_the_ground_truth_when_it_is_not_positive(
    g: float, v: list[float]
) -> None:
    # the paper's factor gamma * g / max v here: nan (max v = 0), about 1e30 (max v near 0), or a max above g
    gamma, top = 0.85, max(v)
    stored = torch.tensor([[g, 0.0, 0.0]])
    out = rewrite_logits(stored, torch.tensor([[0.0, *v]]), torch.tensor([0]), torch.tensor([False, True, True]), gamma)
    assert torch.isfinite(out).all()
    rewritten = out[0, 1:]
    assert rewritten.abs().max() <= max(abs(x) for x in v) + abs(top) + (2 - gamma) * abs(g), "bounded"
    assert float(rewritten.max()) == pytest.approx(g - (1 - gamma) * abs(g), abs=1e-6), "largest at g - (1-gamma)|g|"
    assert float(rewritten.max()) <= g, "the ground-truth class stays the stored target's top class"
    torch.testing.assert_close(rewritten - rewritten.max(), torch.tensor(v) - top), "a shift: the order is kept"


# ---------------------------------------------------------------------------------------------- the task end
def test_a_task_end_rewrites_the_finished_head_of_stored_samples_and_never_their_past(make_cfg, monkeypatch) -> None:
    snapshots: list[dict] = []
    original = XDER.on_task_end

    def recorded(self, trainer, pl_module, task_id):
        buf = self.buffer
        n = buf.size
        # a stored sample is identified by its (group, rank), which the task-end compaction carries with it
        keys = [] if buf.is_empty else list(zip(buf.group[:n].tolist(), buf.rank[:n].tolist(), strict=True))
        before = {key: buf.logits[s].clone() for s, key in enumerate(keys)}
        original(self, trainer, pl_module, task_id)
        old = torch.nonzero(buf.task_id[: buf.size] < task_id).view(-1)
        now = self._logits(pl_module, buf.x[old], buf.task_id[old]) if len(old) else None
        after = {k: v.clone() for k, v in buf.state_dict().items() if isinstance(v, Tensor)} | {"size": buf.size}
        snapshots.append(
            {"task": task_id, "before": before, "now": now, "old": old, "module": pl_module, "after": after}
        )

    monkeypatch.setattr(XDER, "on_task_end", recorded)
    train(make_cfg(*SMALL, "max_tasks=3"))
    assert [s["task"] for s in snapshots] == [0, 1, 2]
    for snap in snapshots[1:]:
        t, after, old = snap["task"], snap["after"], snap["old"]
        masks = snap["module"].output_masks.cpu()
        head = masks[t]
        assert len(old) > 0
        stored = torch.stack([snap["before"][int(after["group"][s]), int(after["rank"][s])] for s in old])
        kept = after["logits"][old]
        assert torch.equal(kept[:, ~head], stored[:, ~head]), "every logit but the finished head's is kept"
        expected = rewrite_logits(stored, snap["now"], after["y"][old], head, 0.85)
        torch.testing.assert_close(kept, expected)
        assert not torch.equal(kept[:, head], stored[:, head]), "the finished head is rewritten"
        g = kept.gather(1, after["y"][old].view(-1, 1)).squeeze(1)
        assert (kept[:, head].amax(1) <= g).all(), "below the ground-truth logit"
        # the new task's samples: their past heads below their own logit, the buffer class-balanced
        new = after["task_id"][: after["size"]] == t
        z, y = after["logits"][: after["size"]][new], after["y"][: after["size"]][new]
        g_new = z.gather(1, y.view(-1, 1)).squeeze(1)
        assert (z[:, masks[:t].any(0)].amax(1) <= g_new).all()
        counts = torch.bincount(after["y"][: after["size"]], minlength=10)
        n_seen = 2 * (t + 1)
        assert (counts[:n_seen] == 50 // n_seen).all() and counts[n_seen:].sum() == 0


def test_task_end_selection_keeps_the_logits_of_the_samples_it_keeps() -> None:
    buf = Buffer(8, "random", seed=0)
    x0, z0 = torch.arange(8.0).view(8, 1), torch.randn(8, 3)
    buf.add_task(x0, torch.zeros(8, dtype=torch.long), 0, logits=z0)
    buf.add_task(x0 + 100, torch.ones(8, dtype=torch.long), 1, logits=torch.randn(8, 3))
    assert buf.logits is not None
    kept = buf.slots_of_task(0)
    assert len(kept) == 4
    for s in kept.tolist():
        assert torch.equal(buf.logits[s], z0[int(buf.x[s, 0])]), "a kept sample's logits move with it"


def test_the_rewrite_during_a_task_touches_only_the_current_and_future_heads() -> None:
    method, module = filled(1)
    method.replay_batch_size = 3  # A and B: at most 6 of the 8 stored samples
    before = method.buffer.logits.clone()
    replay_terms(method, module, batch_of(1), torch.randn(8, 6))
    after = method.buffer.logits
    replays = method._replays
    assert replays is not None and int(replays.sum()) > 0
    drawn = replays > 0  # a first replay is always rewritten (probability 1 / 1)
    assert (~drawn).any()
    assert torch.equal(after[:, :2], before[:, :2]), "the past head (the samples' own task) never changes"
    assert torch.equal(after[~drawn], before[~drawn]), "samples not replayed are not touched"
    assert not torch.equal(after[drawn][:, 2:], before[drawn][:, 2:])
    with torch.no_grad():
        out = module.net(method.buffer.x[drawn])
    expected = rewrite_logits(before[drawn], out, method.buffer.y[drawn], torch.arange(6) >= 2, method.gamma)
    torch.testing.assert_close(after[drawn], expected)


# ---------------------------------------------------------------------------------------------- the losses
def test_the_current_cross_entropy_runs_over_the_current_head_only() -> None:
    method, module = filled(1)
    batch = batch_of(1)
    logits = torch.randn(8, 6, requires_grad=True)
    terms = replay_terms(method, module, batch, logits)
    torch.testing.assert_close(terms["stream"], F.cross_entropy(logits[:, 2:4], batch.y - 2))
    (grad,) = torch.autograd.grad(terms["stream"], logits)
    assert (grad[:, [0, 1, 4, 5]] == 0).all(), "past and future classes get no gradient from the current CE"
    assert (grad[:, 2:4] != 0).all()


@pytest.mark.parametrize(("scenario", "heads"), [("class_il", [0, 1, 2, 3]), ("task_il", None)])
def test_the_replayed_cross_entropy_runs_over_the_past_heads_only(scenario: str, heads: list[int] | None) -> None:
    method, module = filled(2, scenario)
    terms = replay_terms(method, module, batch_of(2), torch.randn(8, 6))
    (grad,) = torch.autograd.grad(terms["replay"], module.net.weight)
    rows = grad.abs().sum(1) > 0
    if heads is not None:  # class-IL: every past class, and only those
        assert rows.tolist() == [c in heads for c in range(6)]
    else:  # task-IL: each sample's own head (tasks 0 and 1 both replayed), never the current or a future one
        assert rows[:4].all() and not rows[4:].any()


def test_the_margins_start_and_stop_with_the_tasks_that_have_past_and_future_heads() -> None:
    for task, expected in [(0, {"stream", "future_margin"}),
                           (1, {"stream", "logit_mse", "replay", "past_margin", "future_margin"}),
                           (2, {"stream", "logit_mse", "replay", "past_margin"})]:  # fmt: skip
        method, module = filled(task)
        terms = replay_terms(method, module, batch_of(task), torch.randn(8, 6))
        assert set(terms) == expected, task
        assert all(torch.isfinite(v) for v in terms.values())
    method, module = filled(1)
    logits = torch.zeros(8, 6)
    logits[:, 2:4] = 100.0  # the current head far above the others: no margin is violated on the current batch
    method.m = 0.3
    terms = replay_terms(method, module, batch_of(1), logits)
    assert float(terms["past_margin"]) == 0.0


# ---------------------------------------------------------------------------------------------- config and state
@pytest.mark.parametrize(
    ("override", "message"),
    [("method.gamma=0", "method.gamma=0: must be a number in (0, 1]"), ("method.eta=-1", "method.eta=-1"),
     ("method.buffer_size=5", "method.buffer_size=5: xder keeps buffer_size // classes seen")],
)  # fmt: skip
def test_bad_values_name_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg("method=xder", override, "logger=none"))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dataset.scenario=domain_il", "domain-IL shares one head"),
        ("dataset.stream=online epochs_per_task=1", "needs task boundaries"),
    ],
)
def test_refuses_what_it_cannot_do_with_the_reason(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg("method=xder", *override.split(), "logger=none"))


def test_state_round_trips_and_a_resumed_task_end_is_not_repeated(make_cfg, monkeypatch) -> None:
    methods = capture(monkeypatch, XDER)
    train(make_cfg(*SMALL, "max_tasks=2"))
    state = methods[0].state_dict()
    assert state["filled"] == 1 and state["replays"].device.type == "cpu" and state["buffer"]["logits"] is not None
    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    fresh = XDER(buffer_size=50, replay_batch_size=16)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    assert torch.equal(fresh.state_dict()["replays"], state["replays"])
    assert torch.equal(fresh.buffer.logits, state["buffer"]["logits"])
    logits = fresh.buffer.logits.clone()
    fresh.on_task_end(None, None, 1)  # type: ignore[arg-type]  # task 1 was done: nothing is read, nothing moves
    assert torch.equal(fresh.buffer.logits, logits)


def test_resume_after_a_task_equals_the_uninterrupted_run(make_cfg) -> None:
    assert_resume_parity(make_cfg, *SMALL)


def test_forgets_less_than_naive_in_class_il(make_cfg) -> None:
    naive = train(make_cfg("logger=none"))
    xder = train(make_cfg(*SMALL))
    assert xder["avg_acc"] > naive["avg_acc"] + 0.3 and xder["forgetting"] < naive["forgetting"] - 0.3


def test_learns_every_task_in_task_il(make_cfg) -> None:
    xder = train(make_cfg(*SMALL, "dataset.scenario=task_il"))
    assert xder["avg_acc"] > 0.9
