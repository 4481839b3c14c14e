"""The fedtrust ClientApp: a Flower node runs one fedtrust client.

A node is client ``k`` = its node-config ``partition-id`` (Flower's simulation
engine numbers its virtual nodes 0 … N−1 the same way; a deployment's
SuperNode is started with ``--node-config "partition-id=k num-partitions=N"``).
It rebuilds the algorithm and its own data from the fedtrust config (the
simulation passes it in; a deployment reads it from the run config), takes
partition ``k`` of the seeded partition, and answers three message types:

- ``query``: "which client are you?" → ``partition-id`` and ``num-partitions``
  (the ServerApp maps Flower node ids to client ids with it);
- ``train``: the fedtrust message for this round → the client runtime
  (``algorithm.client_update`` inside the configured attack wrapper, as on every
  executor) with the client's persistent state, which stays in ``context.state`` on the
  node and is never sent;
- ``evaluate``: the server state → the client's personalized scores
  (:func:`~fedtrust.evaluation.score_client`: the predictors built with that
  same state, on the client's label-matched local test set, which the node
  rebuilds from the config as the server does); the reply holds only the
  accuracies (a ``MetricRecord``), never weights or the state.

Whatever a handler raises becomes an error reply naming the exception, so the
ServerApp reports the client as failed for that round instead of waiting.
Optional node-config keys: ``data-root`` (where this node's data set lives,
overriding ``data.root``), ``device`` (overriding ``device``) and ``state-dir``
(where the node keeps its client state on disk, so a resumed run finds it:
:mod:`fedtrust.flower.node_state`; a simulation keeps it in the run directory).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from fedtrust.errors import ConfigError, FedTrustError
from fedtrust.evaluation import EvalSetup, score_client
from fedtrust.fl.executor import ClientData
from fedtrust.fl.faults import failure_reason
from fedtrust.fl.protocol import Algorithm, ClientContext, Message
from fedtrust.fl.runtime import ClientRuntime
from fedtrust.fl.sampling import client_generator
from fedtrust.flower import LOGGER
from fedtrust.flower.app_config import config_from_run_config
from fedtrust.flower.node_state import NodeStateFiles
from fedtrust.flower.records import (
    SCORES, from_records, has_message, scores_to_record, store_message, to_records,
)
from fedtrust.runner.config import RunConfig, build_config, config_to_dict

log = logging.getLogger(LOGGER)

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_ROOT = "data-root"
DEVICE = "device"
STATE_DIR = "state-dir"
CALL = "fedtrust.call"
"""Config record of a train or evaluate message: ``round`` and the ``client-id`` the server thinks it addresses."""
NODE = "fedtrust.node"
"""Config record of a query reply: the node's ``partition-id`` and ``num-partitions``."""
STATE_PREFIX = "fedtrust.client_state"
"""Prefix of the client's persistent state in ``Context.state``."""


@dataclass(frozen=True)
class NodeRuntime:
    """What a node needs to act as its client: the client runtime (algorithm and attack wrapper, the same
    :class:`~fedtrust.fl.runtime.ClientRuntime` every executor runs), the federation's data, the seed and
    evaluation."""

    client: ClientRuntime
    algorithm: Algorithm
    data: ClientData
    seed: int
    device: torch.device
    eval_setup: EvalSetup


@functools.lru_cache(maxsize=2)
def _build_runtime(config_json: str) -> NodeRuntime:
    """Build once per process and config (a Ray actor serves many messages); keyed by the whole config."""
    from fedtrust.runner.federation import build_federation

    fed = build_federation(build_config(json.loads(config_json)))
    return NodeRuntime(fed.executor.runtime, fed.algorithm, fed.data, fed.config.seed, fed.device, fed.eval_setup)


def node_client(node_config: Mapping[str, Any], num_clients: int) -> int:
    """This node's client id: its ``partition-id``, checked against ``num-partitions`` and the config."""
    if PARTITION_ID not in node_config:
        raise ConfigError(f"SuperNode has no node-config {PARTITION_ID!r}; start it with "
                          f"--node-config \"{PARTITION_ID}=K {NUM_PARTITIONS}={num_clients}\"")
    pid, parts = node_config[PARTITION_ID], node_config.get(NUM_PARTITIONS, num_clients)
    if not isinstance(pid, int) or not 0 <= pid < num_clients:
        raise ConfigError(f"node-config {PARTITION_ID}={pid!r} must be an int in 0..{num_clients - 1} "
                          f"(data.num_clients={num_clients})")
    if parts != num_clients:
        raise ConfigError(f"node-config {NUM_PARTITIONS}={parts!r} differs from data.num_clients={num_clients}")
    return pid


def node_run_config(context: Context, config: Mapping[str, Any] | None) -> RunConfig:
    """The fedtrust config this node runs: ``config`` (simulation) or the run config (deployment).

    The node's ``data-root`` and ``device`` node-config keys override ``data.root`` and ``device``.
    """
    overrides = ["executor=sequential"]  # a node never runs rounds itself
    if DATA_ROOT in context.node_config:
        overrides.append(f"data.root={json.dumps(str(context.node_config[DATA_ROOT]))}")
    if DEVICE in context.node_config:
        overrides.append(f"device={context.node_config[DEVICE]}")
    if config is not None:
        return build_config(dict(config), overrides)
    return config_from_run_config(context.run_config, overrides)


def handle_query(message: FlowerMessage, context: Context, config: Mapping[str, Any] | None) -> RecordDict:
    """Answer "which client are you?"; cheap (no data loaded), so joining is fast."""
    cfg = node_run_config(context, config)
    client = node_client(context.node_config, cfg.data.num_clients)
    return RecordDict({NODE: ConfigRecord({PARTITION_ID: client, NUM_PARTITIONS: cfg.data.num_clients})})


