"""A fully connected variational auto-encoder: the generator of deep generative replay (Lightning-free).

The architecture and loss are those of the MNIST generator of van de Ven & Tolias ("Generative replay with feedback
connections as a general strategy for continual learning", 2018; "Three scenarios for continual learning", 2019):
an encoder ``D-400-400`` to the mean and log-variance of a ``z_dim = 100`` Gaussian posterior, a mirrored decoder
``100-400-400-D`` with ReLUs and a Bernoulli output, and the negative evidence lower bound (Kingma & Welling,
"Auto-Encoding Variational Bayes", ICLR 2014) per input element::

    L(x) = 1/D * [ sum_d BCE(x_d, p_d(z)) + KL( N(mu(x), diag sigma^2(x)) || N(0, I) ) ],   z = mu + sigma * eps

averaged over the batch, for inputs ``x`` in ``[0, 1]`` (van de Ven & Tolias divide both terms by the number of
pixels). The decoder returns logits and the BCE is computed from them (``binary_cross_entropy_with_logits``: the
same value as the BCE of the sigmoid, without its saturation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VAE", "VAELoss"]


class VAELoss(NamedTuple):
    """The two terms of the per-element negative ELBO, each averaged over the batch and divided by ``D``."""

    recon: Tensor
    kl: Tensor

    @property
    def total(self) -> Tensor:
        return self.recon + self.kl


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _normal(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise on ``like``'s device, drawn from a host ``generator`` when one is given."""
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


class VAE(nn.Module):
    """Variational auto-encoder with fully connected encoder and decoder (see the module docstring).

    Args:
        input_dim: ``D``, the number of input elements (``C * H * W``); inputs of any shape with ``D`` elements
            per sample are flattened.
        hidden: Widths of the encoder's hidden layers; the decoder mirrors them.
        z_dim: Size of the latent code.

    Example:
        >>> vae = VAE(16, hidden=(8,), z_dim=2)
        >>> vae.sample(3).shape, bool(vae.sample(3).min() >= 0)
        (torch.Size([3, 16]), True)
    """

    def __init__(self, input_dim: int, hidden: Sequence[int] = (400, 400), z_dim: int = 100) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if input_dim < 1 or z_dim < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"VAE: input_dim={input_dim}, hidden={hidden}, z_dim={z_dim} must all be >= 1")
        self.input_dim, self.z_dim = input_dim, z_dim
        self.encoder = _mlp([input_dim, *hidden])
        self.to_mu = nn.Linear(hidden[-1], z_dim)
        self.to_logvar = nn.Linear(hidden[-1], z_dim)
        self.decoder = nn.Sequential(_mlp([z_dim, *reversed(hidden)]), nn.Linear(hidden[0], input_dim))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of ``q(z | x)``."""
        h = self.encoder(x.flatten(1))
        return self.to_mu(h), self.to_logvar(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Logits of the Bernoulli means ``p(x | z)``, ``[B, D]``."""
        return self.decoder(z)

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> VAELoss:
        """Per-element negative ELBO of a batch ``x`` in ``[0, 1]`` (one reparameterised sample of ``z``).

        Args:
            x: ``[B, ...]`` with ``D`` elements per sample, values in ``[0, 1]``.
            generator: Host generator for the reparameterisation noise (``None``: the global RNG).
        """
        x = x.flatten(1).to(self.to_mu.weight.dtype)  # e.g. half-precision samples drawn under autocast
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * _normal(tuple(mu.shape), mu, generator)
        logits = self.decode_logits(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1).mean()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        return VAELoss(recon / self.input_dim, kl / self.input_dim)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``sigmoid(decoder(z))``, ``z ~ N(0, I)``: ``[n, D]`` in ``[0, 1]``, without gradient.

        Bernoulli means, not binary draws, as van de Ven & Tolias replay them.
        """
        anchor = next(self.parameters())
        return torch.sigmoid(self.decode_logits(_normal((n, self.z_dim), anchor, generator)))
