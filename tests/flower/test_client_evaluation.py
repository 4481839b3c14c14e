"""Personalized evaluation on Flower: each client is scored on its node, with the state it keeps there.

On a loopback Grid (no Ray): the metrics of FedLoGe (local heads L_k on the
nodes) equal the sequential executor's bit for bit, and no message the server
receives holds a local head; FedAvg's clients are scored on the server with the
global model, as before; failed evaluations and resume.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

from flwr.app import ArrayRecord, MetricRecord  # noqa: E402

import fedtrust  # noqa: E402
from fedtrust.errors import FedTrustError  # noqa: E402
from fedtrust.evaluation import evaluate  # noqa: E402
from fedtrust.fl.executor import ClientStore  # noqa: E402
from fedtrust.fl.protocol import Message  # noqa: E402
from fedtrust.flower.app_config import FlowerSettings, config_table, flatten  # noqa: E402
from fedtrust.flower.client_app import STATE_PREFIX, make_client_app  # noqa: E402
from fedtrust.flower.executor import FlowerExecutor, bind_grid  # noqa: E402
from fedtrust.flower.records import SCORES, from_records, has_message  # noqa: E402
from fedtrust.registry import get, names  # noqa: E402
from fedtrust.runner.config import build_config, config_to_dict  # noqa: E402
from fedtrust.runner.federation import build_federation  # noqa: E402
from fedtrust.runner.rundir import read_metrics  # noqa: E402
from fedtrust.runner.run import RunResult  # noqa: E402

N = 5
FEDLOGE = [f"data.num_clients={N}", "data.clients_per_round=3", "rounds=3", "eval.every=1", "model.width=16",
           "train.batch_size=8", "data.imbalance_ratio=10", "algorithm.name=fedloge",
           "algorithm.refine_steps=100", "algorithm.norm_target=1.0"]
NODES = {100 + k: {"partition-id": k, "num-partitions": N} for k in range(N)}  # node ids ≠ client ids


def run_config(cfg) -> dict:
    """What Flower hands a deployed app (the fedtrust config under fedtrust.*)."""
    return flatten(config_table(cfg))


def strip(records: list[dict]) -> list[dict]:
    """Metrics records without the wall-clock time."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def on_flower(args: list[str], out, grid_of, mods=()) -> tuple[RunResult, Any]:
    """``fedtrust.run`` with executor=flower on a loopback Grid: (the run's result, the grid)."""
    cfg = build_config({}, args + ["executor=flower", f"out={out}"])
    grid = grid_of(make_client_app(config_to_dict(cfg), mods=mods), NODES)
    with bind_grid(grid, FlowerSettings(round_timeout=30.0, join_timeout=30.0)):
        result = fedtrust.run(cfg, progress=False, report=False)
    return result, grid


def fail_evaluate_on(plan: dict[int, set[int]]):
    """A Flower mod raising in the evaluate handler of the clients ``plan[round]``."""
    def mod(msg, context, call_next):
        if msg.metadata.message_type == "evaluate" and \
                context.node_config["partition-id"] in plan.get(int(msg.metadata.group_id), set()):
            raise RuntimeError("injected evaluation fault")
        return call_next(msg, context)
    return mod


def test_fedloge_on_flower_scores_clients_on_their_nodes_exactly_as_sequential(loopback_grid, tmp_path, one_thread):
    seq = fedtrust.run(None, FEDLOGE + ["executor=sequential", f"out={tmp_path / 'seq'}"], progress=False,
                       report=False)
    flw, grid = on_flower(FEDLOGE, tmp_path / "flower", loopback_grid)
    expected, got = strip(read_metrics(tmp_path / "seq")), strip(read_metrics(tmp_path / "flower"))
    assert got == expected  # every key, every client, every predictor: bit for bit
    last = got[-1]
    assert set(last["by_predictor"]) == {"universal", "global", "personalized"}
    assert all(len(p["client_acc"]) == N and None not in p["client_acc_masked"]
               for p in last["by_predictor"].values())

    # the nodes' local heads made the difference: without them the personalized scores differ
    fed = build_federation(seq.config)
    blind = evaluate(fed.algorithm, flw.state, ClientStore(), fed.eval_setup)["by_predictor"]["personalized"]
    assert blind["client_acc"] != last["by_predictor"]["personalized"]["client_acc"]

    # every client was evaluated on its node after every round; each reply is one metric record
    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert sorted((int(m.metadata.group_id), m.metadata.dst_node_id) for m in evals) == \
        [(r, node) for r in (1, 2, 3) for node in sorted(NODES)]
    for reply in grid.received:
        if reply.metadata.message_type == "evaluate":
            assert list(reply.content) == [SCORES] and isinstance(reply.content[SCORES], MetricRecord)


