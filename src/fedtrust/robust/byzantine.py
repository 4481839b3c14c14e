"""Untargeted (Byzantine) attacks: pure functions that craft a malicious client's update or labels.

Each function takes the malicious clients' own honest update and/or the
benign updates of the round, flattened, and returns what the malicious clients
send. Functions that read ``benign`` are **omniscient**: they assume the
attacker sees the other clients' updates of the round, a power that only a
simulation grants; they model the worst case that the defenses must survive.
The attack wrappers around ``run_client`` (registry kind ``attack``) decide
who is malicious and feed these functions.

==============  =======================================================  ==================================
function        malicious update                                         reference
==============  =======================================================  ==================================
sign_flip       −s · Δ                                                   Damaskinos et al. 2018 (common)
gaussian_update N(0, σ² I)                                               Blanchard et al., NeurIPS 2017
alie            μ − z · σ per coordinate                                 Baruch et al., NeurIPS 2019
ipm             −ε · μ                                                   Xie et al., UAI 2019
min_max         μ − γ p, γ max s.t. max distance to benign bounded       Shejwalkar & Houmansadr, NDSS 2021
min_sum         μ − γ p, γ max s.t. sum of sq. distances bounded         Shejwalkar & Houmansadr, NDSS 2021
flip_labels     y ← K − 1 − y (a data transform)                         Tolpegin et al., ESORICS 2020
==============  =======================================================  ==================================

μ and σ are the coordinate-wise mean and standard deviation of the benign
updates. GUESS (σ): the population std (divide by m, not m − 1), defined for
a single benign update; Baruch et al. do not say which.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from fedtrust.errors import ConfigError, DataError, FedTrustError

Perturbation = Literal["std", "unit", "sign"]


def _check_benign(benign: Tensor) -> Tensor:
    if not isinstance(benign, Tensor) or benign.dim() != 2 or benign.shape[0] == 0 or not benign.is_floating_point():
        got = f"shape {tuple(benign.shape)}" if isinstance(benign, Tensor) else type(benign).__name__
        raise FedTrustError(f"benign updates must be a floating (m, d) tensor with m >= 1; got {got}")
    if not bool(torch.isfinite(benign).all()):
        raise FedTrustError("benign updates contain NaN or Inf")
    return benign


def sign_flip(delta: Tensor, scale: float = 1.0) -> Tensor:
    """Sign flipping: the malicious client sends −``scale`` · Δ, its own honest update reversed and scaled."""
    return -scale * delta


def gaussian_update(shape: tuple[int, ...] | torch.Size, std: float, generator: torch.Generator,
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Gaussian attack: an update drawn from N(0, ``std``² I) with ``generator`` (Blanchard et al. 2017, §5),
    drawn on the generator's device and returned on ``device`` (default: the generator's)."""
    if std < 0:
        raise ConfigError(f"gaussian_update needs std >= 0; got {std}")
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return (std * noise).to(generator.device if device is None else device)


def alie_z(n_total: int, n_malicious: int) -> float:
    """z^max of "A Little Is Enough" (Baruch et al., NeurIPS 2019, Alg. 3 l. 1–2):
    s = ⌊n/2 + 1⌋ − f supporters are needed, z = Φ⁻¹((n − s) / n)."""
    n, f = n_total, n_malicious
    s = math.floor(n / 2 + 1) - f
    if n < 1 or f < 0 or not 0 < s < n:
        raise ConfigError(f"alie needs n >= 1 clients and 0 <= f < floor(n/2 + 1) malicious; got n={n}, f={f}")
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((n - s) / n, dtype=torch.float64)))


def alie(benign: Tensor, n_total: int, n_malicious: int, z: float | None = None) -> Tensor:
    """A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019, Alg. 3): μ_j − z·σ_j per coordinate j.

    Omniscient (simulation only): μ and σ are the coordinate-wise mean and
    population std of the ``benign`` (m, d) updates. ``z`` unset takes
    :func:`alie_z` of n = ``n_total`` clients, f = ``n_malicious``.
    """
    benign = _check_benign(benign)
    z = alie_z(n_total, n_malicious) if z is None else z
    return benign.mean(dim=0) - z * benign.std(dim=0, correction=0)


def ipm(benign: Tensor, epsilon: float) -> Tensor:
    """Inner-product manipulation (Xie, Koyejo & Gupta, UAI 2019, §4): −ε · mean(benign).

    Omniscient (simulation only). For ε > 0 the inner product with the benign
    mean is −ε‖μ‖² < 0, so the aggregate descends less (ε < 1 for mean-like
    defenses to still see a small update, large ε against Krum/median).
    """
    return -epsilon * _check_benign(benign).mean(dim=0)


