"""executor=flower on a loopback Grid (no Ray): parity, failed clients, client discovery, node state."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from fedtrust.errors import FedTrustError  # noqa: E402
from fedtrust.fl.executor import Callback, ClientStore, RoundReport  # noqa: E402
from fedtrust.fl.protocol import Message  # noqa: E402
from fedtrust.flower.app_config import FlowerSettings, config_table, flatten  # noqa: E402
from fedtrust.flower.client_app import STATE_PREFIX, make_client_app  # noqa: E402
from fedtrust.flower.executor import FlowerExecutor, bind_grid  # noqa: E402
from fedtrust.flower.node_state import NodeStateFiles  # noqa: E402
from fedtrust.flower.records import from_records, has_message  # noqa: E402
from fedtrust.flower.server_app import discover_clients  # noqa: E402
from fedtrust.runner.config import build_config, config_to_dict  # noqa: E402
from fedtrust.runner.federation import build_federation  # noqa: E402

ARGS = ["data.num_clients=4", "data.clients_per_round=3", "rounds=3", "train.steps=3", "model.width=8"]
NODES = {100 + k: {"partition-id": k, "num-partitions": 4} for k in range(4)}  # node ids ≠ client ids


class Recorder(Callback):
    def __init__(self) -> None:
        self.reports: list[RoundReport] = []

    def after_round(self, report: RoundReport) -> None:
        self.reports.append(report)


def run_config(cfg) -> dict:
    """What Flower hands a deployed app (the fedtrust config under fedtrust.*)."""
    return flatten(config_table(cfg))


def fail_on(plan: dict[int, set[int]]):
    """A Flower mod raising in the train handler of the clients ``plan[round]``."""
    def mod(msg, context, call_next):
        if msg.metadata.message_type == "train" and \
                context.node_config["partition-id"] in plan.get(int(msg.metadata.group_id), set()):
            raise RuntimeError("injected fault")
        return call_next(msg, context)
    return mod


def test_flower_rounds_equal_sequential_rounds_bit_for_bit(sequential_and_flower):
    recorder = Recorder()
    run = sequential_and_flower(ARGS + ["algorithm.name=fedprox"], NODES, 3, [recorder])
    fed, grid = run.fed, run.grid
    assert isinstance(fed.executor, FlowerExecutor) and fed.executor.config == run.cfg
    run.assert_equal_weights()
    assert [r.clients for r in recorder.reports] == [sorted(r.reply_meta) for r in recorder.reports]
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 9 and {m.metadata.dst_node_id for m in train} <= set(NODES)
    assert all(m.metadata.group_id == str(m.content["fedtrust.call"]["round"]) for m in train)


FLIP = ["algorithm.name=flip", "algorithm.warmup_steps=20", "algorithm.pair_steps=10", "algorithm.refine_steps=5",
        "algorithm.tau_inv=0.3", "attack.name=backdoor", "attack.ids=[2]", "attack.force=true"]


def test_flip_on_flower_equals_sequential_and_keeps_its_state_on_the_node(sequential_and_flower):
    """FLIP's hardening (its inversion state per client) and a DBA attacker: the Flower executor gives the
    sequential executor's weights bit for bit, the FLIP state stays in each node's context and is never
    sent. Rules out FLIP state kept on the server side under Flower (a node would warm up every round and
    the weights would differ) or shipped in the replies."""
    run = sequential_and_flower(ARGS + FLIP, NODES, 3)
    run.assert_equal_weights()
    grid, store = run.grid, run.store
    replied = [key for m in grid.received if m.has_content() for rec in m.content.array_records.values()
               for key in rec.keys()]
    assert replied and not any("flip" in key for key in replied), "FLIP state left the node"
    assert any(k.startswith("flip/cache/") for st in store.states.values() for k in st.arrays), \
        "the sequential reference kept no FLIP pair cache: nothing compared"
    for node, ctx in grid.contexts.items():  # node 100 + k holds client k's state, as the sequential store
        want = store.get(node - 100)
        if not want.arrays:
            assert not has_message(ctx.state, STATE_PREFIX)
            continue
        got = from_records(ctx.state, STATE_PREFIX)
        assert got.arrays.keys() == want.arrays.keys()
        for k, v in want.arrays.items():
            assert torch.equal(got.arrays[k], v), (node, k)


def test_failed_client_is_left_out_and_a_round_where_all_fail_stops_the_run(loopback_grid, caplog):
    cfg = build_config({}, ARGS + ["executor=flower", "data.clients_per_round=4"])
    fed = build_federation(cfg)
    app = make_client_app(config_to_dict(cfg), mods=[fail_on({1: {2}, 2: {0, 1, 2, 3}})])
    grid = loopback_grid(app, NODES, silent=[101])  # client 1 never answers
    recorder = Recorder()
    all_failed = r"^round 2: all 4 sampled clients failed; client 0: .*RuntimeError: injected fault$"
    with bind_grid(grid, FlowerSettings(round_timeout=1.0, join_timeout=5.0)), \
            caplog.at_level("WARNING", logger="flwr.fedtrust"), pytest.raises(FedTrustError, match=all_failed):
        fed.executor.run(fed.algorithm.init(), ClientStore(), 0, 3, [recorder])
    assert [r.round for r in recorder.reports] == [1]
    assert sorted(recorder.reports[0].reply_meta) == [0, 3]
    text = caplog.text
    assert "round 1: client 1 failed (no reply within 1 s)" in text
    assert "round 1: client 2 failed (ClientAppException: RuntimeError: injected fault)" in text


def test_client_state_stays_in_the_node_context_and_never_in_replies(loopback_grid, monkeypatch):
    cfg = build_config({}, ARGS + ["executor=flower", "rounds=2", "data.clients_per_round=4"])
    fed = build_federation(cfg)
    alg_cls = type(fed.algorithm)
    stateless = alg_cls.client_update

    def client_update(self, message, data, client_state, ctx):  # a stateful client: counts its rounds
        reply, _ = stateless(self, message, data, client_state, ctx)
        seen = int(client_state.meta.get("rounds_seen", 0)) + 1
        return reply, Message({"secret": torch.full((2,), float(ctx.client_id))}, {"rounds_seen": seen})

    monkeypatch.setattr(alg_cls, "client_update", client_update)
    grid = loopback_grid(make_client_app(config_to_dict(cfg)), NODES)
    with bind_grid(grid, FlowerSettings()):
        fed.executor.run(fed.algorithm.init(), store := ClientStore(), 0, 2)
    assert store.states == {}  # the server never sees client state
    for node, ctx in grid.contexts.items():
        assert has_message(ctx.state, STATE_PREFIX)
        state = from_records(ctx.state, STATE_PREFIX)
        assert state.meta == {"rounds_seen": 2} and torch.equal(state.arrays["secret"],
                                                                torch.full((2,), float(node - 100)))


class StaticGrid:
    """A grid whose nodes answer queries with fixed records (or errors)."""

    def __init__(self, answers: dict[int, tuple[int, int] | str]) -> None:
        self.answers = answers
        self.replies: dict[str, object] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.answers)

    def push_messages(self, messages):
        from flwr.app import Error
        from flwr.app import Message as FlowerMessage

        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.replies)}-{i}"
            a = self.answers[m.metadata.dst_node_id]
            if isinstance(a, str):
                reply = FlowerMessage(Error(code=2, reason=f"Traceback...\n  boom\n{a}\n"), reply_to=m)
            else:
                rec = ConfigRecord({"partition-id": a[0], "num-partitions": a[1]})
                reply = FlowerMessage(RecordDict({"fedtrust.node": rec}), reply_to=m)
            self.replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.mark.parametrize(("answers", "error"), [
    ({7: (0, 2), 8: (0, 2)}, "SuperNodes 7 and 8 both claim partition-id 0"),
    ({7: (0, 3)}, "SuperNode 7 has num-partitions=3, expected data.num_clients=2"),
    ({7: (0, 2), 8: "ConfigError: node-config partition-id=5 must be an int in 0..1"},
     "SuperNode 8 cannot act as a fedtrust client: ConfigError: node-config partition-id=5 must be"),
    ({7: (1, 2)}, r"only 1 of 2 clients joined within 0.3 s; no SuperNode answered for partition-id 0$"),
])
def test_discovery_errors_are_one_line(answers, error, task_identity):
    with pytest.raises(FedTrustError, match=error):
        discover_clients(StaticGrid(answers), 2, timeout=0.3, poll=0.05)
    assert discover_clients(StaticGrid({5: (1, 2), 9: (0, 2)}), 2, timeout=1) == {0: 9, 1: 5}


def test_execute_outside_run_is_an_error():
    fed = build_federation(build_config({}, ARGS + ["executor=flower"]))
    with pytest.raises(FedTrustError, match="no Flower Grid is bound"):
        fed.executor.execute({0: Message()}, 1, ClientStore())


def test_a_stopped_run_ends_the_wait_for_replies_at_once(loopback_grid):
    from fedtrust.flower.server_app import exchange

    grid = loopback_grid(make_client_app({}), NODES, silent=NODES)  # nobody answers train messages
    start = time.monotonic()
    with pytest.raises(FedTrustError, match="^the Flower run stopped while waiting for clients$"):
        exchange(grid, {0: 100}, {0: Message({"w": torch.ones(1)}, {})}, 1, timeout=600, stopped=lambda: True)
    assert time.monotonic() - start < 5
    replies, failed = exchange(grid, {0: 100}, {0: Message()}, 1, timeout=0.3)
    assert replies == {} and failed == {0: "no reply within 0.3 s"}


def test_a_run_on_flower_that_dies_resumes_to_the_sequential_result(loopback_grid, tmp_path):
    import fedtrust
    from fedtrust.runner.rundir import read_metrics

    args = ARGS + ["eval.every=1", "eval.personalized=false"]
    fedtrust.run(None, args + ["executor=sequential", f"out={tmp_path / 'seq'}"], progress=False, report=False)
    cfg = build_config({}, args + ["executor=flower", f"out={tmp_path / 'flower'}"])
    broken = loopback_grid(make_client_app(config_to_dict(cfg), mods=[fail_on({3: {0, 1, 2, 3}})]), NODES)
    with bind_grid(broken, FlowerSettings()), pytest.raises(FedTrustError, match="^round 3: all 3 sampled"):
        fedtrust.run(cfg, progress=False, report=False)
    assert [r["round"] for r in read_metrics(tmp_path / "flower")] == [1, 2]
    with bind_grid(loopback_grid(make_client_app(), NODES, run_config(cfg)), FlowerSettings()):
        resumed = fedtrust.run(resume=tmp_path / "flower", progress=False, report=False)
    assert resumed.summary["executor"] == "flower"

    def strip(records):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in records]

    assert strip(read_metrics(tmp_path / "flower")) == strip(read_metrics(tmp_path / "seq"))


def test_node_state_on_disk_carries_a_resumed_run_on_new_nodes(loopback_grid, tmp_path):
    """Ditto keeps each client's personal model on its node. Rounds 1-2 on one set of nodes, then rounds 3-4
    on NEW nodes (empty contexts: what a resumed run starts) that find the state their predecessors wrote
    under node-config ``state-dir``: every node's state and the server state equal the uninterrupted
    run's, bit for bit. Without ``state-dir`` the new nodes restart from nothing and their states differ
    (the test can tell). Rules out state written late or not at all, a version from the wrong round."""
    args = ARGS + ["executor=flower", "algorithm.name=ditto", "eval.personalized=false", "data.clients_per_round=3"]
    cfg = build_config({}, args)
    app = make_client_app(config_to_dict(cfg))
    fed = build_federation(cfg)
    settings = FlowerSettings(round_timeout=30.0, join_timeout=5.0)

    def rounds(grid, state, start: int, end: int) -> Message:
        with bind_grid(grid, settings):
            return fed.executor.run(state, ClientStore(), start, end)

    def node_states(grid) -> dict[int, Message]:
        return {n: from_records(c.state, STATE_PREFIX) for n, c in grid.contexts.items()
                if has_message(c.state, STATE_PREFIX)}

    torch.manual_seed(0)
    init = fed.algorithm.init()
    grid = loopback_grid(app, NODES)
    whole, whole_nodes = rounds(grid, init, 0, 4), node_states(grid)

    def split(state_dir) -> tuple[Message, dict[int, Message]]:
        nodes = {n: {**c, **({"state-dir": str(state_dir)} if state_dir else {})} for n, c in NODES.items()}
        half = rounds(loopback_grid(app, nodes), init, 0, 2)
        second = loopback_grid(app, nodes)
        return rounds(second, half, 2, 4), node_states(second)

    resumed, resumed_nodes = split(tmp_path / "nodes")
    assert all(torch.equal(resumed.arrays[k], whole.arrays[k]) for k in whole.arrays)
    assert len(whole_nodes) >= 3 and 0 < len(resumed_nodes) < len(whole_nodes)  # some only trained before
    for n, want in whole_nodes.items():  # a node idle since the "resume" holds its state on disk only
        got = resumed_nodes.get(n) or NodeStateFiles(tmp_path / "nodes" / f"client-{n - 100}").latest_before(5)
        assert all(torch.equal(got.arrays[k], v) for k, v in want.arrays.items()), n
    written = sorted(p.relative_to(tmp_path / "nodes").as_posix() for p in (tmp_path / "nodes").rglob("*.safetensors"))
    assert written and all(p.startswith("client-") and "/round-" in p for p in written)
    assert max(len(list(d.iterdir())) for d in (tmp_path / "nodes").iterdir()) <= 2  # checkpoint_every + 1
    _, forgetful_nodes = split(None)
    assert any(not torch.equal(forgetful_nodes[n].arrays[k], v) for n, want in whole_nodes.items()
               for k, v in want.arrays.items() if n in forgetful_nodes), \
        "new nodes without their state ended with the same state: the test cannot see lost state"