def test_no_message_the_server_receives_holds_a_local_head(loopback_grid, tmp_path, one_thread):
    heads: list[torch.Tensor] = []  # every L_k (weight, bias) a node held after any of its handlers ran

    def keep_heads(msg, context, call_next):
        reply = call_next(msg, context)
        if has_message(context.state, STATE_PREFIX):
            heads.extend(from_records(context.state, STATE_PREFIX).prefixed("head_l").values())
        return reply

    _, grid = on_flower(FEDLOGE, tmp_path / "flower", loopback_grid, mods=[keep_heads])
    initial = from_records(grid.sent[-1].content).prefixed("head_l_init")["weight"]  # the common initial L
    trained = [h for h in heads if h.shape == initial.shape and not torch.equal(h, initial)]
    assert len(trained) >= 9, "the nodes must have trained their local heads"

    kinds = {"train": 0, "evaluate": 0}
    for reply in grid.received:
        kind = reply.metadata.message_type
        if kind == "query":
            continue
        kinds[kind] += 1
        arrays = [a for rec in reply.content.values() if isinstance(rec, ArrayRecord) for a in rec.values()]
        if kind == "evaluate":
            assert arrays == [] and list(reply.content) == [SCORES]  # numbers only
        else:
            keys = set(from_records(reply.content).arrays)
            assert keys and all(k.startswith(("backbone/", "head_g/")) for k in keys), sorted(keys)
        for array in arrays:
            t = torch.from_numpy(array.numpy())
            assert not any(t.shape == h.shape and torch.equal(t, h) for h in heads), "a local head reached the server"
    assert kinds == {"train": 9, "evaluate": 3 * N}


PERSONALIZED = sorted(n for n in names("algorithm") if get("algorithm", n).personalized)


@pytest.mark.parametrize("algorithm", PERSONALIZED)
def test_every_personalized_algorithm_scores_its_clients_on_flower_as_sequential(algorithm, loopback_grid, tmp_path,
                                                                                one_thread):
    args = [f"data.num_clients={N}", "data.clients_per_round=2", "rounds=2", "eval.every=1", "train.steps=3",
            "model.width=8", f"algorithm.name={algorithm}"]
    args += ["algorithm.refine_steps=10"] if algorithm == "fedloge" else []
    fedtrust.run(None, args + ["executor=sequential", f"out={tmp_path / 'seq'}"], progress=False, report=False)
    _, grid = on_flower(args, tmp_path / "flower", loopback_grid)
    assert strip(read_metrics(tmp_path / "flower")) == strip(read_metrics(tmp_path / "seq"))
    assert sum(m.metadata.message_type == "evaluate" for m in grid.sent) == 2 * N


def test_fedavg_clients_are_scored_on_the_server_with_the_global_model(loopback_grid, tmp_path, one_thread):
    args = [f"data.num_clients={N}", "data.clients_per_round=2", "rounds=2", "eval.every=1", "train.steps=5",
            "model.width=8", "data.imbalance_ratio=10"]
    fedtrust.run(None, args + ["executor=sequential", f"out={tmp_path / 'seq'}"], progress=False, report=False)
    _, grid = on_flower(args, tmp_path / "flower", loopback_grid)
    expected, got = strip(read_metrics(tmp_path / "seq")), strip(read_metrics(tmp_path / "flower"))
    assert got == expected
    assert all(None not in r["client_acc"] and len(r["client_acc_masked"]) == N for r in got)
    assert not [m for m in grid.sent if m.metadata.message_type == "evaluate"]  # no client state: nothing to ask


