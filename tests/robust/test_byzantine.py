"""Untargeted attacks (fedtrust.robust.byzantine): hand-worked values, each test naming the wrong version it rules out."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrust.errors import ConfigError, DataError, FedTrustError
from fedtrust.robust.byzantine import (alie, alie_z, flip_labels, gaussian_update, ipm, min_max, min_sum,
                                       perturbation_vector, sign_flip)

BENIGN = torch.tensor([[0.0, 2.0, 1.0], [2.0, 2.0, -1.0], [4.0, 8.0, 3.0], [1.0, -1.0, 0.5]], dtype=torch.float64)


def test_sign_flip_is_minus_scale_times_the_update() -> None:
    delta = torch.tensor([1.0, -2.0, 0.0])
    assert torch.equal(sign_flip(delta), torch.tensor([-1.0, 2.0, 0.0]))
    assert torch.equal(sign_flip(delta, scale=3.0), torch.tensor([-3.0, 6.0, 0.0]))


def test_gaussian_update_uses_the_generator() -> None:
    """Same seed → same draw regardless of the global RNG; std σ. Rules out torch.randn without the generator."""
    a = gaussian_update((50_000,), 2.0, torch.Generator().manual_seed(1))
    torch.manual_seed(99)
    b = gaussian_update((50_000,), 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (50_000,) and a.dtype == torch.float32
    assert a.std().item() == pytest.approx(2.0, rel=0.02)


def test_alie_z_follows_the_papers_formula() -> None:
    """n = 10, f = 2: s = ⌊10/2 + 1⌋ − 2 = 4, z = Φ⁻¹((10 − 4)/10) = Φ⁻¹(0.6) = 0.2533471 (scipy's norm.ppf).
    Rules out s without −f (z = Φ⁻¹(0.4) < 0) and Φ⁻¹(s/n)."""
    assert alie_z(10, 2) == pytest.approx(0.2533471031357997, abs=1e-12)
    assert alie_z(10, 0) == pytest.approx(-0.2533471031357997, abs=1e-12)  # s = 6: Φ⁻¹(0.4)


def test_alie_is_mean_minus_z_sigma_per_coordinate() -> None:
    """μ = (1.75, 2.75, 0.875) and the population σ of each column; rules out the unbiased std (÷ m − 1),
    μ + zσ, and σ taken over rows instead of columns."""
    z = 0.2533471031357997
    mu = torch.tensor([7 / 4, 11 / 4, 3.5 / 4], dtype=torch.float64)
    var = ((BENIGN - mu) ** 2).sum(dim=0) / 4
    expected = mu - z * var.sqrt()
    assert torch.allclose(alie(BENIGN, n_total=10, n_malicious=2), expected)
    assert torch.allclose(alie(BENIGN, 10, 2, z=1.5), mu - 1.5 * var.sqrt())


def test_alie_with_too_many_malicious_is_a_config_error() -> None:
    """f >= ⌊n/2 + 1⌋ leaves no supporters to recruit (s <= 0): Φ⁻¹ would be inf."""
    with pytest.raises(ConfigError, match="n=10, f=6"):
        alie(BENIGN, 10, 6)


def test_ipm_has_a_negative_inner_product_with_the_benign_mean() -> None:
    """−ε·μ exactly; ⟨−εμ, μ⟩ = −ε‖μ‖² < 0. Rules out +εμ and the sum instead of the mean."""
    mu = BENIGN.mean(dim=0)
    crafted = ipm(BENIGN, 0.5)
    assert torch.allclose(crafted, -0.5 * mu)
    assert torch.dot(crafted, mu) < 0


def _max_distance(x, benign):
    return (benign - x).norm(dim=1).max().item()


def _sum_sq_distance(x, benign):
    return ((benign - x) ** 2).sum().item()


@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_min_max_stays_inside_the_benign_diameter_with_the_largest_gamma(perturbation: str) -> None:
    """max_i ‖μ − γp − x_i‖ <= max_ij ‖x_i − x_j‖ at the returned γ, and fails at γ + 2·tol (γ is maximal).
    Rules out stopping at γ_init's first halving (not maximal) and comparing with the mean pairwise distance."""
    tol = 1e-6
    crafted, gamma = min_max(BENIGN, perturbation, tol=tol)
    p = perturbation_vector(BENIGN, perturbation)
    diameter = torch.cdist(BENIGN, BENIGN).max().item()
    assert gamma > 0
    assert torch.allclose(crafted, BENIGN.mean(dim=0) - gamma * p)
    assert _max_distance(crafted, BENIGN) <= diameter + 1e-9
    assert _max_distance(BENIGN.mean(dim=0) - (gamma + 2 * tol) * p, BENIGN) > diameter


def test_min_max_finds_gamma_beyond_gamma_init() -> None:
    """The feasible γ here exceed γ_init = 0.01, so a search confined to [0, γ_init] would be wrong."""
    _, gamma = min_max(BENIGN, "unit", gamma_init=0.01)
    _, reference = min_max(BENIGN, "unit", gamma_init=10.0)
    assert gamma == pytest.approx(reference, abs=1e-4) and gamma > 0.01


@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_min_sum_bounds_the_sum_of_squared_distances(perturbation: str) -> None:
    """Σ_i ‖μ − γp − x_i‖² <= max_i Σ_j ‖x_i − x_j‖², tight at γ (fails at γ + 2·tol)."""
    tol = 1e-6
    crafted, gamma = min_sum(BENIGN, perturbation, tol=tol)
    p = perturbation_vector(BENIGN, perturbation)
    bound = (torch.cdist(BENIGN, BENIGN) ** 2).sum(dim=1).max().item()
    assert _sum_sq_distance(crafted, BENIGN) <= bound + 1e-9
    assert _sum_sq_distance(BENIGN.mean(dim=0) - (gamma + 2 * tol) * p, BENIGN) > bound


def test_min_sum_and_min_max_solve_different_conditions() -> None:
    """Rules out min_sum reusing min-max's condition (the same γ for both)."""
    assert min_sum(BENIGN, "std")[1] != pytest.approx(min_max(BENIGN, "std")[1], abs=1e-3)


def test_perturbations_are_unit_std_and_sign() -> None:
    mu = BENIGN.mean(dim=0)
    assert torch.allclose(perturbation_vector(BENIGN, "unit"), mu / mu.norm())
    assert torch.allclose(perturbation_vector(BENIGN, "std"), BENIGN.std(dim=0, correction=0))
    assert torch.equal(perturbation_vector(BENIGN, "sign"), torch.sign(mu))
    with pytest.raises(ConfigError, match="unknown perturbation 'norm'"):
        perturbation_vector(BENIGN, "norm")


def test_flip_labels_is_k_minus_one_minus_y() -> None:
    y = torch.tensor([0, 1, 9, 4])
    assert torch.equal(flip_labels(y, 10), torch.tensor([9, 8, 0, 5]))
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        flip_labels(torch.tensor([0, 10]), 10)


def test_bad_benign_input_is_a_one_line_error() -> None:
    for bad in [torch.zeros(3), torch.zeros(0, 3), torch.tensor([[0.0, math.nan]])]:
        with pytest.raises(FedTrustError) as err:
            ipm(bad, 1.0)
        assert "\n" not in str(err.value)
