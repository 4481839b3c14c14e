"""The ServerApp side: find the clients and exchange one round's messages (the deployable ServerApp is in flower/app.py).

The round loop itself is fedtrust's (``Executor.run``: sample, ``configure``,
execute, ``aggregate``, callbacks); on Flower, "execute" is :func:`exchange`
over a Grid, after :func:`discover_clients` has mapped Flower node ids to
fedtrust client ids by asking every node for its ``partition-id``. A
personalized algorithm's clients are evaluated on their nodes with
:func:`score_clients` (``evaluate`` messages; the replies hold only accuracies).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.serverapp import Grid

from fedtrust.errors import FedTrustError
from fedtrust.fl.protocol import Message
from fedtrust.flower import LOGGER
from fedtrust.flower.client_app import CALL, NODE, NUM_PARTITIONS, PARTITION_ID
from fedtrust.flower.records import SCORES, Record, from_records, scores_from_record, to_records

if TYPE_CHECKING:
    from fedtrust.evaluation import ClientScores

log = logging.getLogger(LOGGER)


def _reason(reply: FlowerMessage, limit: int = 300) -> str:
    """A failed reply's reason on one line: the last line of Flower's (possibly multi-line) reason."""
    lines = [line.strip() for line in (reply.error.reason or "").splitlines() if line.strip()]
    reason = lines[-1] if lines else f"Flower error code {reply.error.code}"
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def _register(reply: FlowerMessage, nodes: dict[int, int], num_clients: int) -> None:
    """Record the client id a node answered with; a failed, foreign or duplicate answer is an error."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise FedTrustError(f"SuperNode {node} cannot act as a fedtrust client: {_reason(reply)}")
    if NODE not in reply.content:
        raise FedTrustError(f"SuperNode {node} answered without a {NODE!r} record; is it running fedtrust's ClientApp?")
    info = reply.content[NODE]
    client, parts = int(info[PARTITION_ID]), int(info[NUM_PARTITIONS])
    if parts != num_clients:
        raise FedTrustError(f"SuperNode {node} has num-partitions={parts}, expected data.num_clients={num_clients}")
    if nodes.get(client, node) != node:
        raise FedTrustError(f"SuperNodes {nodes[client]} and {node} both claim partition-id {client}")
    nodes[client] = node


POLL_S = 0.2
"""Seconds between pulls for replies (Flower's own ``send_and_receive`` waits 3 s between pulls on a deployment)."""

Stopped = Callable[[], bool]


def collect(grid: Grid, messages: list[FlowerMessage], timeout: float, stopped: Stopped | None = None,
            poll: float = POLL_S) -> list[FlowerMessage]:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds passed.

    ``stopped()`` turning true (the simulation engine died, Ctrl-C) ends the
    wait with a one-line error instead of waiting out the timeout.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[FlowerMessage] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending -= {r.metadata.reply_to_message_id for r in got}
        if not pending or time.monotonic() >= deadline:
            break
        if stopped is not None and stopped():
            raise FedTrustError("the Flower run stopped while waiting for clients")
        time.sleep(poll)
    return replies


def discover_clients(grid: Grid, num_clients: int, timeout: float, stopped: Stopped | None = None,
                     poll: float = POLL_S) -> dict[int, int]:
    """``{client id: node id}`` once a node has answered for every partition-id 0 … num_clients − 1.

    Nodes may join late (a deployment): new nodes are asked every ``poll``
    seconds until ``timeout``, then a one-line error names the missing ids.
    """
    deadline = time.monotonic() + timeout
    nodes: dict[int, int] = {}
    asked: set[int] = set()
    while len(nodes) < num_clients:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            asked.update(new)
            queries = [FlowerMessage(RecordDict(), n, MessageType.QUERY) for n in new]
            replies = collect(grid, queries, max(poll, deadline - time.monotonic()), stopped, poll)
            for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
                _register(reply, nodes, num_clients)
        if len(nodes) < num_clients:
            if time.monotonic() >= deadline:
                missing = sorted(set(range(num_clients)) - set(nodes))
                raise FedTrustError(f"only {len(nodes)} of {num_clients} clients joined within {timeout:g} s; "
                                    f"no SuperNode answered for partition-id {_ids(missing)}")
            if stopped is not None and stopped():
                raise FedTrustError("the Flower run stopped while waiting for clients")
            time.sleep(poll)
    return nodes


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:10])) + (f", … ({len(ids)} in all)" if len(ids) > 10 else "")


