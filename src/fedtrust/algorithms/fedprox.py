"""FedProx (Li et al., MLSys 2020, Eq. (2)).

Client k minimises h_k(w; w^t) = F_k(w) + (μ/2)·‖w − w^t‖², the local objective
plus a proximal term pulling the trainable weights w towards the round's
global weights w^t. Aggregation is FedAvg's. μ = 0 is FedAvg.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.fl.protocol import Batch, Message
from fedtrust.registry import register


@register("algorithm", "fedprox")
class FedProx(FedAvg):
    """FedAvg plus the proximal term (μ/2)·‖w − w^t‖² on the client."""

    name = "fedprox"
    train_options = frozenset({"keep_optimizer", "trainable"})

    class Params(FedAvg.Params):
        mu: float = Field(0.01, ge=0, description="proximal coefficient μ of Eq. (2)")

    def local_ref(self, message: Message) -> dict[str, Tensor]:
        return message.prefixed("model")

    def local_loss(self, model, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        prox = sum(((p - ref[name]) ** 2).sum() for name, p in params.items())
        return self.ctx.objective(model, batch) + 0.5 * self.params.mu * prox
