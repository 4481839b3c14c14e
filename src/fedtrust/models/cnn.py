"""Small CNNs for digits (8x8), MNIST-like (28x28) and CIFAR-like (32x32) inputs.

- ``"cnn"`` (:class:`SmallCNN`): three conv3x3-norm-ReLU layers of width
  ``w, 2w, 4w`` (``w = width``, default 32), a 2x2 max-pool before the third
  layer when the input is at least 16x16, then global average pooling, so
  ``z`` has ``4w`` non-negative entries. It is fedtrust's own quick CPU model
  (the embedded digits runs), not a published architecture. It is fully
  convolutional; inputs need ``H, W >= 4`` (smaller ones are mostly padding).
  ``width_ratio`` r scales the three widths to ``ceil(r w), ceil(2 r w),
  ceil(4 r w)`` (a Split-Mix base net, spec splitmix.md §2), with
  ``rescale_init``/``rescale_layer`` as in :mod:`fedtrust.models.width`.
- ``"cnn2"`` (:class:`TwoConvCNN`): the "CNN" of McMahan et al., *Communication-
  Efficient Learning of Deep Networks from Decentralized Data* (AISTATS 2017,
  §3): conv5x5(32)-ReLU-maxpool2-conv5x5(64)-ReLU-maxpool2-FC(512)-ReLU-FC(C),
  the standard small FL vision baseline. ``z`` is the 512-d FC layer after its
  ReLU. Convolutions use "same" padding, so any ``H, W >= 4`` works; at 28x28
  it has 1,663,370 parameters with 10 classes, as in the paper. It has no
  normalization layers.
  Note: pfl-research's ``simple_cnn`` (benchmarks/model/pytorch/cnn.py) is a
  different net (two valid conv3x3, one max-pool, dropout, FC 128); ``"cnn2"``
  follows McMahan et al.
- ``"lenet"`` (:class:`LeNet`): the ``MnistNet`` of DBA (Xie et al., ICLR 2020)
  and FLIP (Zhang et al., ICLR 2023; spec flip.md §1), a LeNet-5-style net:
  conv5x5(20, valid)-ReLU-maxpool2-conv5x5(50, valid)-ReLU-maxpool2-FC(500)-
  ReLU-FC(C). ``z`` is the 500-d FC layer after its ReLU. The valid
  convolutions need ``H, W >= 16``; at 28x28 it has 431,080 parameters with 10
  classes. FLIP's net ends in a log-softmax; this one returns logits, which is
  the same model and the same loss (cross-entropy on logits = NLL on
  log-softmax), and the same predictions and softmax confidences. No
  normalization layers.
"""

from __future__ import annotations

from torch import Tensor, nn

from fedtrust.models.base import ConvNormReLU, FedModel, Shape, Stage, check_in_shape, check_int, global_avg_pool
from fedtrust.models.norms import NormFactory
from fedtrust.models.width import ScalableModel, rescale_init_, scaled
from fedtrust.registry import register

MIN_SIZE = 4  # SmallCNN and TwoConvCNN: smallest H, W accepted
LENET_MIN_SIZE = 16  # LeNet: two valid conv5x5 and two 2x2 pools leave a 1x1 map at 16x16, none at 15x15
POOL_MIN_SIZE = 16  # SmallCNN max-pools once when min(H, W) >= this


