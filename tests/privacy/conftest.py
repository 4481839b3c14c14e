"""Shared fixtures of the leakage-audit tests: bundled 8x8 digits in normalized space, the spec's small nets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from fedtrust.data.datasets import load_digits
from fedtrust.models import create_model


@dataclass(frozen=True)
class Digits:
    """The first test images of bundled digits, float64, normalized as fedtrust feeds them to a model."""

    x: Tensor  # (N, 1, 8, 8), (p - mean) / std with p in [0, 1]
    y: Tensor  # (N,)
    pixels: Tensor  # (N, 1, 8, 8) in [0, 1]
    std: float


@pytest.fixture(scope="session")
def digits() -> Digits:
    ds = load_digits()
    pixels = ds.test.x[:20].double() / 255.0
    return Digits((pixels - ds.mean[0]) / ds.std[0], ds.test.y[:20], pixels, ds.std[0])


def spec_cnn(seed: int = 0) -> nn.Module:
    """Spec i2f.md §6's small sigmoid net: conv3x3(1->8, pad 1)-sigmoid-conv3x3(8->8, stride 2, pad 1)-sigmoid-
    Linear(8*4*4 -> 10), weights and biases U(-0.5, 0.5), float64."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Sigmoid(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.Sigmoid(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-0.5, 0.5)
    return net.double().eval()


def leakage_net(name: str, seed: int = 0, **options: object) -> nn.Module:
    """A registered model for 8x8 digits (10 classes), seeded, float64, eval mode; ``"spec_cnn"`` is §6's net."""
    if name == "spec_cnn":
        return spec_cnn(seed)
    torch.manual_seed(seed)
    return create_model(name, 10, (1, 8, 8), **options).double().eval()


@pytest.fixture(scope="session")
def make_net():
    """:func:`leakage_net`, as a fixture (test modules do not import conftest)."""
    return leakage_net
