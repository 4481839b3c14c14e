"""Shared fixtures: the real data directory beside the checkout, small digits federations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip where it is absent."""
    if not (SHARED_DATA / "mnist" / "train.npz").is_file():
        pytest.skip(f"../shared/data absent (looked in {SHARED_DATA}): real-data checks need it")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: torch's intra-op threads only contend (several times slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Run a test in float64, where float32 rounding cannot hide or fake an equivalence."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def executor_device() -> str:
    """Where the executor-equivalence tests train: ``cpu`` (CI), or ``$FEDTRUST_TEST_DEVICE`` (``cuda`` on a
    lent GPU, see benchmarks/device_check.sh) to check the same equivalences on an accelerator."""
    return os.environ.get("FEDTRUST_TEST_DEVICE", "cpu")
