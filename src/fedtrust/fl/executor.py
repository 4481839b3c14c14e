"""Executors own the round loop; algorithms never know which one runs them.

The loop (:meth:`Executor.run`) is written once: sample clients, ``configure``,
execute the clients (each through the one client runtime, :class:`ClientRuntime`,
with its attack wrapper), let omniscient attacks collude (simulation only),
validate the replies (:func:`~fedtrust.fl.validate.validate_replies`), ``aggregate``
the valid ones, then hand a :class:`RoundReport` to the callbacks (evaluation,
metrics, checkpoints, progress). A subclass only says how a round's clients are
executed (:meth:`Executor.execute`).

A client that raises, stays silent past the round's deadline or straggles
(genuinely, or injected by ``faults``: :mod:`fedtrust.fl.faults`) is left out of
the round and logged with its id and reason (``"failed"``, and
``"failed_fraction"`` of the sampled clients); its persistent state stays as it
was. A round whose valid replies are fewer than ``defense.min_replies`` keeps the
previous server state and says why in its metrics; rejected replies are logged
with their client id and reason (``"rejected"``). The run goes on either way, except
when no client of a round replied and one of them raised a genuine error (not an
injected fault, not a timeout): that is a bug or a broken setup, and the first
such error stops the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtrust.data.types import ImageSet
from fedtrust.errors import FedTrustError
from fedtrust.fl.faults import Faults, failure_reason, is_injected
from fedtrust.fl.protocol import Algorithm, ClientContext, Message
from fedtrust.fl.runtime import ClientRuntime
from fedtrust.fl.sampling import Sampler, client_generator, force_clients, sample_clients
from fedtrust.fl.validate import validate_replies
from fedtrust.registry import register
from fedtrust.robust.attacks import Attack


class ClientStore:
    """Persistent per-client state kept by the executor (never seen by the server).

    Only clients that have state are stored, so 10,000 stateless clients cost nothing.
    """

    def __init__(self, states: dict[int, Message] | None = None) -> None:
        self.states: dict[int, Message] = dict(states or {})

    def get(self, client: int) -> Message:
        return self.states.get(client) or Message()

    def set(self, client: int, state: Message) -> None:
        """Keep ``state`` (on the CPU, as every message: see :meth:`Executor.run`)."""
        if state.arrays or state.meta:
            self.states[client] = state.to("cpu")
        else:
            self.states.pop(client, None)


@dataclass
class ClientData:
    """The federation's data: the training set and each client's index array into it."""

    train: ImageSet
    indices: Sequence[torch.Tensor]

    def __len__(self) -> int:
        return len(self.indices)

    def client(self, k: int) -> ImageSet:
        return self.train.subset(self.indices[k])


class Replies(dict[int, Message]):
    """A round's replies by client id, and the clients that gave none: ``failed`` (id → one-line reason)
    and, in process, ``errors`` (id → the exception a client raised)."""

    def __init__(self, replies: dict[int, Message] | None = None, failed: dict[int, str] | None = None,
                 errors: dict[int, BaseException] | None = None) -> None:
        super().__init__(sorted((replies or {}).items()))
        self.errors: dict[int, BaseException] = dict(sorted((errors or {}).items()))
        reasons = {**(failed or {}), **{c: failure_reason(e) for c, e in self.errors.items()}}
        self.failed: dict[int, str] = dict(sorted(reasons.items()))


def fail_if_broken(replies: Replies, round: int) -> None:
    """Stop the run when no sampled client of ``round`` replied and one of them raised a genuine error
    (not an injected fault, not a timeout): re-raise the first such exception (in process), else a
    one-line error. A round lost to injected faults or silence alone keeps the previous state instead."""
    if len(replies) or not replies.failed:
        return
    genuine = {c: r for c, r in replies.failed.items() if not is_injected(r) and not r.startswith("no reply")}
    if not genuine:
        return
    first = next(iter(genuine))
    if first in replies.errors:
        raise replies.errors[first]
    raise FedTrustError(f"round {round}: all {len(replies.failed)} sampled clients failed; "
                        f"client {first}: {genuine[first]}")


@dataclass
class RoundReport:
    """What callbacks see after a round: who took part, the replies' metadata, and metrics so far."""

    round: int
    clients: list[int]
    reply_meta: dict[int, dict[str, Any]]
    state: Message
    store: ClientStore
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def train_loss(self) -> float | None:
        """Sample-weighted mean of the clients' mean local losses."""
        pairs = [(m.get("loss"), m.get("num_examples", 0)) for m in self.reply_meta.values()]
        pairs = [(l, n) for l, n in pairs if l is not None and l == l and n > 0]  # NaN: no step taken
        total = sum(n for _, n in pairs)
        return sum(l * n for l, n in pairs) / total if total else None


class Callback:
    """Hooks around the round loop (STYLE.md §3: callbacks handle eval, checkpoints and logging)."""

    def on_begin(self, start_round: int, rounds: int) -> None: ...
    def after_round(self, report: RoundReport) -> None: ...
    def on_end(self) -> None: ...


