"""FedBABU (Oh et al., "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022, Alg. 1).

During federated training only the body is updated: the head keeps its random
initialisation on every client and the server (it is not in ``trainable`` and is
never sent back). The server averages the body. Personalization fine-tunes the
received global model locally (§3.2); here, following this project's brief, only
the head is tuned by default (``ft_scope=head``; ``ft_scope=full`` tunes
everything as in the paper's main tables) for ``ft_epochs`` epochs.

Predictors: ``global`` (body + the fixed initial head) and ``personalized``
(body + the client's fine-tuned head). The fine-tuning schedule is
:class:`~fedtrust.algorithms.personal.FineTuned`'s (general path).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from fedtrust.algorithms.fedavg_ft import FedAvgFT
from fedtrust.algorithms.personal import FineTuneParams, is_head
from fedtrust.registry import register


@register("algorithm", "fedbabu")
class FedBABU(FedAvgFT):
    """Body-only federated training with a frozen random head; head fine-tuned for personalization."""

    name = "fedbabu"

    class Params(FineTuneParams):
        ft_scope: Literal["full", "head"] = Field("head", description="what fine-tuning trains and keeps: head or full model")

    def is_fixed(self, name: str) -> bool:
        return is_head(name)

    def trainable(self, model: nn.Module) -> tuple[str, ...]:
        return tuple(n for n, _ in model.named_parameters() if not is_head(n))