def test_a_failed_client_evaluation_is_none_and_all_failing_stops_the_run(loopback_grid, tmp_path, caplog):
    args = FEDLOGE + ["rounds=2", "train.steps=2"]
    seq = fedtrust.run(None, args + ["executor=sequential", f"out={tmp_path / 'seq'}"], progress=False,
                       report=False)
    assert seq.summary["round"] == 2
    mod = fail_evaluate_on({1: {3}, 2: set(range(N))})
    with caplog.at_level("WARNING", logger="flwr.fedtrust"), \
            pytest.raises(FedTrustError, match=r"^evaluation after round 2: all 5 clients failed; client 0: "
                                               r".*RuntimeError: injected evaluation fault$"):
        on_flower(args, tmp_path / "flower", loopback_grid, mods=[mod])
    assert "evaluation after round 1: client 3 failed (ClientAppException: RuntimeError: injected evaluation " \
           "fault); its personalized scores are None" in caplog.text
    first, expected = read_metrics(tmp_path / "flower")[0], read_metrics(tmp_path / "seq")[0]
    for name, p in first["by_predictor"].items():
        want = expected["by_predictor"][name]["client_acc"]
        assert p["client_acc"] == want[:3] + [None] + want[4:], name
        assert p["client_acc_mean"] == pytest.approx(sum(want[:3] + want[4:]) / 4)


def test_fedloge_on_flower_resumes_with_fresh_client_state(loopback_grid, tmp_path):
    args = FEDLOGE + ["train.steps=2"]
    fedtrust.run(None, args + ["executor=sequential", f"out={tmp_path / 'seq'}"], progress=False, report=False)
    fail_round_3 = fail_evaluate_on({3: set(range(N))})
    with pytest.raises(FedTrustError, match="^evaluation after round 3: all 5 clients failed"):
        on_flower(args, tmp_path / "flower", loopback_grid, mods=[fail_round_3])
    cfg = build_config({}, args + ["executor=flower", f"out={tmp_path / 'flower'}"])
    with bind_grid(loopback_grid(make_client_app(), NODES, run_config(cfg)), FlowerSettings()):
        resumed = fedtrust.run(resume=tmp_path / "flower", progress=False, report=False)
    assert resumed.summary["executor"] == "flower"
    expected, got = strip(read_metrics(tmp_path / "seq")), strip(read_metrics(tmp_path / "flower"))
    assert [r["round"] for r in got] == [1, 2, 3]
    assert got[:2] == expected[:2]  # the checkpoint after round 2 came from the uninterrupted nodes
    # round 3 ran on new nodes, so client state restarted (a known limit): L_k never shapes θ or G (its term
    # sees detached features), so only the personalized scores differ from the uninterrupted run's
    after, want = got[2]["by_predictor"], expected[2]["by_predictor"]
    assert after["universal"] == want["universal"] and after["global"] == want["global"]
    assert after["personalized"]["client_acc"] != want["personalized"]["client_acc"]
    assert None not in after["personalized"]["client_acc"]


def test_evaluate_clients_outside_run_is_an_error():
    fed = build_federation(build_config({}, FEDLOGE[:2] + ["executor=flower", "algorithm.name=fedloge",
                                                           "algorithm.refine_steps=1"]))
    assert isinstance(fed.executor, FlowerExecutor)
    assert fed.eval_setup.client_evaluator == fed.executor.evaluate_clients
    with pytest.raises(FedTrustError, match="no Flower Grid is bound"):
        fed.executor.evaluate_clients(Message(), [0])
    sequential = build_federation(build_config({}, FEDLOGE[:2] + ["executor=sequential"]))
    assert sequential.eval_setup.client_evaluator is None
