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
``g . g_ref < 0``, else ``g``. :func:`agem_project_` writes it into the parameters' gradients in place, one
tensor at a time (no flat copies of ``g`` and ``g_ref``, the same arithmetic).

**GEM's projection in one pass over G** (:func:`gem_stacked_dual`): with ``g`` stored as the row after ``G``,
``[G; g] [G; g]^T`` holds both ``G G^T`` and ``G g``; it is the only product of the ``P``-wide rows before the
update ``G^T v + g``, and the one transfer to the host (the violation check and the ``K x K`` dual run there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

__all__ = [
    "add_to_grads_",
    "agem_project",
    "agem_project_",
    "flat_grad",
    "gem_stacked_dual",
    "solve_gem_dual",
    "write_flat_grad",
]


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


def add_to_grads_(params: Sequence[Tensor], matrix: Tensor, v: Tensor) -> None:
    """Add ``matrix^T v`` (``matrix``: ``[K, P]`` rows in :func:`flat_grad`'s layout) to each parameter's ``.grad``
    in place, block by block (a missing ``.grad`` is allocated): GEM's update ``g + G^T v`` without a flat copy of
    ``g`` or of the result."""
    offset = 0
    for p in params:
        n = p.numel()
        block = matrix[:, offset : offset + n].T
        if p.grad is None:
            p.grad = (block @ v).view_as(p)
        elif p.grad.is_contiguous():
            p.grad.view(-1).addmv_(block, v)
        else:
            p.grad.add_((block @ v).view_as(p))
        offset += n


def solve_gem_dual(gram: np.ndarray, dots: np.ndarray, margin: float = 0.0, eps: float = 1e-3) -> np.ndarray:
    """Solve GEM's dual ``min_{v >= margin} 1/2 v^T (G G^T + eps I) v + (G g)^T v`` exactly (NNLS on the K x K
    system, see the module), given ``G G^T`` and ``G g`` as float64 arrays (``[K, K]``, ``[K]``).

    Args:
        gram: ``G G^T``, one row and column per memory gradient.
        dots: ``G g``, with ``g`` the proposed gradient.
        margin: Lower bound of every dual variable (GEM's ``memory_strength``); 0 gives the exact projection.
        eps: Ridge added to the Gram matrix.

    Returns:
        ``v``, ``[K]`` (float64); the update is ``G^T v + g``.
    """
    k = dots.shape[0]
    Q = 0.5 * (gram + gram.T)
    Q.flat[:: k + 1] += eps
    m = np.full(k, float(margin))
    q = dots + Q @ m  # v = m + u: the linear term of u
    if k == 1:  # min_{u >= 0} 1/2 Q u^2 + q u, in closed form (what NNLS returns on the 1 x 1 system)
        return m + (max(0.0, -float(q[0]) / float(Q[0, 0])) if Q[0, 0] > 0 else 0.0)
    s, U = np.linalg.eigh(Q)
    keep = s > max(float(s.max()), 0.0) * k * np.finfo(np.float64).eps
    if not keep.any():  # every memory gradient is zero: nothing constrains g
        return m
    root = np.sqrt(s[keep])
    A = root[:, None] * U[:, keep].T
    b = -(U[:, keep].T @ q) / root
    u, _ = nnls(A, b)
    return m + u


def gem_stacked_dual(rows: Tensor, margin: float = 0.0, eps: float = 1e-3) -> Tensor | None:
    """GEM's dual (:func:`solve_gem_dual`) for ``g = rows[-1]`` and ``G = rows[:-1]``, with ``G g`` and ``G G^T``
    taken from the one product ``rows rows^T`` (in ``rows``' dtype; a single pass over ``G`` instead of two; one
    transfer to the host, where the violation check and the ``K x K`` dual run).

    Returns:
        ``v`` on ``rows``' device and dtype (the update is ``rows[-1] + rows[:-1]^T v``), or ``None`` when no
        constraint is violated (the update is ``rows[-1]``).
    """
    k = rows.shape[0] - 1
    if k == 0:
        return None
    product = (rows @ rows.T).double().cpu().numpy()
    if not (product[:k, k] < 0).any():
        return None
    return torch.from_numpy(solve_gem_dual(product[:k, :k], product[:k, k], margin, eps)).to(rows)


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM's update: ``g - (g . g_ref / ||g_ref||^2) g_ref`` where ``g . g_ref < 0``, else ``g`` (bit-identical).

    Written without a host synchronisation: the coefficient is ``min(g . g_ref, 0) / ||g_ref||^2``, zero when
    there is no conflict (and when ``g_ref`` is zero).
    """
    dot = torch.dot(g, g_ref)
    norm = torch.dot(g_ref, g_ref)
    coef = torch.where(norm > 0, dot.clamp(max=0) / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)
    return g - coef * g_ref


def agem_project_(grads: Sequence[Tensor], refs: Sequence[Tensor | None]) -> Tensor:
    """:func:`agem_project` of the gradient held by the tensors ``grads`` against the one held by ``refs`` (a
    ``None`` ref is a zero block), written into ``grads`` in place: the two dot products are summed over the
    tensors, and each tensor is updated by ``g -= coef * g_ref`` (``coef`` zero without a conflict, so ``grads``
    are then left bit-identical). No flat copy of either gradient is made; no host synchronisation.

    Returns:
        ``g . g_ref < 0`` (whether the gradient was projected), a 0-dim bool tensor.
    """
    pairs = [(g, r) for g, r in zip(grads, refs, strict=True) if r is not None]
    if not pairs:
        return torch.zeros((), dtype=torch.bool, device=grads[0].device if grads else None)
    dot = torch.stack([torch.dot(g.reshape(-1), r.reshape(-1)) for g, r in pairs]).sum()
    norm = torch.stack([torch.dot(r.reshape(-1), r.reshape(-1)) for _, r in pairs]).sum()
    coef = torch.where(norm > 0, dot.clamp(max=0) / norm.clamp(min=torch.finfo(norm.dtype).tiny), 0.0)
    for g, r in pairs:
        g.addcmul_(r, coef, value=-1)
    return dot < 0
