"""Meta-gradients through an inner loop of SGD steps, with ``torch.func.functional_call`` (Lightning-free).

MAML (Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017, eq. 1): from
parameters ``theta_0`` take ``k`` SGD steps on inner batches ``b_1 .. b_k``::

    theta_i = theta_{i-1} - alpha * grad_theta l(theta_{i-1}; b_i),    i = 1 .. k

and evaluate the outer loss ``L(theta_k; b_out)``. Its gradient with respect to ``theta_0`` is the meta-gradient::

    dL/dtheta_0 = (I - alpha H_1) (I - alpha H_2) ... (I - alpha H_k) grad L(theta_k)     (second order)
    dL/dtheta_0 = grad L(theta_k)                                                         (first order, FOMAML)

with ``H_i`` the Hessian of ``l(.; b_i)`` at ``theta_{i-1}``. Second order keeps the inner gradients in the autograd
graph (``create_graph=True``); first order detaches them, so ``theta_k = theta_0 - const``.

The model is never copied: the adapted parameters are plain tensors in a dict, passed to
``torch.func.functional_call``; the caller's ``nn.Parameter`` objects are ``theta_0``, so ``L.backward()`` puts
the meta-gradient in their ``.grad`` (and any hook registered on them, such as DDP's all-reduce, fires as for an
ordinary backward). Buffers are not part of the dict: every functional forward uses the module's own buffers, so a
batch-norm layer in training mode updates its running statistics at each inner and outer forward, as ordinary
forward passes would.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["MetaBatch", "MetaLoss", "call", "inner_loop", "meta_loss"]

LossFn = Callable[[Tensor, Any], Tensor]


class MetaBatch(NamedTuple):
    """One batch of the inner or the outer loop.

    Attributes:
        inputs: Positional arguments of the model's ``forward`` (e.g. ``(x,)`` or ``(x, task_id)``).
        target: Passed with the model's output to the loss function (e.g. labels, or labels and task ids).
    """

    inputs: tuple[Any, ...]
    target: Any


class MetaLoss(NamedTuple):
    """Result of :func:`meta_loss`.

    Attributes:
        outer: ``L(theta_k; b_out)``, in the autograd graph of ``theta_0``: its gradient is the meta-gradient.
        inner: The inner losses ``l(theta_{i-1}; b_i)``, detached (for logging).
        params: The adapted parameters ``theta_k`` by name.
    """

    outer: Tensor
    inner: list[Tensor]
    params: dict[str, Tensor]


def _slots(model: nn.Module) -> dict[str, str]:
    """One name per parameter slot ``(submodule, attribute)``, mapped to the parameter's canonical name.

    A tied parameter (one ``nn.Parameter`` in two slots) gets both slots; a submodule reachable by two paths (a
    ``head`` alias of ``heads[0]``) gets one name per slot, not per path.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    slots: dict[tuple[int, str], str] = {}
    names: dict[str, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            if (id(module), attr) not in slots:
                slots[id(module), attr] = name = f"{prefix}.{attr}" if prefix else attr
                names[name] = canonical[id(p)]
    return names


def call(model: nn.Module, params: Mapping[str, Tensor], inputs: tuple[Any, ...]) -> Tensor:
    """``model(*inputs)`` with ``params`` (canonical names, as ``named_parameters()``) in place of its parameters.

    ``functional_call`` with ``tie_weights=True`` swaps a slot twice when a submodule has two paths and leaves the
    model holding the substitutes afterwards (pytorch/pytorch#164759); one name per slot, given explicitly, and
    ``tie_weights=False`` handle both tied parameters and aliased submodules.
    """
    slots = {slot: params[name] for slot, name in _slots(model).items() if name in params}
    return functional_call(model, slots, inputs, tie_weights=False)


def inner_loop(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loss_fn: LossFn,
    batches: Sequence[MetaBatch],
    lr: float,
    first_order: bool = False,
    adapt: Collection[str] | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """``len(batches)`` SGD steps from ``params``; return the adapted parameters and the detached inner losses.

    Args:
        model: The network; called as ``call(model, params, batch.inputs)``.
        params: ``theta_0`` by name (``model.named_parameters()`` that require grad). Names absent from it use the
            module's own tensors.
        loss_fn: ``(output, batch.target) -> scalar``.
        batches: One batch per inner step.
        lr: The inner learning rate ``alpha``.
        first_order: Detach the inner gradients (FOMAML) instead of keeping them in the graph.
        adapt: Names of the parameters the inner steps update (default: all of ``params``); the others stay at
            ``theta_0`` in every step (the outer loss still depends on them).

    Example:
        >>> net = nn.Linear(2, 1, bias=False)
        >>> _ = net.weight.data.fill_(1.0)
        >>> mse = lambda out, y: ((out - y) ** 2).mean() / 2
        >>> batch = MetaBatch((torch.tensor([[1.0, 0.0]]),), torch.tensor([[0.0]]))
        >>> fast, losses = inner_loop(net, dict(net.named_parameters()), mse, [batch], lr=0.5)
        >>> fast["weight"].tolist(), losses[0].item()  # grad = (w.x - y) x = [1, 0]
        ([[0.5, 1.0]], 0.5)
    """
    fast = dict(params)
    names = [n for n in fast if (adapt is None or n in adapt) and fast[n].requires_grad]
    unknown = sorted(set(adapt or ()) - set(fast))
    if unknown:
        raise ValueError(f"adapt names parameters that are not in params: {', '.join(unknown)}")
    losses: list[Tensor] = []
    for batch in batches:
        loss = loss_fn(call(model, fast, batch.inputs), batch.target)
        # allow_unused: a parameter the batch never reaches (another task's column) keeps its value
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order, allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                fast[name] = fast[name] - lr * (grad.detach() if first_order else grad)
        losses.append(loss.detach())
    return fast, losses


def meta_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loss_fn: LossFn,
    inner: Sequence[MetaBatch],
    outer: MetaBatch,
    lr: float,
    first_order: bool = False,
    adapt: Collection[str] | None = None,
) -> MetaLoss:
    """The outer loss ``L(theta_k; outer)`` after the inner SGD steps of :func:`inner_loop` on ``inner``.

    ``meta_loss(...).outer.backward()`` leaves the meta-gradient (module docstring) in ``params``' ``.grad``.
    With ``inner`` empty it is the plain loss of ``outer`` at ``theta_0``. Arguments as in :func:`inner_loop`.
    """
    fast, losses = inner_loop(model, params, loss_fn, inner, lr, first_order, adapt)
    return MetaLoss(loss_fn(call(model, fast, outer.inputs), outer.target), losses, fast)
