"""Training a network from scratch on a small fixed set of samples (GDumb's learner), Lightning-free."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["reinitialise", "train_from_scratch"]


def reinitialise(net: nn.Module, seed: int) -> None:
    """Every submodule's ``reset_parameters()`` (PyTorch's initialisation), drawn from ``seed`` with the global RNG
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in net.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def train_from_scratch(
    params: list[Tensor],
    n_samples: int,
    loss_of: Callable[[Tensor], Tensor],
    epochs: int,
    batch_size: int = 16,
    max_lr: float = 0.05,
    min_lr: float = 0.0005,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    clip: float = 10.0,
    generator: torch.Generator | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> None:
    """GDumb's training schedule (Prabhu et al. 2020, their ``main.py``): SGD with momentum and weight decay, the
    first epoch at ``max_lr / 10`` (a warm start), then ``CosineAnnealingWarmRestarts(T_0=1, T_mult=2,
    eta_min=min_lr)`` stepped once per epoch from the third, gradients clipped to norm ``clip``, ``epochs`` shuffled
    passes over the ``n_samples`` in batches of ``batch_size``.

    Args:
        params: The parameters to train (already re-initialised).
        n_samples: How many samples there are; ``loss_of(indices)`` gives the loss of a batch of them.
        loss_of: Batch loss from sample indices (``[b]`` long tensor on the CPU).
        generator: Draws the shuffles.
        on_epoch_end: Called with the epoch's index after each pass (e.g. to record a learning curve).
    """
    optimizer = torch.optim.SGD(params, lr=max_lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=1, T_mult=2, eta_min=min_lr)
    for epoch in range(epochs):
        if epoch <= 1:  # their warm start: one epoch at a tenth of the rate, then the full rate
            for group in optimizer.param_groups:
                group["lr"] = max_lr * (0.1 if epoch == 0 else 1.0)
        else:
            scheduler.step()
        for idx in torch.randperm(n_samples, generator=generator).split(batch_size):
            loss = loss_of(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
