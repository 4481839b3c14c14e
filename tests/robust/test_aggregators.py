"""Robust aggregators (fedtrust.robust.aggregators): hand-worked cases, each ruling out a named wrong implementation."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor

import fedtrust.robust.aggregators  # noqa: F401  (registers the aggregators until the lead adds it to _PROVIDERS)
from fedtrust.errors import ConfigError, FedTrustError
from fedtrust.registry import get, names
from fedtrust.robust.aggregators import build_aggregator
from fedtrust.robust.types import Aggregate, Updates

ALL = ["centered_clipping", "flame", "fltrust", "foolsgold", "geomedian", "krum", "mean", "median",
       "multikrum", "norm_clipping", "rlr", "trimmed_mean"]


def _updates(rows, weights=None, ids=None) -> Updates:
    deltas = torch.tensor(rows, dtype=torch.float64)
    n = deltas.shape[0]
    return Updates(deltas, torch.ones(n, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64),
                   tuple(range(n)) if ids is None else tuple(ids))


def _run(name: str, updates: Updates, state=None, seed: int = 0, root: Tensor | None = None, **params) -> tuple[Aggregate, dict]:
    agg = build_aggregator(name, params)
    return agg(updates, {} if state is None else state, torch.Generator().manual_seed(seed), root)


# ---------------------------------------------------------------- registry smoke


def test_registry_holds_every_aggregator() -> None:
    assert set(ALL) <= set(names("aggregator"))


@pytest.mark.parametrize("name", sorted(set(ALL) | set(names("aggregator"))))
def test_every_aggregator_runs_on_random_input(name: str) -> None:
    """Every registered aggregator: a frozen, extra-forbidding Params with described fields; two rounds on random
    updates give a finite (d,) delta in the deltas' dtype and JSON-able metrics naming every client's weight.
    Rules out a NaN from a 0/0 (e.g. FoolsGold's logit), a (n, d) or (1, d) result, and Tensor values in metrics."""
    cls = get("aggregator", name)
    assert issubclass(cls.Params, BaseModel)
    assert cls.Params.model_config.get("frozen") and cls.Params.model_config.get("extra") == "forbid"
    for field, info in cls.Params.model_fields.items():
        assert info.description, f"{name}.Params.{field} has no description"
    assert cls.__doc__ and re.search(r"\b(19|20)\d\d\b", cls.__doc__), f"{name}'s docstring cites no paper"
    g = torch.Generator().manual_seed(1)
    n, d = 10, 7
    state: dict[str, Tensor] = {}
    for rnd in range(2):
        updates = Updates(torch.randn(n, d, generator=g), torch.randint(1, 50, (n,), generator=g).double(),
                          tuple(range(3 + rnd, 3 + rnd + n)))
        agg, state = cls()(updates, state, torch.Generator().manual_seed(rnd), torch.randn(d, generator=g))
        assert agg.delta.shape == (d,) and agg.delta.dtype == torch.float32
        assert torch.isfinite(agg.delta).all()
        assert all(isinstance(v, Tensor) for v in state.values())
        json.dumps(agg.metrics)
        assert set(agg.metrics["weights"]) == set(updates.ids)
        total = sum(agg.metrics["weights"].values())
        assert total == pytest.approx(1.0) or total == 0.0
        assert set(agg.metrics["rejected"]) <= set(updates.ids)


@pytest.mark.parametrize("name", sorted(set(ALL) - {"krum", "multikrum"}))
def test_a_single_update_gives_a_finite_delta(name: str) -> None:
    """n = 1 (a round with one reply): rules out a 0/0 from empty neighbour sets (FoolsGold's max over j != i)
    and a crash from HDBSCAN's n >= 2. (Krum needs n > 2f + 2 >= 3 and says so.)"""
    updates = _updates([[1.0, -2.0, 0.5]], [3.0], [7])
    agg, _ = _run(name, updates, root=torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    assert torch.isfinite(agg.delta).all() and agg.delta.shape == (3,)
    assert agg.metrics["weights"] == {7: pytest.approx(1.0)}


# ---------------------------------------------------------------- mean, median, trimmed mean


def test_mean_is_the_sample_weighted_mean() -> None:
    """Σ w_i Δ_i / Σ w_i: rules out the unweighted mean ([2, 2]) and a sum not divided by Σ w."""
    updates = _updates([[1.0, 4.0], [2.0, 0.0], [3.0, 2.0]], [1.0, 2.0, 3.0])
    agg, _ = _run("mean", updates)
    assert torch.allclose(agg.delta, torch.tensor([14 / 6, 10 / 6], dtype=torch.float64))
    assert agg.metrics["weights"] == pytest.approx({0: 1 / 6, 1: 2 / 6, 2: 3 / 6})


def test_median_of_five_vectors_is_coordinate_wise() -> None:
    """Columns sorted: (−7, 1, 2, 3, 100) → 2 and (−100, 2, 3, 4, 5) → 3. Rules out the median over the wrong
    axis (a (5,) result), the row with the median norm, and the mean ([19.8, −17.2])."""
    updates = _updates([[1.0, 5.0], [2.0, 4.0], [3.0, 3.0], [100.0, -100.0], [-7.0, 2.0]])
    agg, _ = _run("median", updates)
    assert torch.equal(agg.delta, torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert agg.metrics["weights"] == pytest.approx({0: 0.0, 1: 0.5, 2: 0.5, 3: 0.0, 4: 0.0})
    assert agg.metrics["rejected"] == [0, 3, 4]


def test_median_of_an_even_count_averages_the_middle_two() -> None:
    """n = 4: (1, 2, 10, 20) → 6. Rules out torch.median's lower median (2)."""
    agg, _ = _run("median", _updates([[20.0], [1.0], [10.0], [2.0]]))
    assert agg.delta.item() == 6.0


@pytest.mark.parametrize("beta", [1, 0.2, 0.25])
def test_trimmed_mean_drops_k_from_each_side_per_coordinate(beta: float) -> None:
    """k = 1 of n = 5 (β = 1, ⌊0.2·5⌋ = ⌊0.25·5⌋ = 1): columns (−7, 1, 2, 4, 100) → 7/3 and (−100, 10, 20, 30, 60) → 20.
    Rules out trimming one side only ((1+2+4+100)/4 in column 0), rounding β·n up (k = 2: the median 2)
    and the untrimmed mean (20)."""
    updates = _updates([[1.0, 10.0], [2.0, 20.0], [4.0, 30.0], [100.0, -100.0], [-7.0, 60.0]])
    agg, _ = _run("trimmed_mean", updates, beta=beta)
    assert torch.allclose(agg.delta, torch.tensor([7 / 3, 20.0], dtype=torch.float64))
    assert agg.metrics["trimmed"] == 1


def test_trimmed_mean_trims_per_coordinate_not_per_client() -> None:
    """Client 0 holds the max of column 0 and the min of column 1: per-coordinate trimming drops it in both
    columns but keeps the others' values; dropping whole clients by norm would keep client 0 (norm √2·10 < 100)."""
    updates = _updates([[10.0, -10.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [0.0, 100.0]])
    agg, _ = _run("trimmed_mean", updates, beta=1)
    assert torch.allclose(agg.delta, torch.tensor([2.0, 2.0], dtype=torch.float64))  # (1+2+3)/3 per column


# ---------------------------------------------------------------- Krum, Multi-Krum


def test_krum_picks_the_point_with_the_closest_neighbours() -> None:
    """1-D points 0.2, 0.7, 1.0 and outliers 10, −10; n = 5, f = 1: n − f − 2 = 2 neighbours.
    Scores: 0.2 → .25+.64 = .89, 0.7 → .25+.09 = .34, 1.0 → .09+.64 = .73, 10 → 81+86.49, −10 → 104.04+114.49.
    Rules out summing over all neighbours (0.2 would win: 200.97 < 201.32) and n − f − 1 neighbours (1.0 wins)."""
    updates = _updates([[0.2], [0.7], [1.0], [10.0], [-10.0]], ids=[10, 11, 12, 13, 14])
    agg, _ = _run("krum", updates, num_byzantine=1)
    assert agg.delta.item() == pytest.approx(0.7)
    assert agg.metrics["selected"] == [11]
    assert agg.metrics["scores"] == pytest.approx({10: 0.89, 11: 0.34, 12: 0.73, 13: 167.49, 14: 218.53})
    assert agg.metrics["rejected"] == [10, 12, 13, 14]


def test_krum_scores_squared_distances() -> None:
    """Points 0, 1, 6, 9, 13, f = 1: squared scores (37, 26, 34, 25, 65) pick 9; plain distances
    (7, 6, 8, 7, 11) would pick 1."""
    agg, _ = _run("krum", _updates([[0.0], [1.0], [6.0], [9.0], [13.0]]), num_byzantine=1)
    assert agg.delta.item() == 9.0


def test_krum_fraction_of_byzantine_is_floored() -> None:
    """f = 0.2 of n = 5 is 1, the same as the count."""
    agg, _ = _run("krum", _updates([[0.2], [0.7], [1.0], [10.0], [-10.0]]), num_byzantine=0.2)
    assert agg.delta.item() == pytest.approx(0.7)


@pytest.mark.parametrize(("m", "expected"), [(1, 0.7), (2, 0.85), (3, 1.9 / 3), (None, 11.9 / 4)])
def test_multikrum_averages_the_m_best(m: int | None, expected: float) -> None:
    """Multi-Krum averages the m lowest-scoring points (scores as in the Krum test: 0.7 < 1.0 < 0.2 < 10 < −10);
    m unset is n − f = 4: (0.7 + 1.0 + 0.2 + 10)/4. Rules out a sample-weighted average (client 0.7 has weight 5:
    m = 2 would give 0.75) and taking the m highest scores."""
    updates = _updates([[0.2], [0.7], [1.0], [10.0], [-10.0]], weights=[1.0, 5.0, 1.0, 1.0, 1.0])
    agg, _ = _run("multikrum", updates, num_byzantine=1, m=m)
    assert agg.delta.item() == pytest.approx(expected)


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    with pytest.raises(ConfigError, match="n > 2f"):
        _run("krum", _updates([[0.0], [1.0], [2.0], [3.0]]), num_byzantine=1)


# ---------------------------------------------------------------- geometric median


def test_geomedian_matches_a_brute_force_minimiser() -> None:
    """argmin_z Σ w_i ‖z − x_i‖ on a 2-D case vs scipy's Nelder–Mead. Rules out the weighted mean, the
    unweighted geometric median (weights ignored) and Weiszfeld steps without the 1/distance factor."""
    from scipy.optimize import minimize

    points = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [5.0, 5.0], [1.0, -2.0]])
    weights = np.array([1.0, 2.0, 1.5, 0.5, 1.0])  # minimiser ≈ (1.93, 0.46), ~2 from every point
    objective = lambda z: float((weights * np.linalg.norm(points - z, axis=1)).sum())  # noqa: E731
    best = minimize(objective, points.mean(0), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12}).x
    agg, _ = _run("geomedian", _updates(points.tolist(), weights.tolist()), iters=500, eps=1e-12)
    assert np.allclose(agg.delta.numpy(), best, atol=1e-5)
    assert agg.metrics["objective"] == pytest.approx(objective(best) / weights.sum(), rel=1e-8)  # α_i = w_i / Σ w
    unweighted = minimize(lambda z: float(np.linalg.norm(points - z, axis=1).sum()), points.mean(0), method="Nelder-Mead").x
    assert not np.allclose(agg.delta.numpy(), unweighted, atol=1e-1)  # ≈ (1.44, 0.63)
    assert not np.allclose(agg.delta.numpy(), (weights[:, None] * points).sum(0) / weights.sum(), atol=1e-1)


# ---------------------------------------------------------------- clipping


def test_centered_clipping_clips_around_the_previous_aggregate() -> None:
    """v_0 = [1, 1] from state; the benign updates equal v_0 (no pull), the outlier [1000, −1000] is clipped to
    radius τ = 10 around v_0 and enters with weight 1/5: v_1 = v_0 + 2·u, u = (x − v_0)/‖x − v_0‖.
    Rules out clipping Δ_i instead of Δ_i − v (every update would be clipped to norm 10 and shrink v) and
    starting from zero instead of the state."""
    outlier = [1000.0, -1000.0]
    updates = _updates([[1.0, 1.0]] * 4 + [outlier])
    previous = torch.tensor([1.0, 1.0], dtype=torch.float64)
    agg, state = _run("centered_clipping", updates, state={"previous": previous}, tau=10.0, iters=1)
    u = torch.tensor([999.0, -1001.0], dtype=torch.float64)
    expected = previous + 2.0 * u / u.norm()
    assert torch.allclose(agg.delta, expected)
    assert torch.equal(state["previous"], agg.delta)
    assert agg.metrics["clipped"] == [4]
    assert agg.metrics["weights"][4] < 1e-2


def test_centered_clipping_bounds_a_huge_outliers_influence() -> None:
    """From v_0 = 0 with τ = 10, L = 3: one outlier of norm 1e6 among 4 benign [1, 1] moves the result by at most
    L·τ/n = 6 from the benign mean, while the plain mean moves by ~2e5. First step by hand: the benign diffs
    (norm √2 < τ) pass unclipped, the outlier becomes 10·û → v_1 = (4·[1, 1] + 10·û)/5."""
    updates = _updates([[1.0, 1.0]] * 4 + [[1e6 / math.sqrt(2), -1e6 / math.sqrt(2)]])
    one, _ = _run("centered_clipping", updates, tau=10.0, iters=1)
    u_hat = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2)
    assert torch.allclose(one.delta, (4 * torch.tensor([1.0, 1.0], dtype=torch.float64) + 10 * u_hat) / 5)
    three, _ = _run("centered_clipping", updates, tau=10.0, iters=3)
    assert (three.delta - torch.tensor([1.0, 1.0], dtype=torch.float64)).norm() <= 3 * 10 / 5 + 1e-9


