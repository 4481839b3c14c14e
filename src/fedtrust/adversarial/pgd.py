"""L∞ projected gradient descent on a model's input (Madry et al., *Towards Deep Learning Models
Resistant to Adversarial Attacks*, ICLR 2018, Eq. (2)), as Split-Mix's DAT uses it (spec splitmix.md §4:
advertorch ``LinfPGD``, eps 8/255, 7 steps, step min(1.25·eps, eps + 4/255)/7, random start, clip
[0, 1], summed CE).

Starting from δ₀ ~ U(−ε, ε)ᵈ (random start) or δ₀ = 0, each of the ``steps`` iterations is

    δ ← clip_[0,1](p + Π_ε(δ + α·sign ∇_δ L(f(N(p + δ)), y))) − p,      L = Σ_i CE_i (summed, not averaged)

where p is the clean image in **pixel space** [0, 1], ε = ``eps`` and α = ``step_size`` are in pixel
units, Π_ε clamps every entry to [−ε, ε] and N maps pixels to the model input. fedtrust feeds
models normalised images (``data.normalize``), so :func:`pgd` takes and returns **model inputs**
and is told N by a :class:`PixelScale`: the ε-ball and the [0, 1] box are enforced on the pixels
behind the inputs, whatever the normalisation.

:func:`pgd` is written for ``torch.func``: the input gradient is ``torch.func.grad``, nothing is
written in place on parameters, and there is no ``.item()``; so it runs eagerly on any module
returning logits (a dual-BN model under a chosen route, an ensemble that averages logits) and
inside a loss that ``vmap(grad(...))`` differentiates (the DAT objective in the vectorised executor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from fedtrust.errors import ConfigError

EPS = 8 / 255
"""Split-Mix's L∞ radius in pixel units (spec §4)."""
STEPS = 7
"""Split-Mix's PGD iterations (spec §4; there is no PGD-20 in its code)."""


def default_step_size(eps: float, steps: int) -> float:
    """advertorch/Split-Mix's α = min(1.25·ε, ε + 4/255) / steps (spec §4): (10/255)/7 at ε = 8/255."""
    return min(1.25 * eps, eps + 4 / 255) / max(steps, 1)


