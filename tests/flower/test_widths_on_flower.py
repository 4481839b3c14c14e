"""Split-Mix, SHeteroFL / FedRolex and FedBN on executor=flower (a loopback Grid, Flower's wire format): the
sequential executor's result bit for bit, each client's message holds only what its budget allows, and local
norm layers stay on the node."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

from fedtrust.flower.records import from_records  # noqa: E402
from fedtrust.models.norms import norm_state_keys  # noqa: E402

COMMON = ["data.dataset=digits_domains", "data.partition=domains", "data.num_clients=5", "data.clients_per_round=4",
          "model.width=8", "eval.personalized=false", "train.steps=3", "budget.distribution=blocks",
          "budget.widths=[0.25,0.5,1.0]"]
CASES = {
    "splitmix-local-bn": ["algorithm.name=splitmix", "algorithm.base_ratio=0.25", "model.norm=bn",
                          "algorithm.rescale_layer=false", "algorithm.local_bn=true"],
    "sheterofl": ["algorithm.name=heterofl", "algorithm.slimmable=true", "model.norm=bn_static"],
    "fedrolex": ["algorithm.name=heterofl", "algorithm.rolling=true", "model.norm=bn_static"],
    "fedbn": ["algorithm.name=fedbn", "model.norm=bn"],
}
NODES = {300 + k: {"partition-id": k, "num-partitions": 5} for k in range(5)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_width_methods_on_flower_equal_sequential(name, sequential_and_flower):
    run = sequential_and_flower([*COMMON, *CASES[name], "rounds=2"], NODES, 2)
    run.assert_equal_weights()
    fed, grid, expected = run.fed, run.grid, run.expected
    moved = [k for k in expected.arrays if not torch.equal(expected.arrays[k], fed.algorithm.init().arrays[k])]
    assert moved

    replies = [(m.metadata.src_node_id - 300, from_records(m.content)) for m in grid.received
               if m.has_content() and m.metadata.message_type == "train"]
    assert len(replies) == 8
    algo = fed.algorithm
    norm = norm_state_keys(algo.template)
    full = {k: v.shape for k, v in fed.algorithm.init().arrays.items()}
    for client, reply in replies:
        if "local-bn" in name or name == "fedbn":  # norm layers never leave the node
            assert not any(k.split("/", 1)[1] in norm for k in reply.arrays)
        if name == "splitmix-local-bn":  # as many bases as the client's budget allows, ⌊R_k / r⌋
            bases = {k.split("/", 1)[0] for k in reply.arrays}
            assert len(bases) == round(algo.budget(client) / 0.25), (client, bases)
        if name in ("sheterofl", "fedrolex"):  # a slice of its budget's width: fewer entries below budget 1
            size = sum(v.numel() for v in reply.arrays.values())
            whole = sum(torch.Size(s).numel() for k, s in full.items() if k.startswith("model/"))
            assert (size < whole) == (algo.budget(client) < 1), (client, size, whole)
