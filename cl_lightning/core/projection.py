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
forward over all groups and one backward to the layer outputs (no weight gradient is formed) give every ``D_k``;
the ``D_k^T A_k`` are one batched matrix product per layer. The arithmetic is that of one backward per group, in
larger kernels; the pass is written out layer by layer (autograd only differentiates the loss with respect to the
logits), which on MNIST-sized MLPs saves the graph's bookkeeping at every step.

**GEM's projection in one pass over G** (:func:`gem_stacked_dual`): with ``g`` stored as the row after ``G``,
``[G; g] [G; g]^T`` holds both ``G G^T`` and ``G g``; it is the only product of the ``P``-wide rows before the
update ``G^T v + g``, and the one transfer to the host (the violation check and the ``K x K`` dual run there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import nnls
from torch import Tensor, nn

__all__ = [
    "LinearGroupGradients",
    "agem_project",
    "flat_grad",
    "gem_dual",
    "gem_project",
    "gem_stacked_dual",
    "solve_gem_dual",
    "write_flat_grad",
]

# modules whose forward treats every sample on its own (Dropout draws an independent mask per element)
PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout)


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
    memories: Tensor,
    g: Tensor,
    margin: float = 0.0,
    eps: float = 1e-3,
    dots: Tensor | None = None,
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
    p = (G @ g if dots is None else dots).double().cpu().numpy()
    return solve_gem_dual(gram, p, margin, eps)


def solve_gem_dual(gram: np.ndarray, dots: np.ndarray, margin: float = 0.0, eps: float = 1e-3) -> np.ndarray:
    """:func:`gem_dual` on ``G G^T`` and ``G g`` given as float64 arrays (``[K, K]``, ``[K]``)."""
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


