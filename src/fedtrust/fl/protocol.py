"""The message-passing ``Algorithm`` protocol (DESIGN.md "The Algorithm protocol").

An algorithm says what the server sends (``configure``), what a client computes
from that message, its own data and its persistent state (``local_training``
for the declarative, vectorisable path, or ``client_update`` for any Python),
how the server aggregates replies (``aggregate``) and which models evaluation
scores (``predictors``). Executors own the round loop; nothing here knows
which executor runs it. The message types live in :mod:`fedtrust.fl.types`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict
import torch
from torch import nn

from fedtrust.data.types import ImageSet
import fedtrust.fl.local as local
from fedtrust.fl.types import (  # noqa: F401  (re-exported: the protocol's vocabulary)
    Batch, ClientContext, LocalTraining, LossFn, Message, OptimizerSpec, TrainResult, with_prefix,
)

if TYPE_CHECKING:
    from fedtrust.fl.programs import ClientProgram
    from fedtrust.fl.context import AlgorithmContext

OPTIM = "optim"
"""Prefix of the kept optimizer state in a client's persistent state (never replied)."""


def keep_optimizer_state(client_state: Message, result: TrainResult) -> Message:
    """``client_state`` with its ``optim/`` entries replaced by the result's final optimizer state, when
    the plan kept one (``train.keep_optimizer``); unchanged otherwise."""
    if result.optimizer_state is None:
        return client_state
    rest = {k: v for k, v in client_state.arrays.items() if not k.startswith(OPTIM + "/")}
    return Message(arrays=rest | with_prefix(OPTIM, result.optimizer_state), meta=client_state.meta)


class Algorithm:
    """Base class: FedAvg-like defaults; an algorithm overrides only the hooks it needs.

    Subclasses set ``name`` and ``Params`` (a pydantic model of their
    hyper-parameters, validated from the ``algorithm`` config section) and are
    registered with ``@register("algorithm", name)``.
    """

    name: ClassVar[str] = "base"
    personalized: ClassVar[bool] = False
    """True when ``predictors`` depends on the client state (personalized models)."""
    declarative: ClassVar[bool] = False
    """True when ``local_training`` states the client's training (so the vectorised executor can
    train clients together); it may still return None for some calls (a first visit)."""
    train_options: ClassVar[frozenset[str]] = frozenset()
    """The optional ``train`` keys this algorithm honours: ``keep_optimizer`` (its plans carry the
    client's kept optimizer state, :meth:`kept_optimizer`) and ``trainable`` (its plans train only the
    parameters the patterns select). Not inherited: a subclass that trains other parameter sets says so
    itself (:meth:`supports`)."""

    needs_init_from: ClassVar[bool] = False
    """True for a second stage that only makes sense from another run's weights (IS&BC's step 2): a fresh
    run without ``init_from`` is refused."""
    fresh_prefixes: ClassVar[tuple[str, ...]] = ()
    """Server-state prefixes that start from ``init()`` under ``init_from`` when the source has none of
    them (a new head the first stage never had); every other array must come from the source."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, params: BaseModel, ctx: "AlgorithmContext") -> None:
        self.params = params
        self.ctx = ctx

    @functools.cached_property
    def template(self) -> nn.Module:
        """One architecture instance reused by every local training of this algorithm (weights are overwritten)."""
        return self.ctx.new_model().to(self.ctx.device)

    # ---- server side -------------------------------------------------
    def init(self) -> Message:
        """Round-0 server state: the initial global model under ``"model/"``."""
        return Message(arrays=with_prefix("model", self.ctx.new_model().state_dict()), meta={})

    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        """What each sampled client receives: by default the global model and this round's lr."""
        payload = Message(arrays={k: v for k, v in state.arrays.items() if k.startswith("model/")},
                          meta={"lr": self.ctx.lr(round), "round": round})
        return {c: payload for c in clients}

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        """Server update from the clients' (validated) replies, and metrics for ``metrics.jsonl``.

        Average the shared parts through ``self.ctx.defense.average`` (the configured
        aggregator: mean, median, Krum, ...), never by hand, so every defense applies.
        """
        raise NotImplementedError

    def reply_spec(self, message: Message) -> dict[str, tuple[tuple[int, ...], torch.dtype]] | None:
        """What the reply to ``message`` must hold (key → (shape, dtype)), for validation; None: the
        round's majority signature. Algorithms whose clients reply different parts (Split-Mix's
        bases) say it here."""
        return None

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        """Named models to evaluate; the first is the primary one reported as ``test_acc``."""
        model = self.ctx.new_model()
        model.load_state_dict(state.prefixed("model"))
        return {"global": model}

    @classmethod
    def supports(cls, option: str) -> bool:
        """Whether this very class (not merely a parent) lists ``option`` in ``train_options``."""
        return option in vars(cls).get("train_options", frozenset())

    # ---- client side -------------------------------------------------
    def kept_optimizer(self, client_state: Message) -> dict[str, torch.Tensor] | None:
        """The optimizer state a plan starts from: the client's kept one (``optim/`` of its state; empty on
        a first visit) under ``train.keep_optimizer``, else None (a fresh optimizer, dropped after)."""
        if not (self.ctx.schedule.keep_optimizer and self.supports("keep_optimizer")):
            return None
        return client_state.prefixed(OPTIM)

    def local_training(self, message: Message, client_state: Message,
                       ctx: ClientContext) -> LocalTraining | list[LocalTraining] | None:
        """Declarative local training for ``message``; None when the client needs general code
        (an algorithm whose clients always do sets ``declarative = False``). Several plans (a
        list) train side by side on one batch schedule, and ``finish`` gets their results as a
        list in the same order (Split-Mix's base nets)."""
        return None

    def finish(self, message: Message, result: TrainResult, client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        """Turn a finished :class:`LocalTraining` into the reply and the new client state."""
        reply = Message(arrays=with_prefix("model", result.state),
                        meta={"num_examples": result.num_examples, "loss": result.mean_loss, "steps": result.steps})
        return reply, keep_optimizer_state(client_state, result)

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        """General client path. The default runs ``local_training`` with the reference trainer."""
        plan = self.local_training(message, client_state, ctx)
        if plan is None:
            raise NotImplementedError(f"algorithm {self.name!r} defines neither local_training nor client_update")
        result = local.train_locally(plan, data, ctx, self.ctx.normalize)
        return self.finish(message, result, client_state, ctx)

    def client_program(self, message: Message, data: ImageSet, client_state: Message,
                       ctx: ClientContext) -> "ClientProgram | None":
        """The general client path as a program of batchable requests (:mod:`fedtrust.fl.programs`), which
        the vectorised executor runs in lock-step across the round's clients; None (default): no program,
        ``client_update`` runs alone. An algorithm with a program makes ``client_update`` run it."""
        return None

