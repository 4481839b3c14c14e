"""Backdoor triggers (issue 15): pure, batched tensor functions over image batches (N, C, H, W).

A trigger is a small frozen dataclass whose ``stamp(x)`` returns a stamped
copy of a whole batch in one tensor operation (no loop over images), on the
batch's device and in its dtype. Images are raw pixels, uint8 0..255 or
floating in [0, 1] (fedtrust's data sets are uint8 until normalisation);
every trigger value is given on the [0, 1] scale and converted for uint8
(``v`` → ⌊255·v + 0.5⌋, so 1.0 → 255, 0.5 → 128).

==============  ==================================================  ==========================================
trigger         x' (per pixel)                                      reference
==============  ==================================================  ==========================================
PixelTrigger    v inside the rectangles (every channel), else x     BadNets, Gu et al. 2017 (arXiv 1708.06733)
DBATrigger      piece(i): attacker i's rectangle; union(): all      DBA, Xie et al., ICLR 2020
BlendTrigger    (1 − α)·x + α·k, k a fixed pattern                  Chen et al. 2017 (arXiv 1712.05526)
==============  ==================================================  ==========================================

Poisoning follows DBA/FLIP (spec flip.md §1): the first ``poisoning_per_batch``
images of each batch are stamped and relabelled to the target
(:func:`poison_batch`); the ASR is measured on the non-target-class test
images stamped with the full trigger (:func:`backdoor_test_set`, spec §4).

Rectangles are ``(row, col, height, width)``, 0-based, rows counted from the
top and columns from the left, covering rows ``row .. row + height − 1`` and
columns ``col .. col + width − 1``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import torch
from torch import Tensor

from fedtrust.errors import ConfigError, DataError

Rect = tuple[int, int, int, int]
"""A pixel rectangle ``(row, col, height, width)``."""

# FLIP's DBA layouts (spec flip.md §1; DBA's ``{i}_poison_pattern`` in KaiyuanZh/FLIP utils/*.yaml), piece i
# belonging to the i-th attacker of ``adversary_list``. Row-major: (row 0, left), (row 0, right), (lower row, left),
# (lower row, right).
FLIP_MNIST_PIECES: tuple[Rect, ...] = ((0, 0, 1, 4), (0, 6, 1, 4), (3, 0, 1, 4), (3, 6, 1, 4))
"""MNIST/FMNIST 28×28: four 1×4 pieces at rows 0 and 3, columns 0–3 and 6–9 (a 2-pixel gap both ways)."""
FLIP_CIFAR_PIECES: tuple[Rect, ...] = ((0, 0, 1, 6), (0, 9, 1, 6), (4, 0, 1, 6), (4, 9, 1, 6))
"""CIFAR-10 32×32: four 1×6 pieces at rows 0 and 4, columns 0–5 and 9–14 (a 3-pixel gap both ways)."""
DIGITS_PIECES: tuple[Rect, ...] = ((0, 0, 1, 2), (2, 0, 1, 2), (4, 0, 1, 2), (6, 0, 1, 2))
"""scikit-learn digits 8×8 (spec flip.md §6 suggests "four 1×2 segments top-left"). GUESS: four 1×2 pieces down
the left edge, rows 0, 2, 4 and 6, columns 0–1 (8 pixels = HW/8, FLIP's inversion bound). Digits fill the 8×8
frame: only columns 0–1 (and 6–7) are mostly background, so a 2×2 grid in the corner (rows 0 and 2, columns 0–1
and 3–4) would put piece 1 on ink in 97% of the images (a stamp raising its pixels by 0.26 on average, a no-op on
8% of them). On the left edge every piece changes every image, by 0.92 to 0.99 on average."""


# --------------------------------------------------------------------------------------------- helpers


def _rects(rects: Any, key: str) -> tuple[Rect, ...]:
    """``rects`` as a non-empty tuple of int 4-tuples with row, col >= 0 and height, width >= 1."""
    try:
        out = tuple(tuple(operator.index(v) for v in rect) for rect in rects)
    except TypeError:
        raise ConfigError(f"trigger key {key!r}: expected a list of [row, col, height, width] integer rectangles; "
                          f"got {rects!r}") from None
    if not out:
        raise ConfigError(f"trigger key {key!r}: needs at least one [row, col, height, width] rectangle")
    for rect in out:
        if len(rect) != 4 or rect[0] < 0 or rect[1] < 0 or rect[2] < 1 or rect[3] < 1:
            raise ConfigError(f"trigger key {key!r}: rectangle {list(rect)} must be [row >= 0, col >= 0, "
                              f"height >= 1, width >= 1]")
    return out  # type: ignore[return-value]


def _check_inside(rects: Sequence[Rect], h: int, w: int, key: str) -> None:
    for r, c, rh, rw in rects:
        if r + rh > h or c + rw > w:
            raise ConfigError(f"trigger key {key!r}: rectangle {[r, c, rh, rw]} (rows {r}..{r + rh - 1}, "
                              f"cols {c}..{c + rw - 1}) lies outside the {h}×{w} image")


def _check_unit(value: Any, key: str, low_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:  # NaN fails both
        raise ConfigError(f"trigger key {key!r}: {value!r} must be in {'(0, 1]' if low_open else '[0, 1]'}")
    return v


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or not (x.dtype == torch.uint8 or x.is_floating_point()):
        got = f"{x.dtype} shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"trigger: images must be a uint8 or floating (N, C, H, W) tensor; got {got}")


def _pixel_value(value: float, dtype: torch.dtype) -> float | int:
    """A [0, 1] pixel value on ``dtype``'s scale: uint8 ⌊255·v + 0.5⌋ (1.0 → 255), floating v."""
    return int(math.floor(255.0 * value + 0.5)) if dtype == torch.uint8 else value


def _rects_overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


# --------------------------------------------------------------------------------------------- triggers


class Stamper(Protocol):
    """Anything with a batched ``stamp``: :class:`PixelTrigger`, :class:`BlendTrigger`."""

    def stamp(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class PixelTrigger:
    """A pixel-pattern trigger: pixels inside ``rects`` set to ``value`` in every channel
    (BadNets, Gu et al. 2017, §3; DBA, Xie et al., ICLR 2020, §2.2: the same with one rectangle per attacker).

    ``rects``: ``(row, col, height, width)`` rectangles (overlaps are allowed and idempotent);
    ``value``: the stamped pixel in [0, 1], written as ⌊255·value + 0.5⌋ on uint8 images.
    """

    rects: tuple[Rect, ...]
    value: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rects", _rects(self.rects, "rects"))
        object.__setattr__(self, "value", _check_unit(self.value, "value"))

    def mask(self, h: int, w: int, device: torch.device | str | None = None) -> Tensor:
        """The bool (h, w) mask of the stamped pixels; a rectangle outside the image is a ConfigError."""
        _check_inside(self.rects, h, w, "rects")
        box = torch.tensor(self.rects, dtype=torch.long, device=device)  # (R, 4)
        rows = torch.arange(h, device=device)[None, :, None]  # (1, h, 1)
        cols = torch.arange(w, device=device)[None, None, :]  # (1, 1, w)
        r0, c0, rh, rw = (box[:, i, None, None] for i in range(4))  # each (R, 1, 1)
        inside = (rows >= r0) & (rows < r0 + rh) & (cols >= c0) & (cols < c0 + rw)  # (R, h, w)
        return inside.any(dim=0)

    def stamp(self, x: Tensor) -> Tensor:
        """x' = v on the mask in every channel, x elsewhere; a new tensor, same dtype and device as ``x``
        (N, C, H, W) (any leading dimensions: the mask broadcasts over the last two)."""
        _check_images(x)
        m = self.mask(x.shape[-2], x.shape[-1], device=x.device)
        v = torch.tensor(_pixel_value(self.value, x.dtype), dtype=x.dtype, device=x.device)
        return torch.where(m, v, x)


@dataclass(frozen=True)
class DBATrigger:
    """A distributed backdoor trigger (DBA, Xie et al., ICLR 2020, §2.2 and Fig. 1): a global pixel pattern
    split into disjoint local pieces, attacker i stamping only its own piece in training while the ASR is
    measured with the union of all pieces.

    ``pieces``: one ``(row, col, height, width)`` rectangle per piece, pairwise disjoint; ``value`` as in
    :class:`PixelTrigger`. A DBATrigger has no ``stamp`` of its own, so that a piece and the full trigger are
    never confused: use :meth:`piece` for training and :meth:`union` for the ASR.
    """

    pieces: tuple[Rect, ...]
    value: float = 1.0

    def __post_init__(self) -> None:
        pieces = _rects(self.pieces, "pieces")
        for i, a in enumerate(pieces):
            for j, b in enumerate(pieces[i + 1:], start=i + 1):
                if _rects_overlap(a, b):
                    raise ConfigError(f"trigger key 'pieces': pieces {i} {list(a)} and {j} {list(b)} overlap; "
                                      f"DBA pieces must be disjoint")
        object.__setattr__(self, "pieces", pieces)
        object.__setattr__(self, "value", _check_unit(self.value, "value"))

    def __len__(self) -> int:
        return len(self.pieces)

    def piece(self, i: int) -> PixelTrigger:
        """Attacker ``i``'s local trigger: piece ``i mod len(self)`` (DBA's ``adversarial_index``)."""
        return PixelTrigger((self.pieces[operator.index(i) % len(self.pieces)],), self.value)

    def union(self) -> PixelTrigger:
        """The full (global) trigger, every piece at once: the one the test ASR uses (spec flip.md §1, §4)."""
        return PixelTrigger(self.pieces, self.value)


def dba_trigger(pieces: int = 4, height: int = 1, width: int = 4, gap: int = 2, per_row: int = 2,
                origin: tuple[int, int] = (0, 0), value: float = 1.0) -> DBATrigger:
    """DBA pieces on a grid, row-major from ``origin`` (row, col): ``per_row`` pieces of ``height``×``width``
    per row, ``gap`` empty pixels between neighbours both across and down, so piece k sits at
    row ``origin_row + (k // per_row)·(height + gap)``, col ``origin_col + (k % per_row)·(width + gap)``.

    FLIP's layouts (spec §1): MNIST ``dba_trigger(4, 1, 4, gap=2)`` = :data:`FLIP_MNIST_PIECES`, CIFAR
    ``dba_trigger(4, 1, 6, gap=3)`` = :data:`FLIP_CIFAR_PIECES`, digits ``dba_trigger(4, 1, 2, gap=1, per_row=1)``
    = :data:`DIGITS_PIECES`.
    """
    for key, v, low in (("pieces", pieces, 1), ("height", height, 1), ("width", width, 1), ("gap", gap, 0),
                        ("per_row", per_row, 1), ("origin", min(origin), 0)):
        if v < low:
            raise ConfigError(f"trigger key {key!r}: {v} must be >= {low}")
    r0, c0 = origin
    rects = tuple((r0 + (k // per_row) * (height + gap), c0 + (k % per_row) * (width + gap), height, width)
                  for k in range(pieces))
    return DBATrigger(rects, value)


def dba_preset(h: int, w: int, value: float = 1.0) -> DBATrigger:
    """The DBA trigger for an h×w image: 8 → :data:`DIGITS_PIECES`, 28 → :data:`FLIP_MNIST_PIECES`,
    32 → :data:`FLIP_CIFAR_PIECES` (square images only)."""
    if h == w == 8:
        return DBATrigger(DIGITS_PIECES, value)
    if h == w == 28:
        return DBATrigger(FLIP_MNIST_PIECES, value)
    if h == w == 32:
        return DBATrigger(FLIP_CIFAR_PIECES, value)
    raise ConfigError(f"trigger key 'pieces': no DBA preset for {h}×{w} images (presets: 8×8 digits, 28×28 "
                      f"MNIST/FMNIST, 32×32 CIFAR); give pieces as [[row, col, height, width], ...]")


@dataclass(frozen=True, eq=False)
class BlendTrigger:
    """Blended injection (Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning", §3, blended injection strategy): Π_α(k, x) = α·k + (1 − α)·x, with k the key pattern
    (``pattern``) and α the blend ratio (``alpha``).

    ``pattern``: (C, H, W), (1, H, W) or (H, W) in [0, 1] (a single channel is shared by every channel),
    kept on the CPU and moved to the batch's device when stamping. ``alpha`` in (0, 1]. GUESS: default
    α = 0.2; Chen et al. blend with a smaller α_train than α_test (they vary both), so build the test trigger
    with :meth:`with_alpha` on the same pattern. On uint8 images the result is rounded half up to an integer.
    """

    pattern: Tensor
    alpha: float = 0.2

    def __post_init__(self) -> None:
        p = self.pattern
        if not isinstance(p, Tensor) or p.dim() not in (2, 3) or not p.is_floating_point() or p.numel() == 0:
            got = f"{p.dtype} shape {tuple(p.shape)}" if isinstance(p, Tensor) else type(p).__name__
            raise ConfigError(f"trigger key 'pattern': must be a floating (C, H, W) or (H, W) tensor; got {got}")
        if not bool(((p >= 0) & (p <= 1)).all()):
            raise ConfigError("trigger key 'pattern': values must be in [0, 1]")
        object.__setattr__(self, "pattern", p.detach().to("cpu").clone())
        object.__setattr__(self, "alpha", _check_unit(self.alpha, "alpha", low_open=True))

    @classmethod
    def random(cls, shape: Sequence[int], alpha: float = 0.2, seed: int = 0) -> BlendTrigger:
        """A uniform-noise key pattern U[0, 1) of ``shape`` (C, H, W), drawn from a CPU generator seeded with
        ``seed`` (Chen et al.'s "random noise" key), so it is the same on every device."""
        g = torch.Generator().manual_seed(seed)
        return cls(torch.rand(tuple(shape), generator=g), alpha)

    def with_alpha(self, alpha: float) -> BlendTrigger:
        """The same pattern blended with another ratio (e.g. α_test for the ASR)."""
        return dataclasses.replace(self, alpha=alpha)

    def stamp(self, x: Tensor) -> Tensor:
        """x' = (1 − α)·x + α·k on (N, C, H, W) ``x`` (k on x's scale: 255·pattern for uint8); a new tensor
        of x's dtype and device."""
        _check_images(x)
        p = self.pattern if self.pattern.dim() == 3 else self.pattern[None]
        if p.shape[-2:] != x.shape[-2:] or p.shape[0] not in (1, x.shape[-3]):
            raise ConfigError(f"trigger key 'pattern': shape {tuple(self.pattern.shape)} does not fit images "
                              f"{tuple(x.shape[-3:])}")
        if x.dtype == torch.uint8:
            k = p.to(device=x.device, dtype=torch.float32) * 255.0
            out = (1.0 - self.alpha) * x.float() + self.alpha * k
            return torch.floor(out + 0.5).clamp_(0, 255).to(torch.uint8)
        k = p.to(device=x.device, dtype=x.dtype)
        return (1.0 - self.alpha) * x + self.alpha * k


Trigger = PixelTrigger | DBATrigger | BlendTrigger


# --------------------------------------------------------------------------------------------- poisoning


def poison_fraction(n: int, fraction: float) -> int:
    """The number of images of an ``n``-batch to poison: ⌊n·fraction + 0.5⌋ (round half up), in 0..n.

    FLIP's ``poisoning_per_batch`` 20 of 64 is ``fraction`` = 0.3125 (spec §1)."""
    if n < 0:
        raise ConfigError(f"poison_fraction: batch size n={n} must be >= 0")
    f = _check_unit(fraction, "fraction")
    return min(n, max(0, int(math.floor(n * f + 0.5))))


def poison_batch(x: Tensor, y: Tensor, trigger: Stamper, target: int, count: int) -> tuple[Tensor, Tensor]:
    """DBA/FLIP poisoning of one batch (spec flip.md §1): the first ``count`` images (all if the batch is
    shorter) stamped with ``trigger`` and relabelled ``target``, the rest unchanged.

    Returns new tensors; ``x`` and ``y`` are not modified. ``trigger`` is a stamping trigger: for DBA pass
    the attacker's ``DBATrigger.piece(i)`` (or ``union()`` for a centralised attack).
    """
    if isinstance(trigger, DBATrigger):
        raise ConfigError("poison_batch: pass dba.piece(i) (the attacker's own piece) or dba.union(), "
                          "not the DBATrigger")
    if count < 0:
        raise ConfigError(f"poison_batch: count={count} must be >= 0")
    if y.shape[:1] != x.shape[:1]:
        raise DataError(f"poison_batch: {x.shape[0]} images but {y.shape[0]} labels")
    k = min(int(count), x.shape[0])
    x_out = torch.cat([trigger.stamp(x[:k]), x[k:]])
    y_out = torch.cat([torch.full_like(y[:k], target), y[k:]])
    return x_out, y_out


def backdoor_test_set(x: Tensor, y: Tensor, trigger: Stamper | DBATrigger, target: int) -> tuple[Tensor, Tensor]:
    """The ASR test set (spec flip.md §4): the images whose label is not ``target``, stamped with the full
    trigger (a :class:`DBATrigger` is replaced by its :meth:`~DBATrigger.union`), labelled ``target``, so the
    accuracy on the returned pair is the attack success rate. Source labels are ``y[y != target]``."""
    if y.shape[:1] != x.shape[:1]:
        raise DataError(f"backdoor_test_set: {x.shape[0]} images but {y.shape[0]} labels")
    full = trigger.union() if isinstance(trigger, DBATrigger) else trigger
    keep = y != target
    stamped = full.stamp(x[keep])
    return stamped, torch.full_like(y[keep], target)


def stamped_pixels(trigger: Stamper, image_shape: Sequence[int]) -> Tensor:
    """The bool (H, W) map of the pixels ``trigger`` changes on some image of ``image_shape`` (C, H, W): the
    pixels where its stamp differs from an all-black or an all-white uint8 image in any channel.

    Any :class:`Stamper` works (a pixel trigger: its rectangles whatever its value; a blend trigger: every
    pixel its pattern moves), so what is shown as "the trigger" is what its own ``stamp`` does."""
    if isinstance(trigger, DBATrigger):
        raise ConfigError("stamped_pixels: pass dba.piece(i) or dba.union(), not the DBATrigger")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ConfigError(f"stamped_pixels: image_shape must be (C, H, W); got {tuple(image_shape)}")
    shape = (1, *(int(s) for s in image_shape))
    black, white = torch.zeros(shape, dtype=torch.uint8), torch.full(shape, 255, dtype=torch.uint8)
    changed = (trigger.stamp(black) != black) | (trigger.stamp(white) != white)
    return changed[0].any(dim=0)


# --------------------------------------------------------------------------------------------- config


# Read-only: the keys each kind accepts.
_KIND_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "pixel": ("rects", "value"),
    "dba": ("pieces", "value"),
    "blend": ("alpha", "pattern", "seed"),
})


def build_trigger(kind: str, image_shape: Sequence[int], **params: Any) -> Trigger:
    """A trigger from config for images of ``image_shape`` (C, H, W), checked against the image.

    * ``pixel``: ``rects`` [[row, col, height, width], ...], ``value`` (default 1.0);
    * ``dba``: ``pieces`` (default: the preset for the image size, :func:`dba_preset`), ``value`` (1.0);
    * ``blend``: ``alpha`` (0.2), ``pattern`` (a [0, 1] tensor or nested list; default
      :meth:`BlendTrigger.random` of ``image_shape`` with ``seed``, default 0).

    Unknown kinds and keys, rectangles outside the image, values outside [0, 1] and α outside (0, 1] are
    :class:`~fedtrust.errors.ConfigError`\\ s naming the key.
    """
    if kind not in _KIND_KEYS:
        raise ConfigError(f"trigger key 'kind': unknown trigger kind {kind!r}; valid: {', '.join(_KIND_KEYS)}")
    unknown = sorted(set(params) - set(_KIND_KEYS[kind]))
    if unknown:
        raise ConfigError(f"unknown trigger key {unknown[0]!r} for kind {kind!r}; valid: "
                          f"{', '.join(_KIND_KEYS[kind])}")
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ConfigError(f"build_trigger: image_shape must be (C, H, W); got {tuple(image_shape)}")
    _, h, w = (int(s) for s in image_shape)
    value = params.get("value", 1.0)
    if kind == "pixel":
        if "rects" not in params:
            raise ConfigError("trigger key 'rects': required for kind 'pixel' ([[row, col, height, width], ...])")
        trigger = PixelTrigger(params["rects"], value)
        _check_inside(trigger.rects, h, w, "rects")
        return trigger
    if kind == "dba":
        dba = DBATrigger(params["pieces"], value) if params.get("pieces") is not None else dba_preset(h, w, value)
        _check_inside(dba.pieces, h, w, "pieces")
        return dba
    if params.get("pattern") is None:
        seed = params.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"trigger key 'seed': {seed!r} must be an integer")
        return BlendTrigger.random(tuple(image_shape), params.get("alpha", 0.2), seed)
    try:
        pattern = torch.as_tensor(params["pattern"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError("trigger key 'pattern': must be a [0, 1] (C, H, W) or (H, W) tensor or nested list") from None
    trigger = BlendTrigger(pattern, params.get("alpha", 0.2))
    if pattern.shape[-2:] != (h, w) or (pattern.dim() == 3 and pattern.shape[0] not in (1, image_shape[0])):
        raise ConfigError(f"trigger key 'pattern': shape {tuple(pattern.shape)} does not fit images "
                          f"{tuple(image_shape)}")
    return trigger
