"""Online meta-learning with replay: bad values, one step against a hand computation, behaviour, DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from cl_lightning.errors import ConfigError
from cl_lightning.methods.oml import OML
from cl_lightning.train import train

SMALL = ["method=oml", "method.buffer_size=50", "method.replay_batch_size=16", "logger=none"]
ONLINE = ["dataset.stream=online", "epochs_per_task=1"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.inner_steps=0", "method.inner_steps=0: must be an integer >= 1"),
        ("method.inner_lr=-0.1", "method.inner_lr=-0.1: must be a number >= 0"),
        ("method.first_order=maybe", "method.first_order='maybe': must be true or false"),
        ("method.adapt=body", "method.adapt='body': choose one of all, head"),
        ("method.inner_batch=half", "method.inner_batch='half': choose one of split, full"),
        ("method.buffer_size=0", "method.buffer_size=0"),
        ("method.replay_batch_size=0", "method.replay_batch_size=0"),
    ],
)
def test_bad_values_name_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg("method=oml", override, "logger=none"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_head_adaptation_needs_a_head(make_cfg) -> None:
    cfg = make_cfg(
        "method=oml", "method.adapt=head", "dataset.scenario=task_il", "logger=none",
        "model._target_=helpers.hooks.TaskRoutedNet", "~model.hidden", "~model.dropout", "~model.init",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="method.adapt=head: the model TaskRoutedNet has no trainable `head`"):
        train(cfg)


# ---------------------------------------------------------------------- one step, by hand
def masked_softmax(w: Tensor, b: Tensor, x: Tensor, seen: Tensor) -> Tensor:
    return (x @ w.T + b).masked_fill(~seen, float("-inf")).softmax(1)


def ce_grad(w: Tensor, b: Tensor, x: Tensor, y: Tensor, seen: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the mean cross-entropy of ``softmax(Wx + b)`` over the seen outputs: ``(P - Y)^T [x, 1] / n``."""
    d = (masked_softmax(w, b, x, seen) - torch.nn.functional.one_hot(y, len(b)).double()) / len(y)
    return d.T @ x, d.sum(0)


def ce_hvp(w: Tensor, b: Tensor, x: Tensor, seen: Tensor, vw: Tensor, vb: Tensor) -> tuple[Tensor, Tensor]:
    """Hessian-vector product: ``dz_i = V x_i + v_b``, ``dp_i = (diag(p_i) - p_i p_i^T) dz_i``, then as the gradient."""
    p = masked_softmax(w, b, x, seen)
    dz = (x @ vw.T + vb) * seen
    dp = p * dz - p * (p * dz).sum(1, keepdim=True)
    return dp.T @ x / len(x), dp.sum(0) / len(x)


