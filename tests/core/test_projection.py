"""GEM's and A-GEM's projections alone, against brute-force solutions of the quadratic programs they solve."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cl_lightning.core.projection import (
    LinearGroupGradients,
    agem_project,
    flat_grad,
    gem_dual,
    gem_project,
    gem_stacked_dual,
    write_flat_grad,
)


def closest_feasible(g: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``argmin_z ||z - g||^2 s.t. G z >= 0`` by enumerating active sets (exact for tiny problems)."""
    best, best_dist = None, np.inf
    for r in range(G.shape[0] + 1):
        for active in itertools.combinations(range(G.shape[0]), r):
            A = G[list(active)]
            z = g - A.T @ np.linalg.lstsq(A @ A.T, A @ g, rcond=None)[0] if r else g.copy()
            if (G @ z >= -1e-9).all() and np.linalg.norm(z - g) < best_dist:
                best, best_dist = z, np.linalg.norm(z - g)
    assert best is not None
    return best


def conflicting_case(seed: int, k: int = 3, p: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        G = torch.randn(k, p, generator=gen, dtype=torch.float64)
        g = torch.randn(p, generator=gen, dtype=torch.float64)
        if bool((G @ g < 0).any()):
            return g, G


@pytest.mark.parametrize("seed", range(8))
def test_gem_projection_is_the_closest_gradient_that_violates_no_constraint(seed: int) -> None:
    g, G = conflicting_case(seed, k=1 + seed % 4)
    z = gem_project(g, G, margin=0.0, eps=0.0)
    assert bool((G @ z >= -1e-9).all()), "no memory loss increases to first order"
    expected = closest_feasible(g.numpy(), G.numpy())
    np.testing.assert_allclose(z.numpy(), expected, atol=1e-8)
    # and against a general-purpose solver of the primal QP
    primal = minimize(
        lambda x: 0.5 * np.sum((x - g.numpy()) ** 2),
        g.numpy(),
        jac=lambda x: x - g.numpy(),
        constraints=[{"type": "ineq", "fun": lambda x: G.numpy() @ x, "jac": lambda x: G.numpy()}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    np.testing.assert_allclose(z.numpy(), primal.x, atol=1e-5)


def test_gem_sign_conventions() -> None:
    g, G = conflicting_case(0, k=3)
    v = gem_dual(G, g, margin=0.0, eps=0.0)
    assert (v >= 0).all(), "dual variables are non-negative"
    z = gem_project(g, G, margin=0.0, eps=0.0)
    np.testing.assert_allclose((z - g).numpy(), G.numpy().T @ v, atol=1e-10), "z = g + G^T v: toward memories"
    # complementary slackness: a constraint with a positive multiplier is active
    slack = (G @ z).numpy()
    assert np.all((v < 1e-10) | (np.abs(slack) < 1e-8))


def test_gem_with_one_constraint_is_agem_projection() -> None:
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g_k = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    expected = g - (g @ g_k) / (g_k @ g_k) * g_k
    torch.testing.assert_close(gem_project(g, g_k[None], eps=0.0), expected)
    torch.testing.assert_close(agem_project(g, g_k), expected)


@pytest.mark.parametrize("margin", [0.0, 0.5])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("seed", range(4))
def test_gem_dual_of_one_constraint_meets_the_kkt_conditions(margin: float, eps: float, seed: int) -> None:
    # K = 1 is solved in closed form: v >= margin, Q v + p >= 0, (v - margin)(Q v + p) = 0
    gen = torch.Generator().manual_seed(seed)
    G, g = torch.randn(1, 6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    v = float(gem_dual(G, g, margin=margin, eps=eps)[0])
    slope = float(G[0] @ G[0]) * v + eps * v + float(G[0] @ g)
    assert v >= margin - 1e-12 and slope >= -1e-9 and abs((v - margin) * slope) < 1e-9


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("seed", range(3))
def test_stacked_gem_projection_equals_the_plain_one(k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(k + 1, 40, generator=gen)
    rows[k] = -rows[:k].sum(0) + 0.1 * torch.randn(40, generator=gen)  # g against the memories: violated
    expected = gem_project(rows[k].clone(), rows[:k].clone(), margin=0.5)
    v = gem_stacked_dual(rows, margin=0.5)
    assert v is not None and v.dtype == rows.dtype
    torch.testing.assert_close(rows[k] + rows[:k].T @ v, expected)
    rows.abs_()  # every dot product positive: nothing violated
    assert gem_stacked_dual(rows, margin=0.5) is None


def test_gem_leaves_a_non_conflicting_gradient_alone() -> None:
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([0.5, 0.0])
    assert gem_project(g, G, margin=0.5) is g, "projection only when a constraint is violated"
    assert gem_project(g, G[:0]) is g


def test_gem_margin_and_ridge() -> None:
    # one violated constraint (g_1) and two satisfied ones that the exact projection leaves inactive (v = 0)
    g = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    G = torch.tensor([[-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    exact = gem_project(g, G, margin=0.0, eps=0.0)
    torch.testing.assert_close(exact, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    v = gem_dual(G, g, margin=0.5, eps=0.0)
    assert (v >= 0.5 - 1e-12).all(), "memory_strength bounds every dual variable from below"
    z = gem_project(g, G, margin=0.5, eps=0.0)
    assert bool((G @ z >= -1e-9).all())
    torch.testing.assert_close(z, torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64))
    assert bool(((G @ z)[1:] > (G @ exact)[1:]).all()), "the margin pushes toward the memories it left inactive"
    g, G = conflicting_case(3, k=3)
    exact = gem_project(g, G, margin=0.0, eps=0.0)
    # the ridge keeps the constraints up to eps * v (KKT of the regularised dual)
    eps = 1e-3
    v = torch.from_numpy(gem_dual(G, g, margin=0.0, eps=eps))
    z = gem_project(g, G, margin=0.0, eps=eps)
    assert bool((G @ z >= -eps * v - 1e-9).all())
    torch.testing.assert_close(z, exact, atol=1e-2, rtol=0)


def test_gem_handles_parallel_memories_without_ridge() -> None:
    g_k = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    G = torch.stack([g_k, g_k, 2 * g_k])  # rank one: the Gram matrix is singular
    g = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    z = gem_project(g, G, margin=0.0, eps=0.0)
    torch.testing.assert_close(z, g - (g @ g_k) / (g_k @ g_k) * g_k)
    assert gem_project(g, torch.zeros(2, 3, dtype=torch.float64)) is g, "zero memory gradients constrain nothing"


def test_gem_keeps_dtype_and_device() -> None:
    g, G = conflicting_case(1)
    z = gem_project(g.float(), G.float())
    assert z.dtype == torch.float32 and z.device == g.device


def test_agem_projection_has_non_negative_dot_with_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        g, g_ref = torch.randn(20, generator=gen), torch.randn(20, generator=gen)
        z = agem_project(g, g_ref)
        if float(g @ g_ref) >= 0:
            assert torch.equal(z, g), "no conflict: the gradient is unchanged"
        else:
            assert abs(float(z @ g_ref)) < 1e-5, "a conflict is projected onto the reference's normal plane"
            torch.testing.assert_close(z, g - (g @ g_ref) / (g_ref @ g_ref) * g_ref)
        assert float(z @ g_ref) >= -1e-5
    g = torch.randn(5, generator=gen)
    assert torch.equal(agem_project(g, torch.zeros(5)), g), "a zero reference gradient constrains nothing"


def test_flat_gradients_round_trip() -> None:
    params = [
        torch.nn.Parameter(torch.randn(2, 3)),
        torch.nn.Parameter(torch.randn(4)),
        torch.nn.Parameter(torch.ones(1)),
    ]
    grads = [torch.ones(2, 3), None, torch.full((1,), 7.0)]
    flat = flat_grad(grads, params)
    assert flat.tolist() == [1.0] * 6 + [0.0] * 4 + [7.0]
    write_flat_grad(params, torch.arange(11.0))
    assert params[0].grad.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert params[1].grad.tolist() == [6.0, 7.0, 8.0, 9.0] and params[2].grad.tolist() == [10.0]


def per_group_gradients(net: torch.nn.Module, params: list, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: one forward and one backward per group, each group's loss its mean cross-entropy."""
    rows = []
    for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
        loss = torch.nn.functional.cross_entropy(net(xs), ys)
        rows.append(flat_grad(torch.autograd.grad(loss, params, allow_unused=True), params))
    return torch.stack(rows)


def sum_of_group_means(y: torch.Tensor, group_size: int):
    return lambda logits: torch.nn.functional.cross_entropy(logits, y, reduction="sum") / group_size


@pytest.mark.parametrize("k", [1, 3])
def test_group_gradients_of_a_linear_network_equal_one_backward_per_group(k: int) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5, bias=False),
        torch.nn.ReLU(), torch.nn.Identity(), torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(5, 4)),
    )  # fmt: skip
    net.eval()  # dropout off: groups can be compared with one pass per group
    net[1].bias.requires_grad_(False)  # a frozen parameter is left out of the flat gradient
    params = [p for p in net.parameters() if p.requires_grad]
    x, y = torch.randn(k * 6, 3, 4), torch.randint(0, 4, (k * 6,))
    grouped = LinearGroupGradients.build(net, params)
    assert grouped is not None and grouped.n_params == sum(p.numel() for p in params)
    out = torch.full((k, grouped.n_params), float("nan"))
    assert grouped(x, sum_of_group_means(y, 6), 6, out)
    torch.testing.assert_close(out, per_group_gradients(net, params, x, y, k), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in net.parameters()), "no .grad is written"


@pytest.mark.parametrize("frozen_first", [False, True])
def test_group_gradients_with_dropout_use_the_mask_nn_dropout_draws(frozen_first: bool) -> None:
    # reference: one forward of the network itself (nn.Dropout in training mode) from the same random state, then
    # each group's loss differentiated alone through that graph
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 16), torch.nn.ReLU(),
        torch.nn.Dropout(0.5), torch.nn.Linear(16, 3),
    )  # fmt: skip
    if frozen_first:  # no gradient is needed below the second layer
        net[0].requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    x, y = torch.randn(3 * 5, 8), torch.randint(0, 3, (3 * 5,))
    torch.manual_seed(7)
    per_sample = torch.nn.functional.cross_entropy(net(x), y, reduction="none")
    expected = torch.stack([
        flat_grad(torch.autograd.grad(part.mean(), params, retain_graph=True), params) for part in per_sample.chunk(3)
    ])  # fmt: skip
    grouped = LinearGroupGradients.build(net, params)
    assert grouped is not None
    out = torch.empty(3, grouped.n_params)
    torch.manual_seed(7)
    assert grouped(x, sum_of_group_means(y, 5), 5, out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_restricted_group_gradients_leave_out_inputs_unused_by_every_sample() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    params = list(net.parameters())
    x, y = torch.randn(8, 4, 5), torch.randint(0, 3, (8,))
    x[:, 0, :] = 0  # features 0-4 and 13 are zero in every sample
    x[:, 2, 3] = 0
    full = LinearGroupGradients.build(net, params)
    assert full is not None
    grouped, reduced = full.restricted(x)
    kept = torch.tensor([c for c in range(20) if c not in (0, 1, 2, 3, 4, 13)])
    assert torch.equal(grouped.columns, kept) and grouped.first_weight == 0
    assert torch.equal(reduced, x.flatten(1)[:, kept]) and grouped.n_params == full.n_params - 6 * 6
    rows = torch.empty(2, grouped.n_params)
    assert grouped(reduced, sum_of_group_means(y, 4), 4, rows)
    expected = per_group_gradients(net, params, x, y, 2)
    weight = expected[:, :120].reshape(2, 6, 20)
    assert bool((weight[:, :, [0, 1, 2, 3, 4, 13]] == 0).all()), "unused inputs: zero gradient in every group"
    torch.testing.assert_close(rows[:, :84], weight[:, :, kept].reshape(2, -1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rows[:, 84:], expected[:, 120:], rtol=1e-5, atol=1e-7)
    # gather and add_to_grads move only the kept columns; the others keep p.grad
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    flat = grouped.gather(params, torch.empty(grouped.n_params))
    torch.testing.assert_close(flat[:84], before[0][:, kept].reshape(-1), rtol=0, atol=0)
    grouped.add_to_grads(params, torch.ones_like(flat))
    assert torch.equal(params[0].grad[:, kept], before[0][:, kept] + 1)
    assert torch.equal(params[0].grad[:, 0], before[0][:, 0]), "a left-out column keeps its value"
    assert all(torch.equal(p.grad, b + 1) for p, b in zip(params[1:], before[1:], strict=True))


def test_restriction_applies_only_where_it_is_exact_and_pays() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(6, 10)
    full = LinearGroupGradients.build(net, list(net.parameters()))
    same, same_x = full.restricted(x)
    assert same is full and same_x is x, "every feature used"
    x[:, 0] = 0
    assert full.restricted(x)[0] is full, "one feature in ten: below the share that pays"
    assert full.restricted(x, max_share=1.0)[0].columns is not None
    frozen = LinearGroupGradients.build(net, list(net.parameters())[1:])
    assert frozen.restricted(x, max_share=1.0)[0] is frozen, "the first layer's weight is not trained"
    first = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(10, 2))
    after_relu = LinearGroupGradients.build(first, list(first.parameters()))
    assert after_relu.restricted(x, max_share=1.0)[0] is after_relu, "a module computes before the first layer"


def test_group_gradients_refuse_what_they_cannot_split() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    assert LinearGroupGradients.build(conv, list(conv.parameters())) is None, "convolutions: not handled"
    norm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    assert LinearGroupGradients.build(norm, [norm[0].weight]) is None, "batch norm mixes the samples of a batch"
    lin = torch.nn.Linear(3, 2)
    stray = torch.nn.Parameter(torch.zeros(1))
    assert LinearGroupGradients.build(lin, [lin.weight, stray]) is None, "a parameter outside the linear layers"
    shared = torch.nn.Linear(3, 3)
    twice = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    assert LinearGroupGradients.build(twice, list(twice.parameters())) is None, "a layer applied twice"
    partial = torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Linear(4, 2))
    assert LinearGroupGradients.build(partial, list(partial.parameters())) is None, "a flatten that keeps 3 dims"


def test_group_gradients_step_aside_for_hooks_and_unexpected_shapes() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    grouped = LinearGroupGradients.build(net, list(net.parameters()))
    assert grouped is not None
    x, y = torch.randn(4, 4), torch.randint(0, 2, (4,))
    out = torch.full((2, grouped.n_params), float("nan"))
    handle = net[1].register_forward_hook(lambda module, args, output: output * 2)
    assert not grouped(x, sum_of_group_means(y, 2), 2, out), "a hook would be skipped: refused"
    handle.remove()
    assert not grouped(torch.randn(4, 5, 4), sum_of_group_means(y, 2), 2, out), "a linear on 3-d input"
    assert not grouped(x, sum_of_group_means(y, 2), 3, out), "groups that do not tile the input"
    assert bool(out.isnan().all()), "out untouched when refused"
    assert grouped(x, sum_of_group_means(y, 2), 2, out) and not bool(out.isnan().any())
