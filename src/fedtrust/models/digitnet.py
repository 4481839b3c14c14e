"""Split-Mix's ``DigitModel`` (Hong et al., ICLR 2022; spec splitmix.md §2), the FedBN Digits net.

``"digitnet"`` (:class:`DigitNet`): three conv5x5 layers (padding 2) of 64, 64
and 128 channels, each followed by norm and ReLU, with a 2x2 max-pool after
the first two; then FC ``128 (H/4)(W/4) -> 2048 -> 512``, each hidden FC
followed by a 1-D norm and ReLU; then the head ``Linear(512, num_classes)``.
``z`` is the 512-d output of the last hidden FC after its ReLU (``z >= 0``),
so ``logits = head(z)`` is the reference's ``fc3``.

As in the reference, every conv and FC carries a bias (also before BN), which
is what its parameter counts include: 14,219,210 parameters at 3x28x28 with
10 classes (spec §2: "14.2M"), 224,194 at ``width_ratio=1/8`` ("about 224k").
The pools floor, so any ``H, W >= 4`` works (8x8 digits: FC input 128·2·2,
28x28: 128·7·7 = 6272); any channel count.

``width_ratio``, ``rescale_init`` (all layers but ``conv1``, the head
included) and ``rescale_layer`` (after conv1-3, fc1, fc2) follow
:mod:`fedtrust.models.width`. The net has no split points (its features are
not a pooled feature map).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from fedtrust.models.base import Shape, check_in_shape
from fedtrust.models.norms import NormFactory
from fedtrust.models.width import ScalableModel, rescale_init_, scaled
from fedtrust.registry import register

CONV_WIDTHS = (64, 64, 128)
FC_WIDTHS = (2048, 512)
MIN_SIZE = 4  # two 2x2 pools: the FC layer needs at least a 1x1 map


class DigitNet(ScalableModel):
    """conv5x5(64)-pool-conv5x5(64)-pool-conv5x5(128)-FC 2048-FC 512 (= ``z``), norm + ReLU after each; FC head.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with ``H, W >= 4``.
        norm: the norm-layer factory (BN by default); FC layers get its 1-D version.
        width_ratio: r in (0, 1]: every hidden width ``n`` becomes ``ceil(r n)`` (spec §2).
        rescale_init: re-initialise every conv/FC but ``conv1`` with fan_in / r (spec §2).
        rescale_layer: divide conv1-3, fc1, fc2 outputs by r in training mode only (spec §2).
    """

    def __init__(self, num_classes: int, in_shape: Shape, norm: NormFactory | None = None, width_ratio: float = 1.0,
                 rescale_init: bool = False, rescale_layer: bool = False) -> None:
        super().__init__()
        norm = norm if norm is not None else NormFactory()
        c, h, w = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)
        r = self._setup_width(norm, width_ratio, rescale_init, rescale_layer)
        k1, k2, k3 = (scaled(n, r) for n in CONV_WIDTHS)
        f1, f2 = (scaled(n, r) for n in FC_WIDTHS)
        self.spatial = (h // 4) * (w // 4)
        self.conv1, self.bn1 = nn.Conv2d(c, k1, 5, padding=2), norm(k1)
        self.conv2, self.bn2 = nn.Conv2d(k1, k2, 5, padding=2), norm(k2)
        self.conv3, self.bn3 = nn.Conv2d(k2, k3, 5, padding=2), norm(k3)
        self.fc1, self.bn4 = nn.Linear(k3 * self.spatial, f1), norm(f1, dims=1)
        self.fc2, self.bn5 = nn.Linear(f1, f2), norm(f2, dims=1)
        self.num_features = f2
        self.reset_head(num_classes)
        if rescale_init:
            rescale_init_(self, r, skip=(self.conv1,))

    def features(self, x: Tensor) -> Tensor:
        s = self.scale_out
        x = F.max_pool2d(F.relu(self.bn1(s(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.bn2(s(self.conv2(x)))), 2)
        x = F.relu(self.bn3(s(self.conv3(x))))
        x = F.relu(self.bn4(s(self.fc1(x.flatten(1)))))
        return F.relu(self.bn5(s(self.fc2(x))))

    def channel_blocks(self) -> dict[str, dict[int, int]]:
        """fc1's inputs are conv3's ``(C, H/4, W/4)`` map flattened: ``H/4 * W/4`` entries per channel."""
        return {"fc1.weight": {1: self.spatial}}


@register("model", "digitnet")
def digitnet(num_classes: int, in_shape: Shape, *, norm: str = "bn", bn_affine: bool = True, width_ratio: float = 1.0,
             rescale_init: bool = False, rescale_layer: bool = False) -> DigitNet:
    """Split-Mix DigitModel (``H, W >= 4``); ``z`` has ``ceil(512 * width_ratio)`` entries."""
    return DigitNet(num_classes, in_shape, NormFactory(norm, bn_affine), width_ratio, rescale_init, rescale_layer)
