"""FedRoD (Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022, §4, linear personalized head).

Two predictors on one shared body: the **generic** head g (aggregated with the
body) trained with the balanced-softmax loss on the client's label prior
(Eq. 7: CE(g(f) + log n_k, y), so every client optimizes the same
class-balanced objective), and the **personalized** head p_k (kept on the
client) trained on detached features to fit the client's own distribution
on top of the generic logits: CE(g(f)ᵀ.detach() + p_k(f.detach()), y). The
personalized prediction is g(f) + p_k(f).

Declarative: one loss, BSM(g(f)) + CE(sg[g(f)] + p_k(sg[f])); the stop-gradients
make one SGD optimizer equal to the reference's separate body+g and p
optimizers (the reference's p optimizer has no momentum; here both share
``train.momentum``). The balanced-softmax prior needs the client's label
histogram, computed on its first visit (general path for that one call, see
:mod:`fedtrust.algorithms.personal`).

GUESS: p_k starts at zero, so the personalized model of a client never sampled
equals the generic one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.algorithms.personal import (
    LABEL_COUNTS, balanced_softmax_ce, log_prior, message_arrays, module_state, with_label_counts,
)
from fedtrust.data.types import ImageSet
from fedtrust.fl.local import train_locally
from fedtrust.fl.protocol import Batch, ClientContext, LocalTraining, Message, TrainResult
from fedtrust.registry import register


class RoDNet(nn.Module):
    """``model`` (body + generic head g) and the personalized head ``p_head``; forward = g(f) + p(f)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.p_head = nn.Linear(model.head.in_features, model.head.out_features)
        nn.init.zeros_(self.p_head.weight)
        nn.init.zeros_(self.p_head.bias)

    def forward(self, x: Tensor) -> Tensor:
        f = self.model.features(x)
        return self.model.head(f) + self.p_head(f)


@register("algorithm", "fedrod")
class FedRoD(FedAvg):
    """Balanced-softmax generic head (shared) + personalized residual head (kept on the client)."""

    name = "fedrod"
    personalized = True

    @functools.cached_property
    def net(self) -> RoDNet:
        return RoDNet(copy.deepcopy(self.template))

    def rod_loss(self, model: RoDNet, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        """BSM(g(f), y; log n_k) + CE(sg[g(f)] + p(sg[f]), y) (Eq. 7 + the personalized loss)."""
        f = model.model.features(batch["x"])
        g = model.model.head(f)
        generic = balanced_softmax_ce(g, batch["y"], ref["log_prior"])
        personal = F.cross_entropy(g.detach() + model.p_head(f.detach()), batch["y"])
        return generic + personal

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining | None:
        if LABEL_COUNTS not in client_state.arrays:
            return None  # first visit: client_update computes the label prior
        base = super().local_training(message, client_state, ctx)
        init = {**module_state(message.arrays, ["model"]), **self._p_head(client_state)}
        return dataclasses.replace(base, model=self.net, init=init, loss=self.rod_loss,
                                   trainable=tuple(n for n, _ in self.net.named_parameters()),
                                   ref={"log_prior": log_prior(client_state.arrays[LABEL_COUNTS])})

    def _p_head(self, client_state: Message | None) -> dict[str, Tensor]:
        """The client's p_k in module-state names; zeros (GUESS) before its first visit."""
        own = module_state(client_state.arrays, ["p_head"]) if client_state is not None else {}
        return own or {f"p_head.{k}": torch.zeros_like(v) for k, v in self.net.p_head.state_dict().items()}

    def finish(self, message: Message, result: TrainResult, client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        arrays = message_arrays(result.state, ["model", "p_head"])
        reply = Message(arrays={k: v for k, v in arrays.items() if k.startswith("model/")},
                        meta={"num_examples": result.num_examples, "loss": result.mean_loss, "steps": result.steps})
        own = {k: v for k, v in arrays.items() if k.startswith("p_head/")}
        return reply, Message(arrays={**client_state.arrays, **own}, meta=dict(client_state.meta))

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        client_state = with_label_counts(client_state, data)
        result = train_locally(self.local_training(message, client_state, ctx), data, ctx, self.ctx.normalize)
        return self.finish(message, result, client_state, ctx)

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        return self.ctx.defense.merge(state, replies, ["model"], round, self.params.bn_aggregation)

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        net = copy.deepcopy(self.net)
        net.load_state_dict({**module_state(state.arrays, ["model"]), **self._p_head(client_state)})
        return {"global": net.model, "personalized": net}
