"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021, Eq. (2) and Alg. 1).

Global objective: FedAvg on the configured objective F_k(w). Personal
objective of client k: h_k(v; w) = F_k(v) + (λ/2)·‖v − w^t‖², with w^t the
global model the client received this round. Client k keeps v_k in its
client state; the server never sees it.

Declarative: the client trains a pair module ``(model=w, personal=v)`` with one
loss F_k(w) + F_k(v) + (λ/2)‖v − w^t‖² on the same minibatches. Because the
proximal term ties v to the *fixed* w^t (in ``ref``), not to the moving w, the
two problems share no parameters and SGD on the sum is exactly Alg. 1's two
local solvers run side by side (E epochs of w, and s = E epochs of v, same lr
and momentum; the paper tunes them separately).

GUESS: a client's first v_k is the w^t it receives (Ditto's code copies the
global model); a client never sampled is scored with the global model.
Predictors: ``global`` (w) and ``personalized`` (v_k).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

from pydantic import Field
from torch import Tensor, nn

from fedtrust.algorithms.personal import PERSONAL, PersonalizedAvg, message_arrays, module_state, personal_overrides
from fedtrust.fl.protocol import Batch, ClientContext, LocalTraining, Message, TrainResult, with_prefix
from fedtrust.registry import register


class DittoPair(nn.Module):
    """The global copy ``model`` (w) and the personal copy ``personal`` (v) of one architecture."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.personal = copy.deepcopy(model)


@register("algorithm", "ditto")
class Ditto(PersonalizedAvg):
    """FedAvg for w; a λ-proximal personal model v_k per client."""

    name = "ditto"

    class Params(PersonalizedAvg.Params):
        lam: float = Field(0.1, ge=0, description="λ of Eq. (2): pull of the personal model towards the global one")

    @functools.cached_property
    def pair(self) -> DittoPair:
        return DittoPair(copy.deepcopy(self.template))

    def ditto_loss(self, model: DittoPair, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        """F_k(w) + F_k(v) + (λ/2)·Σ‖v − w^t‖² over v's parameters (``ref`` holds w^t)."""
        prox = sum(((params[name] - w) ** 2).sum() for name, w in ref.items())
        objective = self.ctx.objective
        return objective(model.model, batch) + objective(model.personal, batch) + 0.5 * self.params.lam * prox

    def plan(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining:
        base = super().plan(message, client_state, ctx)
        glob = message.prefixed("model")
        own = personal_overrides(client_state) or glob
        init = {**module_state(with_prefix("model", glob), ["model"]), **module_state(with_prefix(PERSONAL, own), [PERSONAL])}
        ref = {f"{PERSONAL}.{n}": glob[n] for n, _ in self.template.named_parameters()}
        return dataclasses.replace(base, model=self.pair, init=init, loss=self.ditto_loss, ref=ref,
                                   trainable=tuple(n for n, _ in self.pair.named_parameters()))

    def finish(self, message: Message, result: TrainResult, client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        arrays = message_arrays(result.state, ["model", PERSONAL])
        reply = Message(arrays={k: v for k, v in arrays.items() if k.startswith("model/")},
                        meta={"num_examples": result.num_examples, "loss": result.mean_loss, "steps": result.steps})
        own = {k: v for k, v in arrays.items() if k.startswith(PERSONAL + "/")}
        return reply, Message(arrays={**client_state.arrays, **own}, meta=dict(client_state.meta))