class SmallCNN(ScalableModel):
    """conv(w)-conv(2w)-[maxpool]-conv(4w), each conv3x3-norm-ReLU, then global average pool.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with ``H, W >= 4``.
        width: channels of the first layer ``w``; ``num_features = ceil(4 * width * width_ratio)``.
        norm: the norm-layer factory (BN by default).
        width_ratio: r in (0, 1]: the widths become ``ceil(r w), ceil(2 r w), ceil(4 r w)`` (spec splitmix.md §2).
        rescale_init: re-initialise conv2, conv3 and the head with fan_in / r (spec §2).
        rescale_layer: divide each conv output by r before its norm, in training mode only (spec §2).
    """

    def __init__(self, num_classes: int, in_shape: Shape, width: int = 32, norm: NormFactory | None = None,
                 width_ratio: float = 1.0, rescale_init: bool = False, rescale_layer: bool = False) -> None:
        super().__init__()
        norm = norm if norm is not None else NormFactory()
        c, h, w = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)
        width = check_int("width", width, 1)
        r = self._setup_width(norm, width_ratio, rescale_init, rescale_layer, width=width)
        c1, c2, c3 = (scaled(k * width, r) for k in (1, 2, 4))
        pool: nn.Module = nn.MaxPool2d(2) if min(h, w) >= POOL_MIN_SIZE else nn.Identity()
        self.body = nn.Sequential(
            ConvNormReLU(c, c1, norm, out_scale=self.out_scale),
            ConvNormReLU(c1, c2, norm, out_scale=self.out_scale),
            pool,
            ConvNormReLU(c2, c3, norm, out_scale=self.out_scale),
        )
        self.num_features = c3
        self.reset_head(num_classes)
        if rescale_init:
            rescale_init_(self, r, skip=(self.body[0][0],))

    default_split = "conv1"

    def features(self, x: Tensor) -> Tensor:
        return global_avg_pool(self.body(x))

    def stages(self) -> list[Stage]:
        """conv1, conv2, conv3 (the max-pool, where there is one, opens conv3)."""
        b = self.body
        return [Stage("conv1", ("body.0",), b[0]), Stage("conv2", ("body.1",), b[1]),
                Stage("conv3", ("body.2", "body.3"), lambda h: b[3](b[2](h)))]


class TwoConvCNN(FedModel):
    """McMahan et al. (2017) CNN: two conv5x5 + max-pool stages, FC 512 (= ``z``), FC head.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with ``H, W >= 4``.
        hidden: width of the FC layer that gives ``z`` (512 in the paper).
    """

    def __init__(self, num_classes: int, in_shape: Shape, hidden: int = 512) -> None:
        super().__init__()
        c, h, w = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)
        hidden = check_int("hidden", hidden, 1)
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), hidden),
            nn.ReLU(),
        )
        self.num_features = hidden
        self.reset_head(num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


class LeNet(FedModel):
    """DBA/FLIP ``MnistNet``: conv5x5(20)-pool-conv5x5(50)-pool, valid convs, FC 500 (= ``z``), FC head.

    Returns logits (FLIP's ``MnistNet`` returns their log-softmax: same argmax, softmax and CE loss).

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with ``H, W >= 16`` (the valid convolutions shrink 28 to 24, 12, 8, 4).
    """

    def __init__(self, num_classes: int, in_shape: Shape) -> None:
        super().__init__()
        c, h, w = self.in_shape = check_in_shape(in_shape, min_hw=LENET_MIN_SIZE)
        self.body = nn.Sequential(
            nn.Conv2d(c, 20, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * _lenet_side(h) * _lenet_side(w), 500),
            nn.ReLU(),
        )
        self.num_features = 500
        self.reset_head(num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


def _lenet_side(n: int) -> int:
    """Side of LeNet's last feature map for an input side ``n``: conv5 valid, pool 2, conv5 valid, pool 2."""
    return ((n - 4) // 2 - 4) // 2


@register("model", "cnn")
def cnn(num_classes: int, in_shape: Shape, *, width: int = 32, norm: str = "bn", bn_affine: bool = True,
        width_ratio: float = 1.0, rescale_init: bool = False, rescale_layer: bool = False) -> SmallCNN:
    """Small 3-layer CNN (``H, W >= 4``); ``z`` has ``ceil(4 * width * width_ratio)`` entries."""
    return SmallCNN(num_classes, in_shape, width, NormFactory(norm, bn_affine), width_ratio, rescale_init, rescale_layer)


@register("model", "cnn2")
def cnn2(num_classes: int, in_shape: Shape, *, hidden: int = 512) -> TwoConvCNN:
    """McMahan et al. (2017) 2-conv CNN (``H, W >= 4``); ``z`` has ``hidden`` entries."""
    return TwoConvCNN(num_classes, in_shape, hidden)


@register("model", "lenet")
def lenet(num_classes: int, in_shape: Shape) -> LeNet:
    """DBA/FLIP MnistNet (``H, W >= 16``); ``z`` has 500 entries. No options."""
    return LeNet(num_classes, in_shape)
