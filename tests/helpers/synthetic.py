"""A tiny, well-separated synthetic image dataset: every test's task sequence, built in milliseconds."""

from __future__ import annotations

import torch

from cl_lightning.data.sources import SourceData


def blobs(
    seed: int = 0, test_fraction: float = 0.25, n_classes: int = 10, per_class: int = 40, side: int = 4, pad: int = 0
) -> SourceData:
    """``n_classes`` Gaussian blobs in ``[1, side, side]`` uint8 images; a linear model separates them. ``pad``
    adds a border of zero pixels (features that are zero in every image, like MNIST's border).

    The signature mirrors ``load_digits`` so tests can swap it in with one ``_target_`` override.
    """
    gen = torch.Generator().manual_seed(1234 + seed)
    dim = side * side
    centers = torch.rand(n_classes, dim, generator=gen) * 200 + 25
    n_test = max(1, round(per_class * test_fraction))
    xs, ys = [], []
    for split_n in (per_class, n_test):
        noise = torch.randn(n_classes, split_n, dim, generator=gen) * 12
        x = (centers[:, None, :] + noise).clamp(0, 255).round().to(torch.uint8)
        xs.append(torch.nn.functional.pad(x.reshape(-1, 1, side, side), (pad, pad, pad, pad)))
        ys.append(torch.arange(n_classes).repeat_interleave(split_n))
    return SourceData("blobs", xs[0], ys[0], xs[1], ys[1], n_classes, tuple(str(c) for c in range(n_classes)))