def test_norm_clipping_clips_to_the_bound_then_takes_the_weighted_mean() -> None:
    """[3, 4] (norm 5) is scaled to [0.6, 0.8]; [0.3, 0.4] (norm 0.5 < 1) is kept; weights 1 : 3 →
    (0.6 + 0.9, 0.8 + 1.2)/4. Rules out clipping the mean instead of each update ((3.9, 5.2)/4 has norm 1.625 → scaled)
    and clipping every update to the bound (scaling small ones up)."""
    agg, _ = _run("norm_clipping", _updates([[3.0, 4.0], [0.3, 0.4]], [1.0, 3.0]), clip=1.0)
    assert torch.allclose(agg.delta, torch.tensor([0.375, 0.5], dtype=torch.float64))
    assert agg.metrics["clipped"] == [0]
    assert agg.metrics["norms"] == pytest.approx({0: 5.0, 1: 0.5})


def test_norm_clipping_noise_comes_from_the_generator() -> None:
    """Same generator seed → the same noisy result; another seed → another; the noise std is σ.
    Rules out the global RNG (torch.manual_seed would not reproduce) and noise scaled by the clip bound."""
    updates = Updates(torch.zeros(3, 20_000), torch.ones(3, dtype=torch.float64), (0, 1, 2))
    a, _ = _run("norm_clipping", updates, seed=5, clip=1.0, noise=0.1)
    torch.manual_seed(123)
    b, _ = _run("norm_clipping", updates, seed=5, clip=1.0, noise=0.1)
    c, _ = _run("norm_clipping", updates, seed=6, clip=1.0, noise=0.1)
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)
    assert a.delta.std().item() == pytest.approx(0.1, rel=0.03)


