"""MIR: the candidates' scores are the loss increase under a virtual SGD step on the incoming batch, computed without
touching the network; the top-scored are replayed (instantiation, state round trip, resume and DDP:
``tests/test_contract.py``)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_lightning.errors import ConfigError
from cl_lightning.methods.mir import MIR
from cl_lightning.train import train


def fake_module(net: nn.Module, lr: float) -> SimpleNamespace:
    return SimpleNamespace(
        net=net, prepare=lambda x, train=False: x, training_logits=lambda z, tid: z,
        optimizers=lambda: SimpleNamespace(param_groups=[{"lr": lr}]), trainer=SimpleNamespace(world_size=1),
    )  # fmt: skip


def candidates(n: int) -> SimpleNamespace:
    return SimpleNamespace(x=torch.randn(n, 5), y=torch.randint(0, 3, (n,)), task_id=torch.full((n,), -1))


def test_scores_are_the_loss_increase_of_a_virtual_sgd_step() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    batch, cand = candidates(6), candidates(20)
    scores = MIR(subsample=20).scores(fake_module(net, 0.3), batch, cand.x, cand)  # type: ignore[arg-type]
    ref = copy.deepcopy(net)  # brute force: one real SGD step on the incoming batch
    with torch.no_grad():
        pre = F.cross_entropy(ref(cand.x), cand.y, reduction="none")
    torch.optim.SGD(ref.parameters(), lr=0.3).zero_grad()
    F.cross_entropy(ref(batch.x), batch.y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.3).step()
    with torch.no_grad():
        post = F.cross_entropy(ref(cand.x), cand.y, reduction="none")
    torch.testing.assert_close(scores, post - pre, rtol=1e-4, atol=1e-6)


def test_scoring_leaves_the_network_as_it_was() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    before = copy.deepcopy(net.state_dict())
    cand = candidates(20)
    MIR(subsample=20).scores(fake_module(net, 0.3), candidates(6), cand.x, cand)  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "batch norm statistics untouched"
    assert all(p.grad is None for p in net.parameters())


def test_the_top_scored_candidates_are_replayed(make_cfg, monkeypatch) -> None:
    picked: list[tuple[torch.Tensor, torch.Tensor]] = []
    scores = MIR.scores

    def recording(self, pl_module, batch, x, candidates):
        s = scores(self, pl_module, batch, x, candidates)
        picked.append((s, candidates.y))
        return s

    monkeypatch.setattr(MIR, "scores", recording)
    train(make_cfg("dataset.stream=online", "epochs_per_task=1", "logger=none", "method=mir", "method.subsample=20",
                   "method.replay_batch_size=5"))  # fmt: skip
    assert picked and all(len(s) <= 20 for s, _ in picked)
    assert any(len(s) == 20 for s, _ in picked), "a full candidate set once the buffer holds 20"


def test_subsample_must_cover_the_replay_batch(make_cfg) -> None:
    with pytest.raises(ConfigError, match="method.subsample=5"):
        train(make_cfg("method=mir", "method.subsample=5", "method.replay_batch_size=10", "logger=none"))
