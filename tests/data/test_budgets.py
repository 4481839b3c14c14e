"""Client budgets (Split-Mix spec §1): blocks by hand, seeded random/lognormal, config errors, partition.json and ctx."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtrust.data.budgets import assign_budgets, blocks_budgets, lognormal_group_sizes
from fedtrust.errors import ConfigError
from fedtrust.runner.config import build_config

W = (0.125, 0.25, 0.5, 1.0)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_blocks_by_hand_ten_clients_four_widths():
    """widths[int(4·i/10)] for i = 0..9: 0,0,0,1,1,2,2,2,3,3 (rules out round() or ceil blocks, or widest first)."""
    expected = (0.125,) * 3 + (0.25,) * 2 + (0.5,) * 3 + (1.0,) * 2
    assert blocks_budgets(10, W) == expected
    assert assign_budgets("blocks", 10, W, rng()) == expected


def test_none_is_no_budgets():
    assert assign_budgets("none", 10, W, rng()) is None


def test_random_is_reproducible_from_the_seed_and_covers_the_widths():
    a, b, c = (assign_budgets("random", 40, W, rng(s)) for s in (3, 3, 4))
    assert a == b and a != c
    assert set(a) == set(W)
    assert list(a) != sorted(a)  # independent draws, not blocks


def test_lognormal_group_sizes_by_hand():
    """σ=0.5, median 0.4, N=50: F(w) = Φ((ln w − ln 0.4)/0.5) = .0100, .1738, .6726, .9666 for the four widths;
    bounds ⌊50·(F − F(1/8))/(1 − F(1/8))⌋ = 0, 8, 33, 48, then 50 → sizes 8, 25, 15, 2 (Split-Mix's rule)."""
    assert lognormal_group_sizes(50, W, 0.5, 0.4) == [8, 25, 15, 2]
    budgets = assign_budgets("lognormal", 50, W, rng())
    assert budgets == (0.125,) * 8 + (0.25,) * 25 + (0.5,) * 15 + (1.0,) * 2


def test_lognormal_leaves_out_the_mass_below_the_narrowest_width():
    """median 0.25, N=20: F = .0828, .5, .9172, .9972; q = 0, .4549, .9097, .9970, 1 → bounds 0, 9, 18, 19, 20.
    Without renormalising by 1 − F(1/8) the bounds would be 1, 10, 18, 19, 20 (and one client lost)."""
    assert lognormal_group_sizes(20, W, 0.5, 0.25) == [9, 9, 1, 1]


def test_lognormal_shuffle_is_reproducible_and_keeps_the_group_sizes():
    a = assign_budgets("lognormal", 50, W, rng(1), shuffle=True)
    b = assign_budgets("lognormal", 50, W, rng(1), shuffle=True)
    c = assign_budgets("lognormal", 50, W, rng(2), shuffle=True)
    assert a == b and a != c
    assert sorted(a) == sorted(assign_budgets("lognormal", 50, W, rng()))
    assert set(a) == set(W)


def test_paper_ln05_04_over_eight_widths_covers_them_for_50_clients():
    eight = tuple(k / 8 for k in range(1, 9))
    sizes = lognormal_group_sizes(50, eight, 0.5, 0.4)
    assert sum(sizes) == 50 and all(s > 0 for s in sizes[:6])
    assert sizes.index(max(sizes)) in (1, 2)  # the mode of W near the median 0.4 lies in (2/8, 4/8]


@pytest.mark.parametrize("override, needle", [
    ("budget.widths=[0.5, 1.5]", "outside (0, 1]"),
    ("budget.widths=[0, 1]", "outside (0, 1]"),
    ("budget.widths=[0.5, 0.25]", "not strictly increasing"),
    ("budget.widths=[0.25, 0.25, 1.0]", "not strictly increasing"),
    ("budget.widths=[]", "empty"),
    ("budget.distribution=gaussian", "budget.distribution"),
    ("budget.sigma=0", "budget.sigma"),
])
def test_config_errors_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        build_config({}, [override, "budget.distribution=blocks"] if "distribution" not in override else [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_budgets_reach_partition_json_and_ctx(tmp_path, one_thread):
    """A 1-round, 10-client digits run: partition.json and ctx.budgets hold the blocks budgets."""
    import fedtrust

    out = tmp_path / "run"
    result = fedtrust.run(None, [f"out={out}", "rounds=1", "data.num_clients=10", "data.clients_per_round=2",
                                 "data.partition=iid", "budget.distribution=blocks", "eval.every=1",
                                 "eval.personalized=false", "eval.metrics=[accuracy]", "model.width=4",
                                 "train.steps=1", "checkpoint_every=0"], progress=False, report=False)
    expected = [0.125] * 3 + [0.25] * 2 + [0.5] * 3 + [1.0] * 2
    assert json.loads((out / "partition.json").read_text())["budgets"] == expected
    from fedtrust.runner.federation import build_federation

    fed = build_federation(result.config)
    assert fed.algorithm.ctx.budgets == tuple(expected)


def test_no_budget_section_means_ctx_budgets_none():
    from fedtrust.runner.federation import build_budgets

    assert build_budgets(build_config({})) is None
    assert build_budgets(build_config({}, ["budget.distribution=random", "data.num_clients=12"])) == \
        build_budgets(build_config({}, ["budget.distribution=random", "data.num_clients=12"]))
    a = build_budgets(build_config({}, ["budget.distribution=random", "data.num_clients=12", "data.partition_seed=1"]))
    b = build_budgets(build_config({}, ["budget.distribution=random", "data.num_clients=12", "data.partition_seed=2"]))
    assert a != b  # seeded by the partition seed