def _addressed(message: FlowerMessage, context: Context,
               config: Mapping[str, Any] | None) -> tuple[int, int, NodeRuntime]:
    """``(client id, round, runtime)`` of a train or evaluate message; one for another client is an error."""
    cfg = node_run_config(context, config)
    client = node_client(context.node_config, cfg.data.num_clients)
    runtime = _build_runtime(json.dumps(config_to_dict(cfg), sort_keys=True))
    call = message.content[CALL]
    if int(call["client-id"]) != client:
        raise FedTrustError(f"message for client {call['client-id']} reached the node of client {client}")
    return client, int(call["round"]), runtime


def _client_state(context: Context, device: torch.device) -> Message:
    """The client's persistent state kept in ``context.state`` (empty before its first round)."""
    return (from_records(context.state, STATE_PREFIX, device)
            if has_message(context.state, STATE_PREFIX) else Message())


def _state_files(context: Context, config: Mapping[str, Any] | None, client: int) -> NodeStateFiles | None:
    """Where this node keeps its client's state on disk (:mod:`fedtrust.flower.node_state`): node-config
    ``state-dir``, else in a simulation the run directory's ``nodes/``; None: in memory only."""
    cfg = node_run_config(context, config)
    keep = max(cfg.checkpoint_every, 1) + 1
    if STATE_DIR in context.node_config:
        return NodeStateFiles(Path(str(context.node_config[STATE_DIR])) / f"client-{client}", keep)
    if config is not None and cfg.out is not None:
        return NodeStateFiles(Path(cfg.out) / "nodes" / f"client-{client}", keep)
    return None


def _resumed_state(context: Context, config: Mapping[str, Any] | None, client: int, before: int,
                   device: torch.device) -> Message:
    """The client state in ``context.state``; a fresh node (a resumed run) reads the newest version on disk
    from a round before ``before``."""
    if has_message(context.state, STATE_PREFIX):
        return _client_state(context, device)
    files = _state_files(context, config, client)
    kept = files.latest_before(before) if files is not None else None
    return Message({k: v.to(device) for k, v in kept.arrays.items()}, kept.meta) if kept is not None else Message()


def handle_train(message: FlowerMessage, context: Context, config: Mapping[str, Any] | None) -> RecordDict:
    """Run ``client_update`` on this node's data and state; keep the new state in ``context.state`` (and on
    disk where :func:`_state_files` says, so a resumed run finds it)."""
    client, round_, runtime = _addressed(message, context, config)
    incoming = from_records(message.content, device=runtime.device)
    state = _resumed_state(context, config, client, round_, runtime.device)
    ctx = ClientContext(client, round_, client_generator(runtime.seed, round_, client), runtime.device)
    if runtime.client.faults is not None:  # an injected hang: silent past the server's deadline, then fail
        runtime.client.faults.wait_if_hanging(ctx)
    reply, new_state = runtime.client.run(incoming, runtime.data.client(client), state, ctx)
    store_message(context.state, new_state, STATE_PREFIX)
    files = _state_files(context, config, client)
    if files is not None and (new_state.arrays or new_state.meta or files.versions()):
        files.write(round_, new_state)
    return RecordDict(to_records(reply))


def handle_evaluate(message: FlowerMessage, context: Context, config: Mapping[str, Any] | None) -> RecordDict:
    """Score this client's predictors, built with the state it keeps, on its local test set; reply the numbers.

    The state is only read here (evaluation never changes it); the reply is
    one ``MetricRecord`` of accuracies (:func:`~fedtrust.flower.records.scores_to_record`).
    """
    client, round_, runtime = _addressed(message, context, config)
    server_state = from_records(message.content, device=runtime.device)
    state = _resumed_state(context, config, client, round_ + 1, runtime.device)
    scores = score_client(runtime.algorithm, server_state, state, client, runtime.eval_setup)
    if scores is None:
        raise FedTrustError(f"client {client} has an empty local test set on its node but not on the server; "
                            "do both load the same data set?")
    return RecordDict({SCORES: scores_to_record(scores)})


Handler = Callable[[FlowerMessage, Context, "Mapping[str, Any] | None"], RecordDict]


def _reply(handler: Handler, message: FlowerMessage, context: Context,
           config: Mapping[str, Any] | None) -> FlowerMessage:
    """Run ``handler``; any exception becomes an error reply ("Type: message") instead of a crash."""
    try:
        return FlowerMessage(handler(message, context, config), reply_to=message)
    except Exception as e:  # noqa: BLE001 - reported to the server as this client's failure
        reason = failure_reason(e, limit=10_000)
        log.warning("fedtrust client (node %s, %s) failed: %s", context.node_id, dict(context.node_config), reason)
        log.debug("traceback of the failure above", exc_info=True)
        return FlowerMessage(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def make_client_app(config: Mapping[str, Any] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp running fedtrust clients.

    ``config`` is the resolved fedtrust config (a plain dict) in simulation;
    None reads it from the run config (deployment). ``mods`` are Flower mods
    wrapped around every handler.
    """
    app = ClientApp(mods=list(mods))
    fixed = dict(config) if config is not None else None

    @app.query()
    def query(message: FlowerMessage, context: Context) -> FlowerMessage:
        return _reply(handle_query, message, context, fixed)

    @app.train()
    def train(message: FlowerMessage, context: Context) -> FlowerMessage:
        return _reply(handle_train, message, context, fixed)

    @app.evaluate()
    def evaluate(message: FlowerMessage, context: Context) -> FlowerMessage:
        return _reply(handle_evaluate, message, context, fixed)

    return app
