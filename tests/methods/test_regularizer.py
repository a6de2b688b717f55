"""The quadratic-regularizer base, through the smallest subclass: consolidation once per task, the penalty by
either door, the strength from the penalty's curvature, a CPU state restored lazily on the parameters' device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from cl_lightning.methods.regularizer import QuadraticRegularizer


class L2(QuadraticRegularizer):
    """``lambda * sum_t sum_i W_t (theta_i - theta*_{t,i})^2`` with a fixed importance per task (``W_t = t + 1``),
    as a loss term."""

    name = "l2"
    penalty_door = "loss"

    def importance(self, trainer, pl_module, task_id: int) -> dict[str, Tensor]:
        return {n: torch.full_like(p, task_id + 1.0) for n, p in zip(self.param_names, self.params, strict=True)}


class RunningL2(L2):
    """One running quadratic (``W <- W_t + W / 2``), applied by the gradient door, stored as two dicts."""

    name = "running_l2"
    penalty_door = "gradient"
    importance_key, anchor_key, listed_state = "omega", "anchor", False

    def consolidate(self, importance: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        self.keep_running(importance, anchor, decay=0.5)


def setup(method: QuadraticRegularizer, lr: float = 0.1) -> tuple[SimpleNamespace, SimpleNamespace, nn.Linear]:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(n_tasks=5), optimizers=[optimizer], is_global_zero=True, global_step=0
    )
    module = SimpleNamespace(net=net, loggers=[], log_every_n_steps=50)
    method.on_fit_start(trainer, module)  # type: ignore[arg-type]
    return trainer, module, net


def finish_task(method: QuadraticRegularizer, trainer, module, net: nn.Module, task_id: int) -> dict[str, Tensor]:
    """Move the weights (as training would), end the task; return the weights at its end."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    method.on_task_end(trainer, module, task_id)  # type: ignore[arg-type]
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def direct(importances: list[float], anchors: list[dict[str, Tensor]], net: nn.Module, scale: float) -> float:
    return scale * sum(
        float((w * (p.detach() - a[n]) ** 2).sum())
        for w, a in zip(importances, anchors, strict=True)
        for n, p in net.named_parameters()
    )


def test_one_quadratic_per_task_consolidated_once_and_summed() -> None:
    method = L2(2.0, reference=1.0)
    trainer, module, net = setup(method, lr=0.01)
    assert method.loss_terms(module, None, None) == {}, "no penalty before a task ends"  # type: ignore[arg-type]
    anchors = [finish_task(method, trainer, module, net, t) for t in range(3)]
    method.on_task_end(trainer, module, 2)  # type: ignore[arg-type]  # again (a resumed run): nothing happens
    assert method.consolidated == 2 and len(method.importances) == len(method.anchors) == 3
    with torch.no_grad():
        net.weight.add_(0.3)
    penalty = method.loss_terms(module, None, None)["penalty"]  # type: ignore[arg-type]
    assert penalty.item() == pytest.approx(direct([1.0, 2.0, 3.0], anchors, net, scale=2.0), rel=1e-5)


def test_strength_follows_the_penalty_curvature() -> None:
    """Curvature per unit of strength is ``2 c max A``: with summed importances 1 + 2 = 3 and SGD lr 0.1, ``auto``
    keeps ``lr * s * 2 * 3`` at 1 (half of SGD's bound)."""
    method = L2("auto", reference=100.0)
    trainer, module, net = setup(method)
    finish_task(method, trainer, module, net, 0)
    finish_task(method, trainer, module, net, 1)
    assert method.strength.value == pytest.approx(1.0 / (0.1 * 2 * 3))
    assert method.diagnostics(module) == {"lambda_": method.strength.value}  # type: ignore[arg-type]


def test_running_quadratic_by_the_gradient_door_equals_the_loss_term() -> None:
    method = RunningL2(3.0, reference=1.0)
    trainer, module, net = setup(method)
    finish_task(method, trainer, module, net, 0)
    anchor = finish_task(method, trainer, module, net, 1)
    assert len(method.importances) == 1 and torch.equal(method.importances[0]["bias"], torch.full((2,), 2.5))
    assert method.loss_terms(module, None, None) == {}, "the gradient door adds no loss term"  # type: ignore[arg-type]
    with torch.no_grad():
        net.bias.sub_(0.2)
    as_loss = RunningL2(3.0, reference=1.0)
    as_loss.penalty_door = "loss"  # type: ignore[misc]
    as_loss.load_state_dict(method.state_dict())
    as_loss.on_fit_start(trainer, module)  # type: ignore[arg-type]
    as_loss.loss_terms(module, None, None)["penalty"].backward()  # type: ignore[arg-type]
    expected = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
    torch.testing.assert_close(expected[1], 2 * 3.0 * 2.5 * (net.bias.detach() - anchor["bias"]))
    net.zero_grad(set_to_none=True)
    method.on_before_optimizer_step(trainer, module, None)  # type: ignore[arg-type]
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e)


