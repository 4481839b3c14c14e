"""Updates and flat vectors (fedtrust.robust.types): bad input is a one-line FedTrustError naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrust.errors import FedTrustError
from fedtrust.robust.types import Updates, flatten, unflatten


@pytest.mark.parametrize(("deltas", "weights", "ids", "match"), [
    (torch.zeros(3), [1.0, 1.0, 1.0], (0, 1, 2), "floating \\(n, d\\) tensor"),
    (torch.zeros(2, 3, 1), [1.0, 1.0], (0, 1), "floating \\(n, d\\) tensor"),
    (torch.zeros(2, 3, dtype=torch.long), [1.0, 1.0], (0, 1), "floating"),
    (torch.zeros(0, 3), [], (), "no rows"),
    (torch.zeros(2, 3), [1.0, 1.0, 1.0], (0, 1), "weights has shape \\(3,\\); expected \\(2,\\)"),
    (torch.zeros(2, 3), [1.0, 1.0], (0,), "ids"),
    (torch.zeros(2, 3), [1.0, 1.0], (4, 4), "distinct"),
    (torch.zeros(2, 3), [1.0, -1.0], (0, 1), ">= 0"),
    (torch.zeros(2, 3), [0.0, 0.0], (0, 1), "not all zero"),
    (torch.tensor([[0.0, 1.0], [math.nan, 0.0]]), [1.0, 1.0], (5, 6), "client\\(s\\) \\[6\\] contain NaN"),
    (torch.tensor([[math.inf, 1.0]]), [1.0], (5,), "NaN or Inf"),
])
def test_bad_updates_are_one_line_errors(deltas, weights, ids, match) -> None:
    """Rules out a NaN update reaching an aggregator (the median would pass it through silently) and a
    weights/ids length mismatch being broadcast."""
    with pytest.raises(FedTrustError, match=match) as err:
        Updates(deltas, torch.tensor(weights, dtype=torch.float64), ids)
    assert "\n" not in str(err.value)


def test_updates_store_float64_weights_and_int_ids() -> None:
    u = Updates(torch.zeros(2, 3), [1, 2], [3, 4])
    assert u.weights.dtype == torch.float64 and u.ids == (3, 4) and (u.n, u.d) == (2, 3)


def test_stack_orders_by_client_id() -> None:
    u = Updates.stack({5: torch.tensor([5.0]), 2: torch.tensor([2.0])}, {2: 20, 5: 50})
    assert u.ids == (2, 5) and u.deltas.flatten().tolist() == [2.0, 5.0] and u.weights.tolist() == [20.0, 50.0]
    with pytest.raises(FedTrustError, match="no sample weight for client"):
        Updates.stack({1: torch.tensor([1.0])}, {})


def test_flatten_unflatten_round_trip() -> None:
    """Keys in the given order, shapes and dtypes restored; rules out concatenating in dict order."""
    arrays = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([7.0]), "n": torch.tensor(3)}
    flat = flatten(arrays, ["a", "b", "n"])
    assert flat.tolist() == [7.0, 0, 1, 2, 3, 4, 5, 3.0]
    back = unflatten(flat, arrays, ["a", "b", "n"])
    assert all(torch.equal(back[k], arrays[k]) and back[k].dtype == arrays[k].dtype for k in arrays)
    with pytest.raises(FedTrustError, match="'c' is missing"):
        flatten(arrays, ["a", "c"])
    with pytest.raises(FedTrustError, match="cannot unflatten"):
        unflatten(flat[:-1], arrays, ["a", "b", "n"])
