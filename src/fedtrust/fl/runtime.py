"""The one client runtime every executor calls (DESIGN "Extension points": ``run_client``).

The sequential executor, the vectorised executor (its declarative path and its
fallback) and the Flower ClientApp all run a client through :class:`ClientRuntime`,
so a wrapper added here (an attack now, FLIP's client-side defense next) works on
every executor:

* :meth:`ClientRuntime.run` — the general path: ``algorithm.client_update``;
* :meth:`ClientRuntime.plan` / :meth:`ClientRuntime.finish` — the declarative path the
  vectorised executor trains in groups: ``algorithm.local_training``, then ``finish``.

An attack (:class:`~fedtrust.robust.attacks.Attack`) wraps both: it may change the
client's data (such a client then takes the general path, whose trainer reads the
changed data), and its reply. Its choice of clients and rounds is fixed by the
config, so the same clients attack in the same rounds on every executor.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtrust.data.types import ImageSet
from fedtrust.fl.protocol import Algorithm
from fedtrust.fl.types import ClientContext, LocalTraining, Message, TrainResult
from fedtrust.robust.attacks import Attack


@dataclass
class ClientRuntime:
    """An algorithm's client side, wrapped by an optional attack."""

    algorithm: Algorithm
    attack: Attack | None = None

    def malicious(self, ctx: ClientContext) -> bool:
        """True when this client attacks in this round."""
        return self.attack is not None and self.attack.attacks(ctx.client_id, ctx.round)

    def run(self, message: Message, data: ImageSet, client_state: Message,
            ctx: ClientContext) -> tuple[Message, Message]:
        """``run_client``: one client's reply and new persistent state, on any executor."""
        bad = self.malicious(ctx)
        if bad:
            data = self.attack.poison_data(data, ctx)
        reply, state = self.algorithm.client_update(message, data, client_state, ctx)
        return (self.attack.poison_reply(message, reply, ctx) if bad else reply), state

    def plan(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining | None:
        """The client's declarative training, or None when it must take the general path (:meth:`run`)."""
        if self.malicious(ctx) and self.attack.changes_data:
            return None
        return self.algorithm.local_training(message, client_state, ctx)

    def finish(self, message: Message, result: TrainResult, client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        """Reply and new state after a declarative training ran (by any trainer)."""
        reply, state = self.algorithm.finish(message, result, client_state, ctx)
        return (self.attack.poison_reply(message, reply, ctx) if self.malicious(ctx) else reply), state

    def collude(self, state: Message, messages: dict[int, Message], replies: dict[int, Message],
                round: int) -> dict[int, Message]:
        """Omniscient attacks rewrite the malicious replies from the benign ones (simulation only)."""
        return self.attack.collude(state, messages, replies, round) if self.attack is not None else replies
