"""The VAE generator: the loss is the per-element negative ELBO, sampling is seeded, and it learns two blobs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_lightning.core.vae import VAE


def two_blobs(n: int = 200, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs in ``[0, 1]^dim`` with opposite bright halves; returns the data and the two centres."""
    gen = torch.Generator().manual_seed(seed)
    pattern = (torch.arange(dim) < dim // 2).float()
    centres = torch.stack([0.15 + 0.7 * pattern, 0.85 - 0.7 * pattern])
    labels = torch.arange(n) % 2
    x = (centres[labels] + 0.05 * torch.randn(n, dim, generator=gen)).clamp(0, 1)
    return x, centres


def test_architecture_is_a_mirrored_fully_connected_vae() -> None:
    vae = VAE(784)
    shapes = [tuple(p.shape) for p in vae.parameters()]
    # van de Ven & Tolias's MNIST generator: 784-400-400 to (mu, logvar) in 100 dimensions, 100-400-400-784 back
    assert shapes == [
        (400, 784), (400,), (400, 400), (400,), (100, 400), (100,), (100, 400), (100,),
        (400, 100), (400,), (400, 400), (400,), (784, 400), (784,),
    ]  # fmt: skip


def test_loss_is_the_per_element_negative_elbo() -> None:
    torch.manual_seed(0)
    vae = VAE(6, hidden=(5,), z_dim=3)
    x = torch.rand(4, 1, 2, 3)
    loss = vae.loss(x, torch.Generator().manual_seed(7))
    # by hand, with the same noise
    mu, logvar = vae.encode(x)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    p = torch.sigmoid(vae.decode_logits(mu + torch.exp(0.5 * logvar) * eps))
    recon = F.binary_cross_entropy(p, x.flatten(1), reduction="sum") / 4
    kl = (
        sum(
            0.5 * sum(m**2 + math.exp(lv) - 1 - lv for m, lv in zip(mu_row.tolist(), lv_row.tolist(), strict=True))
            for mu_row, lv_row in zip(mu, logvar, strict=True)
        )
        / 4
    )
    assert loss.recon.item() == pytest.approx(recon.item() / 6, rel=1e-5)
    assert loss.kl.item() == pytest.approx(kl / 6, rel=1e-5)
    assert loss.total.item() == pytest.approx((recon.item() + kl) / 6, rel=1e-5)


def test_kl_vanishes_when_the_posterior_is_the_prior() -> None:
    vae = VAE(8, hidden=(4,), z_dim=2)
    for layer in (vae.to_mu, vae.to_logvar):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    assert vae.loss(torch.rand(5, 8)).kl.item() == 0.0


def test_samples_are_seeded_pixels_in_the_unit_interval() -> None:
    vae = VAE(16, hidden=(8,), z_dim=2)
    a = vae.sample(10, torch.Generator().manual_seed(3))
    b = vae.sample(10, torch.Generator().manual_seed(3))
    assert a.shape == (10, 16) and torch.equal(a, b) and not a.requires_grad
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, vae.sample(10, torch.Generator().manual_seed(4)))


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="z_dim=0"):
        VAE(16, z_dim=0)


def test_learns_two_blobs_its_samples_land_near_them() -> None:
    torch.manual_seed(0)
    x, centres = two_blobs()
    vae = VAE(x.shape[1], hidden=(64,), z_dim=2)
    gen = torch.Generator().manual_seed(0)

    def near(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's distance to the nearest centre, in units of the distance between the centres; which one."""
        dist = torch.cdist(samples, centres) / torch.dist(*centres)
        return dist.min(1).values, dist.argmin(1)

    assert (near(vae.sample(200, gen))[0] < 0.25).float().mean() < 0.1, "untrained: grey samples, between the blobs"
    optimizer = torch.optim.Adam(vae.parameters(), lr=0.01)
    for _ in range(600):
        loss = vae.loss(x[torch.randint(len(x), (32,), generator=gen)], gen).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dist, which = near(vae.sample(400, gen))
    close = dist < 0.25
    # a VAE also decodes the prior's mass between the two modes: a minority of samples lies in between
    assert close.float().mean() > 0.75 and dist.median() < 0.125, "samples land on the blobs"
    assert min(torch.bincount(which[close], minlength=2).tolist()) > 100, "both blobs are generated"
