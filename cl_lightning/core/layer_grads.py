"""Weighted sums of squared (or absolute) per-sample gradients of Linear and Conv2d layers from batched backward
passes, without per-sample gradients of the whole network (Lightning-free).

For a linear layer ``out = W a + b`` and a per-sample loss ``l(x)``, the gradient of sample ``x`` is
``dl/dW = delta(x) a(x)^T`` with ``delta = dl/d out``, so ``sum_x w_x (dl/dW)^2 = (w * delta^2)^T (a^2)`` (elementwise
squares): one backward pass over the batch gives every sample's ``delta`` (a network that treats samples
independently, as every ``torch.nn`` layer does in eval mode, has ``d(sum_x l(x)) / d out(x) = dl(x) / d out(x)``),
and one matrix product gives the sum. The absolute value factors the same way, ``|delta a^T| = |delta| |a|^T``. A
convolution's weight gradient is a sum over positions, which does not factor: its per-sample gradients come from
the unfolded input (``delta(x) U(x)^T`` per sample, one batched product), still without a backward pass per sample.
This is the "sum of squared per-sample gradients" of BackPACK (Dangel et al. 2020) and Opacus, written here with
public torch APIs only (module forward hooks, ``torch.autograd.grad`` with respect to the layers' outputs,
``torch.nn.functional.unfold``).

Layers not covered (other types, grouped or non-zero-padded convolutions, a layer called twice in one forward, a
linear layer on inputs with more than two dimensions, parameters shared between modules) are left to the caller,
who computes them per sample (:func:`cl_lightning.core.importance.diagonal_fisher`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerCapture", "batched_layers"]


def batched_layers(net: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    """The Linear and Conv2d submodules of ``net`` (by module name) whose every parameter is among ``names``
    (trainable parameter names) and belongs to no other module."""
    owners: dict[int, int] = {}
    for _, module in net.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    layers = {}
    for mname, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            ok = module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
        else:
            ok = type(module) is nn.Linear
        own = [f"{mname}.{pname}" if mname else pname for pname, _ in module.named_parameters(recurse=False)]
        if ok and own and all(n in names for n in own) and all(owners[id(p)] == 1 for p in module.parameters(False)):
            layers[mname] = module
    return layers


class LayerCapture:
    """Records each covered layer's input and output during one forward pass, then turns output gradients into
    weighted sums of squared or absolute per-sample parameter gradients.

    Usage: ``with capture.recording(): z = net(x)``; then ``capture.accumulate(total, outputs_grads, weights)``
    for each backward pass, with ``outputs_grads = torch.autograd.grad(loss, capture.outputs(), ...)``.
    Layers the forward did not call exactly once, or called on inputs of another rank, end up in :attr:`failed`
    and out of :attr:`names`.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.inputs: dict[str, Tensor] = {}
        self.outs: dict[str, Tensor] = {}
        self.failed: set[str] = set()

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.inputs, self.outs, self.failed = {}, {}, set()
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        for name, module in self.layers.items():
            rank = 2 if isinstance(module, nn.Linear) else 4
            if name not in self.inputs or self.inputs[name].dim() != rank:
                self.failed.add(name)
        for name in self.failed:
            self.inputs.pop(name, None)
            self.outs.pop(name, None)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            if name in self.inputs:  # called twice: its gradient is a sum over calls
                self.failed.add(name)
            self.inputs[name] = args[0].detach()
            self.outs[name] = out

        return hook

    def outputs(self) -> list[Tensor]:
        """The covered layers' outputs, in the order of :attr:`names`."""
        return [self.outs[n] for n in self.names]

    @property
    def names(self) -> list[str]:
        """The layers recorded by the last forward pass."""
        return [n for n in self.layers if n in self.outs]

    def parameter_names(self) -> set[str]:
        """Names (in the network) of the parameters of :attr:`names`."""
        return {f"{n}.{p}" if n else p for n in self.names for p, _ in self.layers[n].named_parameters(recurse=False)}

    def accumulate(
        self, total: dict[str, Tensor], grads: tuple[Tensor, ...], weights: Tensor, absolute: bool = False,
        chunk_size: int = 8,
    ) -> None:  # fmt: skip
        """``total[param] += sum_x weights[x] * g_x^2`` (``|g_x|`` if ``absolute``) for each covered parameter, with
        ``grads`` the gradients of a per-sample-separable loss with respect to :meth:`outputs`."""
        for name, delta in zip(self.names, grads, strict=True):
            module, a = self.layers[name], self.inputs[name]
            prefix = f"{name}." if name else ""
            w = weights.to(delta.dtype)
            if isinstance(module, nn.Linear):
                d = delta.abs() if absolute else delta.square()
                x = a.abs() if absolute else a.square()
                dw = d * w[:, None]
                total[prefix + "weight"].addmm_(dw.t(), x.to(dw.dtype))
                if module.bias is not None:
                    total[prefix + "bias"].add_(dw.sum(0))
                continue
            conv: nn.Conv2d = module  # type: ignore[assignment]
            n, c_out = delta.shape[:2]
            d = delta.reshape(n, c_out, -1)
            for i in range(0, n, chunk_size):
                sl = slice(i, i + chunk_size)
                u = F.unfold(a[sl], conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # type: ignore[arg-type]
                g = torch.bmm(d[sl], u.transpose(1, 2).to(d.dtype))  # [n, C_out, C_in * k * k]
                g = g.abs() if absolute else g.square()
                total[prefix + "weight"].view(-1).addmv_(g.reshape(g.shape[0], -1).t(), w[sl])
                if conv.bias is not None:
                    b = d[sl].sum(2)
                    b = b.abs() if absolute else b.square()
                    total[prefix + "bias"].addmv_(b.t(), w[sl])