def hand_meta_gradient(
    w: Tensor, b: Tensor, inner: list[tuple[Tensor, Tensor]], outer: tuple[Tensor, Tensor], seen: Tensor,
    alpha: float, first_order: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    points = [(w, b)]
    for x, y in inner:
        gw, gb = ce_grad(*points[-1], x, y, seen)
        points.append((points[-1][0] - alpha * gw, points[-1][1] - alpha * gb))
    vw, vb = ce_grad(*points[-1], *outer, seen)
    if not first_order:  # (I - a H_1) ... (I - a H_k) grad L(theta_k), applied from the right
        for (x, _), (pw, pb) in zip(reversed(inner), reversed(points[:-1]), strict=True):
            hw, hb = ce_hvp(pw, pb, x, seen, vw, vb)
            vw, vb = vw - alpha * hw, vb - alpha * hb
    return vw, vb


@pytest.mark.parametrize("first_order", [False, True])
def test_one_training_step_is_the_hand_computed_meta_update(make_cfg, monkeypatch, first_order: bool) -> None:
    # A linear classifier (no hidden layer), class-IL task 0 (outputs 0 and 1 seen), batches of 16 split into two
    # inner steps of 8, outer loss on 4 replayed samples + the batch; two steps: the second one replays.
    steps: list[tuple] = []
    original = OML.loss_terms

    def record(self, pl_module, batch, logits):
        before = {n: p.detach().double().clone() for n, p in pl_module.net.named_parameters()}
        drawn: list = []
        sample = self.buffer.sample
        monkeypatch.setattr(self.buffer, "sample", lambda n: drawn.append(sample(n)) or drawn[-1])
        terms = original(self, pl_module, batch, logits)
        monkeypatch.delattr(self.buffer, "sample")
        steps.append((before, batch, drawn, pl_module))
        return terms

    monkeypatch.setattr(OML, "loss_terms", record)
    cfg = make_cfg(
        "method=oml", "method.inner_steps=2", "method.inner_lr=0.5", f"method.first_order={first_order}",
        "method.replay_batch_size=4", "model.hidden=[]", "steps_per_task=2", "max_tasks=1", "logger=none",
        "optimizer.lr=0.2",
    )  # fmt: skip
    train(cfg)
    assert len(steps) == 2 and not steps[0][2] and len(steps[1][2]) == 1, "the first step has nothing to replay"
    before, batch, (replay,), module = steps[1]
    seen = torch.tensor([True, True] + [False] * 8)
    x, y = module.prepare(batch.x).flatten(1).double(), batch.y
    rx = module.prepare(replay.x).flatten(1).double()
    inner = [(x[:8], y[:8]), (x[8:], y[8:])]
    outer = (torch.cat([rx, x]), torch.cat([replay.y, y]))
    gw, gb = hand_meta_gradient(before["head.weight"], before["head.bias"], inner, outer, seen, 0.5, first_order)
    after = {n: p.detach().double() for n, p in module.net.named_parameters()}
    torch.testing.assert_close(after["head.weight"], before["head.weight"] - 0.2 * gw, atol=1e-6, rtol=0)
    torch.testing.assert_close(after["head.bias"], before["head.bias"] - 0.2 * gb, atol=1e-6, rtol=0)
    plain_w, _ = ce_grad(before["head.weight"], before["head.bias"], *outer, seen)
    assert not torch.allclose(gw, plain_w, atol=1e-3), "the update is not the plain replay gradient"


# ---------------------------------------------------------------------- behaviour
def test_forgets_less_than_naive_in_class_il(make_cfg) -> None:
    naive = train(make_cfg("logger=none"))
    oml = train(make_cfg(*SMALL))
    assert oml["avg_acc"] > naive["avg_acc"] + 0.3 and oml["forgetting"] < naive["forgetting"] - 0.5


@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
def test_runs_in_every_scenario_and_task_free(make_cfg, scenario: str) -> None:
    assert train(make_cfg(*SMALL, f"dataset.scenario={scenario}"))["avg_acc"] > 0.8
    assert len(train(make_cfg(*SMALL, *ONLINE, f"dataset.scenario={scenario}"))["acc_matrix"]) == 5


def test_first_order_head_only_full_batch_and_a_task_routed_network_train(make_cfg) -> None:
    variants = ["method.first_order=true", "method.adapt=head", "method.inner_batch=full"]
    assert train(make_cfg(*SMALL, *variants, "dataset.scenario=task_il"))["avg_acc"] > 0.8
    routed = ["model._target_=helpers.hooks.TaskRoutedNet", "~model.hidden", "~model.dropout", "~model.init"]
    assert train(make_cfg(*SMALL, *routed, "dataset.scenario=task_il"))["avg_acc"] > 0.7, "chance is 0.5"


@pytest.mark.slow
def test_ddp_reduces_the_meta_gradient_and_keeps_ranks_identical(tmp_path: Path) -> None:
    """2 processes (gloo): each rank adapts on its own shard, so ranks whose meta-gradients were not all-reduced
    would drift apart; ``SameOnAllRanks`` checks weights and buffers at every task end."""
    from test_ddp import run

    common = ["method=oml", "dataset.scenario=task_il", "method.inner_steps=2"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = run(tmp_path / "one", *common, "batch_size=16")
    ddp = run(
        tmp_path / "two", *common, "trainer=ddp", "trainer.devices=2", "batch_size=8",
        "+callbacks.same._target_=helpers.ddp_check.SameOnAllRanks",
    )  # fmt: skip
    assert ddp["world_size"] == 2 and ddp["complete"]
    assert abs(ddp["avg_acc"] - single["avg_acc"]) <= 0.1
