"""Experiment presets: each composes, with the methods it is meant for, into a network of the paper's shape."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_lightning.train import CONFIG_DIR, _build_model

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# Mammoth's MNISTMLP (Buzzega et al. 2020): Glorot-uniform weights, zero biases; the others keep PyTorch's init
XAVIER = {"der_split_mnist", "der_permuted_mnist"}


def build(make_cfg, preset: str, *overrides: str) -> tuple[nn.Module, list[int]]:
    cfg = make_cfg(f"experiment={preset}", *overrides, synthetic=False)
    n_tasks = cfg.dataset.n_tasks
    per_task = 10 if cfg.dataset.scenario == "domain_il" else 10 // n_tasks
    outputs = [torch.arange(t * per_task, (t + 1) * per_task) % 10 for t in range(n_tasks)]
    dm = SimpleNamespace(input_shape=(1, 28, 28), n_outputs=10, n_tasks=n_tasks, task_outputs=outputs)
    torch.manual_seed(0)
    return _build_model(cfg, dm), list(cfg.model.hidden)  # type: ignore[arg-type]


def test_every_preset_is_tested() -> None:
    assert set(PRESETS) == {"agem_permuted_mnist", "der_permuted_mnist", "der_split_mnist", "vdv_split_mnist"}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", ["naive", "pnn"])
def test_preset_builds_its_network_with_its_initialisation(make_cfg, preset: str, method: str) -> None:
    net, hidden = build(make_cfg, preset, f"method={method}")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    first = [m for m in linears if m.in_features == 784]
    assert first and all(m.out_features == hidden[0] for m in first), "the preset's widths"
    zero_biases = all(not m.bias.any() for m in linears)
    assert zero_biases == (preset in XAVIER), "xavier: zero biases; default: PyTorch's uniform biases"