def gem_stacked_dual(rows: Tensor, margin: float = 0.0, eps: float = 1e-3) -> Tensor | None:
    """:func:`gem_dual` for ``g = rows[-1]`` and ``G = rows[:-1]``, with ``G g`` and ``G G^T`` taken from the one
    product ``rows rows^T`` (a single pass over ``G`` instead of two; one transfer to the host).

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


class LinearGroupGradients:
    """Per-group gradients of a chain of ``nn.Linear`` layers and per-sample modules (see the module doc).

    The chain is the network's leaf modules in registration order: ``nn.Sequential`` and the ``containers`` given
    to :meth:`build` (types whose ``forward`` calls their children once each, in that order, like
    :class:`cl_lightning.models.backbones.MLP`) are read through. The pass is written out rather than recorded by
    autograd (which only differentiates the loss with respect to the logits): forward with the layers' own
    parameters, then ``D`` backwards layer by layer (``D W`` through a linear layer, the mask of positive outputs
    through ReLU, the drawn mask through dropout), each layer's group gradients formed as soon as its ``D`` is
    known. Dropout in training mode draws its mask as ``nn.Dropout`` does on the CPU (Bernoulli of ``1 - p``,
    divided by ``1 - p``).

    The flat gradient holds the parameters in the order given to :meth:`build`; :meth:`gather` copies ``p.grad``
    into it and :meth:`add_to_grads` adds a flat change back. A helper from :meth:`restricted` leaves out the first
    linear layer's weight columns of input features that are zero in every sample of a fixed input (see there).

    Args:
        chain: The leaf modules, in the order the network applies them.
        layout: ``(chain index, "weight" | "bias", offset, shape)`` of each parameter, in flat order (the shape
            in the flat gradient).
        n_params: Length of the flat gradient.
        columns: Input features of the first linear layer kept in the flat gradient and in the inputs given to
            :meth:`__call__` (``None``: all).
    """

    def __init__(
        self,
        chain: Sequence[nn.Module],
        layout: Sequence[tuple[int, str, int, torch.Size]],
        n_params: int,
        columns: Tensor | None = None,
    ):
        self.chain = list(chain)
        self.layout = list(layout)
        self.n_params = n_params
        self.columns = columns
        self._first = min(i for i, *_ in self.layout) if self.layout else len(self.chain)  # D needed down to here
        self._linear0 = next((i for i, m in enumerate(self.chain) if isinstance(m, nn.Linear)), None)
        # the position (in flat order) of the first linear layer's weight, if trained
        self.first_weight = next(
            (j for j, (i, kind, *_) in enumerate(self.layout) if i == self._linear0 and kind == "weight"), None
        )
        self._by_layer: dict[int, list[tuple[str, int, torch.Size]]] = {}  # chain index -> its parameters
        for i, kind, offset, shape in self.layout:
            self._by_layer.setdefault(i, []).append((kind, offset, shape))

    @classmethod
    def build(
        cls, net: nn.Module, params: Sequence[Tensor], containers: tuple[type[nn.Module], ...] = ()
    ) -> LinearGroupGradients | None:
        """The helper for ``net`` and its trainable ``params`` (in flat order), or ``None`` if it does not apply:
        a module of another type, a flatten other than ``Flatten(1, -1)``, a module that appears twice in the
        chain, or a trainable parameter that is not the weight or bias of one of its linear layers."""
        chain: list[nn.Module] = []

        def walk(module: nn.Module) -> bool:
            if type(module) is nn.Sequential or type(module) in containers:
                return all(child is not None and walk(child) for child in module._modules.values())  # repeats kept
            if type(module) not in PER_SAMPLE_MODULES:
                return False
            if type(module) is nn.Flatten and (module.start_dim, module.end_dim) != (1, -1):  # type: ignore[union-attr]
                return False
            chain.append(module)
            return True

        if not walk(net) or len({id(m) for m in chain}) != len(chain):
            return None
        owner: dict[int, tuple[int, str]] = {}
        for i, m in enumerate(chain):
            if type(m) is nn.Linear:
                owner[id(m.weight)] = (i, "weight")
                if m.bias is not None:
                    owner[id(m.bias)] = (i, "bias")
        layout, offset = [], 0
        for p in params:
            if id(p) not in owner:
                return None
            layout.append((*owner[id(p)], offset, p.shape))
            offset += p.numel()
        return cls(chain, layout, offset)

    def restricted(self, x: Tensor, max_share: float = 0.9) -> tuple[LinearGroupGradients, Tensor]:
        """The helper for a fixed input ``x`` whose flat gradient leaves out the first linear layer's weight
        columns of the features that are zero in every sample of ``x``, and ``x`` reduced to the other features.

        For every group, column ``c`` of that weight's gradient ``D_k^T A_k`` is exactly zero when ``A[:, c]`` is
        (and the features add nothing to the forward pass), so dot products and combinations of the flat
        gradients lose nothing; :meth:`add_to_grads` changes only the kept columns of ``p.grad``.
        Sparse inputs (MNIST's border pixels are zero in every image) then cost fewer multiply-adds, forward and
        backward. Returns ``(self, x)`` when at least ``max_share`` of the features are nonzero somewhere, or when
        the first linear layer is not the first module that computes (only ``Flatten`` / ``Identity`` may precede
        it), or its weight is not trained.
        """
        i = self._linear0
        if self.columns is not None or i is None or len(x) == 0:
            return self, x
        if any(not isinstance(m, nn.Flatten | nn.Identity) for m in self.chain[:i]):
            return self, x
        flat = x.flatten(1)
        if self.first_weight is None or flat.shape[1] != self.chain[i].in_features:  # type: ignore[union-attr]
            return self, x
        columns = flat.ne(0).any(0).nonzero().squeeze(1)
        if len(columns) >= max_share * flat.shape[1]:
            return self, x
        layout, offset = [], 0
        for j, (li, kind, _, shape) in enumerate(self.layout):
            if j == self.first_weight:
                shape = torch.Size((shape[0], len(columns)))
            layout.append((li, kind, offset, shape))
            offset += shape.numel()
        helper = LinearGroupGradients(self.chain, layout, offset, columns)
        return helper, flat.index_select(1, columns)

    def gather(self, params: Sequence[Tensor], out: Tensor) -> Tensor:
        """The flat gradient of ``params`` (``p.grad``, ``None`` read as zeros) in this layout, into ``out``."""
        for j, ((_, _, offset, shape), p) in enumerate(zip(self.layout, params, strict=True)):
            part = out[offset : offset + shape.numel()].view(shape)
            if p.grad is None:
                part.zero_()
            elif self.columns is not None and j == self.first_weight:
                torch.index_select(p.grad, 1, self.columns, out=part)  # type: ignore[arg-type]
            else:
                part.copy_(p.grad)
        return out

    def add_to_grads(self, params: Sequence[Tensor], vector: Tensor) -> None:
        """Add the flat ``vector`` to ``p.grad`` (the columns left out are unchanged)."""
        for j, ((_, _, offset, shape), p) in enumerate(zip(self.layout, params, strict=True)):
            part = vector[offset : offset + shape.numel()].view(shape)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.columns is not None and j == self.first_weight:
                p.grad.index_add_(1, self.columns, part)  # type: ignore[arg-type]
            else:
                p.grad.add_(part)

    def __call__(self, x: Tensor, loss_fn: Callable[[Tensor], Tensor], group_size: int, out: Tensor) -> bool:
        """Write into row ``k`` of ``out`` (``[K, n_params]``) the flat gradient of group ``k``'s loss.

        Args:
            x: The network's input for all ``K * group_size`` samples, group after group (for a helper from
                :meth:`restricted`, the reduced input it returned, or rows of it).
            loss_fn: Maps the logits to ``sum_k L_k`` (e.g. the sum of per-sample losses divided by
                ``group_size`` for per-group means).
            group_size: Samples per group.
            out: ``[K, n_params]``, written in place.

        Returns:
            ``False`` (``out`` untouched) when a module of the chain has forward hooks now (they would not run
            here) or a linear layer gets other than ``[K * group_size, features]``; the caller then computes the
            gradients another way.
        """
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.chain):
            return False
        k = out.shape[0]
        saved: list[Tensor | None] = []  # per module: a linear's input, a ReLU's output, a dropout's mask
        with torch.no_grad():
            a = x
            for i, m in enumerate(self.chain):
                kept = None
                if isinstance(m, nn.Linear):
                    if a.dim() != 2 or a.shape[0] != k * group_size:
                        return False
                    narrow = self.columns is not None and i == self._linear0
                    weight = m.weight.index_select(1, self.columns) if narrow else m.weight  # type: ignore[arg-type]
                    kept, a = a, F.linear(a, weight, m.bias)
                elif isinstance(m, nn.ReLU):
                    a = kept = torch.relu(a)
                elif isinstance(m, nn.Flatten):
                    a = a.flatten(1)
                elif isinstance(m, nn.Dropout) and m.training and m.p > 0:
                    kept = torch.zeros_like(a) if m.p == 1 else torch.empty_like(a).bernoulli_(1 - m.p).div_(1 - m.p)
                    a = a * kept
                saved.append(kept)
        logits = a.requires_grad_()
        with torch.enable_grad():
            (d,) = torch.autograd.grad(loss_fn(logits), logits)
        with torch.no_grad():
            for i in range(len(self.chain) - 1, self._first - 1, -1):
                m, kept = self.chain[i], saved[i]
                if isinstance(m, nn.Linear):
                    for kind, offset, shape in self._by_layer.get(i, ()):
                        rows = out[:, offset : offset + shape.numel()]
                        if kind == "weight":  # D_k^T A_k for every k, written into the rows
                            dk = d.reshape(k, group_size, -1).transpose(1, 2)
                            torch.bmm(dk, kept.reshape(k, group_size, -1), out=rows.view(k, *shape))  # type: ignore[union-attr]
                        else:
                            torch.sum(d.reshape(k, group_size, -1), 1, out=rows)
                    if i > self._first:
                        d = d @ m.weight
                elif kept is not None:  # ReLU: where the output is positive (ReLU's own backward); dropout: the mask
                    d = torch.ops.aten.threshold_backward(d, kept, 0) if isinstance(m, nn.ReLU) else d * kept
                # Flatten, Identity, dropout in eval mode: D passes unchanged (above a linear layer every tensor is
                # [N, features], which Flatten leaves as it is)
        return True
