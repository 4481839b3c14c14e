"""FedAvg (McMahan et al., AISTATS 2017, Algorithm 1).

Clients run local SGD on the configured objective from the global weights;
the server takes the sample-weighted mean of every state-dict tensor, BN
running statistics included: θ ← Σ_k n_k θ_k / Σ_k n_k.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from fedtrust.fl.protocol import Algorithm, Batch, ClientContext, LocalTraining, Message
from fedtrust.models.select import select_parameters
from fedtrust.registry import register


@register("algorithm", "fedavg")
class FedAvg(Algorithm):
    """Federated averaging with a server learning rate of 1."""

    name = "fedavg"
    declarative = True
    train_options = frozenset({"keep_optimizer", "trainable"})

    class Params(Algorithm.Params):
        bn_aggregation: Literal["mean", "pooled"] = Field(
            "mean", description="BN running statistics: sample-weighted mean (FedAvg), or pooled moments "
                                "(variance of the union, spec rna.md §8)")

    def local_loss(self, model, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        """The client's loss: the configured objective (FedProx adds its proximal term)."""
        return self.ctx.objective(model, batch)

    def local_ref(self, message: Message) -> dict[str, Tensor]:
        """Constant tensors the local loss needs (none for FedAvg)."""
        return {}

    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        """The global model and lr (base class), plus each client's outlier share when the objective needs one."""
        messages = super().configure(state, round, clients)
        shares = self.ctx.outlier_shares(round, clients) if self.ctx.objective.needs_outliers else {}
        for c, share in shares.items():
            messages[c] = Message(arrays=messages[c].arrays | {"outliers/x": share}, meta=messages[c].meta)
        return messages

    @functools.cached_property
    def trainable(self) -> tuple[str, ...]:
        """The parameters local training updates: all, or those ``train.trainable`` selects (FedAvg and
        FedProx only; subclasses that train parts of the model choose their own)."""
        patterns = self.ctx.schedule.trainable
        if patterns is None or not self.supports("trainable"):
            return tuple(name for name, _ in self.template.named_parameters())
        return select_parameters(self.template, patterns)

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining:
        model = self.template
        sched = self.ctx.schedule
        return LocalTraining(
            views=self.ctx.objective.num_views,
            outliers=message.arrays.get("outliers/x"),
            model=model,
            init=message.prefixed("model"),
            trainable=self.trainable,
            loss=self.local_loss,
            optimizer=self.ctx.optimizer(message.meta["lr"]),
            batch_size=sched.batch_size,
            epochs=sched.epochs,
            steps=sched.steps,
            ref=self.local_ref(message),
            augment=sched.augment,
            drop_last=sched.drop_last,
            outlier_ratio=sched.outlier_ratio,
            optimizer_state=self.kept_optimizer(client_state),
        )

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        """θ ← the configured aggregate of the replies' models (the sample-weighted mean by default)."""
        return self.ctx.defense.merge(state, replies, ["model"], round, self.params.bn_aggregation)
