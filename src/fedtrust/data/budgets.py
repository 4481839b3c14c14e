"""Client budgets: each client's maximum model width (Split-Mix spec §1 "Budgets"; config section ``budget``).

A budget is a width ratio in (0, 1] taken from a sorted list ``widths`` (the
paper's ``--slim_ratios 8-4-2-1`` is ``[0.125, 0.25, 0.5, 1.0]``). Distributions:

==========  =====================================================================================
none        no budgets (``ctx.budgets`` is None): every client trains the full model
blocks      contiguous blocks in client order: client i gets ``widths[int(K·i/N)]`` (K widths, N
            clients), the paper's rule (``fed_hfl.py``); with the domain-major client order of the
            ``domains`` partitioner the budget is tied to the domain, as in the paper
random      an independent uniform draw from ``widths`` per client, seeded
lognormal   contiguous groups whose sizes follow a lognormal over widths (the paper's ``ln0.5_0.4``):
            see :func:`lognormal_group_sizes`
==========  =====================================================================================

``shuffle`` permutes the resulting vector over clients (seeded), which unties
budget from client order (and so from domain; spec §9: "budget and domain are
confounded" in the paper's code). All randomness comes from one
``numpy.random.Generator`` the caller seeds (the runner: the partition seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedtrust.errors import ConfigError

DISTRIBUTIONS = ("none", "blocks", "random", "lognormal")
DEFAULT_WIDTHS = (0.125, 0.25, 0.5, 1.0)


def check_widths(widths: Sequence[float]) -> tuple[float, ...]:
    """``widths`` as a tuple, or a one-line ConfigError unless they are non-empty, in (0, 1] and strictly rising."""
    widths = tuple(float(w) for w in widths)
    if not widths:
        raise ConfigError("config key 'budget.widths' is empty; expected width ratios in (0, 1], e.g. "
                          "[0.125, 0.25, 0.5, 1.0]")
    bad = [w for w in widths if not 0 < w <= 1]
    if bad:
        raise ConfigError(f"config key 'budget.widths': {bad[0]:g} is outside (0, 1]; expected width ratios "
                          f"in (0, 1] (got {list(widths)})")
    if any(b <= a for a, b in zip(widths, widths[1:])):
        raise ConfigError(f"config key 'budget.widths': {list(widths)} is not strictly increasing; expected "
                          f"sorted widths without duplicates")
    return widths


def blocks_budgets(num_clients: int, widths: Sequence[float]) -> tuple[float, ...]:
    """Client i gets ``widths[int(K·i/N)]``: K contiguous blocks of ⌈N/K⌉ or ⌊N/K⌋ clients, narrowest first.

    Split-Mix ``federated/core.py`` ``get_slim_ratio_schedule`` (non-``ln`` mode).
    N=10, K=4 gives 1/8 ×3, 1/4 ×2, 1/2 ×3, 1 ×2.
    """
    k = len(widths)
    return tuple(float(widths[k * i // num_clients]) for i in range(num_clients))


def random_budgets(num_clients: int, widths: Sequence[float], rng: np.random.Generator) -> tuple[float, ...]:
    """An independent uniform draw from ``widths`` for each client."""
    return tuple(float(widths[j]) for j in rng.integers(0, len(widths), size=num_clients))


def lognormal_cdf(w: float, sigma: float, median: float) -> float:
    """P(W ≤ w) for W ~ LogNormal(ln median, sigma²) (scipy's ``lognorm(s=sigma, scale=median)``)."""
    return 0.5 * math.erfc(-(math.log(w) - math.log(median)) / (sigma * math.sqrt(2.0)))


def lognormal_group_sizes(num_clients: int, widths: Sequence[float], sigma: float, median: float) -> list[int]:
    """How many clients get each width under the lognormal budget (Split-Mix ``parse_lognorm_slim_schedule``).

    With F the CDF of LogNormal(ln ``median``, ``sigma``²) and w_0 < … < w_{K−1} the
    widths, the group of w_j is the clients from ⌊N·q_j⌋ to ⌊N·q_{j+1}⌋ − 1, where
    q_j = (F(w_j) − F(w_0)) / (1 − F(w_0)) for j < K and q_K = 1: width w_j gets the
    probability mass of (w_j, w_{j+1}] (the widest width the tail above it), the
    mass below w_0 left out and the rest renormalised. The group sizes are a
    deterministic function of (N, widths, sigma, median); a group may be empty
    when N is small. The paper's ``ln0.5_0.4`` is sigma 0.5, median 0.4 over the
    eight widths 1/8, 2/8, …, 1.
    """
    f0 = lognormal_cdf(widths[0], sigma, median)
    span = 1.0 - f0
    if span <= 0:
        raise ConfigError(f"budget: lognormal(sigma={sigma:g}, median={median:g}) puts no mass above the narrowest "
                          f"width {widths[0]:g}; use a larger median")
    q = [(lognormal_cdf(w, sigma, median) - f0) / span for w in widths] + [1.0]
    bounds = [int(num_clients * v) for v in q[:-1]] + [num_clients]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def lognormal_budgets(num_clients: int, widths: Sequence[float], sigma: float, median: float) -> tuple[float, ...]:
    """Contiguous groups, narrowest first, of the sizes :func:`lognormal_group_sizes` gives."""
    sizes = lognormal_group_sizes(num_clients, widths, sigma, median)
    return tuple(float(w) for w, n in zip(widths, sizes) for _ in range(n))


def assign_budgets(distribution: str, num_clients: int, widths: Sequence[float], rng: np.random.Generator,
                   sigma: float = 0.5, median: float = 0.4, shuffle: bool = False) -> tuple[float, ...] | None:
    """Each client's maximum width under ``distribution`` (None for ``none``).

    Args:
        distribution: ``none``, ``blocks``, ``random`` or ``lognormal``.
        num_clients: N ≥ 1.
        widths: the allowed widths, strictly rising in (0, 1].
        rng: the only source of randomness (``random`` draws, ``shuffle``).
        sigma, median: the lognormal's shape (``lognormal`` only).
        shuffle: permute the budgets over clients.

    Raises:
        ConfigError: unknown distribution, bad widths, num_clients < 1, sigma or median ≤ 0.
    """
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"config key 'budget.distribution': unknown {distribution!r}; valid: "
                          f"{', '.join(DISTRIBUTIONS)}")
    if distribution == "none":
        return None
    widths = check_widths(widths)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"budget: num_clients must be an integer >= 1, got {num_clients!r}")
    if not (sigma > 0 and median > 0):
        raise ConfigError(f"config keys 'budget.sigma', 'budget.median' must be > 0, got {sigma!r}, {median!r}")
    if distribution == "blocks":
        budgets = blocks_budgets(num_clients, widths)
    elif distribution == "random":
        budgets = random_budgets(num_clients, widths, rng)
    else:
        budgets = lognormal_budgets(num_clients, widths, sigma, median)
    if shuffle:
        budgets = tuple(budgets[i] for i in rng.permutation(num_clients))
    return budgets