class PGDParams(BaseModel):
    """The attack's settings (shared by the ``dat`` objective and the ``robust_acc`` evaluator)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    eps: float = Field(EPS, ge=0.0, description="L∞ radius ε in [0, 1] pixel units (8/255)")
    steps: int = Field(STEPS, ge=0, description="PGD iterations (7)")
    step_size: float | None = Field(None, ge=0.0, description="α in pixel units; null: min(1.25·ε, ε + 4/255)/steps")
    random_start: bool = Field(True, description="start from a uniform point of the ε-ball (Madry et al.)")


@dataclass(frozen=True)
class PixelScale:
    """The per-channel affine map between pixels ``p`` in [0, 1] and model inputs ``x``:
    ``x = lo + p·(hi − lo)``, so ``lo``/``hi`` are the inputs of a black/white pixel.

    Build it from a mean/std (:meth:`from_mean_std`, ``x = (p − mean)/std``), from fedtrust's uint8
    normaliser (:meth:`from_normalize`: ``ctx.normalize``, ``EvalSetup.normalize``), or take
    :meth:`identity` when the model reads raw [0, 1] pixels.
    """

    lo: Tensor
    hi: Tensor

    @classmethod
    def identity(cls) -> PixelScale:
        """Inputs are the pixels themselves."""
        return cls(torch.tensor(0.0), torch.tensor(1.0))

    @classmethod
    def from_mean_std(cls, mean: Sequence[float], std: Sequence[float]) -> PixelScale:
        """``x = (p − mean)/std`` per channel."""
        m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        if bool((s <= 0).any()):
            raise ConfigError(f"pixel std must be positive, got {tuple(std)}")
        return cls(-m / s, (1 - m) / s)

    @classmethod
    def from_normalize(cls, normalize: Callable[[Tensor], Tensor], channels: int,
                       device: torch.device | str | None = None) -> PixelScale:
        """Read ``lo``/``hi`` off a uint8 → input normaliser (``fedtrust.data.augment.normalize`` and what
        ``data.normalize`` builds) by feeding it a black and a white ``channels``-channel pixel. The
        normaliser must be per-channel affine in the pixel value (both ``data.normalize`` kinds are)."""
        black = torch.zeros(1, channels, 1, 1, dtype=torch.uint8, device=device)
        return cls(normalize(black), normalize(black + 255))

    def _on(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.lo.to(device=x.device, dtype=x.dtype), self.hi.to(device=x.device, dtype=x.dtype)

    def to_pixels(self, x: Tensor) -> Tensor:
        """Model inputs → pixels in [0, 1] (up to rounding)."""
        lo, hi = self._on(x)
        return (x - lo) / (hi - lo)

    def to_inputs(self, p: Tensor) -> Tensor:
        """Pixels → model inputs."""
        lo, hi = self._on(p)
        return lo + p * (hi - lo)


Normalizer = PixelScale | Callable[[Tensor], Tensor] | tuple[Sequence[float], Sequence[float]] | None
"""What :func:`pgd` accepts as the pixel → input map: a :class:`PixelScale`, fedtrust's uint8 normaliser
(a callable, read by :meth:`PixelScale.from_normalize`), a ``(mean, std)`` pair, or None (inputs are pixels)."""


def pixel_scale(normalizer: Normalizer, channels: int, device: torch.device | str | None = None) -> PixelScale:
    """``normalizer`` as a :class:`PixelScale` for ``channels``-channel images (see :data:`Normalizer`)."""
    if normalizer is None:
        return PixelScale.identity()
    if isinstance(normalizer, PixelScale):
        return normalizer
    if isinstance(normalizer, tuple):
        return PixelScale.from_mean_std(*normalizer)
    return PixelScale.from_normalize(normalizer, channels, device)


def check_pgd(eps: float, steps: int, step_size: float | None) -> float:
    """Validate the attack's numbers; returns α (the default when ``step_size`` is None).

    Raises:
        ConfigError: ``eps < 0``, ``steps`` not an integer ≥ 0 or ``step_size < 0`` (one line).
    """
    if not eps >= 0:
        raise ConfigError(f"PGD eps must be >= 0 (pixel units in [0, 1]), got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"PGD steps must be an integer >= 0, got {steps!r}")
    if step_size is None:
        return default_step_size(eps, steps)
    if not step_size >= 0:
        raise ConfigError(f"PGD step_size must be >= 0 (pixel units), got {step_size!r}")
    return float(step_size)


def pgd(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, eps: float = EPS, steps: int = STEPS,
        step_size: float | None = None, random_start: bool = True, normalizer: Normalizer = None,
        generator: torch.Generator | None = None) -> Tensor:
    """L∞ PGD adversarial inputs (Madry et al. 2018, Eq. (2); spec splitmix.md §4), detached.

    Args:
        model: any module (or callable) mapping inputs to logits; it runs in whatever train/eval mode
            and dual-BN route it is in (DAT attacks the adversarial BN in eval mode).
        x: model inputs ``(B, C, H, W)`` (normalised images).
        y: labels ``(B,)``; the attack ascends their summed CE.
        eps: ε, the L∞ radius in pixel units.
        steps: iterations; 0 with ``random_start=False`` returns ``x`` itself (a detached copy).
        step_size: α in pixel units; None: :func:`default_step_size`.
        random_start: start from δ₀ ~ U(−ε, ε), clipped to the image box.
        normalizer: how pixels map to inputs (:data:`Normalizer`); None: ``x`` is in pixels.
        generator: the random start's RNG (the same generator state gives the same result); None: the
            global RNG (what the DAT objective uses: a generator cannot cross ``vmap``).

    Returns:
        Adversarial model inputs of ``x``'s shape whose pixels lie in [0, 1] and within ε of ``x``'s.
    """
    alpha = check_pgd(eps, steps, step_size)
    scale = pixel_scale(normalizer, x.shape[-3], x.device)
    x = x.detach()
    p = scale.to_pixels(x).clamp(0.0, 1.0)
    if random_start:
        delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        delta = (p + delta).clamp(0.0, 1.0) - p
    else:
        delta = torch.zeros_like(x)

    def summed_ce(d: Tensor) -> Tensor:
        return F.cross_entropy(model(scale.to_inputs(p + d)), y, reduction="sum")

    for _ in range(steps):
        g = torch.func.grad(summed_ce)(delta)
        delta = (delta + alpha * g.sign()).clamp(-eps, eps)
        delta = (p + delta).clamp(0.0, 1.0) - p
    lo, hi = scale._on(x)
    return (x + delta * (hi - lo)).detach()
