"""Backdoor triggers (robust/triggers.py): exact pixels, FLIP's layouts, poisoning and config errors, each test
naming the wrong implementation it rules out."""

from __future__ import annotations

import pytest
import torch

from fedtrust.errors import ConfigError, DataError
from fedtrust.robust.triggers import (DIGITS_PIECES, FLIP_CIFAR_PIECES, FLIP_MNIST_PIECES, BlendTrigger, DBATrigger,
                                      PixelTrigger, backdoor_test_set, build_trigger, dba_preset, dba_trigger,
                                      poison_batch, poison_fraction)


def images(dtype: torch.dtype, n: int = 3, c: int = 3, h: int = 5, w: int = 7,
           device: str = "cpu") -> torch.Tensor:
    """Pixels in 0..200 (uint8) or 0..0.78 (float): never the stamped value, so every stamped pixel changes."""
    x = torch.randint(0, 201, (n, c, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return (x if dtype == torch.uint8 else x.to(dtype) / 255).to(device)


def pixels(rects) -> set[tuple[int, int]]:
    """The (row, col) pixels of rectangles, written out by hand from (row, col, height, width)."""
    return {(r + i, c + j) for r, c, h, w in rects for i in range(h) for j in range(w)}


def mask_pixels(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in mask.nonzero().tolist()}


# --------------------------------------------------------------------------------------------- pixel triggers


@pytest.mark.parametrize("dtype, value, stamped", [(torch.uint8, 1.0, 255), (torch.uint8, 0.5, 128),
                                                   (torch.float32, 1.0, 1.0), (torch.float64, 0.5, 0.5)])
def test_pixel_stamp_changes_exactly_the_rectangles_in_every_channel(dtype, value, stamped) -> None:
    """A 2×3 rectangle at row 1, col 2 on a 5×7 image: rows 1–2, cols 2–4 of all 3 channels become the value on
    the image's scale, nothing else moves. Rules out swapped row/col or height/width (non-square everything),
    stamping channel 0 only, writing 1.0 into uint8 (no ×255), 127 for 0.5 (truncation), and a dtype change."""
    x = images(dtype)
    out = PixelTrigger(((1, 2, 2, 3),), value).stamp(x)
    expected = x.clone()
    expected[:, :, 1:3, 2:5] = stamped
    assert out.dtype == dtype and torch.equal(out, expected)


def test_pixel_stamp_leaves_the_input_untouched_and_the_mask_is_the_union_of_rectangles() -> None:
    """Rules out stamping in place, and a mask that keeps only the last rectangle."""
    x = images(torch.uint8)
    before = x.clone()
    trigger = PixelTrigger([(0, 0, 1, 2), (3, 5, 2, 2)])
    trigger.stamp(x)
    assert torch.equal(x, before)
    m = trigger.mask(5, 7)
    assert m.dtype == torch.bool and m.shape == (5, 7)
    assert mask_pixels(m) == {(0, 0), (0, 1), (3, 5), (3, 6), (4, 5), (4, 6)}


def test_pixel_trigger_outside_the_image_is_a_config_error() -> None:
    """Rows 4..5 on a 5-row image: silently clipping the rectangle would stamp a smaller trigger than configured."""
    with pytest.raises(ConfigError, match="'rects'.*outside the 5×7 image"):
        PixelTrigger(((4, 0, 2, 1),)).stamp(images(torch.float32))


def test_stamp_rejects_integer_images_other_than_uint8() -> None:
    """int64 pixels have no defined [0, 1] scale: writing 1 or 255 would be a guess."""
    with pytest.raises(DataError, match="uint8 or floating"):
        PixelTrigger(((0, 0, 1, 1),)).stamp(torch.zeros(1, 1, 2, 2, dtype=torch.int64))


# --------------------------------------------------------------------------------------------- DBA


def test_flip_presets_match_the_spec_coordinates() -> None:
    """Spec flip.md §1, written as pixel sets: MNIST/FMNIST 1×4 pieces at rows 0 and 3, cols 0–3 and 6–9; CIFAR 1×6
    at rows 0 and 4, cols 0–5 and 9–14. Rules out an off-by-one in a start column or a row/col swap."""
    mnist = [{(r, c) for c in cols} for r in (0, 3) for cols in (range(0, 4), range(6, 10))]
    cifar = [{(r, c) for c in cols} for r in (0, 4) for cols in (range(0, 6), range(9, 15))]
    assert [pixels([p]) for p in FLIP_MNIST_PIECES] == mnist
    assert [pixels([p]) for p in FLIP_CIFAR_PIECES] == cifar
    assert [mask_pixels(dba_preset(28, 28).piece(i).mask(28, 28)) for i in range(4)] == mnist
    assert [mask_pixels(dba_preset(32, 32).piece(i).mask(32, 32)) for i in range(4)] == cifar


def test_the_grid_constructor_reproduces_every_preset() -> None:
    """Rules out a constructor whose row stride ignores the gap or whose pieces go column-major."""
    assert dba_trigger(4, 1, 4, gap=2).pieces == FLIP_MNIST_PIECES
    assert dba_trigger(4, 1, 6, gap=3).pieces == FLIP_CIFAR_PIECES
    assert dba_trigger(4, 1, 2, gap=1, per_row=1).pieces == DIGITS_PIECES
    assert dba_trigger(3, 2, 1, gap=0, per_row=2, origin=(1, 1)).pieces == ((1, 1, 2, 1), (1, 2, 2, 1), (3, 1, 2, 1))


@pytest.mark.parametrize("size", [8, 28, 32])
def test_dba_pieces_are_disjoint_and_their_union_is_the_full_trigger(size) -> None:
    """Rules out overlapping pieces (piece masks summing to more than the union) and a union missing a piece."""
    dba = dba_preset(size, size)
    masks = torch.stack([dba.piece(i).mask(size, size) for i in range(len(dba))])
    full = dba.union().mask(size, size)
    assert len(dba) == 4 and int(masks.sum(dim=0).max()) == 1
    assert torch.equal(masks.any(dim=0), full)
    assert int(full.sum()) == int(masks.sum())


def test_piece_i_is_attacker_i_modulo_the_number_of_pieces() -> None:
    """Attacker 5 of 4 pieces stamps piece 1; rules out clamping to the last piece and index errors."""
    dba = DBATrigger(FLIP_MNIST_PIECES, value=0.5)
    assert dba.piece(5) == PixelTrigger((FLIP_MNIST_PIECES[1],), 0.5)
    assert dba.piece(3).rects == (FLIP_MNIST_PIECES[3],) and dba.union().rects == FLIP_MNIST_PIECES


def test_overlapping_dba_pieces_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'pieces'.*overlap"):
        DBATrigger(((0, 0, 1, 4), (0, 3, 1, 2)))


def test_digits_pieces_sit_on_the_background_of_real_digits() -> None:
    """GUESS check (DIGITS_PIECES): on scikit-learn's 8×8 digits each piece raises its pixels by > 0.8 on average,
    so each attacker's piece alone is a visible trigger. Rules out the 2×2 corner grid (rows 0, 2; cols 0–1, 3–4),
    whose piece at row 0, cols 3–4 lies on ink (+0.26)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    x = torch.from_numpy(sklearn.load_digits().images / 16.0).float()[:, None]  # (N, 1, 8, 8) in [0, 1]
    dba = dba_preset(8, 8)
    for i in range(len(dba)):
        piece = dba.piece(i)
        m = piece.mask(8, 8)
        change = (piece.stamp(x) - x)[:, 0, m].mean()
        assert change > 0.8, (i, piece.rects, float(change))
    assert int(dba.union().mask(8, 8).sum()) == 8  # HW/8, FLIP's inversion bound (spec §6)


# --------------------------------------------------------------------------------------------- blend


def test_blend_is_one_minus_alpha_x_plus_alpha_pattern_on_a_hand_built_case() -> None:
    """α = 0.25, x = [[0, .5], [1, .25]], k = [[1, 0], [.5, 1]]: 0.75x + 0.25k = [[.25, .375], [.875, .4375]]
    (exact in binary). A one-channel pattern is shared by both channels. Rules out α on x instead of k."""
    x = torch.tensor([[0.0, 0.5], [1.0, 0.25]]).expand(1, 2, 2, 2).clone()
    k = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    out = BlendTrigger(k, alpha=0.25).stamp(x)
    assert torch.equal(out, torch.tensor([[0.25, 0.375], [0.875, 0.4375]]).expand(1, 2, 2, 2))


def test_blend_on_uint8_uses_the_255_scale_and_rounds_half_up() -> None:
    """x = [[0, 100], [255, 40]], k as above, α = 0.25: 63.75 → 64, 75, 223.125 → 223, 93.75 → 94. Rules out k
    left on [0, 1] (0.25 → 0) and truncation (63, 93)."""
    x = torch.tensor([[[[0, 100], [255, 40]]]], dtype=torch.uint8)
    out = BlendTrigger(torch.tensor([[[1.0, 0.0], [0.5, 1.0]]]), alpha=0.25).stamp(x)
    assert out.dtype == torch.uint8 and out.tolist() == [[[[64, 75], [223, 94]]]]


def test_blend_random_pattern_is_seeded_and_alpha_one_is_the_pattern() -> None:
    """Same seed → same pattern whatever the global RNG; α = 1 returns the pattern itself. Rules out torch.rand
    without the generator."""
    a = BlendTrigger.random((3, 4, 4), seed=7)
    torch.manual_seed(123)
    b = BlendTrigger.random((3, 4, 4), seed=7)
    assert torch.equal(a.pattern, b.pattern) and not torch.equal(a.pattern, BlendTrigger.random((3, 4, 4)).pattern)
    assert a.alpha == 0.2 and float(a.pattern.min()) >= 0 and float(a.pattern.max()) <= 1
    assert torch.equal(a.with_alpha(1.0).stamp(images(torch.float32, c=3, h=4, w=4)), a.pattern.expand(3, 3, 4, 4))


# --------------------------------------------------------------------------------------------- poisoning


def test_poison_batch_stamps_and_relabels_exactly_the_first_count() -> None:
    """Rules out poisoning the last count, a random subset or count + 1, and writing into the caller's tensors."""
    x, y = images(torch.uint8, n=5), torch.tensor([0, 1, 3, 4, 5])
    x0, y0 = x.clone(), y.clone()
    trigger = PixelTrigger(((0, 0, 1, 1),))
    px, py = poison_batch(x, y, trigger, target=2, count=2)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.equal(px[:2], trigger.stamp(x[:2])) and torch.equal(px[2:], x[2:])
    assert py.tolist() == [2, 2, 3, 4, 5] and py.dtype == y.dtype
    all_x, all_y = poison_batch(x, y, trigger, target=2, count=9)  # a short last batch: everything
    assert torch.equal(all_x, trigger.stamp(x)) and all_y.tolist() == [2] * 5
    none_x, none_y = poison_batch(x, y, trigger, target=2, count=0)
    assert torch.equal(none_x, x) and torch.equal(none_y, y)


def test_poison_batch_refuses_a_whole_dba_trigger() -> None:
    """An attacker must stamp its own piece: silently stamping the union would be the centralised attack."""
    with pytest.raises(ConfigError, match="piece"):
        poison_batch(images(torch.uint8), torch.zeros(3, dtype=torch.long), dba_preset(28, 28), 2, 1)


def test_poison_fraction_rounds_half_up_within_the_batch() -> None:
    """FLIP's 20 of 64 and 5 of 64 (spec §1); 10 × 0.25 = 2.5 → 3 rules out Python's round (to even, 2) and
    truncation."""
    assert poison_fraction(64, 20 / 64) == 20 and poison_fraction(64, 5 / 64) == 5
    assert poison_fraction(10, 0.25) == 3 and poison_fraction(10, 0.0) == 0 and poison_fraction(10, 1.0) == 10
    assert poison_fraction(0, 0.5) == 0
    with pytest.raises(ConfigError, match="'fraction'"):
        poison_fraction(10, 1.5)


def test_backdoor_test_set_drops_the_target_class_and_stamps_the_full_trigger() -> None:
    """Labels [2, 0, 2, 7] with target 2 keep images 1 and 3, in order, stamped with the union of a DBA trigger
    and labelled 2. Rules out keeping target images (inflating the ASR), stamping one piece, and source labels."""
    dba = dba_preset(8, 8)
    x, y = images(torch.uint8, n=4, c=1, h=8, w=8), torch.tensor([2, 0, 2, 7])
    bx, by = backdoor_test_set(x, y, dba, target=2)
    assert torch.equal(bx, dba.union().stamp(x[[1, 3]])) and by.tolist() == [2, 2]
    px, _ = backdoor_test_set(x, y, dba.union(), target=2)
    assert torch.equal(px, bx)


# --------------------------------------------------------------------------------------------- config


def test_build_trigger_kinds() -> None:
    """dba picks the preset by image size; explicit pieces override it; blend draws a seeded pattern of the
    image's shape. Rules out a preset keyed on the wrong axis and ignored params."""
    assert build_trigger("pixel", (1, 8, 8), rects=[[0, 0, 2, 2]], value=0.5) == PixelTrigger(((0, 0, 2, 2),), 0.5)
    assert build_trigger("dba", (1, 8, 8)).pieces == DIGITS_PIECES
    assert build_trigger("dba", (1, 28, 28)).pieces == FLIP_MNIST_PIECES
    assert build_trigger("dba", (3, 32, 32)).pieces == FLIP_CIFAR_PIECES
    assert build_trigger("dba", (1, 8, 8), pieces=[[7, 0, 1, 3]]).pieces == ((7, 0, 1, 3),)
    blend = build_trigger("blend", (3, 4, 5), alpha=0.1, seed=3)
    assert isinstance(blend, BlendTrigger) and blend.alpha == 0.1 and blend.pattern.shape == (3, 4, 5)
    assert torch.equal(blend.pattern, BlendTrigger.random((3, 4, 5), seed=3).pattern)
    given = build_trigger("blend", (1, 2, 2), pattern=[[0.0, 1.0], [0.5, 0.25]])
    assert given.alpha == 0.2 and given.pattern.tolist() == [[0.0, 1.0], [0.5, 0.25]]


@pytest.mark.parametrize("kind, shape, params, key", [
    ("pixel", (1, 8, 8), {"rects": [[6, 6, 3, 1]]}, "'rects'.*outside the 8×8"),
    ("pixel", (1, 8, 8), {"rects": [[0, 0, 0, 1]]}, "'rects'.*height >= 1"),
    ("pixel", (1, 8, 8), {}, "'rects'.*required"),
    ("pixel", (1, 8, 8), {"rects": [[0, 0, 1, 1]], "value": 255}, "'value'.*\\[0, 1\\]"),
    ("pixel", (1, 8, 8), {"rects": [[0, 0, 1, 1]], "value": -0.1}, "'value'"),
    ("pixel", (1, 8, 8), {"rects": [[0, 0, 1, 1]], "colour": 1}, "'colour'.*valid: rects, value"),
    ("dba", (1, 28, 28), {"pieces": [[0, 26, 1, 4]]}, "'pieces'.*outside the 28×28"),
    ("dba", (1, 30, 30), {}, "'pieces'.*no DBA preset for 30×30"),
    ("dba", (1, 28, 28), {"value": 2.0}, "'value'"),
    ("blend", (1, 8, 8), {"alpha": 0.0}, "'alpha'.*\\(0, 1\\]"),
    ("blend", (1, 8, 8), {"alpha": 1.5}, "'alpha'"),
    ("blend", (1, 8, 8), {"pattern": [[2.0]]}, "'pattern'"),
    ("blend", (1, 8, 8), {"pattern": [[0.5, 0.5]]}, "'pattern'.*does not fit"),
    ("blend", (1, 8, 8), {"seed": "x"}, "'seed'"),
    ("trojan", (1, 8, 8), {}, "'kind'.*valid: pixel, dba, blend"),
])
def test_bad_trigger_config_is_a_one_line_config_error_naming_the_key(kind, shape, params, key) -> None:
    """Rules out a bare ValueError/IndexError, a silently clipped rectangle, and a value on the 0..255 scale."""
    with pytest.raises(ConfigError, match=key) as info:
        build_trigger(kind, shape, **params)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- device


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_triggers_run_on_the_test_device_and_match_the_cpu(executor_device, dtype) -> None:
    """Everything stays on the batch's device and gives the CPU's answer. Rules out a mask or pattern left on
    the CPU (a device mismatch on cuda)."""
    x, y = images(dtype, n=4, h=28, w=28, c=1), torch.tensor([2, 0, 1, 2])
    xd, yd = x.to(executor_device), y.to(executor_device)
    dba, blend = dba_preset(28, 28), BlendTrigger.random((1, 28, 28), seed=1)
    for trigger in (dba.piece(1), dba.union(), blend):
        out = trigger.stamp(xd)
        assert out.device == xd.device and torch.equal(out.cpu(), trigger.stamp(x))
    px, py = poison_batch(xd, yd, dba.piece(0), target=2, count=3)
    cx, cy = poison_batch(x, y, dba.piece(0), target=2, count=3)
    assert px.device == xd.device and torch.equal(px.cpu(), cx) and torch.equal(py.cpu(), cy)
    bx, by = backdoor_test_set(xd, yd, dba, target=2)
    assert bx.device == xd.device and by.tolist() == [2, 2]
    assert torch.equal(bx.cpu(), backdoor_test_set(x, y, dba, 2)[0])