def perturbation_vector(benign: Tensor, perturbation: Perturbation) -> Tensor:
    """p of Shejwalkar & Houmansadr (NDSS 2021, §IV-A), with ∇^p = −p: ``"unit"`` μ/‖μ‖, ``"std"`` σ, ``"sign"`` sgn(μ)."""
    benign = _check_benign(benign)
    mu = benign.mean(dim=0)
    if perturbation == "unit":
        norm = torch.linalg.vector_norm(mu)
        return mu / norm if float(norm) > 0 else torch.zeros_like(mu)
    if perturbation == "std":
        return benign.std(dim=0, correction=0)
    if perturbation == "sign":
        return torch.sign(mu)
    raise ConfigError(f"unknown perturbation {perturbation!r}; valid: std, unit, sign")


def _largest_feasible(feasible: Callable[[float], bool], gamma_init: float, tol: float) -> float:
    """The largest γ >= 0 with ``feasible(γ)`` to within ``tol``, for a feasible set [0, γ*] (γ = 0 feasible).

    Doubles γ from ``gamma_init`` until it fails, then bisects (the search of
    Shejwalkar & Houmansadr, Alg. 1, with a growth phase so γ* > γ_init is found).
    """
    if gamma_init <= 0 or tol <= 0:
        raise ConfigError(f"gamma_init and tol must be > 0; got {gamma_init}, {tol}")
    lo, hi = 0.0, gamma_init
    for _ in range(64):
        if not feasible(hi):
            break
        lo, hi = hi, 2 * hi
    else:
        return lo  # unbounded (p = 0): any γ is feasible
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def _pairwise_sq(benign: Tensor) -> Tensor:
    """(m, m) squared distances between benign updates (float64, computed directly)."""
    x = benign.double()[None]
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")[0] ** 2


def _distance_terms(benign: Tensor, p: Tensor) -> tuple[Tensor, Tensor, float]:
    """a_i, b_i, c with ‖μ − γp − x_i‖² = a_i − 2γ b_i + γ² c (float64), so each bisection step is O(m)."""
    x = benign.double()
    diff = x.mean(dim=0) - x
    return (diff ** 2).sum(dim=1), diff @ p.double(), float((p.double() ** 2).sum())


def min_max(benign: Tensor, perturbation: Perturbation = "std", gamma_init: float = 10.0,
            tol: float = 1e-5) -> tuple[Tensor, float]:
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, Eq. (3), Alg. 1): μ − γ p with the largest γ such that

        max_i ‖μ − γp − x_i‖ <= max_{i,j} ‖x_i − x_j‖   (x_i the benign updates)

    Omniscient (simulation only). γ = 0 is always feasible and the left side is
    convex in γ, so the feasible γ form an interval searched by bisection to
    ``tol``. Returns (the malicious update (d,), γ).
    """
    p = perturbation_vector(benign, perturbation)
    a, b, c = _distance_terms(benign, p)
    bound = float(_pairwise_sq(benign).amax())
    gamma = _largest_feasible(lambda g: bool((a - 2 * g * b + g * g * c).amax() <= bound), gamma_init, tol)
    return benign.mean(dim=0) - gamma * p, gamma


def min_sum(benign: Tensor, perturbation: Perturbation = "std", gamma_init: float = 10.0,
            tol: float = 1e-5) -> tuple[Tensor, float]:
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021, Eq. (4), Alg. 1): μ − γ p with the largest γ such that

        Σ_i ‖μ − γp − x_i‖² <= max_i Σ_j ‖x_i − x_j‖²   (x_i the benign updates)

    Omniscient (simulation only); bisection as in :func:`min_max`. Returns (the malicious update (d,), γ).
    """
    p = perturbation_vector(benign, perturbation)
    a, b, c = _distance_terms(benign, p)
    m = benign.shape[0]
    bound = float(_pairwise_sq(benign).sum(dim=1).amax())
    total = lambda g: float(a.sum() - 2 * g * b.sum() + m * g * g * c)  # noqa: E731
    gamma = _largest_feasible(lambda g: total(g) <= bound, gamma_init, tol)
    return benign.mean(dim=0) - gamma * p, gamma


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """Label flipping: y ← K − 1 − y for K = ``num_classes`` (a data transform of the malicious clients)."""
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"flip_labels needs integer labels; got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}); got range [{int(y.min())}, {int(y.max())}]")
    return num_classes - 1 - y
