"""Gradient projections of GEM and A-GEM, and flat views of a model's gradients.

**GEM** (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, eqs. 10-13): given
the proposed gradient ``g`` and the memory gradients ``g_k`` (rows of ``G``), find the update closest to ``g``
that increases no memory loss::

    min_z 1/2 ||z - g||^2   s.t.   G z >= 0.

Its dual is ``min_{v >= 0} 1/2 v^T G G^T v + g^T G^T v`` and the update is ``z = G^T v + g``. Since
``1/2 v^T G G^T v + g^T G^T v = 1/2 ||G^T v + g||^2 - 1/2 ||g||^2``, the dual is exactly a non-negative least
squares problem, ``min_{v >= 0} ||G^T v + g||^2``, which :func:`scipy.optimize.nnls` solves exactly. It is solved
on the ``K x K`` Gram matrix ``Q = G G^T + eps I`` (``K`` = number of constraints), not on the ``P x K`` matrix
``G^T``: with ``Q = U S U^T``, ``||S^{1/2} U^T v + S^{-1/2} U^T q||^2 = v^T Q v + 2 q^T v + const``. The ridge
``eps I`` (GEM's code uses ``eps = 1e-3``) is the augmented system ``[G^T; sqrt(eps) I]`` written on ``Q``; it
keeps ``Q`` well conditioned when memory gradients are nearly parallel. GEM's ``margin`` (``memory_strength``)
asks for ``v >= margin`` instead of ``v >= 0`` (as GEM's reference code does), which biases the update further
toward the memories; it is solved by the substitution ``v = margin + u``, ``u >= 0``.

**A-GEM** (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019, eq. 11): with one reference
gradient ``g_ref`` (on a batch drawn from the whole memory), ``g~ = g - (g . g_ref / g_ref . g_ref) g_ref`` if
``g . g_ref < 0``, else ``g``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

__all__ = ["agem_project", "flat_grad", "gem_dual", "gem_project", "write_flat_grad"]


def flat_grad(grads: Sequence[Tensor | None], params: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """Concatenate ``grads`` (``None`` read as zeros of the parameter's shape) into one vector (into ``out``)."""
    parts = [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def write_flat_grad(params: Sequence[Tensor], vector: Tensor) -> None:
    """Copy slices of ``vector`` into each parameter's ``.grad`` (allocated if missing)."""
    offset = 0
    for p in params:
        n = p.numel()
        chunk = vector[offset : offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


def gem_dual(
    memories: Tensor, g: Tensor, margin: float = 0.0, eps: float = 1e-3, dots: Tensor | None = None
) -> np.ndarray:
    """Solve GEM's dual ``min_{v >= margin} 1/2 v^T (G G^T + eps I) v + (G g)^T v`` exactly (NNLS on the K x K
    system in float64; ``G G^T`` and ``G g`` are computed in the inputs' dtype).

    Args:
        memories: ``G``, ``[K, P]``, one memory gradient per row.
        g: The proposed gradient, ``[P]``.
        margin: Lower bound of every dual variable (GEM's ``memory_strength``); 0 gives the exact projection.
        eps: Ridge added to the Gram matrix.
        dots: ``G g`` if already computed.

    Returns:
        ``v``, ``[K]`` (float64).
    """
    # the P-dimensional products in the inputs' dtype, on their device; only the K x K system goes to float64
    G, g = memories.detach(), g.detach()
    gram = (G @ G.T).double().cpu().numpy()
    k = gram.shape[0]
    Q = 0.5 * (gram + gram.T) + eps * np.eye(k)
    p = (G @ g if dots is None else dots).double().cpu().numpy()
    m = np.full(k, float(margin))
    q = p + Q @ m  # v = m + u: the linear term of u
    s, U = np.linalg.eigh(Q)
    keep = s > max(float(s.max()), 0.0) * k * np.finfo(np.float64).eps
    if not keep.any():  # every memory gradient is zero: nothing constrains g
        return m
    root = np.sqrt(s[keep])
    A = root[:, None] * U[:, keep].T
    b = -(U[:, keep].T @ q) / root
    u, _ = nnls(A, b)
    return m + u


def gem_project(g: Tensor, memories: Tensor, margin: float = 0.0, eps: float = 1e-3) -> Tensor:
    """GEM's update: ``g`` itself if ``G g >= 0`` (no memory loss increases), else ``G^T v + g`` (see module).

    Args:
        g: Proposed gradient, ``[P]``.
        memories: ``G``, ``[K, P]``; ``K = 0`` returns ``g``.
        margin: GEM's ``memory_strength``.
        eps: Ridge of the dual's Gram matrix.

    Returns:
        The update, on ``g``'s device and dtype (``g`` itself, not a copy, when no constraint is violated).
    """
    if memories.shape[0] == 0:
        return g
    dots = memories @ g
    if not bool((dots < 0).any()):
        return g
    v = gem_dual(memories, g, margin, eps, dots)
    return torch.addmv(g, memories.T, torch.from_numpy(v).to(memories))


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM's update: ``g - (g . g_ref / ||g_ref||^2) g_ref`` where ``g . g_ref < 0``, else ``g`` (bit-identical).

    Written without a host synchronisation: the coefficient is ``min(g . g_ref, 0) / ||g_ref||^2``, zero when
    there is no conflict (and when ``g_ref`` is zero).
    """
    dot = torch.dot(g, g_ref)
    norm = torch.dot(g_ref, g_ref)
    coef = torch.where(norm > 0, dot.clamp(max=0) / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)
    return g - coef * g_ref
