"""Width-scaled models: Split-Mix base nets and the sub-nets of HeteroFL / FedRolex (spec splitmix.md §2, §5).

A width-scalable family (``cnn``, ``digitnet``, ``preresnet18``) takes

- ``width_ratio`` r in (0, 1]: every *hidden* width C becomes ``ceil(r * C)``
  (at least 1, :func:`scaled`); the input channels and ``num_classes`` stay.
  Split-Mix's base net is the r = 1/8 version (``atom_slim_ratio``, §2).
- ``rescale_init``: re-initialise every conv/linear layer except the input
  conv (the head included) as if it had its full-width fan-in, i.e. with
  ``fan_in / r`` (:func:`rescale_init_`; Split-Mix ``scale_init_param``).
- ``rescale_layer``: divide every hidden conv/FC output by r in training mode
  only (Split-Mix's ``Scaler``; :meth:`ScalableModel.scale_out`). The spec
  (§2) says it must be off when BN tracks running statistics: eval mode would
  then normalise unscaled activations with statistics of scaled ones, so
  that combination is a ConfigError (at r < 1).

A :class:`ScalableModel` remembers its constructor options, so
:meth:`ScalableModel.at_width` builds the same family at another width: what
the slimmable view (:mod:`fedtrust.models.slimmable`) compares shapes with.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.models.base import FedModel, check_bool
from fedtrust.models.norms import NormFactory


def check_width(key: str, value: object) -> float:
    """``value`` as a float in (0, 1], else a one-line ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{key} must be a number in (0, 1], got {value!r}")
    return float(value)


def scaled(channels: int, ratio: float) -> int:
    """``ceil(ratio * channels)``, at least 1: a hidden width at ratio r (spec §2, §5 "first ceil(w·C) channels").

    The product is rounded to 9 decimals first, so ``0.1 * 30`` keeps 3 channels, not 4.
    """
    return max(1, math.ceil(round(ratio * channels, 9)))


def rescale_init_(model: nn.Module, ratio: float, skip: tuple[nn.Module, ...]) -> None:
    """Re-initialise every conv/linear layer of ``model`` but those in ``skip`` with the full-width fan-in.

    Kaiming-uniform with PyTorch's default ``a = sqrt(5)`` (Split-Mix's ``kaiming_uniform_in_``), with
    fan_in replaced by ``fan_in / ratio``: weights and biases ~ U(±b), ``b = 1 / sqrt(fan_in / ratio)``,
    so the weight std is ``b / sqrt(3)``. Spec splitmix.md §2 ``rescale_init``. At ratio 1 it does
    nothing (and draws nothing from the RNG).
    """
    if ratio == 1.0:
        return
    skipped = {id(m) for m in skip}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in skipped:
            fan_in = m.weight[0].numel()  # in_channels/groups * kernel size, or in_features
            bound = 1.0 / math.sqrt(fan_in / ratio)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -bound, bound)


def scale_out(x: Tensor, out_scale: float, training: bool) -> Tensor:
    """``x / out_scale`` in training mode, ``x`` in eval mode or when ``out_scale`` is 1 (spec §2 ``rescale_layer``)."""
    return x / out_scale if training and out_scale != 1.0 else x


class ScalableModel(FedModel):
    """A FedModel family built at a width ratio (spec splitmix.md §2); see the module docstring.

    Subclasses call :meth:`_setup_width` first in ``__init__`` with their keyword options, and may
    override :meth:`channel_blocks` when a hidden layer's channels are flattened into an FC input.

    Attributes:
        width_ratio: the ratio r the hidden widths were scaled by.
        out_scale: r with ``rescale_layer``, else 1: the divisor of hidden outputs in training mode.
    """

    width_ratio: float = 1.0
    out_scale: float = 1.0

    def _setup_width(self, norm: NormFactory, width_ratio: float, rescale_init: bool, rescale_layer: bool,
                     **options: Any) -> float:
        """Check and store the width options (and the family's other ``options``); return the ratio."""
        ratio = check_width("width_ratio", width_ratio)
        check_bool("rescale_init", rescale_init)
        check_bool("rescale_layer", rescale_layer)
        if rescale_layer and ratio != 1.0 and norm.tracks_running_stats:
            raise ConfigError(f"rescale_layer needs norm without running statistics (bn_static or none), "
                              f"got norm {norm.norm!r}: eval mode would see unscaled activations (spec §2)")
        self.width_ratio = ratio
        self.out_scale = ratio if rescale_layer else 1.0
        self._options = dict(options, norm=norm, width_ratio=ratio, rescale_init=rescale_init,
                             rescale_layer=rescale_layer)
        return ratio

    def scale_out(self, x: Tensor) -> Tensor:
        """A hidden conv/FC output divided by r in training mode with ``rescale_layer`` (spec §2)."""
        return scale_out(x, self.out_scale, self.training)

    def at_width(self, width: float, **overrides: Any) -> ScalableModel:
        """A new model of the same family and options at ``width`` times this one's ratio.

        ``overrides`` replace constructor options (e.g. ``rescale_layer=True`` for SHeteroFL's slim
        outputs). The new model is initialised from the global RNG (or on the meta device under
        ``torch.device("meta")``, which draws nothing).
        """
        width = check_width("width", width)
        options = {**self._options, "width_ratio": self.width_ratio * width, **overrides}
        return type(self)(self.num_classes, self.in_shape, **options)

    def channel_blocks(self) -> dict[str, dict[int, int]]:
        """``{state key: {dim: entries per channel}}`` for dims that hold a flattened ``(C, H, W)`` map.

        Empty by default (every sliced dim is one entry per channel). DigitNet's ``fc1.weight`` dim 1
        holds ``H/4 * W/4`` entries per conv3 channel.
        """
        return {}
