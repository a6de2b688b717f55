"""Meta-gradients of the inner SGD loop against closed forms on linear models with a squared loss."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from cl_lightning.core.meta import MetaBatch, inner_loop, meta_loss

ALPHA = 0.3


def mse(out: Tensor, target: Tensor) -> Tensor:
    """``1/(2n) ||out - target||_F^2``: its gradient in ``W`` for ``out = X W^T`` is ``W A - B`` (below)."""
    return ((out - target) ** 2).sum() / (2 * len(out))


def moments(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``A = X^T X / n`` and ``B = T^T X / n`` (rows are samples): ``grad_W l = W A - B`` for ``l = mse(x W^T, t)``."""
    return x.T @ x / len(x), t.T @ x / len(x)


def batches(seed: int, n: int, d: int = 3, o: int = 2) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(randn(gen, 6, d), randn(gen, 6, o)) for _ in range(n)]


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def linear(w: Tensor) -> nn.Linear:
    net = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
    net.weight.data.copy_(w)
    return net


def meta_gradient(net: nn.Module, inner: list[tuple[Tensor, Tensor]], outer: tuple[Tensor, Tensor], **kw) -> dict:
    params = dict(net.named_parameters())
    result = meta_loss(net, params, mse, [MetaBatch((x,), t) for x, t in inner], MetaBatch((outer[0],), outer[1]),
                       ALPHA, **kw)  # fmt: skip
    grads = torch.autograd.grad(result.outer, list(params.values()))
    return dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_linear_model_meta_gradient_equals_the_closed_form(k: int, first_order: bool) -> None:
    # y = W x: W_i = W_{i-1} (I - a A_i) + a B_i, so dL/dW_0 = G_k M_k ... M_1 with M_i = I - a A_i (symmetric)
    # and G_k = W_k A_out - B_out; first order keeps G_k alone.
    *inner, outer = batches(0, k + 1)
    w0 = randn(torch.Generator().manual_seed(1), 2, 3)
    w = w0.clone()
    factors = []
    for x, t in inner:
        a, b = moments(x, t)
        w = w - ALPHA * (w @ a - b)
        factors.append(torch.eye(3, dtype=torch.float64) - ALPHA * a)
    a_out, b_out = moments(*outer)
    expected = w @ a_out - b_out
    if not first_order:
        for m in reversed(factors):
            expected = expected @ m
    got = meta_gradient(linear(w0), inner, outer, first_order=first_order)["weight"]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, w0 @ a_out - b_out), "the inner steps matter"


def test_second_and_first_order_differ_and_two_steps_on_one_batch_are_two_steps() -> None:
    (x, t), outer = batches(2, 2)
    w0 = randn(torch.Generator().manual_seed(3), 2, 3)
    second = meta_gradient(linear(w0), [(x, t), (x, t)], outer)["weight"]
    first = meta_gradient(linear(w0), [(x, t), (x, t)], outer, first_order=True)["weight"]
    assert not torch.allclose(second, first)
    a, b = moments(x, t)
    m = torch.eye(3, dtype=torch.float64) - ALPHA * a
    w2 = (w0 @ m + ALPHA * b) @ m + ALPHA * b
    torch.testing.assert_close(first, w2 @ moments(*outer)[0] - moments(*outer)[1])
    torch.testing.assert_close(second, first @ m @ m)


