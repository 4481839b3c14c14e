"""Normalization layers: the single place every backbone gets its norm layers from.

A model takes one :class:`NormFactory` and calls it for each norm layer,
``norm(channels)`` for a layer on the main path,
``norm(channels, shortcut=True)`` for the BN on a 1x1 projection shortcut and
``norm(features, dims=1)`` for a norm after a hidden fully connected layer
(Split-Mix's DigitModel, spec splitmix.md §2). The kinds of layer are
registered under the ``"norm"`` registry kind, each a builder
``fn(num_features: int, affine: bool, dims: int = 2) -> nn.Module`` (``dims``
2: over ``(B, C, H, W)`` maps, 1: over ``(B, C)`` vectors):

- ``"bn"`` (default): ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` (momentum 0.1,
  eps 1e-5), affine or not, with running statistics for eval mode;
- ``"bn_static"``: the same BN without running statistics
  (``track_running_stats=False``): it normalizes with the current batch's
  statistics in training *and* at test time. This is what Split-Mix and its
  HeteroFL baselines use in every size experiment (``--no_track_stat``, spec
  splitmix.md §2, HeteroFL's "static BN"); predictions then depend on the
  test batch, and BN layers hold no buffers to aggregate;
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

Later kinds (dual BN for Split-Mix DAT, ``models/dual_bn.py``) register with
the same builder signature, so models never construct norm layers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedtrust.errors import ConfigError
from fedtrust.registry import get, register


_BATCH_NORMS: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
"""Module types that count as normalization layers (batch, instance, group, layer norm; dual BN's halves)."""


def norm_state_keys(model: nn.Module) -> frozenset[str]:
    """The state-dict keys of every normalization layer of ``model`` (affine γ/β, running statistics and
    ``num_batches_tracked``): what FedBN-style training keeps on the client."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys |= {f"{name}.{k}" if name else k for k in module.state_dict()}
    return frozenset(keys)


@register("norm", "bn")
def batch_norm(num_features: int, affine: bool, dims: int = 2) -> nn.Module:
    """Batch norm over ``num_features`` channels (``dims`` 2: BatchNorm2d, 1: BatchNorm1d), with or without γ/β."""
    return _BATCH_NORMS[dims](num_features, affine=affine)


@register("norm", "bn_static")
def static_batch_norm(num_features: int, affine: bool, dims: int = 2) -> nn.Module:
    """Batch norm without running statistics: batch statistics in train and eval mode (spec splitmix.md §2)."""
    return _BATCH_NORMS[dims](num_features, affine=affine, track_running_stats=False)


@register("norm", "none")
def no_norm(num_features: int, affine: bool, dims: int = 2) -> nn.Module:
    """No normalization (identity); ``affine`` and ``dims`` are ignored."""
    return nn.Identity()


def _check_bool(key: str, value: object, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (allow_none and value is None):
        return
    valid = "true, false or null" if allow_none else "true or false"
    raise ConfigError(f"{key} must be {valid}, got {value!r}")


@dataclass(frozen=True)
class NormFactory:
    """Builds the norm layers of one model.

    Args:
        norm: registered norm kind (``"bn"``, ``"bn_static"``, ``"none"``, ...).
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

    @property
    def tracks_running_stats(self) -> bool:
        """Whether this kind keeps BN running statistics (eval mode then differs from train mode)."""
        probe = self(2)
        return any(getattr(m, "track_running_stats", False) for m in probe.modules())

    def __call__(self, num_features: int, *, shortcut: bool = False, dims: int = 2) -> nn.Module:
        """A norm layer over ``num_features`` channels; ``shortcut`` marks a projection-shortcut BN;
        ``dims`` is 2 for conv feature maps ``(B, C, H, W)`` and 1 for FC outputs ``(B, C)``."""
        if isinstance(dims, bool) or dims not in (1, 2):
            raise ConfigError(f"norm dims must be 1 (after a linear layer) or 2 (after a conv), got {dims!r}")
        affine = self.bn_affine
        if shortcut and self.bn_affine_shortcut is not None:
            affine = self.bn_affine_shortcut
        return get("norm", self.norm)(num_features, affine, dims)
