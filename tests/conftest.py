"""Shared fixtures: the real data directory beside the checkout, small digits federations."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip where it is absent."""
    if not (SHARED_DATA / "mnist" / "train.npz").is_file():
        pytest.skip(f"../shared/data absent (looked in {SHARED_DATA}): real-data checks need it")
    return SHARED_DATA
