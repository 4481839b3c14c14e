"""HeteroFL's pre-activation ResNet-18 (Diao et al., ICLR 2021), Split-Mix's CIFAR net (spec splitmix.md §2).

``"preresnet18"`` (:class:`PreActResNet`): a 3x3 stride-1 stem conv (64
channels, no norm after it), four stages of two pre-activation blocks of
widths 64/128/256/512 with strides 1/2/2/2, a final norm-ReLU, global average
pooling and the head. A block computes

    o = relu(bn1(x));  out = conv2(relu(bn2(conv1(o))))
    return out + (x if the shape is kept else shortcut(o))

with a bias-free 1x1 projection shortcut reading the pre-activated ``o`` (no
shortcut norm), as HeteroFL's ``Block``. ``z`` is the pooled output of the
final ReLU (``z >= 0``). At 3x32x32 with 10 classes it has 11,172,170
parameters (HeteroFL's "11.2M"). Three stride-2 stages take any
``H, W >= 8``; the model is meant for 32x32 and smaller inputs.

``width_ratio``, ``rescale_init`` (every conv but the stem, the head
included) and ``rescale_layer`` (after every conv, the stem and shortcuts
included, as HeteroFL's ``Scaler``) follow :mod:`fedtrust.models.width`.
Init: PyTorch's defaults (or the rescaled ones), BN γ=1/β=0, zero head bias
(HeteroFL's ``init_param``). Convs carry a bias only with ``norm="none"``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from fedtrust.models.base import Shape, Stage, check_in_shape, conv1x1, conv3x3, global_avg_pool, make_stage
from fedtrust.models.norms import NormFactory
from fedtrust.models.width import ScalableModel, rescale_init_, scale_out, scaled
from fedtrust.registry import register

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
MIN_SIZE = 8


class PreActBlock(nn.Module):
    """HeteroFL's pre-activation block: norm-ReLU, conv3x3, norm-ReLU, conv3x3, plus (projected) shortcut.

    ``out_scale`` divides every conv output by it in training mode (``rescale_layer``, spec §2).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory, out_scale: float) -> None:
        super().__init__()
        self.bn1 = norm(c_in)
        self.conv1 = conv3x3(c_in, c_out, stride, bias=norm.conv_bias)
        self.bn2 = norm(c_out)
        self.conv2 = conv3x3(c_out, c_out, bias=norm.conv_bias)
        self.shortcut = conv1x1(c_in, c_out, stride, bias=norm.conv_bias) if stride != 1 or c_in != c_out else None
        self.out_scale = out_scale

    def forward(self, x: Tensor) -> Tensor:
        s, t = self.out_scale, self.training
        o = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else scale_out(self.shortcut(o), s, t)
        out = scale_out(self.conv1(o), s, t)
        out = scale_out(self.conv2(F.relu(self.bn2(out))), s, t)
        return out + skip


class PreActResNet(ScalableModel):
    """Pre-activation ResNet: stem conv, ``layer1..layer4``, final norm-ReLU (``bn``), global average pool, ``head``.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with any ``C`` and ``H, W >= 8``.
        blocks: blocks per stage, ``(2, 2, 2, 2)`` for ResNet-18.
        norm: the norm-layer factory (BN by default).
        width_ratio: r in (0, 1]: stage widths ``ceil(r * [64, 128, 256, 512])`` (spec §2).
        rescale_init: re-initialise every conv but the stem, and the head, with fan_in / r (spec §2).
        rescale_layer: divide every conv output by r in training mode only (spec §2).
    """

    def __init__(self, num_classes: int, in_shape: Shape, blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
                 norm: NormFactory | None = None, width_ratio: float = 1.0, rescale_init: bool = False,
                 rescale_layer: bool = False) -> None:
        super().__init__()
        norm = norm if norm is not None else NormFactory()
        c, _, _ = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)
        r = self._setup_width(norm, width_ratio, rescale_init, rescale_layer, blocks=blocks)
        widths = [scaled(n, r) for n in STAGE_WIDTHS]

        def block(c_in: int, c_out: int, stride: int) -> PreActBlock:
            return PreActBlock(c_in, c_out, stride, norm, self.out_scale)

        self.stem = conv3x3(c, widths[0], bias=norm.conv_bias)
        c_in = widths[0]
        for i, (c_out, n, stride) in enumerate(zip(widths, blocks, STAGE_STRIDES), start=1):
            self.add_module(f"layer{i}", make_stage(block, c_in, c_out, n, stride))
            c_in = c_out
        self.bn = norm(c_in)
        self.num_features = c_in
        self.reset_head(num_classes)
        if rescale_init:
            rescale_init_(self, r, skip=(self.stem,))
        nn.init.zeros_(self.head.bias)

    default_split = "layer2"
    """As the CIFAR ResNets: front = stem, layer1, layer2; back = layer3, layer4 (with the final norm-ReLU)."""

    def features(self, x: Tensor) -> Tensor:
        x = self.scale_out(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return global_avg_pool(F.relu(self.bn(x)))

    def stages(self) -> list[Stage]:
        """stem, layer1, layer2, layer3, layer4 (with the final norm-ReLU)."""
        return [Stage("stem", ("stem",), lambda h: self.scale_out(self.stem(h))),
                Stage("layer1", ("layer1",), self.layer1), Stage("layer2", ("layer2",), self.layer2),
                Stage("layer3", ("layer3",), self.layer3),
                Stage("layer4", ("layer4", "bn"), lambda h: F.relu(self.bn(self.layer4(h))))]


@register("model", "preresnet18")
def preresnet18(num_classes: int, in_shape: Shape, *, norm: str = "bn", bn_affine: bool = True,
                width_ratio: float = 1.0, rescale_init: bool = False, rescale_layer: bool = False) -> PreActResNet:
    """HeteroFL pre-activation ResNet-18 (``H, W >= 8``); ``z`` has ``ceil(512 * width_ratio)`` entries."""
    return PreActResNet(num_classes, in_shape, (2, 2, 2, 2), NormFactory(norm, bn_affine), width_ratio,
                        rescale_init, rescale_layer)
