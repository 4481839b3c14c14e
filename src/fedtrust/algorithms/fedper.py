"""FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", arXiv 1912.00818, 2019).

The model splits into base layers, shared and averaged by the server, and
personalization layers kept on each client (§3, Alg. 1). As in the paper's
image experiments the personalization layer is the classifier ``head``. Each
round client k trains base and its own head jointly on its data with the
configured objective; it replies with the base only and keeps the head in its
client state. A client's first head is the common initial head the server
holds (the server's ``model/head.*`` never changes).

Evaluation: ``personalized`` = shared base + the client's head. FedPer has no
global model; the global test set is scored with the shared base and the
initial head, which is not meaningful (reported for completeness).
Declarative: one :class:`~fedtrust.fl.protocol.LocalTraining` per client.
"""

from __future__ import annotations

from torch import nn

from fedtrust.algorithms.personal import PersonalizedAvg, is_head
from fedtrust.fl.protocol import Message
from fedtrust.registry import register


@register("algorithm", "fedper")
class FedPer(PersonalizedAvg):
    """Shared body (averaged), personal head (kept on the client)."""

    name = "fedper"

    def is_personal(self, name: str) -> bool:
        return is_head(name)

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        return {"personalized": self.personalized_model(state, client_state)}