# ---------------------------------------------------------------- FLTrust, FoolsGold, RLR


def test_fltrust_weights_are_relu_cosines_and_norms_are_rescaled() -> None:
    """g_0 = [1, 0]: [2, 0] (cos 1) → rescaled [1, 0]; [1, 1] (cos 1/√2) → [1/√2, 1/√2]; [−3, 0.1] (cos < 0) → TS 0.
    g = (1·[1, 0] + (1/√2)·[1/√2, 1/√2]) / (1 + 1/√2). Rules out |cos| (the negative one would count),
    skipping the rescaling, and normalising by n instead of Σ TS."""
    updates = _updates([[2.0, 0.0], [1.0, 1.0], [-3.0, 0.1]], [1.0, 50.0, 1.0])
    root = torch.tensor([1.0, 0.0], dtype=torch.float64)
    agg, _ = _run("fltrust", updates, root=root)
    c = 1 / math.sqrt(2)
    expected = (torch.tensor([1.0, 0.0]) + c * torch.tensor([c, c])).double() / (1 + c)
    assert torch.allclose(agg.delta, expected)
    assert agg.metrics["trust"] == pytest.approx({0: 1.0, 1: c, 2: 0.0})
    assert agg.metrics["rejected"] == [2]
    assert agg.metrics["weights"] == pytest.approx({0: 1 / (1 + c), 1: c / (1 + c), 2: 0.0})


