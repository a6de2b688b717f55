"""Fisher, MAS importance, SI's path integral and the quadratic penalty against closed forms and slow loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_lightning.core.importance import (
    PathIntegral,
    diagonal_fisher,
    eval_mode,
    mas_importance,
    merge_quadratics,
    quadratic_penalty,
    si_omega,
)


def softmax_regression(n_in: int = 5, n_out: int = 4, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Linear(n_in, n_out)
    with torch.no_grad():
        net.weight.mul_(3)  # confident, unequal probabilities
    return net, torch.randn(64, n_in)


def closed_form_fisher(net: nn.Linear, x: torch.Tensor, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Softmax regression: d log p_c / d z = e_c - p, so F over logits is diag(p) - p p^T and, for weight (c, i),
    F = E_x[(diag(p) - p p^T)_cc x_i^2] = E_x[p_c (1 - p_c) x_i^2]; bias c: E_x[p_c (1 - p_c)]. Outputs outside
    the distribution get no gradient."""
    p = net(x).detach()[:, outputs].softmax(-1)
    var = p * (1 - p)  # [N, C]
    weight = torch.zeros_like(net.weight)
    bias = torch.zeros_like(net.bias)
    weight[outputs] = (var[:, :, None] * (x**2)[:, None, :]).mean(0)
    bias[outputs] = var.mean(0)
    return {"weight": weight, "bias": bias}


@pytest.mark.parametrize("outputs", [None, [1, 3]])
def test_exact_fisher_of_softmax_regression_is_the_closed_form(outputs: list[int] | None) -> None:
    net, x = softmax_regression()
    index = torch.arange(4) if outputs is None else torch.tensor(outputs)
    fisher = diagonal_fisher(net, x, "exact", outputs=None if outputs is None else index, chunk_size=7)
    expected = closed_form_fisher(net, x, index)
    for name in ("weight", "bias"):
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-7)


