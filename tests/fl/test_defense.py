"""The defense joint (fl/defense.py): every algorithm averages through the configured aggregator."""

from __future__ import annotations

import torch

from fedtrust.fl.aggregate import weighted_mean
from fedtrust.fl.defense import Defense
from fedtrust.fl.types import Message
from fedtrust.robust.aggregators import build_aggregator


def replies_of(values: dict[int, list[float]], weights: dict[int, int] | None = None) -> dict[int, Message]:
    return {c: Message({"model/w": torch.tensor(v), "model/n": torch.tensor(c)},
                       {"num_examples": (weights or {}).get(c, 1)}) for c, v in values.items()}


STATE = Message({"model/w": torch.tensor([1.0, 1.0]), "model/n": torch.tensor(0), "head/x": torch.ones(1)})


def test_plain_mean_is_fedavgs_weighted_mean_bit_for_bit():
    """Rules out the default defense going through updates (θ + mean(θ_i − θ)), which differs from FedAvg's
    Σ w_i θ_i / Σ w_i in the last bits and would break bit-identical runs."""
    replies = replies_of({0: [0.1, 0.7], 1: [0.3, 0.2], 2: [1.7, -0.4]}, {0: 3, 1: 5, 2: 7})
    arrays, metrics = Defense().average(STATE, replies, "model/", round=1)
    expect = weighted_mean(replies, "model/")
    assert metrics == {} and arrays.keys() == expect.keys()
    assert all(torch.equal(arrays[k], expect[k]) for k in expect)


def test_median_moves_the_state_by_the_coordinate_median_of_the_updates_times_the_server_lr():
    """Rules out a median of the weights instead of the updates, ignoring the server lr, or averaging the
    integer counters through the aggregator."""
    replies = replies_of({0: [2.0, 1.0], 1: [3.0, 0.0], 2: [101.0, -50.0]}, {0: 1, 1: 1, 2: 2})
    defense = Defense(aggregator=build_aggregator("median"), server_lr=0.5)
    arrays, metrics = defense.average(STATE, replies, "model/", round=1)
    # updates: [1, 0], [2, -1], [100, -51] -> median [2, -1]; θ + 0.5·median
    assert torch.allclose(arrays["model/w"], torch.tensor([2.0, 0.5]))
    assert arrays["model/n"] == torch.tensor(1)  # weighted mean of 0, 1, 2 with weights 1, 1, 2 = 1.25 -> 1
    assert set(metrics) == {"aggregator/model"}
    assert metrics["aggregator/model"]["rejected"] == [0, 2]  # client 1 holds the median of both coordinates


def test_aggregator_state_lives_in_the_server_state_and_carries_across_rounds():
    """Rules out an aggregator whose memory (centered clipping's last aggregate) lives in the Python object:
    it would be lost on resume. It must come back from the server state it wrote."""
    defense = Defense(aggregator=build_aggregator("centered_clipping", {"tau": 0.5}))
    replies = replies_of({0: [3.0, 1.0], 1: [3.0, 1.0]})
    merged, _ = defense.merge(STATE, replies, ["model"], round=1)
    assert "defense/model/previous" in merged.arrays
    assert torch.equal(merged.arrays["head/x"], STATE.arrays["head/x"])  # entries no reply carries keep their value
    again, _ = Defense(aggregator=build_aggregator("centered_clipping", {"tau": 0.5})).merge(
        merged, replies, ["model"], round=2)
    fresh, _ = defense.merge(Message({k: v for k, v in merged.arrays.items() if not k.startswith("defense/")}),
                             replies, ["model"], round=2)
    assert not torch.equal(again.arrays["model/w"], fresh.arrays["model/w"])  # the stored aggregate was used


def test_uniform_weights_every_reply_alike_for_any_aggregator():
    """FLIP's server (spec flip.md §3): (1/n)·Σ Δ_i whatever the sample counts, and the same 1/n weights for a
    robust aggregator behind it (norm clipping's clipped mean). Rules out: the weighted mean, uniform reaching
    only the plain mean (FLIP behind another aggregator would silently weight by sample count), and
    ``uniform`` taking the bit-exact FedAvg shortcut."""
    replies = replies_of({0: [2.0, 5.0], 1: [3.0, 1.0], 2: [4.0, 3.0]}, {0: 1, 1: 2, 2: 3})
    # updates [1, 4], [2, 0], [3, 2]: uniform mean [2, 2]; the sample-weighted one [14/6, 10/6]
    arrays, metrics = Defense(uniform=True).average(STATE, replies, "model/", round=1)
    assert torch.allclose(arrays["model/w"], torch.tensor([3.0, 3.0]))
    assert metrics["aggregator/model"]["weights"] == {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}
    weighted, _ = Defense().average(STATE, replies, "model/", round=1)
    assert torch.allclose(weighted["model/w"], torch.tensor([1 + 14 / 6, 1 + 10 / 6]))
    clip = build_aggregator("norm_clipping", {"clip": 1e9, "noise": 0.0})
    clipped, m = Defense(aggregator=clip, uniform=True).average(STATE, replies, "model/", round=1)
    assert torch.allclose(clipped["model/w"], torch.tensor([3.0, 3.0]))
