"""Per-parameter importance of the regularization methods, and the quadratic penalty they share (Lightning-free).

- :func:`diagonal_fisher`: the diagonal of the Fisher information of a classifier (EWC, online EWC), from per-sample
  gradients, never from the square of a batch-mean gradient (which is ``B`` times smaller in expectation and mixes
  samples): for Linear and Conv2d layers from one batched backward pass per class
  (:mod:`cl_lightning.core.layer_grads`), for every other parameter from ``torch.func`` (``functional_call`` +
  ``vmap`` + ``grad``);
- :func:`mas_importance`: Memory Aware Synapses' mean absolute per-sample gradient of the squared output norm, the
  same way;
- :class:`PathIntegral`: Synaptic Intelligence's running path integral of the loss gradient along the parameter
  trajectory, and :func:`si_omega` its normalisation;
- :func:`quadratic_penalty`: ``sum_i w_i (theta_i - theta*_i)^2`` over a list of parameters, fused with
  ``torch._foreach_*`` ops and an analytic backward; :func:`merge_quadratics` turns one quadratic per task into a
  single equivalent one (separate EWC at the cost of online EWC).

Every function works on plain ``nn.Module`` s and tensors; parameters are keyed by their ``named_parameters`` name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cl_lightning.core.layer_grads import LayerCapture, batched_layers

FISHER_MODES = ("exact", "sampled", "empirical")

__all__ = [
    "FISHER_MODES",
    "PathIntegral",
    "diagonal_fisher",
    "eval_mode",
    "mas_importance",
    "merge_quadratics",
    "quadratic_penalty",
    "si_omega",
    "trainable_parameters",
]


def trainable_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the optimizer trains (``requires_grad``), by name: what the penalties constrain."""
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Put ``net`` in evaluation mode (BatchNorm uses and keeps its running statistics, no dropout), then restore
    every submodule's own mode (a model with some submodules frozen in eval mode comes back as it was)."""
    modes = [(module, module.training) for module in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------------------------- per-sample gradients
def _functional(net: nn.Module, names: set[str] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Trainable parameters (differentiated; only ``names`` if given) and everything else (other parameters,
    buffers), detached."""
    trainable = trainable_parameters(net)
    params = {n: p.detach() for n, p in trainable.items() if names is None or n in names}
    rest = {n: p.detach() for n, p in net.named_parameters() if n not in params}
    rest |= dict(net.named_buffers())
    return params, rest


def _per_sample(
    net: nn.Module, names: set[str], outputs: Tensor | None, kind: str
) -> tuple[Callable, dict[str, Tensor]]:
    """``vmap``-ed per-sample gradients of the parameters ``names`` (the others held constant) of the picked log
    probability (``kind="log_prob"``, arguments ``(params, x, c)``) or the squared logit norm (``"norm"``,
    ``(params, x)``), and the parameters to call it with."""
    params, rest = _functional(net, names)
    logits = _one_sample_logits(net, rest, outputs)

    def picked_log_prob(p: dict[str, Tensor], x: Tensor, c: Tensor) -> Tensor:
        return torch.log_softmax(logits(p, x), dim=-1).gather(0, c.unsqueeze(0)).squeeze(0)

    def squared_norm(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return logits(p, x).square().sum()

    if kind == "log_prob":
        return vmap(grad(picked_log_prob), in_dims=(None, 0, 0)), params
    return vmap(grad(squared_norm), in_dims=(None, 0)), params


def _one_sample_logits(net: nn.Module, rest: dict[str, Tensor], outputs: Tensor | None) -> Callable[..., Tensor]:
    def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
        z = functional_call(net, (params, rest), (x.unsqueeze(0),))[0]
        return z if outputs is None else z.index_select(0, outputs)

    return logits


def _accumulate(total: dict[str, Tensor], grads: dict[str, Tensor], weights: Tensor, absolute: bool = False) -> None:
    """``total += sum_n weights[n] * g_n^2`` (or ``|g_n|``), one matrix-vector product per parameter.

    ``grads[k]`` is ``[N, *shape]``; it is overwritten. A GEMV reads the per-sample gradients once, contiguously;
    ``.sum(0)`` over the sample dimension is a strided reduction and several times slower on CPU.
    """
    for name, g in grads.items():
        flat = g.reshape(g.shape[0], -1)
        flat = flat.abs_() if absolute else flat.square_()
        total[name].view(-1).addmv_(flat.t(), weights.to(flat.dtype))


def diagonal_fisher(
    net: nn.Module,
    inputs: Tensor,
    mode: str = "exact",
    targets: Tensor | None = None,
    outputs: Tensor | None = None,
    chunk_size: int = 8,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    batched: bool = True,
) -> dict[str, Tensor]:
    """Diagonal of the Fisher information of a softmax classifier, per trainable parameter.

    With ``p(c|x) = softmax(z(x))_c`` over the logits ``z`` restricted to ``outputs``, and per-sample gradients
    ``g_c(x) = d log p(c|x) / d theta``:

    - ``exact``: ``F = E_x[ sum_c p(c|x) g_c(x)^2 ]``, the expectation over the model's own predictive
      distribution (one backward pass per class: ``len(outputs)`` times the cost of the others);
    - ``sampled``: ``F = E_x[ g_c(x)^2 ]`` with ``c ~ p(.|x)`` drawn once per sample (an unbiased estimate of
      ``exact``);
    - ``empirical``: ``F = E_x[ g_y(x)^2 ]`` with the true labels ``y`` (the "empirical Fisher").

    The network is evaluated in eval mode (BatchNorm running statistics used, not updated; no dropout) and its
    modes are restored. The sums of squared per-sample gradients of Linear and Conv2d layers come from backward
    passes over blocks of 256 samples, one per class for ``exact`` and one for the other modes
    (:class:`~cl_lightning.core.layer_grads.LayerCapture`; this needs a network that treats samples independently
    in eval mode, as every ``torch.nn`` layer does; ``batched=False`` computes everything per sample). The other
    parameters' per-sample gradients come from ``vmap(grad(...))`` over chunks of ``chunk_size`` gradients
    (memory: ``chunk_size x n_params`` floats); ``exact`` mode takes one per (sample, class) pair, weighted by
    ``p(c|x)``. Both give the same values up to float rounding (``tests/core/test_importance.py``).

    Args:
        net: The classifier; ``net(x)`` maps a batch to logits.
        inputs: Network inputs ``[N, ...]`` on the network's device.
        mode: ``exact``, ``sampled`` or ``empirical``.
        targets: Labels ``[N]`` as logit indices (``empirical`` only); each must be one of ``outputs``.
        outputs: Logit indices the distribution is over (the scenario's active outputs); ``None``: all logits.
        chunk_size: Gradients per vectorised computation.
        generator: Draws the labels of ``sampled`` mode (on the CPU).
        reduction: ``mean`` over samples, or ``sum`` (to combine shards, e.g. across processes, before dividing).
        batched: Use the batched path for Linear and Conv2d layers (``False``: every parameter per sample).

    Returns:
        ``{name: F}`` for each trainable parameter, shaped like it.

    Example (softmax regression, where ``F[c, i] = E_x[p_c (1 - p_c) x_i^2]``):
        >>> net = nn.Linear(3, 2, bias=False)
        >>> x = torch.randn(5, 3)
        >>> p = net(x).softmax(-1).detach()
        >>> closed = ((p * (1 - p)).T[:, :, None] * (x**2)[None]).mean(1)
        >>> torch.allclose(diagonal_fisher(net, x)["weight"], closed, atol=1e-6)
        True
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(FISHER_MODES)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'sum'")
    if mode == "empirical" and (targets is None or len(targets) != len(inputs)):
        raise ValueError("empirical Fisher needs one target per input")
    trainable = set(trainable_parameters(net))
    total = {n: torch.zeros_like(p) for n, p in trainable_parameters(net).items()}
    capture = LayerCapture(batched_layers(net, trainable) if batched else {})
    remap = None
    if mode == "empirical" and outputs is not None:
        # true labels are logit indices; the distribution is over `outputs`: position of each label among them
        assert targets is not None
        remap = torch.full((int(max(int(outputs.max()), int(targets.max()))) + 1,), -1, dtype=torch.long)
        remap[outputs.cpu()] = torch.arange(len(outputs))
        if bool((remap[targets.cpu()] < 0).any()):
            raise ValueError("empirical Fisher: a target is not among the given outputs")
    per_sample: dict[frozenset[str], tuple[Callable, dict[str, Tensor]]] = {}
    block = 256  # samples per forward pass
    with eval_mode(net), torch.enable_grad():
        for start in range(0, len(inputs), block):
            x = inputs[start : start + block]
            with capture.recording():
                z = net(x)
            log_p = torch.log_softmax((z if outputs is None else z.index_select(1, outputs)).float(), -1)
            probs = log_p.detach().exp()
            if mode == "empirical":
                assert targets is not None
                labels = targets[start : start + block]
                labels = (labels if remap is None else remap[labels.cpu()]).to(x.device)
            elif mode == "sampled":
                labels = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x.device)
            ones = torch.ones(len(x), device=x.device)
            if capture.names:  # Linear and Conv2d layers: one backward pass per class (exact) or one in all
                if mode == "exact":
                    for c in range(probs.shape[1]):
                        grads = torch.autograd.grad(log_p[:, c].sum(), capture.outputs(), retain_graph=True)
                        capture.accumulate(total, grads, probs[:, c], chunk_size=chunk_size)
                else:
                    picked = log_p.gather(1, labels.unsqueeze(1)).sum()
                    grads = torch.autograd.grad(picked, capture.outputs())
                    capture.accumulate(total, grads, ones, chunk_size=chunk_size)
            rest = frozenset(trainable - capture.parameter_names())
            del z, log_p
            if not rest:
                continue
            if rest not in per_sample:
                per_sample[rest] = _per_sample(net, set(rest), outputs, "log_prob")
            fn, params = per_sample[rest]
            if mode == "exact":  # every (sample, class) pair, weighted by p(c|x)
                n_classes = probs.shape[1]
                labels = torch.arange(n_classes, device=x.device).repeat(len(x))
                weights = probs.reshape(-1)
                x = x.repeat_interleave(n_classes, dim=0)
            else:
                weights = torch.ones(len(x), device=x.device)
            for i in range(0, len(x), chunk_size):
                sl = slice(i, i + chunk_size)
                _accumulate(total, fn(params, x[sl], labels[sl]), weights[sl])
    if reduction == "mean" and len(inputs) > 0:
        for t in total.values():
            t.div_(len(inputs))
    return total


def mas_importance(
    net: nn.Module,
    inputs: Tensor,
    outputs: Tensor | None = None,
    chunk_size: int = 8,
    reduction: str = "mean",
    batched: bool = True,
) -> dict[str, Tensor]:
    """Memory Aware Synapses' importance: ``Omega = E_x[ |d ||z(x)||_2^2 / d theta| ]`` (Aljundi et al. 2018).

    ``z`` are the logits restricted to ``outputs``; no labels are used. The absolute value is taken per sample,
    before averaging (the absolute value of a batch gradient would let samples cancel). Eval mode, the batched path
    for Linear and Conv2d layers (one backward pass per block of samples: ``|delta a^T| = |delta| |a|^T``) and
    ``batched`` as in :func:`diagonal_fisher`.

    Example (a linear map ``z = W x``: ``d||z||^2/dW = 2 z x^T``):
        >>> net = nn.Linear(3, 2, bias=False)
        >>> x = torch.randn(4, 3)
        >>> z = net(x).detach()
        >>> closed = (2 * z[:, :, None] * x[:, None, :]).abs().mean(0)
        >>> torch.allclose(mas_importance(net, x)["weight"], closed, atol=1e-6)
        True
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'sum'")
    trainable = set(trainable_parameters(net))
    total = {n: torch.zeros_like(p) for n, p in trainable_parameters(net).items()}
    capture = LayerCapture(batched_layers(net, trainable) if batched else {})
    per_sample: dict[frozenset[str], tuple[Callable, dict[str, Tensor]]] = {}
    block = 256
    with eval_mode(net), torch.enable_grad():
        for start in range(0, len(inputs), block):
            x = inputs[start : start + block]
            ones = torch.ones(len(x), device=x.device)
            with capture.recording():
                z = net(x)
            if capture.names:  # one backward pass for the Linear and Conv2d layers
                norm = (z if outputs is None else z.index_select(1, outputs)).square().sum()
                grads = torch.autograd.grad(norm, capture.outputs())
                capture.accumulate(total, grads, ones, absolute=True, chunk_size=chunk_size)
            rest = frozenset(trainable - capture.parameter_names())
            del z
            if not rest:
                continue
            if rest not in per_sample:
                per_sample[rest] = _per_sample(net, set(rest), outputs, "norm")
            fn, params = per_sample[rest]
            for i in range(0, len(x), chunk_size):
                sl = slice(i, i + chunk_size)
                _accumulate(total, fn(params, x[sl]), ones[sl], absolute=True)
    if reduction == "mean" and len(inputs) > 0:
        for t in total.values():
            t.div_(len(inputs))
    return total


# ---------------------------------------------------------------------------------------------- quadratic penalty
class _QuadraticPenalty(torch.autograd.Function):
    """``scale * (sum_i w_i (theta_i - a_i)^2 + constant)`` with the analytic gradient ``2 scale w (theta - a)``:
    two fused passes forward and one backward, instead of autograd's graph of one node per elementwise op per
    parameter. The backward pass scales the saved ``w (theta - a)`` in place (no allocation); a second backward
    through the same graph is refused by autograd's saved-tensor version check rather than answered wrongly."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, anchors: list[Tensor], weights: list[Tensor], scale: float, constant: float, *params: Tensor
    ) -> Tensor:
        diffs = torch._foreach_sub(params, anchors)
        weighted = torch._foreach_mul(diffs, weights)
        value = torch.stack([torch.dot(w.reshape(-1), d.reshape(-1)) for w, d in zip(weighted, diffs, strict=True)])
        ctx.save_for_backward(*weighted)
        ctx.scale = scale
        return (value.sum() + constant) * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weighted = list(ctx.saved_tensors)
        torch._foreach_mul_(weighted, grad_output * (2 * ctx.scale))
        return (None, None, None, None, *weighted)


def quadratic_penalty(
    params: Sequence[Tensor],
    anchors: Sequence[Tensor],
    weights: Sequence[Tensor],
    scale: float = 1.0,
    constant: float = 0.0,
) -> Tensor:
    """``scale * (sum_k sum_i weights[k]_i (params[k]_i - anchors[k]_i)^2 + constant)``, differentiable in
    ``params`` (``constant``: the offset of :func:`merge_quadratics`).

    Example:
        >>> theta = [torch.tensor([1.0, 2.0], requires_grad=True)]
        >>> value = quadratic_penalty(theta, [torch.tensor([1.0, 0.0])], [torch.tensor([3.0, 0.5])])
        >>> value.backward(); value.item(), theta[0].grad.tolist()
        (2.0, [0.0, 2.0])
    """
    if not (len(params) == len(anchors) == len(weights)):
        raise ValueError("quadratic_penalty: params, anchors and weights must have the same length")
    if not params:
        raise ValueError("quadratic_penalty: no parameters")
    return _QuadraticPenalty.apply(list(anchors), list(weights), float(scale), float(constant), *params)


@torch.no_grad()
def merge_quadratics(
    weights: Sequence[Sequence[Tensor]], anchors: Sequence[Sequence[Tensor]]
) -> tuple[list[Tensor], list[Tensor], float]:
    """One quadratic equal to a sum of quadratics: ``sum_t F_t (theta - a_t)^2 = A (theta - m)^2 + K``.

    ``A = sum_t F_t``, ``m = a_T + sum_t F_t (a_t - a_T) / A`` (the Fisher-weighted mean anchor, written relative to
    the last anchor ``a_T`` so that one task gives ``m = a_T`` exactly) and ``K = sum_t F_t (a_t - m)^2 >= 0``, since
    the cross term ``-2 (theta - m) sum_t F_t (a_t - m)`` vanishes by the choice of ``m``. Where ``A = 0`` no task
    constrains the parameter and ``m = a_T``. Separate EWC (one penalty per task) then costs one quadratic per step,
    however many tasks it remembers; value and gradient are those of the sum.

    Args:
        weights: ``weights[t][k]``: task ``t``'s weight (Fisher) of parameter ``k``.
        anchors: ``anchors[t][k]``: task ``t``'s anchor of parameter ``k``.

    Returns:
        ``(A, m, K)``: per-parameter weights and anchors, and the constant (a float).

    Example:
        >>> A, m, K = merge_quadratics([[torch.tensor([1.0])], [torch.tensor([3.0])]],
        ...                            [[torch.tensor([0.0])], [torch.tensor([4.0])]])
        >>> A[0].item(), m[0].item(), K  # 1 (x - 0)^2 + 3 (x - 4)^2 = 4 (x - 3)^2 + 12
        (4.0, 3.0, 12.0)
    """
    if len(weights) != len(anchors) or not weights:
        raise ValueError("merge_quadratics: give one list of weights and one of anchors per task (at least one)")
    last = anchors[-1]
    total = [torch.zeros_like(a) for a in last]
    shift = [torch.zeros_like(a) for a in last]
    for w_t, a_t in zip(weights, anchors, strict=True):
        torch._foreach_add_(total, w_t)
        torch._foreach_addcmul_(shift, w_t, torch._foreach_sub(a_t, last))
    means = [
        a + torch.where(t > 0, s / t.clamp_min(torch.finfo(t.dtype).tiny), 0.0)
        for a, s, t in zip(last, shift, total, strict=True)
    ]
    constant = 0.0
    for w_t, a_t in zip(weights, anchors, strict=True):
        for w, a, m in zip(w_t, a_t, means, strict=True):
            constant += float(torch.dot(w.reshape(-1).double(), (a - m).reshape(-1).double().square()))
    return total, means, constant


# ---------------------------------------------------------------------------------------------- synaptic intelligence
class PathIntegral:
    """Synaptic Intelligence's per-parameter path integral over one task (Zenke et al. 2017).

    ``w_k = sum over optimizer steps s of -g_k(s) * (theta_k(s+1) - theta_k(s))``, with ``g`` the gradient of the
    task loss at step ``s`` and ``theta(s+1) - theta(s)`` the change the optimizer made (whatever the optimizer:
    momentum, Adam). Call :meth:`before_step` with the gradients right before ``optimizer.step()`` and
    :meth:`after_step` right after it; all bookkeeping is ``torch._foreach_*`` on preallocated buffers.

    Args:
        params: The parameters, in a fixed order; their current values are the task's start ``theta(0)``.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.start = [p.detach().clone() for p in params]
        self.integral = [torch.zeros_like(p) for p in self.start]
        self._before = [torch.zeros_like(p) for p in self.start]
        self._grads = [torch.zeros_like(p) for p in self.start]
        self._pending = False

    def before_step(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Record the parameters and the task-loss gradients of this step (``None``: no gradient, counts as 0)."""
        present = [(b, g) for b, g in zip(self._grads, grads, strict=True) if g is not None]
        for buf, g in zip(self._grads, grads, strict=True):
            if g is None:
                buf.zero_()
        if present:
            torch._foreach_copy_([b for b, _ in present], [g.detach() for _, g in present])
        torch._foreach_copy_(self._before, [p.detach() for p in params])
        self._pending = True

    def after_step(self, params: Sequence[Tensor]) -> None:
        """Add ``-g * (theta_after - theta_before)`` of the step recorded by :meth:`before_step`."""
        if not self._pending:
            return
        # _before becomes theta_before - theta_after = -delta, in place
        torch._foreach_sub_(self._before, [p.detach() for p in params])
        torch._foreach_addcmul_(self.integral, self._grads, self._before)
        self._pending = False

    def omega(self, params: Sequence[Tensor], xi: float) -> list[Tensor]:
        """This task's importance: :func:`si_omega` of the integral and the total change since the start."""
        delta = torch._foreach_sub([p.detach() for p in params], self.start)
        return si_omega(self.integral, delta, xi)


def si_omega(integral: Sequence[Tensor], delta: Sequence[Tensor], xi: float) -> list[Tensor]:
    """``omega = max(0, w / (delta^2 + xi))``: the path integral normalised by the squared total change (Zenke et
    al. 2017, with damping ``xi``). Clamped at 0: a parameter whose updates raised the loss on balance (noise,
    or other loss terms fighting the task) is not protected, rather than pushed away from its anchor.

    Example:
        >>> si_omega([torch.tensor([2.0, -1.0])], [torch.tensor([1.0, 1.0])], xi=1.0)[0].tolist()
        [1.0, 0.0]
    """
    denominators = torch._foreach_add(torch._foreach_mul(list(delta), list(delta)), xi)
    return [o.clamp_(min=0.0) for o in torch._foreach_div(list(integral), denominators)]
