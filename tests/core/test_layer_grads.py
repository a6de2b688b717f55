"""The batched path of the Fisher and MAS importance (Linear and Conv2d layers from batched backward passes) equals
the per-sample path, on networks it covers wholly, partly, and not at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_lightning.core.importance import diagonal_fisher, mas_importance
from cl_lightning.core.layer_grads import LayerCapture, batched_layers


class Shared(nn.Module):
    """One Linear layer applied twice (its gradient is a sum over both calls), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x.flatten(1))))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 2, 4),
    )  # fmt: skip


NETS = {"mlp": (mlp, (1, 2, 3)), "cnn": (cnn, (1, 6, 3)), "shared": (Shared, (1, 2, 3))}


def setup(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = NETS[name]
    net = factory()
    if name == "cnn":  # non-trivial running statistics, used in eval mode
        net.train()
        with torch.no_grad():
            net(torch.randn(32, *shape) * 2 + 1)
    return net, torch.randn(20, *shape)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("mode", ["exact", "sampled", "empirical"])
def test_fisher_batched_equals_per_sample(name: str, mode: str) -> None:
    net, x = setup(name)
    y = torch.randint(0, 3, (len(x),))
    outputs = torch.tensor([0, 1, 2])

    def fisher(batched: bool) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        targets = y if mode == "empirical" else None
        return diagonal_fisher(net, x, mode, targets=targets, outputs=outputs, generator=gen, batched=batched)

    close(fisher(True), fisher(False))


@pytest.mark.parametrize("name", sorted(NETS))
def test_mas_batched_equals_per_sample(name: str) -> None:
    net, x = setup(name)
    close(mas_importance(net, x, batched=True), mas_importance(net, x, batched=False))


def test_the_layers_covered() -> None:
    net = cnn()
    names = {n for n, p in net.named_parameters()}
    assert set(batched_layers(net, names)) == {"0", "3", "6"}  # the convolutions and the head, not batch norm
    assert set(batched_layers(net, names - {"0.bias"})) == {"3", "6"}  # a layer with a frozen parameter is not
    shared = Shared()
    capture = LayerCapture(batched_layers(shared, {n for n, _ in shared.named_parameters()}))
    with capture.recording():
        shared(torch.randn(2, 6))
    assert capture.failed == {"layer"} and capture.names == ["head"], "a layer called twice falls back"
