"""Every preset in configs/ is a valid config (a typo in a preset fails here, not in a user's run)."""

from pathlib import Path

import pytest

from fedtrust.runner.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_validates(path):
    cfg = load_config(path)
    assert cfg.rounds >= 1
