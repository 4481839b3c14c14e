"""Update validation (fl/validate.py): malformed replies are rejected with a reason, never aggregated."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrust.fl.types import Message
from fedtrust.fl.validate import update_norm, validate_replies


def state() -> Message:
    return Message({"model/w": torch.zeros(2, 3), "model/b": torch.zeros(3), "model/n": torch.tensor(0)})


def reply(value: float = 1.0, n: int = 10, **changes) -> Message:
    arrays = {"model/w": torch.full((2, 3), value), "model/b": torch.zeros(3), "model/n": torch.tensor(1)}
    for k, v in changes.items():
        key = f"model/{k}"
        if v is None:
            arrays.pop(key)
        else:
            arrays[key] = v
    return Message(arrays, {"num_examples": n})


def test_well_formed_replies_all_pass():
    """Rules out a validator that rejects good replies (e.g. integer BN counters checked for NaN)."""
    replies = {c: reply(0.1 * c) for c in range(4)}
    valid, rejected = validate_replies(state(), replies)
    assert rejected == {} and list(valid) == [0, 1, 2, 3]


@pytest.mark.parametrize("bad, reason", [
    (reply(float("nan")), "key 'model/w' holds NaN or Inf"),
    (reply(b=torch.tensor([0.0, float("inf"), 0.0])), "key 'model/b' holds NaN or Inf"),
    (reply(w=torch.zeros(3, 2)), "key 'model/w' has shape (3, 2); expected (2, 3)"),
    (reply(w=torch.zeros(2, 3, dtype=torch.float64)), "key 'model/w' has dtype torch.float64; expected torch.float32"),
    (reply(b=None), "missing key 'model/b'"),
    (reply(extra=torch.zeros(1)), "unexpected key 'model/extra'"),
    (Message(reply().arrays, {"num_examples": -3}), "no valid sample weight"),
    (Message(reply().arrays, {}), "no valid sample weight"),
    (Message(reply().arrays, {"num_examples": float("nan")}), "no valid sample weight"),
])
def test_each_malformed_reply_is_rejected_with_its_reason(bad, reason):
    """Rules out a validator that lets a NaN, a wrong shape or dtype, a missing/extra key or a bad weight
    through to the aggregator (which would crash or poison the model), or rejects the good replies with it."""
    replies = {0: reply(0.1), 1: reply(0.2), 2: bad, 3: reply(0.3)}
    valid, rejected = validate_replies(state(), replies)
    assert list(rejected) == [2] and reason in rejected[2]
    assert list(valid) == [0, 1, 3]
    assert "\n" not in rejected[2]


def test_a_lone_wrong_shape_is_caught_against_the_server_state_even_in_a_round_of_two():
    """Rules out a majority-only rule: with one good and one bad reply there is no majority, but the
    server state's shape decides."""
    replies = {5: reply(w=torch.zeros(6)), 7: reply()}
    valid, rejected = validate_replies(state(), replies)
    assert list(valid) == [7] and "shape (6,)" in rejected[5]


def test_update_norm_bound_rejects_only_the_large_update():
    """Rules out a bound on the reply's weights instead of on the update (reply − state), or a bound
    applied when it is not set."""
    s = Message({"model/w": torch.full((2, 3), 5.0), "model/b": torch.zeros(3), "model/n": torch.tensor(0)})
    near, far = reply(5.5), reply(9.0)  # updates of norm √6·0.5 ≈ 1.22 and √6·4 ≈ 9.8
    assert update_norm(near, s) == pytest.approx(math.sqrt(6) * 0.5)
    valid, rejected = validate_replies(s, {0: near, 1: far}, max_update_norm=2.0)
    assert list(valid) == [0] and "update norm 9.798 exceeds defense.max_update_norm=2" in rejected[1]
    assert validate_replies(s, {0: near, 1: far})[1] == {}


def test_replies_sharing_a_renamed_key_cannot_outvote_the_sound_ones():
    """Two replies with the same key renamed (a key the server does not know) against two sound ones: the
    tie used to go to the lowest client id, so the sound replies were rejected and the renamed key reached
    the server state. The reference now prefers the signature with the fewest unknown keys."""
    state = Message({"model/w": torch.zeros(2), "model/b": torch.zeros(1)})
    sound = Message({"model/w": torch.ones(2), "model/b": torch.ones(1)}, {"num_examples": 1})
    renamed = Message({"model/w": torch.ones(2), "model/b.x": torch.ones(1)}, {"num_examples": 1})
    valid, rejected = validate_replies(state, {0: renamed, 1: renamed, 2: sound, 3: sound})
    assert sorted(valid) == [2, 3] and sorted(rejected) == [0, 1]
    assert all("missing key 'model/b'" in r for r in rejected.values())


def test_a_spec_dimension_of_minus_one_matches_any_size():
    """IS&BC's replies hold each client's own sample count: a −1 in the spec matches any size there, and
    only there (the other dimensions and the rank still must match)."""
    state = Message({"model/w": torch.zeros(2)})
    spec = {"mix/h": ((-1, 4, 2, 2), torch.float32), "mix/y": ((-1,), torch.int64)}

    def reply(n: int, shape=(4, 2, 2), y_rank: int = 1) -> Message:
        y = torch.zeros((n,) if y_rank == 1 else (n, 1), dtype=torch.int64)
        return Message({"mix/h": torch.zeros(n, *shape), "mix/y": y}, {"num_examples": n})

    replies = {0: reply(5), 1: reply(9), 2: reply(5, (3, 2, 2)), 3: reply(5, y_rank=2)}
    valid, rejected = validate_replies(state, replies, specs={c: spec for c in replies})
    assert sorted(valid) == [0, 1]
    assert rejected[2] == "key 'mix/h' has shape (5, 3, 2, 2); expected (any, 4, 2, 2)"
    assert rejected[3] == "key 'mix/y' has shape (5, 1); expected (any,)"
