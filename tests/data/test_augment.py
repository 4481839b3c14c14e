"""Batched augmentation (data/augment.py) against hand-built crops and flips.

The vectorised == sequential tests call the same augmentation on both sides, so they cannot
see a wrong crop or flip; these tests compare with an independent per-image reference.
"""

from __future__ import annotations

import pytest
import torch

from fedtrust.data.augment import apply_augment, augment, draw_augment, normalize, random_crop
from fedtrust.errors import ConfigError


def numbered(n: int = 3, c: int = 2, h: int = 5, w: int = 6) -> torch.Tensor:
    """Images whose every pixel is distinct (1-based, so zero padding is recognisable)."""
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(n, c, h, w)


def crop_by_hand(img: torch.Tensor, padding: int, dy: int, dx: int) -> torch.Tensor:
    """Reference: zero-pad one (C, H, W) image, then slice rows dy.. and columns dx.. back to H × W."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding)
    padded[:, padding:padding + h, padding:padding + w] = img
    return padded[:, dy:dy + h, dx:dx + w]


def test_random_crop_shifts_rows_by_dy_and_columns_by_dx():
    """Rules out swapped offsets (dy applied to columns, dx to rows) and an off-by-padding shift:
    the images are not square and every (dy, dx) pair is asymmetric, so a swap moves other pixels."""
    x = numbered()
    dy = torch.tensor([0, 2, 1])
    dx = torch.tensor([2, 0, 1])
    out = random_crop(x, 1, dy, dx)
    for i in range(3):
        assert torch.equal(out[i], crop_by_hand(x[i], 1, int(dy[i]), int(dx[i]))), i
    # (dy, dx) = (0, 2): a row of padding on top, the image moved one column to the left
    assert torch.equal(out[0, 0, 0], torch.zeros(6))
    assert torch.equal(out[0, 0, 1, :5], x[0, 0, 0, 1:])


def test_centre_offset_is_the_identity():
    """Rules out an offset convention other than "padding = no shift" (e.g. offsets centred at 0)."""
    x = numbered()
    centre = torch.full((3,), 2)
    assert torch.equal(random_crop(x, 2, centre, centre), x)


def test_flip_mirrors_columns_only_for_the_drawn_images():
    """Rules out a vertical flip (rows mirrored), flipping every image, or flipping the undrawn ones."""
    x = numbered(n=4)
    draw = {"flip": torch.tensor([True, False, True, False])}
    out = apply_augment(x, "flip", draw)
    for i in range(4):
        expect = x[i].flip(-1) if draw["flip"][i] else x[i]  # torch.flip(-1): columns, i.e. horizontal
        assert torch.equal(out[i], expect), i
    assert torch.equal(out[0, 0, 0], x[0, 0, 0].flip(0))  # the first row read right to left
    assert torch.equal(out[0, 0, :, 0], x[0, 0, :, -1])  # first column is the last one, rows in place


def test_crop_flip_crops_then_flips_the_cropped_image():
    """Rules out flipping before cropping (which mirrors the crop offset dx)."""
    x = numbered(n=2, h=8, w=8)
    draw = {"dy": torch.tensor([0, 2]), "dx": torch.tensor([2, 0]), "flip": torch.tensor([True, True])}
    out = apply_augment(x, "crop_flip", draw)
    for i in range(2):
        expect = crop_by_hand(x[i], 1, int(draw["dy"][i]), int(draw["dx"][i])).flip(-1)
        assert torch.equal(out[i], expect), i


def test_uint8_batches_stay_uint8_with_zero_padding():
    """Rules out a crop that casts to float or pads with a non-zero value (black borders are 0)."""
    x = (numbered(n=2, c=1, h=8, w=8) % 250 + 1).to(torch.uint8)
    out = random_crop(x, 1, torch.tensor([0, 2]), torch.tensor([0, 2]))
    assert out.dtype == torch.uint8
    assert (out[0, 0, 0] == 0).all() and (out[0, 0, :, 0] == 0).all()  # top-left shift: zero border top and left
    assert (out[1, 0, -1] == 0).all() and (out[1, 0, :, -1] == 0).all()


def test_draws_cover_every_offset_and_both_flips_with_their_generator():
    """Rules out offsets drawn from a too-narrow range (no full 2p+1 span), a flip probability far from
    1/2, and draws that ignore the generator (the same seed must give the same draw)."""
    g = torch.Generator().manual_seed(0)
    d = draw_augment("crop_flip", 4000, 32, g)  # padding 4 for 32 px: offsets 0..8
    assert set(d["dy"].tolist()) == set(range(9)) == set(d["dx"].tolist())
    assert 0.45 < d["flip"].float().mean().item() < 0.55
    again = draw_augment("crop_flip", 4000, 32, torch.Generator().manual_seed(0))
    assert all(torch.equal(d[k], again[k]) for k in d)
    assert set(draw_augment("flip", 3, 8, g)) == {"flip"} and set(draw_augment("crop", 3, 8, g)) == {"dy", "dx"}
    assert draw_augment("crop", 1000, 8, g)["dy"].max().item() == 2  # padding 1 for 8 px: offsets 0..2


def test_augment_none_is_the_identity_and_unknown_kind_is_a_config_error():
    """Rules out 'none' still drawing (and applying) random parameters, and silent unknown kinds."""
    x = numbered()
    assert augment(x, "none", torch.Generator()) is x
    with pytest.raises(ConfigError, match="unknown augmentation 'rotate'"):
        augment(x, "rotate", torch.Generator())


def test_normalize_scales_to_unit_range_then_standardises_each_channel():
    """Rules out a missing /255 or one mean/std for every channel."""
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    out = normalize(x, mean=[0.5, 0.2], std=[0.5, 0.1])
    expect = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]])
    assert torch.allclose(out, expect, atol=1e-6)
