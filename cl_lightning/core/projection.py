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

**Gradients of several losses in one pass** (:class:`LinearGroupGradients`): GEM needs the gradient of each past
task's memory loss separately. For a network of ``nn.Linear`` layers joined by per-sample operations (samples never
interact), the gradient of the group loss ``L_k = sum_{i in k} l_i`` with respect to a layer's weight is
``D_k^T A_k`` and with respect to its bias ``1^T D_k``, where ``A_k`` holds the layer's inputs on the group's
samples and ``D_k`` the gradients ``dl_i / dz_i`` of their losses with respect to the layer's outputs. Since ``l_i``
depends on sample ``i`` only, ``D`` is the gradient of ``L = sum_k L_k`` with respect to the layer's outputs: one
forward over all groups and one backward (to the layer outputs only: no weight gradient is formed) give every
``D_k``; the ``D_k^T A_k`` are one batched matrix product per layer. The arithmetic is that of one backward per
group, in larger kernels and one autograd call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor, nn

__all__ = ["LinearGroupGradients", "agem_project", "flat_grad", "gem_dual", "gem_project", "write_flat_grad"]

# modules whose forward treats every sample on its own (Dropout draws an independent mask per element)
PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.ReLU,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.Sequential,
)


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


class LinearGroupGradients:
    """Per-group gradients of a network made of ``nn.Linear`` layers and per-sample modules (see the module doc).

    Build it with :meth:`build`, which returns ``None`` for a network it cannot handle: a module whose type is not
    exactly one of :data:`PER_SAMPLE_MODULES` or ``containers`` (types whose ``forward`` only chains their
    children), or a trainable parameter that is not the weight or bias of one of its ``nn.Linear`` layers.

    Args:
        linears: The network's ``nn.Linear`` layers.
        layout: ``(layer index, "weight" | "bias", offset, shape)`` of each parameter, in :func:`flat_grad` order.
        n_params: Length of the flat gradient.
    """

    def __init__(self, linears: Sequence[nn.Linear], layout: Sequence[tuple[int, str, int, torch.Size]], n_params: int):
        self.linears = list(linears)
        self.layout = list(layout)
        self.n_params = n_params
        self._used = sorted({i for i, *_ in self.layout})  # layers whose output gradient is needed

    @classmethod
    def build(
        cls, net: nn.Module, params: Sequence[Tensor], containers: tuple[type[nn.Module], ...] = ()
    ) -> LinearGroupGradients | None:
        """The helper for ``net`` and its trainable ``params`` (in flat order), or ``None`` if it does not apply."""
        allowed = (*PER_SAMPLE_MODULES, *containers)
        if any(type(m) not in allowed for m in net.modules()):
            return None
        linears = [m for m in net.modules() if type(m) is nn.Linear]
        owner: dict[int, tuple[int, str]] = {}
        for i, m in enumerate(linears):
            owner[id(m.weight)] = (i, "weight")
            if m.bias is not None:
                owner[id(m.bias)] = (i, "bias")
        layout, offset = [], 0
        for p in params:
            if id(p) not in owner:
                return None
            layout.append((*owner[id(p)], offset, p.shape))
            offset += p.numel()
        return cls(linears, layout, offset)

    def __call__(self, loss_fn: Callable[[], Tensor], group_size: int, out: Tensor) -> bool:
        """Write into row ``k`` of ``out`` (``[K, n_params]``) the flat gradient of group ``k``'s loss.

        Args:
            loss_fn: Runs the forward pass over all ``K * group_size`` samples, group after group, and returns
                ``sum_k L_k`` (e.g. the sum of per-sample losses divided by ``group_size`` for per-group means).
            group_size: Samples per group.
            out: ``[K, n_params]``, written in place.

        Returns:
            ``False`` (``out`` unspecified) when the forward pass did not call every layer exactly once on a
            ``[K * group_size, in_features]`` input; the caller then computes the gradients another way.
        """
        k = out.shape[0]
        n = k * group_size
        taps: dict[nn.Module, tuple[Tensor, Tensor] | None] = {}

        def tap(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            taps[module] = None if module in taps else (args[0], output)  # a layer called twice: unsupported

        handles = [self.linears[i].register_forward_hook(tap) for i in self._used]
        try:
            loss = loss_fn()
        finally:
            for handle in handles:
                handle.remove()
        seen = [taps.get(self.linears[i]) for i in self._used]
        if any(t is None or t[0].dim() != 2 or t[0].shape[0] != n or t[1].shape[0] != n for t in seen):
            return False
        outputs = [t[1] for t in seen]  # type: ignore[index]
        deltas = dict(zip(self._used, torch.autograd.grad(loss, outputs, allow_unused=True), strict=True))
        inputs = {i: t[0].detach() for i, t in zip(self._used, seen, strict=True)}  # type: ignore[index]
        with torch.no_grad():
            for i, kind, offset, shape in self.layout:
                rows = out[:, offset : offset + shape.numel()]
                d = deltas[i]
                if d is None:  # the loss does not depend on this layer
                    rows.zero_()
                elif kind == "weight":  # D_k^T A_k for every k, written into the rows
                    a = inputs[i]
                    da = d.reshape(k, group_size, -1).transpose(1, 2), a.reshape(k, group_size, -1)
                    torch.bmm(*da, out=rows.view(k, *shape))
                else:
                    torch.sum(d.reshape(k, group_size, -1), 1, out=rows)
        return True
