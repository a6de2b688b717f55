"""Experiment presets: each composes, with the methods it is meant for, into a network of the paper's shape."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_lightning.build import CONFIG_DIR, build_model

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
CIFAR = {"der_split_cifar10"}
MNIST = [p for p in PRESETS if p not in CIFAR]
# Mammoth's MNISTMLP (Buzzega et al. 2020): Glorot-uniform weights, zero biases; the others keep PyTorch's init
XAVIER = {"der_split_mnist", "der_split_fmnist", "der_permuted_mnist", "der_rotated_mnist"}


def build(make_cfg, preset: str, *overrides: str) -> tuple[nn.Module, list[int]]:
    cfg = make_cfg(f"experiment={preset}", *overrides, synthetic=False)
    n_tasks, domain = cfg.dataset.n_tasks, cfg.dataset.scenario == "domain_il"
    if cfg.dataset.benchmark == "split":  # the ten classes cut into tasks
        per_task = 10 if domain else 10 // n_tasks
        outputs = [torch.arange(t * per_task, (t + 1) * per_task) % 10 for t in range(n_tasks)]
        n_outputs = 10
    else:  # permuted / rotated: every task has all ten classes, its own block of outputs unless domain-IL
        outputs = [torch.arange(10) + (0 if domain else 10 * t) for t in range(n_tasks)]
        n_outputs = 10 if domain else 10 * n_tasks
    shape = (3, 32, 32) if preset in CIFAR else (1, 28, 28)
    dm = SimpleNamespace(input_shape=shape, n_outputs=n_outputs, n_tasks=n_tasks, task_outputs=outputs)
    torch.manual_seed(0)
    return build_model(cfg, dm), list(cfg.model.get("hidden") or [])  # type: ignore[arg-type]


def test_every_preset_is_tested() -> None:
    assert set(PRESETS) == {
        "agem_permuted_mnist", "der_permuted_mnist", "der_rotated_mnist", "der_split_cifar10", "der_split_fmnist",
        "der_split_mnist", "gdumb_split_mnist", "online_split_mnist", "vdv_split_mnist",
    }  # fmt: skip


# GDumb's preset sets an option of the plain MLP (batch_norm) that a progressive network does not have
PAIRS = [(p, m) for p in MNIST for m in ("naive", "pnn") if not (p == "gdumb_split_mnist" and m == "pnn")]


@pytest.mark.parametrize(("preset", "method"), PAIRS)
def test_preset_builds_its_network_with_its_initialisation(make_cfg, preset: str, method: str) -> None:
    net, hidden = build(make_cfg, preset, f"method={method}")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    first = [m for m in linears if m.in_features == 784]
    assert first and all(m.out_features == hidden[0] for m in first), "the preset's widths"
    zero_biases = all(not m.bias.any() for m in linears if m.bias is not None)
    assert zero_biases == (preset in XAVIER), "xavier: zero biases; default: PyTorch's uniform biases"


def test_cifar_preset_builds_mammoths_resnet18(make_cfg) -> None:
    net, _ = build(make_cfg, "der_split_cifar10", "method=der")
    assert type(net).__name__ == "ResNet18Reduced" and net.feature_dim == 512
    assert sum(p.numel() for p in net.parameters()) == 11_173_962, "Mammoth's resnet18(10, nf=64)"
