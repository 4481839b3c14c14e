"""FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization", ICLR 2021).

FedAvg in which every normalization layer stays on its client (Alg. 1: the server averages every parameter
but the BN ones): the client trains its whole model, replies without its norm layers' entries (affine γ/β,
running statistics, ``num_batches_tracked``) and keeps them in its client state (``personal/…``), and lays
them over the global model when it is next sampled. A client's first norm layers are the common initial ones
the server holds (they never change there). Split-Mix's "locally tracked" BN ablation (``--lbn``, spec
splitmix.md §2) is this rule on its bases (``algorithm.local_bn`` of ``splitmix``).

Evaluation: ``personalized`` = the shared layers with the client's own norm layers, on its local test set
(on a multi-domain set: its own domain's test images, label-matched). There is no global model: the global
test set is scored with the shared layers and the initial norm layers, which is not meaningful (reported for
completeness, as FedPer's). Declarative (one :class:`~fedtrust.fl.protocol.LocalTraining` a client), so the
vectorised executor runs it.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from fedtrust.algorithms.personal import PersonalizedAvg
from fedtrust.errors import ConfigError
from fedtrust.fl.protocol import Message
from fedtrust.models.norms import norm_state_keys
from fedtrust.registry import register


@register("algorithm", "fedbn")
class FedBN(PersonalizedAvg):
    """Shared conv/linear layers (averaged), personal normalization layers (kept on the client)."""

    name = "fedbn"

    def __init__(self, params: PersonalizedAvg.Params, ctx: Any) -> None:
        super().__init__(params, ctx)
        if not self._norm_keys:
            raise ConfigError(f"algorithm fedbn keeps the normalization layers local, but model "
                              f"{type(self.template).__name__} has none; expected model.norm bn, bn_static, "
                              f"dual_bn or group norm")

    @functools.cached_property
    def _norm_keys(self) -> frozenset[str]:
        return norm_state_keys(self.template)

    def is_personal(self, name: str) -> bool:
        return name in self._norm_keys

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        return {"personalized": self.personalized_model(state, client_state)}
