"""Batched augmentation and normalisation on the tensor's device (DESIGN principle 1).

Every function takes a whole batch and an explicit ``torch.Generator`` so a
client's augmentation is reproducible from (seed, round, client id).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedtrust.errors import ConfigError

AUGMENTATIONS = ("none", "flip", "crop", "crop_flip")


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images → float, scaled to [0, 1] then standardised per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and take one random crop of the original size per image.

    Implemented as one gather over a padded batch: no Python loop over images.
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w)).view(n, 1, 1, w).expand(n, c, h, w)
    return out.gather(3, cols)


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device="cpu").to(x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def augment(x: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Apply the named augmentation (one of ``AUGMENTATIONS``) to a float or uint8 batch."""
    if kind == "none":
        return x
    pad = max(1, x.shape[-1] // 8)  # 4 px for 32×32, 3 for 28×28, 1 for 8×8
    if kind == "flip":
        return random_flip(x, generator)
    if kind == "crop":
        return random_crop(x, pad, generator)
    if kind == "crop_flip":
        return random_flip(random_crop(x, pad, generator), generator)
    raise ConfigError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
