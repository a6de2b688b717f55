"""The frozen copy of the network that distillation methods keep (LwF, iCaRL): copied once per task, frozen, and
rebuilt exactly from its state."""

from __future__ import annotations

import io

import torch
from torch import nn

from cl_lightning.core.teacher import Teacher


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_take_copies_and_freezes_once_per_task() -> None:
    live = net()
    teacher = Teacher()
    assert not teacher.ready and teacher.take(live, 0)
    assert teacher.net is not live and not teacher.net.training
    assert all(not p.requires_grad for p in teacher.net.parameters())
    assert all(p.requires_grad for p in live.parameters()), "the live network stays trainable"
    with torch.no_grad():
        live[0].weight.add_(1.0)
    assert not teacher.take(live, 0), "a second take for the same task (a resumed run) changes nothing"
    assert not torch.equal(teacher.net[0].weight, live[0].weight)
    assert teacher.take(live, 1) and torch.equal(teacher.net[0].weight, live[0].weight)


def test_state_round_trips_through_weights_only_load_and_rebuilds_on_attach() -> None:
    live = net()
    teacher = Teacher()
    teacher.take(live, 2)
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)
    buffer.seek(0)
    restored = Teacher()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.task == 2 and not restored.ready
    assert restored.state_dict()["teacher"].keys() == teacher.state_dict()["teacher"].keys(), "saved again unchanged"
    other = net()
    with torch.no_grad():
        other[0].weight.zero_()
    restored.attach(other)  # the structure of the live network, the tensors of the state
    x = torch.randn(5, 3)
    assert restored.ready and torch.equal(restored.net(x), teacher.net(x))
    assert all(not p.requires_grad for p in restored.net.parameters())


def test_a_state_without_a_teacher_restores_none() -> None:
    teacher = Teacher()
    teacher.load_state_dict({})
    teacher.attach(net())
    assert not teacher.ready and teacher.task == -1