def test_fltrust_without_root_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="root") as err:
        _run("fltrust", _updates([[1.0, 0.0]]))
    assert "\n" not in str(err.value)


def test_foolsgold_down_weights_two_sybils_through_their_history() -> None:
    """Round 1: honest [1,0,0,0], [0,1,0,0]; sybils both [0,0,1,1] → sybil cos 1 → α = 0, honest α = 1 (logit
    clipped) → mean of the honest. Round 2: the sybils send orthogonal [0,0,1,0] and [0,0,0,1] (cosine 0 this
    round) but their histories [0,0,2,1] and [0,0,1,2] have cosine 0.8 → α = 0.2 → logit −0.89 → 0.
    Rules out comparing this round's updates instead of the histories (round 2 would admit the sybils)."""
    first = _updates([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0], [0, 0, 1.0, 1.0]], ids=[1, 2, 8, 9])
    agg, state = _run("foolsgold", first)
    assert agg.metrics["weights"] == pytest.approx({1: 0.5, 2: 0.5, 8: 0.0, 9: 0.0})
    assert agg.metrics["rejected"] == [8, 9]
    assert torch.allclose(agg.delta, torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    second = _updates([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]], ids=[1, 2, 8, 9])
    agg, state = _run("foolsgold", second, state=state)
    assert agg.metrics["max_similarity"][8] == pytest.approx(0.8)
    assert agg.metrics["rejected"] == [8, 9]
    assert torch.equal(state["history/8"], torch.tensor([0, 0, 2.0, 1.0], dtype=torch.float64))


