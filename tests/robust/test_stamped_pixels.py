"""``stamped_pixels``: the pixels a trigger's own ``stamp`` changes (what the report draws as the real trigger)."""

from __future__ import annotations

import pytest
import torch

from fedtrust.errors import ConfigError
from fedtrust.robust.triggers import BlendTrigger, PixelTrigger, dba_preset, stamped_pixels


def test_pixel_trigger_of_any_value_marks_its_rectangles() -> None:
    """Value 1 changes only black images, value 0 only white ones, 0.5 both: each must give the rectangle
    (a check against black images alone would miss the value-0 trigger)."""
    want = torch.zeros(6, 7, dtype=torch.bool)
    want[1:3, 2:6] = True
    for value in (1.0, 0.0, 0.5):
        got = stamped_pixels(PixelTrigger(((1, 2, 2, 4),), value), (3, 6, 7))
        assert got.shape == (6, 7) and torch.equal(got, want), value


def test_dba_union_is_every_piece() -> None:
    got = stamped_pixels(dba_preset(28, 28).union(), (1, 28, 28))
    assert int(got.sum()) == 16 and bool(got[0, 0]) and bool(got[3, 9]) and not bool(got[1, 0])


def test_blend_trigger_moves_every_pixel() -> None:
    assert bool(stamped_pixels(BlendTrigger.random((3, 5, 5), alpha=0.5), (3, 5, 5)).all())


def test_a_dba_trigger_itself_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as excinfo:
        stamped_pixels(dba_preset(8, 8), (1, 8, 8))  # type: ignore[arg-type]
    assert "union" in str(excinfo.value) and "\n" not in str(excinfo.value)
