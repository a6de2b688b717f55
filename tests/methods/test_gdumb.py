"""GDumb: the stream trains nothing, the network is re-trained from scratch on the memory at each task end
(instantiation, state round trip, resume and DDP: ``tests/test_contract.py``; the sampler:
``tests/core/test_buffer.py``)."""

from __future__ import annotations

import torch
from torch import nn

from cl_lightning.core.from_scratch import reinitialise
from cl_lightning.methods.gdumb import GDumb
from cl_lightning.train import train


def test_the_stream_leaves_the_network_as_it_was(make_cfg, monkeypatch) -> None:
    states: list[dict[str, torch.Tensor]] = []

    def record(self, trainer, pl_module, task_id):
        states.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    start: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(GDumb, "on_fit_start", lambda self, t, m: start.append(
        {k: v.clone() for k, v in m.net.state_dict().items()}) or self.buffer.to(m.device))  # fmt: skip
    monkeypatch.setattr(GDumb, "on_task_end", record)
    train(make_cfg("method=gdumb", "logger=none", "max_tasks=1", "epochs_per_task=2"))
    (before,), (after,) = start, states
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_gdumb_learns_the_seen_classes_from_its_memory_alone(make_cfg) -> None:
    naive = train(make_cfg("method=naive", "logger=none"))
    gdumb = train(make_cfg("method=gdumb", "method.epochs=16", "logger=none"))
    assert gdumb["avg_acc"] > naive["avg_acc"] + 0.3 and gdumb["forgetting"] < 0.2


def test_reinitialise_is_seeded_and_leaves_the_global_rng_alone() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    state = torch.get_rng_state()
    reinitialise(net, 5)
    first = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    reinitialise(net, 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], v) for k, v in net.state_dict().items())
