"""L∞ PGD (fedtrust.adversarial.pgd): ascent, the ε-ball and [0, 1] box in pixel space, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtrust.adversarial import PixelScale, default_step_size, pgd
from fedtrust.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 8 / 255


def _test_batch(digits, norm, n: int = 128) -> tuple[Tensor, Tensor]:
    return norm(digits.test.x[:n]), digits.test.y[:n]


def test_default_step_size_is_advertorchs() -> None:
    # min(1.25·8/255, 8/255 + 4/255) / 7 = (10/255)/7; at ε = 16/255 the other branch: (20/255)/7
    assert default_step_size(8 / 255, 7) == pytest.approx(10 / 255 / 7)
    assert default_step_size(16 / 255, 7) == pytest.approx(20 / 255 / 7)


def test_pgd_raises_the_loss_and_stays_in_the_pixel_eps_ball_and_box(bn_cnn, digits, norm) -> None:
    """Rules out descending instead of ascending, a missing ε projection (α = 3ε would leave the ball)
    and a missing [0, 1] clip."""
    x, y = _test_batch(digits, norm)
    scale = PixelScale.from_normalize(norm, 1)
    g = torch.Generator().manual_seed(0)
    x_adv = pgd(bn_cnn, x, y, eps=EPS, steps=5, step_size=3 * EPS, normalizer=norm, generator=g)
    with torch.no_grad():
        clean, adv = F.cross_entropy(bn_cnn(x), y), F.cross_entropy(bn_cnn(x_adv), y)
        acc_clean = (bn_cnn(x).argmax(1) == y).float().mean()
    assert acc_clean > 0.6, "the model must be trained for the attack to mean something"
    assert adv > clean + 0.1
    p, p_adv = scale.to_pixels(x), scale.to_pixels(x_adv)
    assert (p_adv - p).abs().max() <= EPS + 1e-6
    assert p_adv.min() >= -1e-6 and p_adv.max() <= 1 + 1e-6
    assert not x_adv.requires_grad


def test_eps_is_in_pixel_units_not_input_units(bn_cnn, digits, norm) -> None:
    """One signed step of α = ε moves unclipped pixels by exactly ε: rules out ε applied to the normalised
    inputs (std 0.376 would shrink the pixel change to 0.376·ε)."""
    x, y = _test_batch(digits, norm)
    scale = PixelScale.from_normalize(norm, 1)
    x_adv = pgd(bn_cnn, x, y, eps=EPS, steps=1, step_size=EPS, random_start=False, normalizer=norm)
    moved = (scale.to_pixels(x_adv) - scale.to_pixels(x)).abs()
    assert moved.max() == pytest.approx(EPS, abs=1e-6)


def test_zero_steps_without_random_start_returns_x(bn_cnn, digits, norm) -> None:
    x, y = _test_batch(digits, norm, 16)
    assert torch.equal(pgd(bn_cnn, x, y, steps=0, random_start=False, normalizer=norm), x)
    # a random start alone moves the pixels (within ε)
    moved = pgd(bn_cnn, x, y, steps=0, normalizer=norm, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(moved, x)


def test_same_generator_same_result(bn_cnn, digits, norm) -> None:
    x, y = _test_batch(digits, norm, 32)
    a = pgd(bn_cnn, x, y, normalizer=norm, generator=torch.Generator().manual_seed(3))
    b = pgd(bn_cnn, x, y, normalizer=norm, generator=torch.Generator().manual_seed(3))
    c = pgd(bn_cnn, x, y, normalizer=norm, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalizer_forms_agree(bn_cnn, digits, norm) -> None:
    """The uint8 normaliser, (mean, std) and a PixelScale describe the same map, so the same attack."""
    x, y = _test_batch(digits, norm, 32)
    runs = [pgd(bn_cnn, x, y, random_start=False, normalizer=n)
            for n in (norm, (digits.mean, digits.std), PixelScale.from_mean_std(digits.mean, digits.std))]
    assert torch.allclose(runs[0], runs[1], atol=1e-5) and torch.allclose(runs[0], runs[2], atol=1e-5)


class MeanOfLogits(nn.Module):
    def __init__(self, *members: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def test_attacks_an_ensemble_through_every_member(bn_cnn, dual_cnn, digits, norm) -> None:
    x, y = _test_batch(digits, norm, 64)
    ensemble = MeanOfLogits(bn_cnn, dual_cnn).eval()
    x_ens = pgd(ensemble, x, y, random_start=False, normalizer=norm)
    x_one = pgd(bn_cnn, x, y, random_start=False, normalizer=norm)
    with torch.no_grad():
        assert F.cross_entropy(ensemble(x_ens), y) > F.cross_entropy(ensemble(x), y)
    assert not torch.equal(x_ens, x_one), "the second member's gradient must count"


@pytest.mark.parametrize(("kwargs", "match"), [({"eps": -0.1}, "eps must be >= 0"),
                                               ({"steps": -1}, "steps must be an integer"),
                                               ({"step_size": -0.01}, "step_size must be >= 0")])
def test_bad_settings_are_one_line_config_errors(kwargs, match) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=match) as err:
        pgd(model, torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), **kwargs)
    assert "\n" not in str(err.value)
