"""Small trained digits models for the adversarial tests (8×8 digits, a width-8 ``cnn``, seconds to build)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtrust.data.augment import normalize
from fedtrust.data.datasets import Dataset, load_dataset
from fedtrust.models import create_model
from fedtrust.models.dual_bn import bn_route


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def norm(digits: Dataset):
    """The run's uint8 → input map, as ``data.normalize=dataset`` builds it."""
    return functools.partial(normalize, mean=digits.mean, std=digits.std)


def train_cnn(digits: Dataset, norm, kind: str = "bn", steps: int = 40, seed: int = 0) -> nn.Module:
    """A width-8 ``cnn`` after ``steps`` SGD steps on digits (dual BN: the two routes alternate), in eval mode."""
    torch.manual_seed(seed)
    model = create_model("cnn", 10, (1, 8, 8), width=8, norm=kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = digits.train.x, digits.train.y
    for t in range(steps):
        idx = torch.randint(0, len(x_all), (64,), generator=g)
        with bn_route(model, "clean" if t % 2 == 0 else "adv"):
            loss = F.cross_entropy(model(norm(x_all[idx])), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def bn_cnn(digits, norm) -> nn.Module:
    return train_cnn(digits, norm, "bn")


@pytest.fixture(scope="session")
def dual_cnn(digits, norm) -> nn.Module:
    return train_cnn(digits, norm, "dual_bn", steps=60)
