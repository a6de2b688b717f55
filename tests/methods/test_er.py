"""Experience replay and its base, :class:`~cl_lightning.methods.replay.ReplayMethod`: behaviour on the synthetic
blobs, buffer contents, the order of replay and insertion, the union mean, a method written on the base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from helpers.methods import assert_resume_parity, capture

from cl_lightning.core.buffer import Buffer
from cl_lightning.errors import ConfigError
from cl_lightning.methods.er import ER
from cl_lightning.methods.replay import ReplayMethod
from cl_lightning.train import train
from cl_lightning.validation import check_number

SMALL = ["method=er", "method.buffer_size=50", "method.replay_batch_size=32", "logger=none"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.buffer_size=0", "method.buffer_size=0: must be an integer >= 1"),
        ("method.replay_batch_size=-1", "method.replay_batch_size=-1"),
        ("method.selection=fifo", "method.selection='fifo': choose one of reservoir, class_balanced, gdumb, herding"),
    ],
)
def test_bad_values_name_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg("method=er", override, "logger=none"))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("selection", ["reservoir", "class_balanced", "herding", "kcenter"])
def test_forgets_less_than_naive_in_class_il(make_cfg, selection: str) -> None:
    naive = train(make_cfg("logger=none"))
    er = train(make_cfg(*SMALL, f"method.selection={selection}"))
    assert naive["avg_acc"] < 0.35
    assert er["avg_acc"] > naive["avg_acc"] + 0.4 and er["forgetting"] < naive["forgetting"] - 0.4


@pytest.mark.parametrize("scenario", ["task_il", "class_il", "domain_il"])
def test_stores_the_right_task_ids_in_every_scenario(make_cfg, monkeypatch, scenario: str) -> None:
    methods = capture(monkeypatch, ER)
    results = train(make_cfg(*SMALL, f"dataset.scenario={scenario}"))
    assert results["avg_acc"] > 0.8
    buf: Buffer = methods[0].buffer
    assert len(buf) == 50
    task_ids = buf.task_id[: len(buf)]
    if scenario == "domain_il":
        assert set(task_ids.tolist()) <= set(range(5))
    else:  # tasks own outputs [2t, 2t + 2): the true task in task-IL, the current task of the stream otherwise
        assert torch.equal(task_ids, buf.y[: len(buf)] // 2)
    assert len(set(task_ids.tolist())) > 1, "reservoir keeps samples of several tasks"


def test_samples_the_replay_batch_before_inserting_the_current_one(make_cfg, monkeypatch) -> None:
    calls: list[tuple[str, int]] = []
    sample, add = Buffer.sample, Buffer.add

    def logged_sample(self, n, generator=None):
        calls.append(("sample", self.n_seen))
        return sample(self, n, generator)

    def logged_add(self, *args, **kwargs):
        calls.append(("add", self.n_seen))
        return add(self, *args, **kwargs)

    monkeypatch.setattr(Buffer, "sample", logged_sample)
    monkeypatch.setattr(Buffer, "add", logged_add)
    train(make_cfg(*SMALL, "max_tasks=1"))
    assert calls[0] == ("add", 0), "nothing to replay at the first step"
    assert [c[0] for c in calls[1:]] == ["sample", "add"] * ((len(calls) - 1) // 2)
    assert all(s[1] == a[1] for s, a in zip(calls[1::2], calls[2::2], strict=True)), "same buffer state"


def test_online_stream(make_cfg, monkeypatch) -> None:
    online = ["dataset.stream=online", "epochs_per_task=1", "dataset.blur=0.2"]
    for selection in ("reservoir", "class_balanced"):
        methods = capture(monkeypatch, ER)
        results = train(make_cfg(*SMALL, *online, f"method.selection={selection}"))
        assert len(results["acc_matrix"]) == 5
        buf = methods[-1].buffer
        assert bool((buf.task_id[: len(buf)] == -1).all()), "task ids are hidden on an online stream"
    for selection in ("herding", "kcenter"):
        with pytest.raises(ConfigError, match=f"method.selection={selection} selects at task end"):
            train(make_cfg(*SMALL, *online, f"method.selection={selection}"))


@pytest.mark.parametrize("selection", ["class_balanced", "kcenter"])
def test_resume_after_a_task_equals_the_uninterrupted_run(make_cfg, selection: str) -> None:
    # the default selection is tests/test_contract.py's; these keep per-class counts and per-task groups
    assert_resume_parity(make_cfg, *SMALL, f"method.selection={selection}")


def assert_mid_task_resume(tmp_path: Path, run: list[str]) -> tuple[dict, dict, dict]:
    """Run uninterrupted; run again killed at step 18 (mid task 2) and resume; return both results and checkpoints.

    (Used by ``test_pnn.py``; ER's own mid-task resume is ``tests/test_contract.py``'s.)"""
    repo = Path(__file__).resolve().parents[2]

    def cli(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
        out.mkdir(exist_ok=True)
        env = {**os.environ, "CL_OUTPUT_DIR": str(out), "PYTHONPATH": str(repo / "tests")}
        return subprocess.run(
            [sys.executable, "-m", "cl_lightning", *args], capture_output=True, text=True, timeout=300, env=env, cwd=out
        )

    whole = cli(tmp_path / "whole", *run)
    assert whole.returncode == 0, whole.stderr[-2000:]
    kill = ["checkpoint_every_n_steps=4", "+callbacks.kill._target_=helpers.kill.KillAtStep", "+callbacks.kill.step=18"]
    killed = cli(tmp_path / "killed", *run, *kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (run_dir,) = (tmp_path / "killed").glob("*/*")
    resumed = cli(tmp_path / "killed", f"resume={run_dir}", "threads=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (whole_dir,) = (tmp_path / "whole").glob("*/*")
    expected = json.loads((whole_dir / "results.json").read_text())
    got = json.loads((run_dir / "results.json").read_text())
    assert got["complete"] and got["acc_matrix"] == expected["acc_matrix"], "bit-identical on CPU"
    load = lambda d: torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)  # noqa: E731
    return got, load(run_dir), load(whole_dir)


@pytest.mark.parametrize("scenario", ["class_il", "task_il"])
def test_loss_is_one_mean_over_the_union_of_batch_and_replay(make_cfg, monkeypatch, scenario: str) -> None:
    """Chaudhry et al. (2019, Alg. 1), Mammoth and Avalanche take one cross-entropy mean over the current batch and
    the replayed batch together, not the sum of the two means (which doubles the step on replay steps). The loss the
    module backpropagates must have the union mean's value and gradient, with replay and batch of different sizes
    (16 and 5) and each sample masked by the scenario."""
    from cl_lightning.models.module import CLModule

    drawn: list = []
    sample = Buffer.sample

    def recording_sample(self, n, generator=None):
        out = sample(self, n, generator)
        drawn.append(out)
        return out

    checked: list[float] = []
    step = CLModule.training_loss

    def checking_step(self, batch):
        drawn.clear()
        loss = step(self, batch)
        if drawn and len(checked) < 4 and int(self.current_task) >= 1:
            (replay,) = drawn
            assert len(replay.y) == 5 and len(batch.y) == 16
            params = [p for p in self.net.parameters() if p.requires_grad]
            got = torch.autograd.grad(loss, params, retain_graph=True)
            x = torch.cat([self.prepare(batch.x, train=True), self.prepare(replay.x, train=True)])
            tid, y = torch.cat([batch.task_id, replay.task_id]), torch.cat([batch.y, replay.y])
            union = F.cross_entropy(self.training_logits(self(x, tid), tid), y)
            want = torch.autograd.grad(union, params)
            assert float(loss.detach()) == pytest.approx(float(union.detach()), rel=1e-5, abs=1e-6)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
            checked.append(float(union.detach()))
        return loss

    monkeypatch.setattr(Buffer, "sample", recording_sample)
    monkeypatch.setattr(CLModule, "training_loss", checking_step)
    run = ["method=er", "method.buffer_size=50", "method.replay_batch_size=5", "logger=none", "max_tasks=2"]
    train(make_cfg(*run, f"dataset.scenario={scenario}"))
    assert len(checked) == 4


@pytest.mark.parametrize("method", ["er", "der", "derpp", "gem", "agem", "oml"])
def test_a_buffer_larger_than_the_data_is_reported_once(make_cfg, method: str) -> None:
    """The blobs have 5 tasks of 80 training samples: a buffer of 100,000 can never fill. The run says so once, with
    both numbers, and its checkpoint holds rows for what the buffer stores, not 100,000."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = make_cfg(f"method={method}", "method.buffer_size=100000", "logger=none", "max_tasks=2")
        train(cfg)
    said = [str(w.message) for w in caught if "method.buffer_size=100000" in str(w.message)]
    assert len(said) == 1, said
    assert "400 training samples" in said[0], said[0]
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (buffer,) = [s["buffer"] for s in state.values() if "buffer" in s]
    assert buffer["capacity"] == 100000 and buffer["x"].shape[0] <= 2 * max(buffer["size"], 128)