class Executor:
    """Runs an algorithm's rounds. ``execute`` is the only hook a subclass overrides."""

    name = "base"

    def __init__(self, algorithm: Algorithm, data: ClientData, seed: int, device: torch.device,
                 num_sampled: int, log: Callable[[str], None] | None = None, attack: Attack | None = None,
                 sampler: Sampler = sample_clients, faults: Faults | None = None) -> None:
        self.algorithm = algorithm
        self.sampler = sampler
        self.attack = attack
        self.faults = faults if faults is not None and faults.active else None
        self.runtime = ClientRuntime(algorithm, attack, self.faults)
        self.data = data
        self.seed = seed
        self.device = device
        self.num_sampled = num_sampled
        self.log: Callable[[str], None] = log or (lambda message: None)

    def execute(self, messages: dict[int, Message], round: int, store: ClientStore) -> Replies:
        """Run the round's clients; the replies of those that answered, with the failures."""
        raise NotImplementedError

    def sample(self, round: int) -> list[int]:
        """The round's clients: the configured sampler's draw, with an attack's clients forced into
        their attack rounds when the attack says so (``attack.force``)."""
        clients = self.sampler(len(self.data), self.num_sampled, self.seed, round)
        if self.attack is not None and self.attack.targets.force:
            forced = [c for c in sorted(self.attack.targets.clients) if self.attack.attacks(c, round)]
            clients = force_clients(clients, forced, self.seed, round) if forced else clients
        return clients

    def aggregate(self, state: Message, replies: dict[int, Message], round: int,
                  messages: dict[int, Message] | None = None) -> tuple[Message, dict[str, Any]]:
        """Validate the replies, then aggregate the valid ones (or keep ``state`` when too few are left)."""
        defense = self.algorithm.ctx.defense
        specs = {c: self.algorithm.reply_spec(messages[c]) for c in replies if c in messages} if messages else None
        valid, rejected = validate_replies(state, replies, defense.max_update_norm, specs)
        metrics: dict[str, Any] = {}
        if rejected:
            metrics["rejected"] = {str(c): reason for c, reason in rejected.items()}
            for c, reason in rejected.items():
                self.log(f"round {round}: reply of client {c} rejected: {reason}")
        if len(valid) < defense.min_replies:
            metrics["skipped"] = (f"{len(valid)} valid replies of {len(replies)}, fewer than "
                                  f"defense.min_replies={defense.min_replies}: kept the previous server state")
            self.log(f"round {round}: {metrics['skipped']}")
            return state, metrics
        state, agg_metrics = self.algorithm.aggregate(state, valid, round)
        return state, {**metrics, **agg_metrics}

    def collude(self, state: Message, messages: dict[int, Message], replies: dict[int, Message],
                round: int) -> dict[int, Message]:
        """An omniscient attack's rewrite of the round's replies, from the replies that pass validation
        (a garbage reply is nothing to craft from); the others go on unchanged, to be rejected."""
        if self.attack is None:
            return dict(replies)
        specs = {c: self.algorithm.reply_spec(messages[c]) for c in replies}
        usable, _ = validate_replies(state, replies, None, specs)
        crafted = self.runtime.collude(state, messages, usable, round)
        return dict(sorted({**replies, **crafted}.items()))

    def client_context(self, client: int, round: int) -> ClientContext:
        return ClientContext(client, round, client_generator(self.seed, round, client), self.device)

    def run(self, state: Message, store: ClientStore, start_round: int, rounds: int,
            callbacks: Sequence[Callback] = (), should_stop: Callable[[], bool] | None = None) -> Message:
        """Rounds ``start_round + 1 … rounds``; returns the final server state."""
        for cb in callbacks:
            cb.on_begin(start_round, rounds)
        for r in range(start_round + 1, rounds + 1):
            clients = self.sample(r)
            messages = self.algorithm.configure(state, r, clients)
            executed = self.execute(messages, r, store)
            for c, reply in executed.items():  # messages live on the CPU; only client training uses the device
                executed[c] = reply.to("cpu")
            fail_if_broken(executed, r)
            replies = self.collude(state, messages, executed, r)
            state, metrics = self.aggregate(state, replies, r, messages)
            if executed.failed:
                for c, reason in executed.failed.items():
                    self.log(f"round {r}: client {c} failed: {reason}")
                metrics = {"failed": {str(c): v for c, v in executed.failed.items()},
                           "failed_fraction": len(executed.failed) / len(messages), **metrics}
            report = RoundReport(r, clients, {c: m.meta for c, m in replies.items()}, state, store, metrics)
            for cb in callbacks:
                cb.after_round(report)
            if should_stop is not None and should_stop():
                break
        for cb in callbacks:
            cb.on_end()
        return state


@register("executor", "sequential")
class SequentialExecutor(Executor):
    """The reference executor: one client after another, in client-id order."""

    name = "sequential"

    def execute(self, messages: dict[int, Message], round: int, store: ClientStore) -> Replies:
        replies: dict[int, Message] = {}
        errors: dict[int, BaseException] = {}
        for c in sorted(messages):
            try:
                reply, new_state = self.runtime.run(
                    messages[c], self.data.client(c), store.get(c), self.client_context(c, round))
            except Exception as e:  # noqa: BLE001 - this client's failure: recorded, left out of the round
                errors[c] = e
                continue
            store.set(c, new_state)
            replies[c] = reply
        return Replies(replies, errors=errors)
