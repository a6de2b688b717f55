"""GEM's and A-GEM's projections alone, against brute-force solutions of the quadratic programs they solve."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cl_lightning.core.projection import (
    add_to_grads_,
    agem_project,
    agem_project_,
    flat_grad,
    gem_stacked_dual,
    solve_gem_dual,
    write_flat_grad,
)


def gem_dual(memories: torch.Tensor, g: torch.Tensor, margin: float = 0.0, eps: float = 1e-3) -> np.ndarray:
    """GEM's dual variables ``v`` for the rows ``G`` of ``memories`` and the proposed gradient ``g``."""
    return solve_gem_dual((memories @ memories.T).double().numpy(), (memories @ g).double().numpy(), margin, eps)


def gem_project(g: torch.Tensor, memories: torch.Tensor, margin: float = 0.0, eps: float = 1e-3) -> torch.Tensor:
    """GEM's update written plainly: ``g`` itself if ``G g >= 0`` (no memory loss increases), else ``G^T v + g``."""
    if memories.shape[0] == 0 or not bool((memories @ g < 0).any()):
        return g
    return torch.addmv(g, memories.T, torch.from_numpy(gem_dual(memories, g, margin, eps)).to(memories))


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


def test_agem_projection_in_place_equals_the_flat_one_and_leaves_unconflicted_gradients_bit_identical() -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    seen = set()
    for _ in range(40):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        refs = [torch.randn(s, generator=gen) for s in shapes]
        grads[2] = grads[2].transpose(0, 2)  # a non-contiguous gradient is updated too, not a copy of it
        refs[1] = None  # a parameter outside the reference's graph: a zero block
        params = [torch.zeros(s) for s in [(3, 4), (4,), (2, 2, 2)]]
        flat_refs = [torch.zeros_like(g) if r is None else r for g, r in zip(grads, refs, strict=True)]
        g, g_ref = flat_grad(grads, params), flat_grad(flat_refs, params)
        expected = agem_project(g, g_ref)
        before = [t.clone() for t in grads]
        projected = agem_project_(grads, refs)
        seen.add(bool(projected))
        assert bool(projected) == bool(g @ g_ref < 0)
        torch.testing.assert_close(flat_grad(grads, params), expected)
        if not projected:
            assert all(torch.equal(a, b) for a, b in zip(before, grads, strict=True)), "no conflict: bit-identical"
    assert seen == {True, False}


def test_gem_update_added_in_place_equals_the_flat_one_for_every_kind_of_gradient() -> None:
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 4), (4,), (2, 3)]]
    params[0].grad = torch.randn(3, 4, generator=gen)
    params[1].grad = None  # never reached by the loss: a zero gradient, allocated
    params[2].grad = torch.randn(3, 2, generator=gen).T  # not contiguous: updated itself, not a copy
    g = flat_grad([p.grad for p in params], params)
    G = torch.randn(3, g.numel(), generator=gen)
    v = torch.rand(3, generator=gen)
    expected = torch.addmv(g, G.T, v)
    add_to_grads_(params, G, v)
    torch.testing.assert_close(flat_grad([p.grad for p in params], params), expected)
    assert params[1].grad is not None and params[1].grad.shape == (4,)
