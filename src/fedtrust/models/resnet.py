"""CIFAR-style ResNet-18/34 (He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016).

The variant RNA (specs/rna.md §1) and FedLoGe (specs/fedloge.md §2) train on
CIFAR: a 3x3 stride-1 stem conv (64 channels) with norm and ReLU and no
max-pool, four stages of BasicBlocks of widths 64/128/256/512 with strides
1/2/2/2 ([2, 2, 2, 2] blocks for ResNet-18, [3, 4, 6, 3] for ResNet-34), then
global average pooling. ``z`` is the 512-d pooled output of the last block's
final ReLU, so ``z >= 0``; ``logits = head(z)``. At 32x32 the global pool is
the reference code's ``AvgPool2d(4)``; it makes any ``H, W >= 8`` work.

A BasicBlock computes ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``;
the shortcut is the identity, or conv1x1(stride) + BN where the width or
stride changes (the first block of stages 2-4). BNs come from
:class:`~fedtrust.models.norms.NormFactory`; the shortcut BN is built with
``shortcut=True``, which is what RNA's affine exception selects. Weights use
PyTorch's default initialisation, as the reference code does.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from fedtrust.models.base import (ConvNormReLU, FedModel, Shape, Stage, check_in_shape, conv1x1, conv3x3, global_avg_pool,
                                  make_stage)
from fedtrust.models.norms import NormFactory
from fedtrust.registry import register

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
MIN_SIZE = 8  # three stride-2 stages: 8x8 input -> 1x1 before pooling


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers plus a shortcut, ReLU after the sum (He et al. 2016, Fig. 2)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride, bias=norm.conv_bias)
        self.bn1 = norm(c_out)
        self.conv2 = conv3x3(c_out, c_out, bias=norm.conv_bias)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv1x1(c_in, c_out, stride, bias=norm.conv_bias), norm(c_out, shortcut=True))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(FedModel):
    """CIFAR ResNet with BasicBlocks: stem, ``layer1..layer4``, global average pool, ``head``.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with any ``C`` and ``H, W >= 8``.
        blocks: BasicBlocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        norm: the norm-layer factory (BN by default).
    """

    def __init__(self, num_classes: int, in_shape: Shape, blocks: tuple[int, int, int, int], norm: NormFactory | None = None) -> None:
        super().__init__()
        norm = norm if norm is not None else NormFactory()
        c, _, _ = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)

        def block(c_in: int, c_out: int, stride: int) -> BasicBlock:
            return BasicBlock(c_in, c_out, stride, norm)

        self.stem = ConvNormReLU(c, STAGE_WIDTHS[0], norm)
        c_in = STAGE_WIDTHS[0]
        for i, (c_out, n, stride) in enumerate(zip(STAGE_WIDTHS, blocks, STAGE_STRIDES), start=1):
            self.add_module(f"layer{i}", make_stage(block, c_in, c_out, n, stride))
            c_in = c_out
        self.num_features = c_in
        self.reset_head(num_classes)

    default_split = "layer2"
    """IS&BC's split (spec fedood_isbc.md §3): front = stem, layer1, layer2; back = layer3, layer4."""

    def features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return global_avg_pool(x)

    def stages(self) -> list[Stage]:
        return [Stage(name, (name,), getattr(self, name)) for name in ("stem", "layer1", "layer2", "layer3", "layer4")]


def _create_resnet(blocks: tuple[int, int, int, int], num_classes: int, in_shape: Shape, norm: str, bn_affine: bool, bn_affine_shortcut: bool | None) -> ResNet:
    return ResNet(num_classes, in_shape, blocks, NormFactory(norm, bn_affine, bn_affine_shortcut))


@register("model", "resnet18")
def resnet18(num_classes: int, in_shape: Shape, *, norm: str = "bn", bn_affine: bool = True, bn_affine_shortcut: bool | None = None) -> ResNet:
    """ResNet-18, [2, 2, 2, 2] BasicBlocks; RNA: ``bn_affine=False, bn_affine_shortcut=True``."""
    return _create_resnet((2, 2, 2, 2), num_classes, in_shape, norm, bn_affine, bn_affine_shortcut)


@register("model", "resnet34")
def resnet34(num_classes: int, in_shape: Shape, *, norm: str = "bn", bn_affine: bool = True, bn_affine_shortcut: bool | None = None) -> ResNet:
    """ResNet-34, [3, 4, 6, 3] BasicBlocks (FedLoGe's CIFAR-100 backbone)."""
    return _create_resnet((3, 4, 6, 3), num_classes, in_shape, norm, bn_affine, bn_affine_shortcut)
