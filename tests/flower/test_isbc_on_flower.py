"""IS&BC on executor=flower (a loopback Grid, Flower's wire format): the sequential executor's result, bit for
bit, and no message a client sends holds an image.

The federation is built directly (no ``init_from``: a random front serves the check as well as a trained
one; the step-2 effect is tests/algorithms/test_isbc.py's).
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

from fedtrust.flower.records import from_records  # noqa: E402
from fedtrust.models.split import split_model  # noqa: E402

ARGS = ["algorithm.name=isbc", "data.num_clients=4", "data.clients_per_round=3", "rounds=2", "model.width=8",
        "eval.personalized=false", "data.outliers=photos", "data.num_outliers=300", "algorithm.pool=2",
        "algorithm.hidden=16", "algorithm.oe_batch=64", "algorithm.id_batch=64"]
NODES = {200 + k: {"partition-id": k, "num-partitions": 4} for k in range(4)}


def test_isbc_on_flower_equals_sequential_and_sends_no_image(sequential_and_flower):
    run = sequential_and_flower(ARGS, NODES, 2)
    run.assert_equal_weights()
    fed, grid = run.fed, run.grid

    image = tuple(fed.dataset.train.x.shape[1:])
    front = {f"model/{k}" for k in split_model(fed.algorithm.template).front_keys}
    train_out = [m for m in grid.sent if m.metadata.message_type == "train"]
    replies = [m for m in grid.received if m.has_content() and m.metadata.message_type == "train"]
    assert len(train_out) == 6 and len(replies) == 6
    for m in train_out:
        assert set(from_records(m.content).arrays) == front
    for r in replies:
        arrays = from_records(r.content).arrays
        assert set(arrays) == {"mix/h", "mix/y_a", "mix/y_b", "mix/lam"}
        assert all(tuple(v.shape[1:]) != image for v in arrays.values())
        assert arrays["mix/h"].shape[1:] == fed.algorithm.feature_shape