def test_a_buffer_that_fits_the_data_is_not_reported(make_cfg) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(make_cfg("method=er", "method.buffer_size=400", "logger=none", "max_tasks=1"))
    assert not [w for w in caught if "buffer_size" in str(w.message)]


def test_with_a_method_that_replaces_the_task_loss_the_term_is_the_replay_mean() -> None:
    from types import SimpleNamespace

    from helpers.hooks import OwnObjective

    from cl_lightning.data.batch import Batch

    logits, y = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0])
    batch = Batch(torch.zeros(4, 1), y, torch.full((4,), -1), torch.arange(4))
    replay_ce = torch.tensor(0.7)
    alone = SimpleNamespace(methods=[], training_logits=lambda z, t: z)
    union = ER.union_term(alone, batch, logits, replay_ce, 2)  # type: ignore[arg-type]
    ce_b = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(ce_b + union, (4 * ce_b + 2 * replay_ce) / 6)
    owner = SimpleNamespace(methods=[OwnObjective()], training_logits=lambda z, t: z)
    assert ER.union_term(owner, batch, logits, replay_ce, 2) is replay_ce  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the base, as a newcomer uses it
class LabelReplay(ReplayMethod):
    """The example of ``methods/replay.py``'s docstring: ``L = CE(f(x), y) + beta * CE(f(aug(x')), y')``."""

    name: ClassVar[str] = "label_replay"

    def __init__(self, buffer_size: int = 500, replay_batch_size: int = 10, beta: float = 1.0, seed: int = 0) -> None:
        super().__init__(buffer_size, replay_batch_size, self.selections[0], seed)
        self.beta = check_number("method.beta", beta)

    def replay_terms(self, pl_module, batch, logits):
        replay = self.draw(pl_module)
        if replay is None:
            return {}
        out = pl_module(replay.x, replay.task_id)
        return {"replay": self.beta * F.cross_entropy(pl_module.training_logits(out, replay.task_id), replay.y)}