class BackwardL2(L2):
    """The default door: the penalty's gradient added right after the backward pass."""

    name = "backward_l2"
    penalty_door = "backward"


def test_the_backward_door_gives_the_loss_terms_gradient_before_any_other_hook() -> None:
    """EWC's door: no loss term; ``on_after_backward`` adds exactly the gradient the loss term's backward pass gives
    (on top of the task loss's, already in ``p.grad``); nothing is added again before the optimizer step."""
    method, as_loss = BackwardL2(3.0, reference=1.0), L2(3.0, reference=1.0)
    trainer, module, net = setup(method)
    finish_task(method, trainer, module, net, 0)
    finish_task(method, trainer, module, net, 1)
    as_loss.load_state_dict(method.state_dict())
    as_loss.on_fit_start(trainer, module)  # type: ignore[arg-type]
    with torch.no_grad():
        net.weight.mul_(1.5)
    assert method.loss_terms(module, None, None) == {}, "no loss term"  # type: ignore[arg-type]
    x = torch.randn(4, 3)
    (net(x).square().sum() + as_loss.loss_terms(module, None, None)["penalty"]).backward()  # type: ignore[arg-type]
    expected = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
    net.zero_grad(set_to_none=True)
    net(x).square().sum().backward()
    method.on_after_backward(trainer, module)  # type: ignore[arg-type]
    method.on_before_optimizer_step(trainer, module, None)  # type: ignore[arg-type]
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e)


def test_under_a_gradient_scaler_the_backward_door_is_a_loss_term() -> None:
    """With 16-mixed the gradients after the backward pass are scaled: the penalty goes into the (scaled) loss."""
    method = BackwardL2(3.0, reference=1.0)
    trainer, module, net = setup(method)
    finish_task(method, trainer, module, net, 0)
    trainer.precision_plugin = SimpleNamespace(scaler=object())
    method.on_fit_start(trainer, module)  # type: ignore[arg-type]
    assert "penalty" in method.loss_terms(module, None, None)  # type: ignore[arg-type]
    net.zero_grad(set_to_none=True)
    method.on_after_backward(trainer, module)  # type: ignore[arg-type]
    assert all(p.grad is None for p in net.parameters()), "and no gradient is added after the backward pass"


def test_state_is_cpu_tensors_by_name_in_the_subclass_layout() -> None:
    listed, running = L2(1.0, reference=1.0), RunningL2(1.0, reference=1.0)
    for method in (listed, running):
        trainer, module, net = setup(method)
        finish_task(method, trainer, module, net, 0)
        finish_task(method, trainer, module, net, 1)
    state = listed.state_dict()  # the default (EWC's) layout: a list of dicts each
    assert len(state["importances"]) == len(state["anchors"]) == 2 and state["lambda_"] == 1.0
    assert all(t.device.type == "cpu" for d in state["importances"] for t in d.values())
    assert state["importances"][1].keys() == {"weight", "bias"}
    state = running.state_dict()
    assert state["omega"].keys() == state["anchor"].keys() == {"weight", "bias"} and state["consolidated"] == 1
    fresh = RunningL2(1.0, reference=1.0)
    fresh.load_state_dict(state)
    assert fresh.consolidated == 1 and torch.equal(fresh.importances[0]["weight"], state["omega"]["weight"])
    with pytest.raises(ValueError, match="1 omega but 0 anchor"):
        RunningL2(1.0, reference=1.0).load_state_dict({"omega": state["omega"]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_state_from_the_gpu_is_on_the_cpu_and_returns_to_the_gpu() -> None:
    method = L2(1.0, reference=1.0)
    trainer, module, net = setup(method)
    net.cuda()
    method.on_fit_start(trainer, module)  # type: ignore[arg-type]
    finish_task(method, trainer, module, net, 0)
    state = method.state_dict()
    assert all(t.device.type == "cpu" for d in (*state["importances"], *state["anchors"]) for t in d.values())
    fresh = L2(1.0, reference=1.0)
    fresh.load_state_dict(state)
    fresh.on_fit_start(trainer, module)  # type: ignore[arg-type]
    assert fresh.loss_terms(module, None, None)["penalty"].device.type == "cuda"  # type: ignore[arg-type]
