"""Batched augmentation and normalisation on the tensor's device (DESIGN principle 1).

Every function takes a whole batch and an explicit ``torch.Generator`` so a
client's augmentation is reproducible from (seed, round, client id).

An augmentation is a pipeline of primitives joined by ``+``, applied in the
canonical order :data:`PRIMITIVES` = crop, flip, color_jitter, grayscale
(RNA's CIFAR recipe, spec rna.md §2, is ``crop+flip+color_jitter+grayscale``).
The names ``none``, ``flip``, ``crop`` and ``crop_flip`` (= ``crop+flip``) stay
valid and draw exactly as before: crop's dy, dx, then flip.

Pixel scale: images are uint8, or float on the same 0..255 scale (what
:func:`normalize` expects). crop and flip keep the dtype; color_jitter and
grayscale return float (torch's default dtype) on the 0..255 scale, unrounded,
so ``normalize`` turns them into exactly what it would for the same values in
uint8. The colour operations are torchvision's, defined on [0, 1]; they are
scale-equivariant (blends with grey or black, an HSV hue rotation), so they run
on the 0..255 scale with clamping at 255, which leaves untouched pixels exact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedtrust.errors import ConfigError

PRIMITIVES = ("crop", "flip", "color_jitter", "grayscale")
"""The augmentation primitives, in the canonical order a pipeline applies (and draws) them."""

AUGMENTATIONS = ("none", "flip", "crop", "crop_flip")
"""Named augmentations from before pipelines: ``none`` is the empty pipeline, ``crop_flip`` is ``crop+flip``."""

LUMA = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights of (R, G, B): PIL's ``convert("L")``, which RNA's PIL pipeline uses."""

PIXEL_MAX = 255.0
"""The top of the pixel scale the colour operations clamp to (uint8 images, or float on 0..255)."""

GRAYSCALE_P = 0.2
"""Probability that ``grayscale`` converts an image (RNA: ``RandomGrayscale(p=0.2)``)."""


