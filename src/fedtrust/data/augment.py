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
    """uint8 images → float (torch's default dtype), scaled to [0, 1] then standardised per channel."""
    dtype = torch.get_default_dtype()
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (x.to(dtype) / 255.0 - m) / s


def _padding(width: int) -> int:
    return max(1, width // 8)  # 4 px for 32×32, 3 for 28×28, 1 for 8×8


def draw_augment(kind: str, n: int, width: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Draw the random parameters of augmentation ``kind`` for ``n`` images of width ``width``.

    Kept apart from :func:`apply_augment` so a vectorised executor can draw
    each client's parameters from its own generator, then augment the whole
    multi-client batch in one call, with the same result as per client.
    """
    if kind not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
    draw: dict[str, Tensor] = {}
    if kind in ("crop", "crop_flip"):
        span = 2 * _padding(width) + 1
        draw["dy"] = torch.randint(0, span, (n,), generator=generator)
        draw["dx"] = torch.randint(0, span, (n,), generator=generator)
    if kind in ("flip", "crop_flip"):
        draw["flip"] = torch.rand(n, generator=generator) < 0.5
    return draw


def concat_draws(draws: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate several draws (e.g. one per client) into one."""
    return {k: torch.cat([d[k] for d in draws]) for k in draws[0]} if draws else {}


def random_crop(x: Tensor, padding: int, dy: Tensor, dx: Tensor) -> Tensor:
    """Zero-pad by ``padding`` and crop each image at offset (dy, dx) back to its size.

    One gather over the padded batch: no Python loop over images.
    """
    n, c, h, w = x.shape
    dy, dx = dy.to(x.device), dx.to(x.device)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w)).view(n, 1, 1, w).expand(n, c, h, w)
    return out.gather(3, cols)


def apply_augment(x: Tensor, kind: str, draw: dict[str, Tensor]) -> Tensor:
    """Apply augmentation ``kind`` with drawn parameters to a batch (uint8 or float)."""
    if "dy" in draw:
        x = random_crop(x, _padding(x.shape[-1]), draw["dy"], draw["dx"])
    if "flip" in draw:
        x = torch.where(draw["flip"].to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def augment(x: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Apply the named augmentation (one of ``AUGMENTATIONS``) to a batch."""
    if kind == "none":
        return x
    return apply_augment(x, kind, draw_augment(kind, x.shape[0], x.shape[-1], generator))
