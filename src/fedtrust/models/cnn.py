"""Small CNNs for digits (8x8), MNIST-like (28x28) and CIFAR-like (32x32) inputs.

- ``"cnn"`` (:class:`SmallCNN`): three conv3x3-norm-ReLU layers of width
  ``w, 2w, 4w`` (``w = width``, default 32), a 2x2 max-pool before the third
  layer when the input is at least 16x16, then global average pooling, so
  ``z`` has ``4w`` non-negative entries. It is fedtrust's own quick CPU model
  (the embedded digits runs), not a published architecture. It is fully
  convolutional; inputs need ``H, W >= 4`` (smaller ones are mostly padding).
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
"""

from __future__ import annotations

from torch import Tensor, nn

from fedtrust.models.base import ConvNormReLU, FedModel, Shape, check_in_shape, check_int, global_avg_pool
from fedtrust.models.norms import NormFactory
from fedtrust.registry import register

MIN_SIZE = 4  # both CNNs: smallest H, W accepted
POOL_MIN_SIZE = 16  # SmallCNN max-pools once when min(H, W) >= this


class SmallCNN(FedModel):
    """conv(w)-conv(2w)-[maxpool]-conv(4w), each conv3x3-norm-ReLU, then global average pool.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with ``H, W >= 4``.
        width: channels of the first layer ``w``; ``num_features = 4 * width``.
        norm: the norm-layer factory (BN by default).
    """

    def __init__(self, num_classes: int, in_shape: Shape, width: int = 32, norm: NormFactory | None = None) -> None:
        super().__init__()
        norm = norm if norm is not None else NormFactory()
        c, h, w = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)
        width = check_int("width", width, 1)
        pool: nn.Module = nn.MaxPool2d(2) if min(h, w) >= POOL_MIN_SIZE else nn.Identity()
        self.body = nn.Sequential(
            ConvNormReLU(c, width, norm),
            ConvNormReLU(width, 2 * width, norm),
            pool,
            ConvNormReLU(2 * width, 4 * width, norm),
        )
        self.num_features = 4 * width
        self.reset_head(num_classes)

    def features(self, x: Tensor) -> Tensor:
        return global_avg_pool(self.body(x))


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


@register("model", "cnn")
def cnn(num_classes: int, in_shape: Shape, *, width: int = 32, norm: str = "bn", bn_affine: bool = True) -> SmallCNN:
    """Small 3-layer CNN (``H, W >= 4``); ``z`` has ``4 * width`` entries."""
    return SmallCNN(num_classes, in_shape, width, NormFactory(norm, bn_affine))


@register("model", "cnn2")
def cnn2(num_classes: int, in_shape: Shape, *, hidden: int = 512) -> TwoConvCNN:
    """McMahan et al. (2017) 2-conv CNN (``H, W >= 4``); ``z`` has ``hidden`` entries."""
    return TwoConvCNN(num_classes, in_shape, hidden)
