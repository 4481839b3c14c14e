"""Flower test helpers: a loopback Grid that runs ClientApps in-process, over Flower's wire format."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
import uuid
from typing import Any

import pytest


class LoopbackGrid:
    """A Flower ``Grid`` whose nodes are ClientApps called in this process.

    Every message and reply goes through protobuf bytes (what a real Grid
    sends), each node keeps its own ``Context`` across calls (``state``
    persists), and nodes in ``silent`` join but never answer a train message
    (a hung or lost client). ``sent`` and ``received`` keep every message the
    server pushed and every reply it pulled.
    """

    def __init__(self, client_app: Any, node_configs: Mapping[int, Mapping[str, Any]],
                 run_config: Mapping[str, Any] | None = None, silent: Iterable[int] = ()) -> None:
        from flwr.app import Context, RecordDict

        self.app = client_app
        self.contexts = {node: Context(run_id=1, node_id=node, node_config=dict(cfg), state=RecordDict(),
                                       run_config=dict(run_config or {}))
                         for node, cfg in node_configs.items()}
        self.silent = set(silent)
        self.sent: list[Any] = []
        self.received: list[Any] = []
        self.replies: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        """Deliver each message at once; its reply (if any) waits to be pulled."""
        from flwr.app import Error, Message

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg_id = uuid.uuid4().hex  # what a SuperLink assigns
            ids.append(msg_id)
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.silent and msg.metadata.message_type == "train":
                continue
            received = Message(content=wire(msg.content), metadata=msg.metadata)
            try:
                reply = self.app(received, self.contexts[node])
            except Exception as e:  # what Flower's runtimes do when a ClientApp (or a mod) raises
                reply = Message(Error(code=2, reason=f"ClientAppException: {type(e).__name__}: {e}"), reply_to=msg)
            self.replies[msg_id] = (Message(content=wire(reply.content), reply_to=msg) if reply.has_content()
                                    else reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        pulled = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        self.received.extend(pulled)
        return pulled


def wire(content: Any) -> Any:
    """``content`` (a RecordDict) after a trip through protobuf bytes."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return recorddict_from_proto(ProtoRecordDict.FromString(recorddict_to_proto(content).SerializeToString()))


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task identity Flower's runtimes give a process before a ServerApp creates messages (restored after)."""
    pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture
def loopback_grid(task_identity: None) -> Callable[..., LoopbackGrid]:
    """``loopback_grid(client_app, node_configs, run_config=None, silent=())``."""
    return LoopbackGrid


@dataclass
class SideBySide:
    """One federation run twice from the same seed: on the sequential executor and on a loopback Flower grid."""

    expected: Any  # the sequential executor's final ServerState
    store: Any  # the sequential run's ClientStore (client states kept on the server side)
    state: Any  # the Flower executor's final ServerState
    cfg: Any  # the Flower run's RunConfig
    fed: Any  # the Flower run's Federation
    grid: LoopbackGrid

    def assert_equal_weights(self) -> None:
        """The Flower run's arrays equal the sequential run's, bit for bit, key for key."""
        import torch

        assert self.state.arrays.keys() == self.expected.arrays.keys()
        for k, v in self.expected.arrays.items():
            assert torch.equal(self.state.arrays[k], v), k


@pytest.fixture
def sequential_and_flower(loopback_grid: Callable[..., LoopbackGrid]) -> Callable[..., SideBySide]:
    """``sequential_and_flower(args, nodes, rounds, recorders=())``: the run of ``args`` (config overrides) for
    ``rounds`` rounds on executor=sequential and on executor=flower over a loopback grid of ``nodes`` (node id
    → node config), both from ``torch.manual_seed(0)``; ``recorders`` watch the Flower run."""
    import torch

    from fedtrust.fl.executor import ClientStore
    from fedtrust.flower.app_config import FlowerSettings, config_table, flatten
    from fedtrust.flower.client_app import make_client_app
    from fedtrust.flower.executor import bind_grid
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import build_federation

    def run(args: list[str], nodes: Mapping[int, Mapping[str, Any]], rounds: int,
            recorders: Iterable[Any] = ()) -> SideBySide:
        seq = build_federation(build_config({}, [*args, "executor=sequential"]))
        torch.manual_seed(0)
        store = ClientStore()
        expected = seq.executor.run(seq.algorithm.init(), store, 0, rounds)

        cfg = build_config({}, [*args, "executor=flower"])
        fed = build_federation(cfg)
        grid = loopback_grid(make_client_app(), nodes, flatten(config_table(cfg)))  # config from the run config
        torch.manual_seed(0)
        with bind_grid(grid, FlowerSettings()):
            state = fed.executor.run(fed.algorithm.init(), ClientStore(), 0, rounds, list(recorders))
        return SideBySide(expected, store, state, cfg, fed, grid)

    return run
