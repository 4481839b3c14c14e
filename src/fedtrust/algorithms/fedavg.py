"""FedAvg (McMahan et al., AISTATS 2017, Algorithm 1).

Clients run local SGD on the configured objective from the global weights;
the server takes the sample-weighted mean of every state-dict tensor, BN
running statistics included: θ ← Σ_k n_k θ_k / Σ_k n_k.
"""

from __future__ import annotations

from torch import Tensor

from fedtrust.fl.aggregate import weighted_mean
from fedtrust.fl.protocol import Algorithm, Batch, LocalTraining, Message
from fedtrust.registry import register


@register("algorithm", "fedavg")
class FedAvg(Algorithm):
    """Federated averaging with a server learning rate of 1."""

    name = "fedavg"

    def local_loss(self, model, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        """The client's loss: the configured objective (FedProx adds its proximal term)."""
        return self.ctx.objective(model, batch)

    def local_ref(self, message: Message) -> dict[str, Tensor]:
        """Constant tensors the local loss needs (none for FedAvg)."""
        return {}

    def local_training(self, message: Message, client_state: Message) -> LocalTraining:
        model = self.template
        sched = self.ctx.schedule
        return LocalTraining(
            model=model,
            init=message.prefixed("model"),
            trainable=tuple(name for name, _ in model.named_parameters()),
            loss=self.local_loss,
            optimizer=self.ctx.optimizer(message.meta["lr"]),
            batch_size=sched.batch_size,
            epochs=sched.epochs,
            steps=sched.steps,
            ref=self.local_ref(message),
            augment=sched.augment,
        )

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> Message:
        return Message(arrays=weighted_mean(replies, "model/"), meta=dict(state.meta))
