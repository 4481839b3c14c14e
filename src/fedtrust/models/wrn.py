"""Wide Residual Networks (Zagoruyko & Komodakis, *Wide Residual Networks*, BMVC 2016).

WRN-``depth``-``k``: a conv3x3 stem of 16 channels, then three groups of
``n = (depth - 4) / 6`` pre-activation blocks of widths ``16k, 32k, 64k`` with
strides 1/2/2, then a final norm-ReLU and global average pooling, so ``z`` has
``64k`` non-negative entries. A block (the paper's B(3,3), Fig. 1d) computes

    o = relu(bn1(x));  out = conv2(dropout(relu(bn2(conv1(o)))))
    return out + (x if the shape is kept else conv1x1(o))

the projection shortcut reading the pre-activated ``o``, as in the authors'
code. ``dropout`` is the paper's dropout between the convolutions (0.3 in its
CIFAR runs, 0 by default here). WRN-40-2 and WRN-16-4 are the OE/Energy-OOD
CIFAR backbones. Initialisation follows the reference code: He-normal
(fan-out) convolutions, BN γ=1/β=0, zero head bias. Every conv output reaches
a BN (the next block's pre-activation, or the final one) before anything
else but a residual sum, so convs carry a bias only with ``norm="none"``.
There are no shortcut BNs, so ``bn_affine`` applies to every BN.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from fedtrust.errors import ConfigError
from fedtrust.models.base import (FedModel, Shape, Stage, check_in_shape, check_int, conv1x1, conv3x3, global_avg_pool,
                                  make_stage)
from fedtrust.models.norms import NormFactory
from fedtrust.registry import register

GROUP_STRIDES = (1, 2, 2)
STEM_WIDTH = 16
MIN_SIZE = 8


class PreActBlock(nn.Module):
    """Pre-activation residual block: norm-ReLU-conv3x3, norm-ReLU-dropout-conv3x3, plus shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory, dropout: float) -> None:
        super().__init__()
        self.bn1 = norm(c_in)
        self.conv1 = conv3x3(c_in, c_out, stride, bias=norm.conv_bias)
        self.bn2 = norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(c_out, c_out, bias=norm.conv_bias)
        self.shortcut = conv1x1(c_in, c_out, stride, bias=norm.conv_bias) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(o)))))
        return out + skip


class WideResNet(FedModel):
    """WRN-``depth``-``widen_factor``: stem, ``group1..group3``, norm-ReLU, global average pool, ``head``.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with any ``C`` and ``H, W >= 8``.
        depth: total depth ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: the width multiplier ``k``.
        dropout: dropout probability between a block's convolutions, in ``[0, 1)``.
        norm: the norm-layer factory (BN by default).
    """

    def __init__(
        self,
        num_classes: int,
        in_shape: Shape,
        depth: int = 16,
        widen_factor: int = 4,
        dropout: float = 0.0,
        norm: NormFactory | None = None,
    ) -> None:
        super().__init__()
        norm = norm if norm is not None else NormFactory()
        c, _, _ = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)
        depth = check_int("depth", depth, 10)
        if (depth - 4) % 6:
            raise ConfigError(f"depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
        k = check_int("widen_factor", widen_factor, 1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6

        def block(c_in: int, c_out: int, stride: int) -> PreActBlock:
            return PreActBlock(c_in, c_out, stride, norm, float(dropout))

        self.stem = conv3x3(c, STEM_WIDTH, bias=norm.conv_bias)
        c_in = STEM_WIDTH
        for i, stride in enumerate(GROUP_STRIDES, start=1):
            c_out = STEM_WIDTH * k * 2 ** (i - 1)
            self.add_module(f"group{i}", make_stage(block, c_in, c_out, n, stride))
            c_in = c_out
        self.bn = norm(c_in)
        self.num_features = c_in
        self.reset_head(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.bias)

    default_split = "group2"
    """IS&BC's split (spec fedood_isbc.md §3: WRN-40-4 after block2); the back is group3 with the final BN."""

    def features(self, x: Tensor) -> Tensor:
        x = self.group3(self.group2(self.group1(self.stem(x))))
        return global_avg_pool(F.relu(self.bn(x)))

    def stages(self) -> list[Stage]:
        """stem, group1, group2, group3 (with the final BN-ReLU)."""
        return [Stage("stem", ("stem",), self.stem), Stage("group1", ("group1",), self.group1),
                Stage("group2", ("group2",), self.group2),
                Stage("group3", ("group3", "bn"), lambda h: F.relu(self.bn(self.group3(h))))]


@register("model", "wrn")
def wrn(
    num_classes: int,
    in_shape: Shape,
    *,
    depth: int = 16,
    widen_factor: int = 4,
    dropout: float = 0.0,
    norm: str = "bn",
    bn_affine: bool = True,
) -> WideResNet:
    """WRN-depth-k, WRN-16-4 by default; ``z`` has ``64 * widen_factor`` entries."""
    return WideResNet(num_classes, in_shape, depth, widen_factor, dropout, NormFactory(norm, bn_affine))


@register("model", "wrn40_2")
def wrn40_2(num_classes: int, in_shape: Shape, *, dropout: float = 0.0, norm: str = "bn", bn_affine: bool = True) -> WideResNet:
    """WRN-40-2, the Outlier Exposure / Energy CIFAR backbone; ``z`` has 128 entries."""
    return wrn(num_classes, in_shape, depth=40, widen_factor=2, dropout=dropout, norm=norm, bn_affine=bn_affine)