def test_foolsgold_keeps_the_history_of_clients_not_sampled() -> None:
    """A client absent from the round keeps its history (state is keyed by client id, not by row)."""
    _, state = _run("foolsgold", _updates([[1.0, 0.0], [0.0, 1.0]], ids=[4, 5]))
    _, state = _run("foolsgold", _updates([[1.0, 1.0], [2.0, 0.0]], ids=[5, 6]), state=state)
    assert torch.equal(state["history/4"], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.equal(state["history/5"], torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_rlr_flips_the_lr_on_coordinates_with_weak_sign_agreement() -> None:
    """Signs [[+,+,+], [+,−,+], [+,−,−]] sum to (3, −1, 1); θ = 3: only coordinate 0 keeps +η.
    Weighted mean with weights (1, 2, 1): (1, −0.5, 0.5); η = 2 → (2, 1, −1).
    Rules out a strict |Σ sgn| > θ (coordinate 0 would flip), the unweighted mean and ignoring η."""
    updates = _updates([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, -1.0, -1.0]], [1.0, 2.0, 1.0])
    agg, _ = _run("rlr", updates, threshold=3, lr=2.0)
    assert torch.allclose(agg.delta, torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    assert agg.metrics["flipped_fraction"] == pytest.approx(2 / 3)
    fraction, _ = _run("rlr", updates, threshold=0.9, lr=2.0)  # θ = 0.9·3 = 2.7: the same coordinates
    assert torch.equal(fraction.delta, agg.delta)


# ---------------------------------------------------------------- FLAME


def _flame_round() -> tuple[Updates, list[int]]:
    """7 benign updates s_i·(5 e_0 + 0.5 e_{i+1}), s_i = 1, 1.1, ..., 1.6 (pairwise cosine distance 0.0099, norms
    5.03 ... 8.04) and 3 planted −3·(5 e_0 + 0.5 e_{8+j}) (cosine distance ≈ 1.98 to the benign, norm 15.1)."""
    basis = torch.eye(20, dtype=torch.float64)
    benign = torch.stack([(1 + 0.1 * i) * (5 * basis[0] + 0.5 * basis[i + 1]) for i in range(7)])
    planted = torch.stack([-3 * (5 * basis[0] + 0.5 * basis[8 + j]) for j in range(3)])
    ids = [20, 21, 22, 23, 24, 25, 26, 90, 91, 92]
    return Updates(torch.cat([benign, planted]), torch.ones(10, dtype=torch.float64), tuple(ids)), ids[7:]


def test_flame_rejects_a_planted_opposite_cluster_and_clips_at_the_median_norm() -> None:
    """3 far-off updates opposite to 7 benign ones: HDBSCAN's majority cluster is the benign 7, so the 3 are
    rejected; with λ = 0 the result is the mean of the benign updates clipped at the median norm of ALL 10.
    Rules out keeping the noise points, clipping at the median of the admitted only, and skipping clipping."""
    updates, planted = _flame_round()
    agg, _ = _run("flame", updates, noise_lambda=0.0)
    assert agg.metrics["rejected"] == planted
    assert agg.metrics["admitted"] == list(updates.ids[:7])
    norms = updates.deltas.norm(dim=1)
    bound = float(norms.sort().values[4:6].mean())  # the median of 10 norms
    assert agg.metrics["clip_bound"] == pytest.approx(bound)
    assert bound == pytest.approx(5.025 * 1.45, rel=1e-3)  # (7.04 + 7.54)/2; the admitted-only median is 6.53
    clipped = updates.deltas[:7] * torch.clamp(bound / norms[:7], max=1.0)[:, None]
    assert torch.allclose(agg.delta, clipped.mean(dim=0))


def test_flame_noise_is_lambda_times_the_bound_from_the_generator() -> None:
    """σ = λ·S and the noise comes from ``generator``: same seed → same delta, another → another."""
    updates, _ = _flame_round()
    a, _ = _run("flame", updates, seed=3, noise_lambda=0.5)
    b, _ = _run("flame", updates, seed=3, noise_lambda=0.5)
    c, _ = _run("flame", updates, seed=4, noise_lambda=0.5)
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)
    assert a.metrics["noise_std"] == pytest.approx(0.5 * a.metrics["clip_bound"])


# ---------------------------------------------------------------- bad input and params


def test_bad_params_are_rejected_by_the_params_model() -> None:
    """Unknown keys, out-of-range values and a non-whole count > 1 fail validation (not silently ignored)."""
    for name, params in [("krum", {"f": 1}), ("trimmed_mean", {"beta": -0.1}), ("trimmed_mean", {"beta": 1.5}),
                         ("geomedian", {"iters": 0}), ("norm_clipping", {"clip": 0.0})]:
        with pytest.raises(ValidationError):
            build_aggregator(name, params)
    with pytest.raises(ValidationError):
        get("aggregator", "krum").Params().num_byzantine = 2  # frozen


def test_trimming_everything_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="2k < n") as err:
        _run("trimmed_mean", _updates([[0.0], [1.0], [2.0], [3.0]]), beta=2)
    assert "\n" not in str(err.value)


def test_state_of_the_wrong_shape_is_an_error_naming_the_key() -> None:
    with pytest.raises(FedTrustError, match="'previous'"):
        _run("centered_clipping", _updates([[0.0, 1.0]]), state={"previous": torch.zeros(3)})
