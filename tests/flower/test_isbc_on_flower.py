"""IS&BC on executor=flower (a loopback Grid, Flower's wire format): the sequential executor's result, bit for
bit, and no message a client sends holds an image.

The federation is built directly (no ``init_from``: a random front serves the check as well as a trained
one; the step-2 effect is tests/algorithms/test_isbc.py's).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

from fedtrust.fl.executor import ClientStore  # noqa: E402
from fedtrust.flower.app_config import FlowerSettings, config_table, flatten  # noqa: E402
from fedtrust.flower.client_app import make_client_app  # noqa: E402
from fedtrust.flower.executor import bind_grid  # noqa: E402
from fedtrust.flower.records import from_records  # noqa: E402
from fedtrust.models.split import split_model  # noqa: E402
from fedtrust.runner.config import build_config  # noqa: E402
from fedtrust.runner.federation import build_federation  # noqa: E402

ARGS = ["algorithm.name=isbc", "data.num_clients=4", "data.clients_per_round=3", "rounds=2", "model.width=8",
        "eval.personalized=false", "data.outliers=photos", "data.num_outliers=300", "algorithm.pool=2",
        "algorithm.hidden=16", "algorithm.oe_batch=64", "algorithm.id_batch=64"]
NODES = {200 + k: {"partition-id": k, "num-partitions": 4} for k in range(4)}


def test_isbc_on_flower_equals_sequential_and_sends_no_image(loopback_grid):
    seq = build_federation(build_config({}, [*ARGS, "executor=sequential"]))
    torch.manual_seed(0)
    expected = seq.executor.run(seq.algorithm.init(), ClientStore(), 0, 2)

    cfg = build_config({}, [*ARGS, "executor=flower"])
    fed = build_federation(cfg)
    grid = loopback_grid(make_client_app(), NODES, flatten(config_table(cfg)))
    torch.manual_seed(0)
    with bind_grid(grid, FlowerSettings()):
        state = fed.executor.run(fed.algorithm.init(), ClientStore(), 0, 2)
    assert state.arrays.keys() == expected.arrays.keys()
    for k, v in expected.arrays.items():
        assert torch.equal(state.arrays[k], v), k

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