def _send(grid: Grid, nodes: Mapping[int, int], contents: Mapping[int, RecordDict], message_type: str,
          round: int, timeout: float,
          stopped: Stopped | None = None) -> tuple[dict[int, FlowerMessage], dict[int, str]]:
    """Send each client its content as a ``message_type`` message of ``round``; ``(replies, failures)``.

    A client fails when its node replies with an error (the reason is kept) or
    not within ``timeout`` seconds. Both are keyed and ordered by client id.
    """
    out = [FlowerMessage(contents[c], nodes[c], message_type, group_id=str(round)) for c in sorted(contents)]
    by_node = {r.metadata.src_node_id: r for r in collect(grid, out, timeout, stopped)}
    replies: dict[int, FlowerMessage] = {}
    failed: dict[int, str] = {}
    for c in sorted(contents):
        reply = by_node.get(nodes[c])
        if reply is None:
            failed[c] = f"no reply within {timeout:g} s"
        elif reply.has_error():
            failed[c] = _reason(reply)
        else:
            replies[c] = reply
    return replies, failed


def _call(records: Mapping[str, Record], round: int, client: int) -> RecordDict:
    """A message's content: ``records`` plus the call record naming the round and the addressed client."""
    return RecordDict({**records, CALL: ConfigRecord({"round": round, "client-id": client})})


def exchange(grid: Grid, nodes: Mapping[int, int], messages: Mapping[int, Message], round: int, timeout: float,
             device: torch.device | None = None,
             stopped: Stopped | None = None) -> tuple[dict[int, Message], dict[int, str]]:
    """Send each client its message for ``round``; return ``(replies, failures)`` by client id.

    A client fails when its node replies with an error (the reason is kept) or
    not within ``timeout`` seconds. A payload shared by several clients is
    encoded once. Replies are ordered by client id, like the sequential executor's.
    """
    encoded: dict[int, dict[str, Record]] = {}
    for c in messages:
        if id(messages[c]) not in encoded:
            encoded[id(messages[c])] = to_records(messages[c])
    contents = {c: _call(encoded[id(messages[c])], round, c) for c in messages}
    received, failed = _send(grid, nodes, contents, MessageType.TRAIN, round, timeout, stopped)
    replies: dict[int, Message] = {}
    for c, reply in received.items():
        try:
            replies[c] = from_records(reply.content, device=device)
        except FedTrustError as e:
            failed[c] = str(e)
    return replies, dict(sorted(failed.items()))


def score_clients(grid: Grid, nodes: Mapping[int, int], state: Message, clients: Sequence[int], round: int,
                  timeout: float,
                  stopped: Stopped | None = None) -> tuple[dict[int, ClientScores], dict[int, str]]:
    """Each client's personalized scores after ``round``, computed on its node; ``(scores, failures)``.

    Every client gets the server ``state`` (encoded once) in an ``evaluate``
    message; its node builds the predictors with the client state it keeps
    and replies only the accuracies (the ``SCORES`` metric record), so the
    client state never reaches the server. Failures as in :func:`exchange`.
    """
    records = to_records(state)
    contents = {c: _call(records, round, c) for c in clients}
    received, failed = _send(grid, nodes, contents, MessageType.EVALUATE, round, timeout, stopped)
    scores: dict[int, ClientScores] = {}
    for c, reply in received.items():
        try:
            record = reply.content[SCORES] if SCORES in reply.content else None
            if not isinstance(record, MetricRecord):
                raise FedTrustError(f"evaluation reply has no {SCORES!r} metric record")
            scores[c] = scores_from_record(record)
        except FedTrustError as e:
            failed[c] = str(e)
    return scores, dict(sorted(failed.items()))
