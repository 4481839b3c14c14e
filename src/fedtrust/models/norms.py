"""Normalization layers: the single place every backbone gets its norm layers from.

A model takes one :class:`NormFactory` and calls it for each norm layer,
``norm(channels)`` for a layer on the main path and
``norm(channels, shortcut=True)`` for the BN on a 1x1 projection shortcut. The
kinds of layer are registered under the ``"norm"`` registry kind:

- ``"bn"`` (default): ``nn.BatchNorm2d`` (momentum 0.1, eps 1e-5), affine or not;
- ``"none"``: ``nn.Identity`` (convolutions then carry their own bias).

Affine options (DESIGN principle 3, "BN options"):

- ``bn_affine=False`` builds BN without the learnable scale γ and shift β. RNA
  (Shin & Chung, TMLR 2024; specs/rna.md §1) trains its CIFAR ResNet-18 this
  way, so the representation norm ||z|| is not re-scaled by γ.
- ``bn_affine_shortcut`` sets affine for the shortcut BNs separately; ``None``
  means "same as ``bn_affine``". RNA's code builds every ``bn1``/``bn2`` with
  ``affine=False`` but leaves the 1x1 shortcut BNs (layer2.0, layer3.0,
  layer4.0) at PyTorch's defaults, so they keep γ/β: reproduce it with
  ``bn_affine=False, bn_affine_shortcut=True``.

Later kinds (dual BN for Split-Mix DAT, width-sliced BN for slimmable nets)
register here too, so models never construct norm layers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedtrust.errors import ConfigError
from fedtrust.registry import get, register


@register("norm", "bn")
def batch_norm(num_features: int, affine: bool) -> nn.Module:
    """2-D batch norm over ``num_features`` channels, with or without γ/β."""
    return nn.BatchNorm2d(num_features, affine=affine)


@register("norm", "none")
def no_norm(num_features: int, affine: bool) -> nn.Module:
    """No normalization (identity); ``affine`` is ignored."""
    return nn.Identity()


def _check_bool(key: str, value: object, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    valid = "true, false or null" if allow_none else "true or false"
    raise ConfigError(f"{key} must be {valid}, got {value!r}")


@dataclass(frozen=True)
class NormFactory:
    """Builds the 2-D norm layers of one model.

    Args:
        norm: registered norm kind (``"bn"`` or ``"none"``).
        bn_affine: learnable γ/β on the main-path BNs.
        bn_affine_shortcut: learnable γ/β on the 1x1 shortcut BNs; ``None`` = ``bn_affine``.

    Raises:
        ConfigError: unknown ``norm`` or a non-boolean affine flag (one line).
    """

    norm: str = "bn"
    bn_affine: bool = True
    bn_affine_shortcut: bool | None = None

    def __post_init__(self) -> None:
        get("norm", self.norm)  # one-line ConfigError listing the valid kinds
        _check_bool("bn_affine", self.bn_affine)
        _check_bool("bn_affine_shortcut", self.bn_affine_shortcut, allow_none=True)

    @property
    def conv_bias(self) -> bool:
        """Whether a convolution followed by this norm needs its own bias.

        BN subtracts the batch mean, which cancels a conv bias, so convs before
        BN have none; with ``norm="none"`` they keep it.
        """
        return self.norm == "none"

    def __call__(self, num_features: int, *, shortcut: bool = False) -> nn.Module:
        """A norm layer over ``num_features`` channels; ``shortcut`` marks a projection-shortcut BN."""
        affine = self.bn_affine
        if shortcut and self.bn_affine_shortcut is not None:
            affine = self.bn_affine_shortcut
        return get("norm", self.norm)(num_features, affine)