def slow_empirical_fisher(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One backward pass per sample, squared and averaged: the textbook loop."""
    total = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    net.eval()
    for xi, yi in zip(x, y, strict=True):
        net.zero_grad()
        F.cross_entropy(net(xi[None]), yi[None]).backward()
        for n, p in net.named_parameters():
            total[n] += p.grad**2
    return {n: v / len(x) for n, v in total.items()}


def test_empirical_fisher_equals_a_per_sample_loop_and_leaves_batchnorm_alone() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    net(torch.randn(32, 6))  # non-trivial running statistics
    net.train()
    stats = {n: b.clone() for n, b in net.named_buffers()}
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    fisher = diagonal_fisher(net, x, "empirical", targets=y, chunk_size=16)
    assert net.training and net[3].training, "modes restored"
    for n, b in net.named_buffers():
        assert torch.equal(b, stats[n]), f"{n} changed"
    expected = slow_empirical_fisher(net, x, y)
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-4, atol=1e-8)


def test_empirical_fisher_maps_labels_into_the_active_outputs() -> None:
    net, x = softmax_regression()
    y = torch.tensor([2, 3]).repeat(32)
    fisher = diagonal_fisher(net, x, "empirical", targets=y, outputs=torch.tensor([2, 3]))
    p = net(x).detach()[:, 2:].softmax(-1)
    # d(-log p_y)/dz = p - e_y over the two outputs; bias Fisher = E[(p_c - [y=c])^2]
    onehot = F.one_hot(y - 2, 2).float()
    torch.testing.assert_close(fisher["bias"][2:], ((p - onehot) ** 2).mean(0))
    assert torch.equal(fisher["bias"][:2], torch.zeros(2))
    with pytest.raises(ValueError, match="not among"):
        diagonal_fisher(net, x, "empirical", targets=torch.zeros(64, dtype=torch.long), outputs=torch.tensor([2, 3]))


def test_sampled_fisher_converges_to_exact() -> None:
    net, x = softmax_regression()
    many = x.repeat(100, 1)  # 6400 label draws over the same inputs
    gen = torch.Generator().manual_seed(0)
    sampled = diagonal_fisher(net, many, "sampled", generator=gen, chunk_size=256)
    exact = diagonal_fisher(net, x, "exact")
    for name in ("weight", "bias"):
        error = (sampled[name] - exact[name]).norm() / exact[name].norm()
        assert error < 0.05, f"{name}: relative error {error:.3f}"
    again = diagonal_fisher(net, many[:256], "sampled", generator=torch.Generator().manual_seed(0), chunk_size=256)
    first = diagonal_fisher(net, many[:256], "sampled", generator=torch.Generator().manual_seed(0), chunk_size=256)
    assert torch.equal(again["weight"], first["weight"]), "seeded"


def test_fisher_is_not_the_square_of_the_batch_gradient() -> None:
    net, x = softmax_regression()
    y = torch.randint(0, 4, (64,))
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    batch_squared = net.weight.grad**2
    per_sample = diagonal_fisher(net, x, "empirical", targets=y)["weight"]
    assert per_sample.sum() > 5 * batch_squared.sum()


def test_fisher_sum_reduction_and_bad_arguments() -> None:
    net, x = softmax_regression()
    mean = diagonal_fisher(net, x)["weight"]
    total = diagonal_fisher(net, x, reduction="sum")["weight"]
    torch.testing.assert_close(total, mean * len(x))
    with pytest.raises(ValueError, match="mode"):
        diagonal_fisher(net, x, "true")
    with pytest.raises(ValueError, match="one target per input"):
        diagonal_fisher(net, x, "empirical")


def test_frozen_parameters_get_no_importance() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    fisher = diagonal_fisher(net, torch.randn(8, 4))
    assert "0.weight" not in fisher and set(fisher) == {"0.bias", "2.weight", "2.bias"}


def test_mas_importance_equals_a_per_sample_loop() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    x = torch.randn(30, 5)
    outputs = torch.tensor([0, 2])
    got = mas_importance(net, x, outputs=outputs, chunk_size=8)
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for xi in x:
        net.zero_grad()
        net(xi[None])[0, outputs].pow(2).sum().backward()
        for n, p in net.named_parameters():
            expected[n] += p.grad.abs() / len(x)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7)


def test_eval_mode_restores_mixed_modes() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    net.train()
    net[1].eval()
    with eval_mode(net):
        assert not net.training and not net[0].training
    assert net.training and net[0].training and not net[1].training


# ---------------------------------------------------------------------------------------------- quadratic penalty
def test_quadratic_penalty_is_zero_at_the_anchor_positive_away_and_has_the_right_gradient() -> None:
    torch.manual_seed(3)
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    anchors = [p.detach().clone() for p in params]
    weights = [torch.rand_like(p) for p in params]
    assert quadratic_penalty(params, anchors, weights).item() == 0.0
    with torch.no_grad():
        params[1][2] += 0.5
    value = quadratic_penalty(params, anchors, weights)
    assert value.item() > 0
    value.backward()
    reference = sum(((p - a) ** 2 * w).sum() for p, a, w in zip(params, anchors, weights, strict=True))
    torch.testing.assert_close(value, reference)
    grads = torch.autograd.grad(reference, params)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_quadratic_penalty_scale_constant_and_no_silent_double_backward() -> None:
    theta = [torch.tensor([1.0, -1.0], requires_grad=True)]
    anchor, weight = [torch.zeros(2)], [torch.tensor([2.0, 1.0])]
    value = quadratic_penalty(theta, anchor, weight, scale=0.5, constant=4.0)  # 0.5 * (2 + 1 + 4)
    assert value.item() == 3.5
    value.backward(retain_graph=True)
    assert theta[0].grad.tolist() == [2.0, -1.0]  # 0.5 * 2 * w * theta
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def test_merged_quadratics_equal_the_sum_of_per_task_penalties() -> None:
    torch.manual_seed(4)
    shapes = [(4, 3), (3,)]
    fishers = [[torch.rand(s) for s in shapes] for _ in range(3)]
    fishers[1][0][0] = 0.0
    for f in fishers:
        f[1][1] = 0.0  # a parameter no task constrains
    anchors = [[torch.randn(s) for s in shapes] for _ in range(3)]
    weights, means, constant = merge_quadratics(fishers, anchors)
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    merged = quadratic_penalty(params, means, weights) + constant
    separate = sum(quadratic_penalty(params, a, f) for f, a in zip(fishers, anchors, strict=True))
    torch.testing.assert_close(merged, separate, rtol=1e-5, atol=1e-6)
    g_merged = torch.autograd.grad(merged, params)
    g_separate = torch.autograd.grad(separate, params)
    for a, b in zip(g_merged, g_separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # one task: the anchor itself, no constant, so the penalty is exactly zero there
    w1, m1, k1 = merge_quadratics(fishers[:1], anchors[:1])
    assert k1 == 0.0 and all(torch.equal(m, a) for m, a in zip(m1, anchors[0], strict=True))
    assert quadratic_penalty([a.clone() for a in anchors[0]], m1, w1).item() == 0.0


# ---------------------------------------------------------------------------------------------- synaptic intelligence
def test_si_omega_of_sgd_on_a_quadratic_is_the_analytic_path_integral() -> None:
    """Loss 1/2 sum_k h_k (theta_k - c_k)^2, plain SGD with lr eta. With r_k = 1 - eta h_k and e_k = theta_k(0) - c_k:
    g(s) = h r^s e, delta(s) = -eta g(s), so w = sum_s -g(s) delta(s) = eta h^2 e^2 sum_{s<S} r^{2s};
    Delta = theta(S) - theta(0) = (r^S - 1) e."""
    h = torch.tensor([0.5, 2.0, 1.0, 0.0])
    c = torch.tensor([1.0, -2.0, 0.5, 3.0])
    theta = torch.nn.Parameter(torch.tensor([-1.0, 1.0, 0.5, 0.0]))
    e = theta.detach() - c
    eta, steps, xi = 0.1, 25, 0.01
    opt = torch.optim.SGD([theta], lr=eta)
    path = PathIntegral([theta])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (h * (theta - c) ** 2).sum()).backward()
        path.before_step([theta], [theta.grad])
        opt.step()
        path.after_step([theta])
    r = 1 - eta * h
    w = eta * h**2 * e**2 * sum(r ** (2 * s) for s in range(steps))  # h = 0: no gradient, w = 0
    delta = (r**steps - 1) * e
    torch.testing.assert_close(path.integral[0], w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(path.omega([theta], xi)[0], w / (delta**2 + xi), rtol=1e-5, atol=1e-7)
    # the path integral is each parameter's loss drop, times 2 / (2 - eta h): the discrete steps' excess, which
    # vanishes as eta -> 0 (Zenke et al.'s continuous-time integral)
    drop = 0.5 * h * (e**2 - (r**steps * e) ** 2)
    torch.testing.assert_close(path.integral[0], drop * 2 / (2 - eta * h), rtol=1e-5, atol=1e-7)


def test_si_path_integral_uses_the_actual_step_of_any_optimizer() -> None:
    theta = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = torch.optim.Adam([theta], lr=0.1)
    path = PathIntegral([theta])
    expected = torch.zeros(2)
    for _ in range(5):
        opt.zero_grad()
        (theta**2).sum().backward()
        g, before = theta.grad.clone(), theta.detach().clone()
        path.before_step([theta], [theta.grad])
        opt.step()
        path.after_step([theta])
        expected -= g * (theta.detach() - before)
    torch.testing.assert_close(path.integral[0], expected)
    path.after_step([theta])  # no step recorded: nothing added
    torch.testing.assert_close(path.integral[0], expected)


def test_si_omega_is_clamped_at_zero_and_missing_gradients_count_as_zero() -> None:
    assert si_omega([torch.tensor([-3.0, 3.0])], [torch.tensor([1.0, 1.0])], xi=0.5)[0].tolist() == [0.0, 2.0]
    theta = torch.nn.Parameter(torch.ones(2))
    path = PathIntegral([theta])
    path.before_step([theta], [None])
    with torch.no_grad():
        theta += 1
    path.after_step([theta])
    assert torch.equal(path.integral[0], torch.zeros(2))
