"""Batched augmentation (data/augment.py) against hand-built crops and flips, and colour jitter and
grayscale against torchvision's definitions (written out here, or the standard library's colorsys).

The vectorised == sequential tests call the same augmentation on both sides, so they cannot
see a wrong crop or flip; these tests compare with an independent per-image reference.
"""

from __future__ import annotations

import colorsys

import pytest
import torch

from fedtrust.data.augment import (GRAYSCALE_P, JITTER_OPS, PRIMITIVES, ColorJitter, adjust_brightness,
                                   adjust_contrast, adjust_hue, adjust_saturation, apply_augment, augment,
                                   color_jitter, draw_augment, draw_color_jitter, luma, normalize, parse_augment,
                                   random_crop)
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


def test_normalize_builds_its_constants_once_and_they_serve_a_later_backward(monkeypatch):
    """Rules out a host-to-device copy on every call (a tensor from Python numbers: on a GPU it waits for the
    device, and a CUDA graph cannot record it) and a constant first made under inference mode that a later
    training step could not save for backward."""
    import fedtrust.data.augment as aug

    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    aug._channel_constants.cache_clear()
    made = []
    real = torch.tensor
    monkeypatch.setattr(aug.torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    with torch.inference_mode():
        first = normalize(x, mean=[0.5, 0.2], std=[0.5, 0.1])
    xf = x.to(torch.get_default_dtype()).requires_grad_(True)  # as FLIP's stamped images: ÷ std saves std
    out = normalize(xf, mean=(0.5, 0.2), std=(0.5, 0.1))  # a list or a tuple: the same constants
    out.sum().backward()
    assert len(made) == 2 and torch.equal(out.detach(), first)
    assert xf.grad.flatten().tolist() == pytest.approx([1 / 127.5] * 2 + [1 / 25.5] * 2)  # d/dx of x/255/std
    normalize(x, mean=[0.5, 0.2], std=[0.25, 0.1])
    assert len(made) == 4  # other constants: made once more


# ------------------------------------------------------------------ pipelines


def test_pipeline_names_parse_in_canonical_order_and_bad_ones_are_one_line_errors():
    """Rules out dropping the old names, accepting a primitive twice or out of order (``flip+crop`` would
    still crop first, so the name would lie), and an unknown primitive without the valid list."""
    assert parse_augment("none") == ()
    assert parse_augment("crop_flip") == parse_augment("crop+flip") == ("crop", "flip")
    assert parse_augment("flip") == ("flip",) and parse_augment("crop") == ("crop",)
    assert parse_augment("crop+flip+color_jitter+grayscale") == PRIMITIVES
    assert parse_augment("color_jitter") == ("color_jitter",)
    for bad, match in [("crop+rotate", "unknown augmentation primitive 'rotate' in 'crop\\+rotate'; valid: .*"
                                       "crop, flip, color_jitter, grayscale"),
                       ("flip+crop", "in the order crop\\+flip\\+color_jitter\\+grayscale"),
                       ("crop+crop", "each primitive at most once"),
                       ("none+crop", "unknown augmentation primitive 'none'"),
                       ("crop+", "unknown augmentation primitive ''")]:
        with pytest.raises(ConfigError, match=match) as e:
            parse_augment(bad)
        assert "\n" not in str(e.value)


def test_old_names_draw_exactly_as_before_and_a_pipeline_draws_its_colours_after_them():
    """Rules out a pipeline that changes the old draws (bit-identical runs need crop's dy, dx, then flip,
    nothing else) or draws its colour parameters before the crop and flip (which shifts them)."""
    g = torch.Generator().manual_seed(5)
    expect = {"dy": torch.randint(0, 9, (50,), generator=g), "dx": torch.randint(0, 9, (50,), generator=g),
              "flip": torch.rand(50, generator=g) < 0.5}
    for kind in ("crop_flip", "crop+flip"):
        d = draw_augment(kind, 50, 32, torch.Generator().manual_seed(5))
        assert d.keys() == expect.keys() and all(torch.equal(d[k], expect[k]) for k in expect)
    full = draw_augment("crop+flip+color_jitter+grayscale", 50, 32, torch.Generator().manual_seed(5))
    assert all(torch.equal(full[k], expect[k]) for k in expect)
    assert set(full) == set(expect) | {"jitter", "jitter_order", *JITTER_OPS, "gray"}
    assert all(len(v) == 50 for v in full.values())


# ------------------------------------------------------------------ colour


def rgb(n: int = 6, h: int = 5, w: int = 7, lo: int = 0, hi: int = 256, seed: int = 0) -> torch.Tensor:
    """Random uint8 RGB images with pixel values in [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 3, h, w), generator=g).to(torch.uint8)


def jitter_draw(n: int, seed: int = 0, **fixed: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """A real colour-jitter draw for ``n`` images, with some entries replaced (a float fills every image)."""
    d = draw_color_jitter(n, torch.Generator().manual_seed(seed))
    for k, v in fixed.items():
        d[k] = v if isinstance(v, torch.Tensor) else torch.full((n,), v)
    return d


def test_grayscale_fraction_is_p_and_grey_images_hold_the_luma_in_three_equal_channels():
    """Rules out a wrong probability (e.g. 1 − p), weights other than ITU-R 601-2 (an unweighted mean,
    torchvision's 0.2989 is within 1e-4·255 but BT.709's 0.2126/0.7152/0.0722 is not), one grey channel
    instead of three, and touching the images not drawn."""
    n = 20000
    gray = draw_augment("grayscale", n, 8, torch.Generator().manual_seed(1))["gray"]
    # binomial: sd = sqrt(p(1-p)/n) = 0.0028; 5 sd = 0.014
    assert abs(gray.float().mean().item() - GRAYSCALE_P) < 5 * (0.2 * 0.8 / n) ** 0.5
    x = rgb(n=8)
    mask = torch.tensor([True, False, True, False, False, True, False, True])
    out = apply_augment(x, "grayscale", {"gray": mask})
    assert out.shape == x.shape and out.is_floating_point()
    r, g, b = x.double().unbind(1)
    luma_ref = 0.299 * r + 0.587 * g + 0.114 * b
    for i in range(8):
        if mask[i]:
            assert all(torch.allclose(out[i, ch].double(), luma_ref[i], atol=1e-3) for ch in range(3)), i
        else:
            assert torch.equal(out[i], x[i].to(out.dtype)), i


def test_brightness_alone_scales_each_image_by_its_own_drawn_factor():
    """Rules out factors outside [0.6, 1.4] (e.g. [0, 1.4] or [−0.4, 0.4]), a factor applied to another
    image (a permuted or batch-wide draw), jitter applied to images whose p-coin said no, and p ≠ 0.8."""
    n = 400
    big = draw_color_jitter(20000, torch.Generator().manual_seed(0))
    assert 0.6 <= big["brightness"].min() < 0.61 and 1.39 < big["brightness"].max() <= 1.4
    assert abs(big["jitter"].float().mean().item() - 0.8) < 5 * (0.8 * 0.2 / 20000) ** 0.5
    assert -0.1 <= big["hue"].min() < -0.099 and 0.099 < big["hue"].max() <= 0.1
    x = rgb(n=n, lo=20, hi=180)  # 179 · 1.4 < 255: no clamping
    d = jitter_draw(n, contrast=1.0, saturation=1.0, hue=0.0)
    out = apply_augment(x, "color_jitter", d)
    ratio = (out.double() / x.double()).flatten(1)
    recovered = ratio.mean(1)
    assert torch.allclose(ratio, recovered[:, None].expand_as(ratio), atol=1e-5)  # one factor per image
    expect = torch.where(d["jitter"], d["brightness"].double(), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(recovered, expect, atol=1e-5)
    assert ((recovered >= 0.6 - 1e-5) & (recovered <= 1.4 + 1e-5)).all()
    assert torch.equal(out[~d["jitter"]], x[~d["jitter"]].to(out.dtype))


def test_contrast_keeps_each_images_grey_mean_and_factor_zero_is_that_mean_everywhere():
    """Rules out blending with the plain mean of the three channels (the grey mean moves when channel means
    differ, as here), with a per-channel mean (factor 0 would leave coloured, unequal channels) or with one
    mean over the whole batch."""
    x = rgb(n=5, lo=100, hi=157).double()  # |x - mean| <= 56, 56 · 1.4 + 156 < 255: no clamping
    x[:, 0] += torch.arange(5).view(5, 1, 1) * 10 - 40  # unequal channel means, different per image
    x[:, 2] -= 20
    grey_mean = luma(x).mean(dim=(1, 2, 3))
    for f in (0.6, 1.4, torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4]).view(5, 1, 1, 1).double()):
        out = adjust_contrast(x, f)
        assert torch.allclose(luma(out).mean(dim=(1, 2, 3)), grey_mean, atol=1e-9)
    flat = adjust_contrast(x, 0.0)
    assert torch.allclose(flat, grey_mean.view(5, 1, 1, 1).expand_as(x), atol=1e-9)


def test_saturation_one_and_hue_zero_are_identities_saturation_zero_is_grey():
    """Rules out a saturation blend with the wrong partner (factor 0 must give the grey image) and a hue
    rotation whose RGB→HSV→RGB round trip loses the colour."""
    x = rgb(n=4).double()
    assert torch.equal(adjust_saturation(x, 1.0), x)
    assert torch.allclose(adjust_saturation(x, 0.0), luma(x).expand_as(x), atol=1e-9)
    assert torch.allclose(adjust_hue(x, 0.0), x, atol=1e-9)
    assert torch.allclose(adjust_hue(x, torch.zeros(4, 1, 1, 1, dtype=torch.float64)), x, atol=1e-9)


def test_hue_rotates_in_hsv_like_colorsys():
    """Against the standard library's independent HSV conversion, pixel by pixel: rules out a shift in
    degrees or radians instead of a fraction of the circle, a sign flip, and a wrong sector table.
    Red moved by 1/3 of the circle is green, by −1/3 blue."""
    x = rgb(n=3, h=4, w=4).double()
    x[0, :, 0, 0] = torch.tensor([255.0, 0, 0])
    x[0, :, 0, 1] = torch.tensor([70.0, 70, 70])  # grey: hue undefined, must stay grey
    x[0, :, 0, 2] = 0.0  # black
    shift = torch.tensor([1 / 3, -1 / 3, 0.45], dtype=torch.float64)
    out = adjust_hue(x, shift.view(3, 1, 1, 1))
    for i in range(3):
        for a in range(4):
            for b in range(4):
                h, s, v = colorsys.rgb_to_hsv(*(x[i, :, a, b] / 255).tolist())
                ref = torch.tensor(colorsys.hsv_to_rgb((h + shift[i].item()) % 1.0, s, v), dtype=torch.float64)
                assert torch.allclose(out[i, :, a, b] / 255, ref, atol=1e-9), (i, a, b)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 255, 0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(out[1:2, :, :1, :1], adjust_hue(x[1:2, :, :1, :1], -1 / 3), atol=1e-9)


def test_each_image_takes_the_four_operations_in_its_own_drawn_order():
    """Against a per-image composition of the adjust_* functions in the order ``jitter_order[i]`` names:
    rules out a fixed order, the inverse permutation (position of op k instead of op at stage s), and a
    batch-wide order. The fixed-order result differs here, so the test can tell."""
    n = 64
    x = rgb(n=n, h=4, w=4, seed=3).double()
    d = jitter_draw(n, seed=3, jitter=True)
    out = color_jitter(x, d)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    fixed_differs = 0
    for i in range(n):
        ref, fixed = x[i:i + 1], x[i:i + 1]
        for k in d["jitter_order"][i].tolist():
            ref = ops[k](ref, d[JITTER_OPS[k]][i].item())
        for k in range(4):
            fixed = ops[k](fixed, d[JITTER_OPS[k]][i].item())
        assert torch.allclose(out[i:i + 1], ref, atol=1e-7), i
        fixed_differs += not torch.allclose(fixed, ref, atol=1e-3)
    assert fixed_differs > n // 4
    assert sorted(d["jitter_order"][0].tolist()) == [0, 1, 2, 3]
    assert len({tuple(o) for o in d["jitter_order"].tolist()}) > 12  # many of the 24 orders occur


def test_a_batch_equals_its_images_one_by_one():
    """Rules out any statistic (contrast mean, luma) or draw taken across the batch instead of per image."""
    kind = "crop+flip+color_jitter+grayscale"
    x = rgb(n=12, h=8, w=8, seed=4)
    d = draw_augment(kind, 12, 8, torch.Generator().manual_seed(4))
    out = apply_augment(x, kind, d)
    for i in range(12):
        alone = apply_augment(x[i:i + 1], kind, {k: v[i:i + 1] for k, v in d.items()})
        assert torch.allclose(out[i:i + 1], alone, atol=1e-4), i


def test_same_seed_same_output_and_uint8_comes_back_float_on_the_pixel_scale():
    """Rules out unseeded colour draws, and colour output on [0, 1] (``normalize`` divides by 255 again)."""
    kind = "crop+flip+color_jitter+grayscale"
    x = rgb(n=16, h=8, w=8)
    a = augment(x, kind, torch.Generator().manual_seed(7))
    assert torch.equal(a, augment(x, kind, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, augment(x, kind, torch.Generator().manual_seed(8)))
    assert a.dtype == torch.get_default_dtype() and a.max() > 100 and a.min() >= 0 and a.max() <= 255
    untouched = jitter_draw(16, jitter=False)
    out = color_jitter(x, untouched)
    assert torch.equal(normalize(out, [0.5] * 3, [0.25] * 3), normalize(x, [0.5] * 3, [0.25] * 3))


def test_one_channel_saturation_and_hue_are_no_ops_and_grayscale_the_identity():
    """Rules out colour operations that break on (or change) 1-channel digits-like images, while
    brightness and contrast still act on them."""
    x = torch.randint(20, 180, (6, 1, 5, 5), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    assert apply_augment(x, "grayscale", {"gray": torch.ones(6, dtype=torch.bool)}) is x
    assert torch.equal(adjust_saturation(x, 0.0), x.double().to(torch.get_default_dtype()))
    assert torch.equal(adjust_hue(x, 0.3), x.to(torch.get_default_dtype()))
    d = jitter_draw(6, jitter=True, brightness=1.0, contrast=1.0, saturation=0.0, hue=0.4)
    assert torch.equal(color_jitter(x, d), x.to(torch.get_default_dtype()))
    d = jitter_draw(6, jitter=True, brightness=1.3, contrast=1.0, saturation=1.0, hue=0.0)
    assert torch.allclose(color_jitter(x, d), x.to(torch.get_default_dtype()) * 1.3, atol=1e-4)


def test_bad_jitter_values_and_channel_counts_are_one_line_config_errors():
    """Rules out silently accepting a negative strength, a hue beyond half the circle, p outside [0, 1]
    or colour on 2- or 4-channel images."""
    for kwargs, match in [({"brightness": -0.1}, "brightness must be >= 0"), ({"hue": 0.6}, "hue must lie in"),
                          ({"p": 1.5}, "p must lie in"), ({"saturation": float("nan")}, "saturation must be")]:
        with pytest.raises(ConfigError, match=match):
            ColorJitter(**kwargs)
    with pytest.raises(ConfigError, match="1 or 3 channels, got 4"):
        apply_augment(torch.zeros(2, 4, 8, 8), "grayscale", {"gray": torch.ones(2, dtype=torch.bool)})


def test_colour_pipeline_on_the_test_device_equals_cpu(executor_device):
    """Runs where ``$FEDTRUST_TEST_DEVICE`` points (default cpu): rules out CPU-only draws or ops (a draw
    left on the CPU against a CUDA batch) and device-dependent results."""
    kind = "crop+flip+color_jitter+grayscale"
    x = rgb(n=32, h=8, w=8)
    d = draw_augment(kind, 32, 8, torch.Generator().manual_seed(2))
    on_device = apply_augment(x.to(executor_device), kind, d)
    assert on_device.device.type == torch.device(executor_device).type
    assert torch.allclose(on_device.cpu(), apply_augment(x, kind, d), atol=1e-3)