@dataclass(frozen=True)
class ColorJitter:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` wrapped in ``RandomApply(p)``.

    Each image draws brightness, contrast and saturation factors uniform in
    ``[max(0, 1 - b), 1 + b]``, a hue shift uniform in ``[-h, h]`` (a fraction of
    the hue circle) and a random order of the four operations, all up front.
    Defaults: RNA's ``ColorJitter(.4, .4, .4, .1)`` applied with p = 0.8 (spec rna.md §2).
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"color_jitter {name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"color_jitter hue must lie in [0, 0.5], got {self.hue!r}")
        if not 0 <= self.p <= 1:
            raise ConfigError(f"color_jitter p must lie in [0, 1], got {self.p!r}")


COLOR_JITTER = ColorJitter()
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
"""The four jitter operations; ``draw["jitter_order"][i, s]`` indexes this tuple (op of stage s of image i)."""


def parse_augment(kind: str) -> tuple[str, ...]:
    """The primitives of augmentation ``kind``, in order: ``"crop_flip"`` → ``("crop", "flip")``, ``"none"`` → ``()``.

    Raises a one-line :class:`ConfigError` for an unknown primitive, or primitives repeated or out of
    the canonical order (``flip+crop``: the pipeline would still crop first, so the name would lie).
    """
    if kind == "none":
        return ()
    if kind == "crop_flip":
        return ("crop", "flip")
    parts = kind.split("+")
    unknown = [p for p in parts if p not in PRIMITIVES]
    if unknown:
        where = "" if len(parts) == 1 else f" primitive {unknown[0]!r} in"
        raise ConfigError(f"unknown augmentation{where} {kind!r}; valid: none, crop_flip, or '+'-joined primitives "
                          f"{', '.join(PRIMITIVES)} (in that order)")
    if list(parts) != sorted(set(parts), key=PRIMITIVES.index):
        raise ConfigError(f"augmentation {kind!r}: each primitive at most once, in the order {'+'.join(PRIMITIVES)}")
    return tuple(parts)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images → float (torch's default dtype), scaled to [0, 1] then standardised per channel.

    The per-channel constants are made once per device and dtype (:func:`_channel_constants`): on a GPU a
    tensor built from Python numbers is a host-to-device copy, which waits for the device on every call and
    cannot be recorded in a CUDA graph (FLIP's recorded inversion steps call this in every step)."""
    dtype = torch.get_default_dtype()
    m, s = _channel_constants(tuple(map(float, mean)), tuple(map(float, std)), dtype, x.device)
    return (x.to(dtype) / 255.0 - m) / s


@functools.lru_cache(maxsize=64)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                       device: torch.device) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as (1, C, 1, 1) tensors on ``device``, normal tensors even when first asked for
    under ``torch.inference_mode`` (an inference tensor cannot be saved for a later backward)."""
    with torch.inference_mode(False), torch.no_grad():
        return (torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1),
                torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1))


def _padding(width: int) -> int:
    return max(1, width // 8)  # 4 px for 32×32, 3 for 28×28, 1 for 8×8


def draw_augment(kind: str, n: int, width: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Draw the random parameters of augmentation ``kind`` for ``n`` images of width ``width``.

    Kept apart from :func:`apply_augment` so a vectorised executor can draw
    each client's parameters from its own generator, then augment the whole
    multi-client batch in one call, with the same result as per client.
    Draws in pipeline order: crop (``dy``, ``dx``), ``flip``, color_jitter
    (:func:`draw_color_jitter`), grayscale (``gray``); every entry has ``n`` rows.
    """
    steps = parse_augment(kind)
    draw: dict[str, Tensor] = {}
    if "crop" in steps:
        span = 2 * _padding(width) + 1
        draw["dy"] = torch.randint(0, span, (n,), generator=generator)
        draw["dx"] = torch.randint(0, span, (n,), generator=generator)
    if "flip" in steps:
        draw["flip"] = torch.rand(n, generator=generator) < 0.5
    if "color_jitter" in steps:
        draw.update(draw_color_jitter(n, generator))
    if "grayscale" in steps:
        draw["gray"] = torch.rand(n, generator=generator, dtype=torch.float32) < GRAYSCALE_P
    return draw


def draw_color_jitter(n: int, generator: torch.Generator, spec: ColorJitter = COLOR_JITTER) -> dict[str, Tensor]:
    """Per image: whether jitter applies (``jitter``, prob ``spec.p``), the order of the four operations
    (``jitter_order``, a random permutation of :data:`JITTER_OPS` per image, as torchvision's ``randperm(4)``
    per call), the ``brightness``/``contrast``/``saturation`` factors and the ``hue`` shift. Drawn in float32
    whatever the default dtype, so a seed gives the same draw in float64 runs."""

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float32)

    draw = {"jitter": torch.rand(n, generator=generator, dtype=torch.float32) < spec.p,
            "jitter_order": torch.rand(n, len(JITTER_OPS), generator=generator, dtype=torch.float32).argsort(dim=1)}
    for name in ("brightness", "contrast", "saturation"):
        b = getattr(spec, name)
        draw[name] = uniform(max(0.0, 1 - b), 1 + b)
    draw["hue"] = uniform(-spec.hue, spec.hue)
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


# ------------------------------------------------------------------ colour (torchvision's definitions)

Factor = Tensor | float
"""A per-image factor, shape (N, 1, 1, 1), or one number for the whole batch."""


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_channels(x: Tensor) -> None:
    if x.shape[1] not in (1, 3):
        raise ConfigError(f"colour augmentation needs 1 or 3 channels, got {x.shape[1]} (use crop/flip only)")


def luma(x: Tensor) -> Tensor:
    """The grey image (N, 1, H, W): :data:`LUMA`-weighted sum of R, G, B; a 1-channel image is its own grey."""
    if x.shape[1] == 1:
        return _as_float(x)
    w = torch.tensor(LUMA, dtype=_as_float(x).dtype, device=x.device).view(1, 3, 1, 1)
    return (_as_float(x) * w).sum(dim=1, keepdim=True)


def _blend(x: Tensor, other: Tensor | float, factor: Factor, bound: float) -> Tensor:
    """torchvision's blend: ``factor·x + (1 − factor)·other``, clamped to [0, bound]."""
    return (factor * x + (1 - factor) * other).clamp(0, bound)


def adjust_brightness(x: Tensor, factor: Factor, bound: float = PIXEL_MAX) -> Tensor:
    """Blend with black: ``x · factor``, clamped."""
    return _blend(_as_float(x), 0.0, factor, bound)


def adjust_contrast(x: Tensor, factor: Factor, bound: float = PIXEL_MAX) -> Tensor:
    """Blend with the image's mean grey value (one scalar per image, over every pixel), clamped."""
    x = _as_float(x)
    return _blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor, bound)


def adjust_saturation(x: Tensor, factor: Factor, bound: float = PIXEL_MAX) -> Tensor:
    """Blend with the grey image, clamped; a no-op on 1-channel images (as torchvision)."""
    x = _as_float(x)
    return x if x.shape[1] == 1 else _blend(x, luma(x), factor, bound)


def adjust_hue(x: Tensor, shift: Factor, bound: float = PIXEL_MAX) -> Tensor:
    """Rotate the hue in HSV by ``shift`` (a fraction of the circle, in [−0.5, 0.5]); a no-op on 1 channel.

    HSV as in ``colorsys``: V = max, S = (max − min)/max, H from which channel is the max. The scale
    cancels (H and S are ratios, V scales), so this works on 0..``bound`` without rescaling.
    """
    x = _as_float(x)
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    v, _ = x.max(dim=1)
    delta = v - x.min(dim=1).values
    s = torch.where(v > 0, delta / torch.where(v > 0, v, 1), 0)
    safe = torch.where(delta > 0, delta, 1)
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6, 0)
    shift = shift.view(-1, 1, 1) if isinstance(shift, Tensor) else shift
    h = torch.remainder(h + shift, 1.0)
    h6 = h * 6
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # (R, G, B) of each of the six hue sectors, as colorsys.hsv_to_rgb
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = torch.zeros_like(x)
    for k, rgb in table.items():
        out = torch.where((sector == k).unsqueeze(1), torch.stack(rgb, dim=1), out)
    return out.clamp(0, bound)


_ADJUST: tuple[Callable[[Tensor, Factor, float], Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, draw: dict[str, Tensor], bound: float = PIXEL_MAX) -> Tensor:
    """Apply drawn colour jitter (:func:`draw_color_jitter`) to a batch, each image in its own op order.

    Stage s applies, to each image i with ``jitter[i]``, the operation ``JITTER_OPS[jitter_order[i, s]]``
    with that image's factor; masks select the images, so the batch goes through in 4 × 4 batched calls,
    no loop over images. Images without ``jitter`` come back unchanged (as float).
    """
    _check_channels(x)
    x = _as_float(x)
    n = x.shape[0]
    apply = draw["jitter"].to(x.device)
    order = draw["jitter_order"].to(x.device)
    factors = torch.stack([draw[k] for k in JITTER_OPS], dim=1).to(x.device, x.dtype)  # (n, 4)
    for stage in range(len(JITTER_OPS)):
        op = order[:, stage]
        for k, adjust in enumerate(_ADJUST):
            if x.shape[1] == 1 and JITTER_OPS[k] in ("saturation", "hue"):
                continue  # no-ops on one channel
            mask = (apply & (op == k)).view(n, 1, 1, 1)
            x = torch.where(mask, adjust(x, factors[:, k].view(n, 1, 1, 1), bound), x)
    return x


def random_grayscale(x: Tensor, gray: Tensor) -> Tensor:
    """Replace the images where ``gray`` holds by their :func:`luma` in all 3 channels; others unchanged
    (as float). The identity on 1-channel images (returned as given)."""
    _check_channels(x)
    if x.shape[1] == 1:
        return x
    x = _as_float(x)
    return torch.where(gray.to(x.device).view(-1, 1, 1, 1), luma(x).expand_as(x), x)


def apply_augment(x: Tensor, kind: str, draw: dict[str, Tensor]) -> Tensor:
    """Apply augmentation ``kind`` with drawn parameters (:func:`draw_augment`) to a batch (uint8 or float)."""
    steps = parse_augment(kind)
    if "crop" in steps:
        x = random_crop(x, _padding(x.shape[-1]), draw["dy"], draw["dx"])
    if "flip" in steps:
        x = torch.where(draw["flip"].to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    if "color_jitter" in steps:
        x = color_jitter(x, draw)
    if "grayscale" in steps:
        x = random_grayscale(x, draw["gray"])
    return x


def augment(x: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """Apply the named augmentation (``none``, a name of ``AUGMENTATIONS`` or a pipeline) to a batch."""
    if kind == "none":
        return x
    return apply_augment(x, kind, draw_augment(kind, x.shape[0], x.shape[-1], generator))
