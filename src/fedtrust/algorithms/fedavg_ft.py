"""FedAvg + local fine-tuning (FedAvg-FT; e.g. Wang et al. 2019, "Federated Evaluation of
On-device Personalization"; the standard personalized baseline of FedBABU and FedRoD).

Training is FedAvg's. Personalization: the client fine-tunes the global model it
received on its own data for ``ft_epochs`` (or ``ft_steps``) at ``ft_lr`` with the
configured objective, and keeps the result. ``ft_scope=full`` tunes (and keeps)
the whole model, BN statistics included; ``ft_scope=head`` only the classifier.

Predictors: ``global`` (the FedAvg model) and ``personalized`` (the client's
tuned model; the global one for a client never sampled). See
:class:`~fedtrust.algorithms.personal.FineTuned` for when the fine-tuning runs
(GUESS: whenever the client is sampled, from the model it received) and why the
client is the general path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from fedtrust.algorithms.personal import FineTuned, FineTuneParams, is_head
from fedtrust.registry import register


@register("algorithm", "fedavg_ft")
class FedAvgFT(FineTuned):
    """FedAvg training; personalized model = received global model fine-tuned locally."""

    name = "fedavg_ft"

    class Params(FineTuneParams):
        ft_scope: Literal["full", "head"] = Field("full", description="what fine-tuning trains and keeps: full model or head")

    def finetune_names(self, model: nn.Module) -> tuple[str, ...]:
        full = self.params.ft_scope == "full"
        return tuple(n for n, _ in model.named_parameters() if full or is_head(n))

    def finetune_keep(self, name: str) -> bool:
        return self.params.ft_scope == "full" or is_head(name)
