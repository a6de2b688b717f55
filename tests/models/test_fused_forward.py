"""``module.fused_forward``: the methods' replay batches forwarded with the current batch in one pass, where exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_lightning.build import build_run
from cl_lightning.data.batch import Batch
from cl_lightning.errors import ConfigError
from cl_lightning.models import CLModule
from cl_lightning.models.backbones import MLP, ResNet18Reduced, SmallCNN, uses_batch_statistics
from cl_lightning.train import train

# methods that give their replay batches to the module's forward pass (CLMethod.step_inputs)
FUSING = ["er", "der", "derpp", "er_ace", "mir", "xder"]
QUICK = ["logger=none", "epochs_per_task=1", "save_checkpoints=false", "method.buffer_size=40"]


@pytest.mark.parametrize(
    ("net", "expected"),
    [
        (MLP((1, 4, 4), 6, hidden=(8,)), False),
        (nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.Dropout(0.5)), False),
        (nn.Sequential(nn.InstanceNorm1d(4)), False),  # per sample, no running statistics
        (nn.Sequential(nn.InstanceNorm1d(4, track_running_stats=True)), True),
        (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)), True),
        (nn.Sequential(nn.LazyBatchNorm2d()), True),
        (ResNet18Reduced((3, 8, 8), 10), True),
    ],
)
def test_batch_statistics_are_detected(net: nn.Module, expected: bool) -> None:
    assert uses_batch_statistics(net) is expected


def _forwards(monkeypatch, net_class: type[nn.Module]) -> list[list[int]]:
    """The batch sizes of the forward passes of ``net_class`` in each training step, recorded as they happen."""
    steps: list[list[int]] = []
    in_step = []
    forward, training_loss = net_class.forward, CLModule.training_loss

    def counting(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if in_step:
            steps[-1].append(len(x))
        return forward(self, x)

    def step(self: CLModule, batch: Batch) -> torch.Tensor:
        in_step.append(True)
        steps.append([])
        try:
            return training_loss(self, batch)
        finally:
            in_step.clear()

    monkeypatch.setattr(net_class, "forward", counting)
    monkeypatch.setattr(CLModule, "training_loss", step)
    return steps


@pytest.mark.parametrize("method", FUSING)
def test_without_batch_statistics_the_replay_batches_go_in_the_current_batchs_pass(
    make_cfg, monkeypatch, method: str
) -> None:
    steps = _forwards(monkeypatch, MLP)
    train(make_cfg(*QUICK, f"method={method}", "steps_per_task=6", "dataset.n_tasks=2"))
    assert len(steps) == 12, steps
    assert steps[0] == [16], steps  # the first step of the run: the buffer is empty, nothing to replay
    if method == "mir":  # its scoring forwards the current batch and the 20 candidates (no training graph)
        steps = [sizes[3:] for sizes in steps]
    # X-DER fills its buffer at task ends: it replays in the second task; the others from the second step on
    replaying = steps[6:] if method == "xder" else steps[1:]
    assert all(len(sizes) == 1 and sizes[0] > 16 for sizes in replaying), steps  # one pass, the replay in it


@pytest.mark.parametrize("method", FUSING)
def test_fused_and_separate_passes_train_alike(make_cfg, method: str) -> None:
    """One pass over the concatenation gives each sample the logits of its own pass: the same run, within the
    rounding of larger matrix products."""
    runs = [
        train(make_cfg(*QUICK, f"method={method}", "steps_per_task=15", f"module.fused_forward={fused}"))
        for fused in ("auto", "false")
    ]
    torch.testing.assert_close(
        torch.tensor(runs[0]["acc_matrix"]), torch.tensor(runs[1]["acc_matrix"]), atol=1e-6, rtol=0
    )


def test_one_step_has_the_gradient_of_separate_passes(make_cfg) -> None:
    """DER++'s loss and gradient at one step, fused and not (the same buffer, draws and weights)."""
    grads = []
    for fused in (True, False):
        cfg = make_cfg(*QUICK, "method=derpp", "method.replay_batch_size=8", f"module.fused_forward={fused}")
        torch.manual_seed(0)
        module, dm, (derpp,), _, _ = build_run(cfg, Path(cfg.paths.output_dir))
        assert module.fuses_forward is fused
        x, y = dm.tasks[0].train_x[:24], dm.tasks[0].train_y[:24]
        tid = torch.zeros_like(y)
        derpp.buffer.add(x, y, tid, logits=torch.randn(24, module.output_masks.shape[1]))
        module._methods = module._loss_methods = module._input_methods = [derpp]
        batch = Batch(x[:16], y[:16], tid[:16], torch.arange(16))
        logits = module.step_forward(batch)
        terms = derpp.replay_terms(module, batch, logits)
        assert set(terms) == {"logit_mse", "replay"}
        loss = F.cross_entropy(logits, batch.y) + sum(terms.values())
        grads.append(torch.autograd.grad(loss, list(module.net.parameters())))
    for fused_grad, separate_grad in zip(*grads, strict=True):
        torch.testing.assert_close(fused_grad, separate_grad, rtol=1e-5, atol=1e-6)


def test_batch_norm_keeps_separate_passes_unless_asked(make_cfg, monkeypatch) -> None:
    steps = _forwards(monkeypatch, SmallCNN)
    cnn = ["model=cnn", "model.channels=[4]", "model.hidden=8", "model.batch_norm=true"]
    derpp = ["method=derpp", "steps_per_task=3", "dataset.n_tasks=2", "method.replay_batch_size=4"]
    train(make_cfg(*QUICK, *cnn, *derpp))
    assert steps == [[16], *[[16, 4, 4]] * 5], steps  # auto: one pass per batch
    steps.clear()
    train(make_cfg(*QUICK, *cnn, *derpp, "module.fused_forward=true"))
    assert steps == [[16], *[[24]] * 5], steps  # asked for: the concatenation, normalised together


@pytest.mark.parametrize("value", ["maybe", 1, "yes"])
def test_a_bad_value_is_refused_in_one_line(make_cfg, tmp_path, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^module.fused_forward={value!r}: must be auto, true or false$"):
        train(make_cfg("logger=none", "method=er", f"module.fused_forward={value}"))
    assert not (tmp_path / "run0").exists(), "a refused command leaves no directory"
