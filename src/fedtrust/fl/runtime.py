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

Injected faults (:class:`~fedtrust.fl.faults.Faults`) wrap them too: a crashing,
hanging or straggling client raises :class:`~fedtrust.fl.faults.ClientFault` before
it trains (:meth:`ClientRuntime.run`, :meth:`ClientRuntime.plan`), a garbage reply
replaces the reply after the attack (:meth:`ClientRuntime.run`,
:meth:`ClientRuntime.finish`). The executors catch what a client raises and record
it as that client's failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fedtrust.data.types import ImageSet
from fedtrust.fl.faults import Faults
from fedtrust.fl.local import plan_list, train_locally
from fedtrust.fl.programs import ClientProgram, run_programs
from fedtrust.fl.protocol import Algorithm
from fedtrust.fl.types import ClientContext, LocalTraining, Message, TrainResult, with_prefix
from fedtrust.fl.update_privacy import UpdatePrivacy
from fedtrust.robust.attacks import Attack

ATTACK = "attack"
"""Prefix of an attack's own state in an attacker's persistent client state (never replied; checkpointed
with the client store, on the node under Flower). The algorithm never sees it."""


@dataclass
class ClientRuntime:
    """An algorithm's client side, wrapped by an optional attack."""

    algorithm: Algorithm
    attack: Attack | None = None
    faults: Faults | None = None
    privacy: UpdatePrivacy | None = None
    """The benign clients' update defense (config ``privacy``), applied before a reply leaves the client."""

    def malicious(self, ctx: ClientContext) -> bool:
        """True when this client attacks in this round."""
        return self.attack is not None and self.attack.attacks(ctx.client_id, ctx.round)

    def _is_attacker(self, ctx: ClientContext) -> bool:
        return self.attack is not None and ctx.client_id in self.attack.targets.clients

    def _split(self, client_state: Message, ctx: ClientContext) -> tuple[Message, dict[str, Tensor]]:
        """The algorithm's part of the client state, and the attack's (``attack/`` keys, attackers only)."""
        if not self._is_attacker(ctx):
            return client_state, {}
        rest = {k: v for k, v in client_state.arrays.items() if not k.startswith(ATTACK + "/")}
        return Message(rest, client_state.meta), client_state.prefixed(ATTACK)

    def _merge(self, message: Message, state: Message, attack_state: dict[str, Tensor],
               ctx: ClientContext) -> Message:
        """The new client state: the algorithm's, plus the attack's after it observed this visit."""
        if not self._is_attacker(ctx):
            return state
        kept = self.attack.observe(message, attack_state, ctx)
        return Message(state.arrays | with_prefix(ATTACK, kept), state.meta)

    def run(self, message: Message, data: ImageSet, client_state: Message,
            ctx: ClientContext) -> tuple[Message, Message]:
        """``run_client``: one client's reply and new persistent state, on any executor."""
        self._check_faults(ctx)
        own, attack_state = self._split(client_state, ctx)
        bad = self.malicious(ctx)
        if bad:
            data = self.attack.poison_data(data, ctx)
        plan = self.algorithm.local_training(message, own, ctx) if bad and self.attack.rewrites_training else None
        if plan is not None:  # the attacker's own local training (declarative algorithms)
            plans = [self.attack.rewrite_plan(p, ctx, message, attack_state) for p in plan_list(plan)]
            result = train_locally(plans if isinstance(plan, list) else plans[0], data, ctx,
                                   self.algorithm.ctx.normalize)
            reply, state = self.algorithm.finish(message, result, own, ctx)
        else:
            reply, state = self.algorithm.client_update(message, data, own, ctx)
        reply = self.attack.poison_reply(message, reply, ctx) if bad else self._protect(message, reply, ctx)
        return self._corrupt(reply, ctx), self._merge(message, state, attack_state, ctx)

    def _check_faults(self, ctx: ClientContext) -> None:
        if self.faults is not None:
            self.faults.before_training(ctx)

    def _protect(self, message: Message, reply: Message, ctx: ClientContext) -> Message:
        return self.privacy.protect(message, reply, ctx) if self.privacy is not None else reply

    def _corrupt(self, reply: Message, ctx: ClientContext) -> Message:
        return self.faults.corrupt(reply, ctx) if self.faults is not None else reply

    def run_together(self, jobs: dict[int, tuple[Message, ImageSet, Message, ClientContext]]
                     ) -> tuple[dict[int, tuple[Message, Message]], dict[int, Exception]]:
        """:meth:`run` for several clients of a round (``client -> (message, data, state, ctx)``): benign
        clients whose algorithm has a :meth:`~fedtrust.fl.protocol.Algorithm.client_program` run their
        programs in lock-step, their requests batched (:func:`~fedtrust.fl.programs.run_programs`); the
        others (attacking clients, algorithms without a program) run one after another.

        Returns ``(results, errors)``: what a client raised before its program started, or while it ran
        alone, is its error (its state unchanged); an error inside the lock-step programs is not one
        client's and propagates."""
        out: dict[int, tuple[Message, Message]] = {}
        errors: dict[int, Exception] = {}
        programs: dict[int, ClientProgram] = {}
        kept: dict[int, tuple[Message, dict[str, Tensor], ClientContext]] = {}
        for c, (message, data, client_state, ctx) in sorted(jobs.items()):
            try:
                self._check_faults(ctx)
                own, attack_state = self._split(client_state, ctx)
                program = None if self.malicious(ctx) else self.algorithm.client_program(message, data, own, ctx)
                if program is None:
                    out[c] = self.run(message, data, client_state, ctx)
                else:
                    programs[c], kept[c] = program, (message, attack_state, ctx)
            except Exception as e:  # noqa: BLE001 - this client's failure, recorded by the executor
                errors[c] = e
        for c, (reply, state) in run_programs(programs).items():
            message, attack_state, ctx = kept[c]
            reply = self._protect(message, reply, ctx)
            out[c] = self._corrupt(reply, ctx), self._merge(message, state, attack_state, ctx)
        return dict(sorted(out.items())), errors

    def plan(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining | None:
        """The client's declarative training, or None when it must take the general path (:meth:`run`)."""
        self._check_faults(ctx)
        if not type(self.algorithm).declarative:  # its client_update is the truth (FLIP's hardening)
            return None
        if self.malicious(ctx) and (self.attack.changes_data or self.attack.rewrites_training):
            return None
        return self.algorithm.local_training(message, self._split(client_state, ctx)[0], ctx)

    def finish(self, message: Message, result: TrainResult, client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        """Reply and new state after a declarative training ran (by any trainer)."""
        own, attack_state = self._split(client_state, ctx)
        reply, state = self.algorithm.finish(message, result, own, ctx)
        reply = (self.attack.poison_reply(message, reply, ctx) if self.malicious(ctx)
                 else self._protect(message, reply, ctx))
        return self._corrupt(reply, ctx), self._merge(message, state, attack_state, ctx)

    def collude(self, state: Message, messages: dict[int, Message], replies: dict[int, Message],
                round: int) -> dict[int, Message]:
        """Omniscient attacks rewrite the malicious replies from the benign ones (simulation only)."""
        return self.attack.collude(state, messages, replies, round) if self.attack is not None else replies