@pytest.mark.parametrize("first_order", [False, True])
def test_head_only_adaptation_of_a_two_layer_linear_model(first_order: bool) -> None:
    # f(x) = V U x, the inner step adapts V only (Javed & White 2019's prediction network):
    # V_1 = V_0 - a (V_0 U A U^T - B U^T); the outer loss reaches U directly and, at second order, through V_1.
    (x, t), (xo, to) = batches(4, 2, d=4)
    gen = torch.Generator().manual_seed(5)
    u0, v0 = randn(gen, 3, 4), randn(gen, 2, 3)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
    net[0].weight.data.copy_(u0)
    net[1].weight.data.copy_(v0)
    a, b = moments(x, t)
    a_out, b_out = moments(xo, to)
    v1 = v0 - ALPHA * (v0 @ u0 @ a @ u0.T - b @ u0.T)
    g_v = (v1 @ u0 @ a_out - b_out) @ u0.T  # dL/dV_1
    g_u = v1.T @ (v1 @ u0 @ a_out - b_out)  # dL/dU at fixed V_1
    if not first_order:
        g_u = g_u - ALPHA * (v0.T @ g_v @ u0 @ a + g_v.T @ v0 @ u0 @ a - g_v.T @ b)
        g_v = g_v @ (torch.eye(3, dtype=torch.float64) - ALPHA * u0 @ a @ u0.T)
    got = meta_gradient(net, [(x, t)], (xo, to), first_order=first_order, adapt={"1.weight"})
    torch.testing.assert_close(got["0.weight"], g_u)
    torch.testing.assert_close(got["1.weight"], g_v)


def test_backward_fills_the_parameters_grad_and_leaves_the_model_unchanged() -> None:
    (x, t), outer = batches(6, 2)
    net = linear(torch.ones(2, 3, dtype=torch.float64))
    before = net.weight.detach().clone()
    expected = meta_gradient(net, [(x, t)], outer)["weight"]
    result = meta_loss(net, dict(net.named_parameters()), mse, [MetaBatch((x,), t)], MetaBatch((outer[0],), outer[1]),
                       ALPHA)  # fmt: skip
    result.outer.backward()
    assert net.weight.grad is not None
    torch.testing.assert_close(net.weight.grad, expected)
    assert torch.equal(net.weight.detach(), before), "functional calls never write the module's parameters"
    assert len(result.inner) == 1 and not result.inner[0].requires_grad
    torch.testing.assert_close(result.inner[0], mse(x @ before.T, t))


def test_batch_norm_uses_and_updates_the_modules_own_running_statistics() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    (x, t), outer = batches(7, 2)
    meta_loss(net, dict(net.named_parameters()), mse, [MetaBatch((x,), t)] * 2, MetaBatch((outer[0],), outer[1]), 0.1)
    assert int(net[1].num_batches_tracked) == 3, "two inner forwards and one outer forward"


def test_unknown_adapted_names_are_refused_and_no_inner_step_is_the_plain_loss() -> None:
    net = linear(torch.ones(2, 3, dtype=torch.float64))
    (x, t), _ = batches(8, 2)
    with pytest.raises(ValueError, match="head.weight"):
        inner_loop(net, dict(net.named_parameters()), mse, [MetaBatch((x,), t)], 0.1, adapt={"head.weight"})
    plain = meta_loss(net, dict(net.named_parameters()), mse, [], MetaBatch((x,), t), 0.1).outer
    torch.testing.assert_close(plain, mse(net(x), t))


class Aliased(nn.Module):
    """A submodule reachable by two paths (``head`` is ``heads[0]``) and a parameter tied across two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 2)])
        self.head = self.heads[0]
        self.out = nn.Linear(3, 2)
        self.out.weight = self.heads[1].weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.head(x)) + self.heads[1](x)


def test_aliased_submodules_and_tied_parameters_are_substituted_once_and_restored() -> None:
    net = Aliased().double()
    (x, t), outer = batches(9, 2)
    params = dict(net.named_parameters())
    assert "out.weight" not in params, "tied: one canonical name"
    result = meta_loss(
        net, params, mse, [MetaBatch((x,), t)], MetaBatch((outer[0],), outer[1]), ALPHA, first_order=True
    )
    assert all(p.is_leaf for _, p in net.named_parameters(remove_duplicate=False)), "the model holds its parameters"
    # first order: the gradient of the outer loss at theta_1, computed on a copy of the model set to theta_1
    copy = Aliased().double()
    with torch.no_grad():
        for name, p in copy.named_parameters():
            p.copy_(result.params[name])
    torch.testing.assert_close(result.outer, mse(copy(outer[0]), outer[1]))
    expected = torch.autograd.grad(mse(copy(outer[0]), outer[1]), list(copy.parameters()))
    got = torch.autograd.grad(result.outer, list(params.values()))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)