class EpisodicReplay(LabelReplay):
    """The same loss on GEM's memories: ``buffer_size // n_tasks`` random samples of each task, chosen at its end."""

    name: ClassVar[str] = "episodic_replay"
    selections: ClassVar[tuple[str, ...]] = ("random",)
    memory_per_task: ClassVar[bool] = True
    needs_task_boundaries: ClassVar[bool] = True


@pytest.mark.parametrize("cls", [LabelReplay, EpisodicReplay])
def test_a_method_written_on_the_base_replays(make_cfg, monkeypatch, cls: type[ReplayMethod]) -> None:
    methods = capture(monkeypatch, cls)
    custom = [f"method._target_={cls.__module__}.{cls.__qualname__}", "~method.selection", "method.buffer_size=50"]
    naive = train(make_cfg("logger=none"))
    results = train(make_cfg(*SMALL, *custom))
    assert results["avg_acc"] > naive["avg_acc"] + 0.3 and results["forgetting"] < naive["forgetting"] - 0.3
    (method,) = methods
    buf = method.buffer
    if cls is EpisodicReplay:  # 50 // 5 tasks: 10 random samples of each task, chosen at its end
        assert method.quota == 10 and torch.bincount(buf.task_id[: len(buf)]).tolist() == [10, 10, 10, 10, 10]
    else:
        assert len(buf) == 50 and buf.n_seen == 5 * 80 * 4, "every step's batch offered: 5 tasks, 80 samples, 4 epochs"
    state = method.state_dict()
    assert state["task"] == 4 and state["filled"] == (4 if cls is EpisodicReplay else -1)
    assert all(v.device.type == "cpu" for v in state["buffer"].values() if isinstance(v, torch.Tensor))


def test_draw_prepares_the_replay_batch_and_returns_none_while_empty() -> None:
    from types import SimpleNamespace

    method = LabelReplay(buffer_size=8, replay_batch_size=3)
    module = SimpleNamespace(prepare=lambda x, train=False: x.float() / 255 if train else None)
    assert method.draw(module) is None  # type: ignore[arg-type]
    method.buffer.add(torch.full((5, 2), 255, dtype=torch.uint8), torch.arange(5), 0)
    replay = method.draw(module)  # type: ignore[arg-type]
    assert replay is not None and len(replay.y) == 3 and replay.x.dtype == torch.float32
    assert bool((replay.x == 1).all()), "network inputs, prepared as a training batch"
    assert len(method.draw(module, n=10).y) == 5  # type: ignore[arg-type,union-attr]
