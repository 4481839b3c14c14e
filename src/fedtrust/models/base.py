"""The contract every fedtrust backbone follows, and the layers families share.

A model (DESIGN principle 3, STYLE "What fedtrust should do" 5, after timm's
``forward_features``/``forward_head``/``num_features``) is split into

- ``features(x) -> z`` of shape ``(B, num_features)``: the representation fed
  to the classifier (what FedLoGe's heads, RNA's RN score ||z||, IS&BC's
  backstage classifier and feature-level objectives read);
- ``head``: one ``nn.Linear(num_features, num_classes)``, so ``logits = head(z)``;
- optionally ``stages()``: the body as named stages in order, so that running
  them all and average-pooling gives ``features(x)``; a stage name is a split
  point (IS&BC runs the front on clients and the back on the server).

Code that needs features or the head uses only these names and ignores the
family. Models take no seed: they are initialised from the caller's global
torch RNG, so a seeded caller gets identical weights. Activations are never
in-place, which keeps the models usable under ``torch.func`` transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.models.norms import NormFactory

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class Stage:
    """One stage of a model's body: its name (a split point), the attribute names of the modules whose
    parameters and buffers it owns, and the function from its input to its output feature map."""

    name: str
    modules: tuple[str, ...]
    forward: Callable[[Tensor], Tensor]


class FedModel(nn.Module):
    """Base class of every backbone: ``forward(x) = head(features(x))``.

    Subclasses build their body, implement :meth:`features`, and finish their
    ``__init__`` with ``self.reset_head(num_classes)`` after setting
    ``num_features``.

    Attributes:
        num_features: width of ``z = features(x)``.
        head: the linear classifier on ``z``.
        in_shape: the ``(C, H, W)`` the model was built for.
        nonnegative_features: ``True`` when ``z >= 0`` by construction (it is
            taken after a ReLU), which RNA's RN score and FedLoGe rely on.
    """

    num_features: int
    head: nn.Linear
    in_shape: Shape
    nonnegative_features: bool = True

    def features(self, x: Tensor) -> Tensor:
        """Representation ``z`` of shape ``(B, num_features)`` for images ``x`` of shape ``(B, C, H, W)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``head(features(x))`` of shape ``(B, num_classes)``."""
        return self.head(self.features(x))

    def forward_features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logits)`` from one pass: what objectives that read both (RNA, OECC) call."""
        z = self.features(x)
        return z, self.head(z)

    @property
    def num_classes(self) -> int:
        """Number of logits."""
        return self.head.out_features

    def reset_head(self, num_classes: int) -> None:
        """Replace ``head`` with a freshly initialised ``Linear(num_features, num_classes)``."""
        self.head = nn.Linear(self.num_features, num_classes)

    default_split: str | None = None
    """The split point IS&BC uses when none is configured (None: the model has no stages)."""

    def stages(self) -> list[Stage]:
        """The body as named stages: ``features(x) == global_avg_pool(s_n(... s_1(x)))``."""
        raise ConfigError(f"model {type(self).__name__} has no split points (stages); "
                          "models with them: cnn, resnet18, resnet34, preresnet18, wrn, wrn40_2")


# ---------------------------------------------------------------- validation


def check_int(key: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum``, else a one-line ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def check_bool(key: str, value: object) -> bool:
    """``value`` if it is a bool, else a one-line ConfigError naming ``key``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_in_shape(in_shape: object, min_hw: int = 1) -> Shape:
    """``in_shape`` as a ``(C, H, W)`` tuple of positive ints with ``H, W >= min_hw``."""
    if (
        not isinstance(in_shape, (tuple, list))
        or len(in_shape) != 3
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in in_shape)
    ):
        raise ConfigError(f"input shape must be (C, H, W) with positive integers, got {in_shape!r}")
    c, h, w = in_shape
    if min(h, w) < min_hw:
        raise ConfigError(f"input (C, H, W) must have H, W >= {min_hw}, got {tuple(in_shape)}")
    return (c, h, w)


# ------------------------------------------------------------- shared layers


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1 (spatial size kept at stride 1)."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution: the projection shortcut of residual blocks."""
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=bias)


class ConvNormReLU(nn.Sequential):
    """conv3x3 -> norm -> ReLU, the stem of ResNets and the layer of the small CNN.

    ``out_scale`` != 1 divides the conv output by it in training mode only, before the norm (Split-Mix's
    ``rescale_layer``, spec splitmix.md §2); the state-dict keys (``0.weight``, ``1.weight``, ...) stay.
    """

    def __init__(self, c_in: int, c_out: int, norm: NormFactory, stride: int = 1, out_scale: float = 1.0) -> None:
        super().__init__(conv3x3(c_in, c_out, stride, bias=norm.conv_bias), norm(c_out), nn.ReLU())
        self.out_scale = out_scale

    def forward(self, x: Tensor) -> Tensor:
        h = self[0](x)
        if self.training and self.out_scale != 1.0:
            h = h / self.out_scale
        return self[2](self[1](h))


def make_stage(block: Callable[[int, int, int], nn.Module], c_in: int, c_out: int, num_blocks: int, stride: int) -> nn.Sequential:
    """``num_blocks`` residual blocks ``block(c_in, c_out, stride)``; only the first changes width or stride."""
    layers = [block(c_in, c_out, stride)]
    layers += [block(c_out, c_out, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*layers)


def global_avg_pool(x: Tensor) -> Tensor:
    """Mean over the spatial dimensions: ``(B, C, H, W) -> (B, C)``."""
    return torch.mean(x, dim=(2, 3))
