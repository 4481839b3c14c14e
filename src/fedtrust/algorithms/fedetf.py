"""FedETF (Li, Shang, He, Lin & Wu, "No Fear of Classifier Biases: Neural Collapse Inspired
Federated Learning with Synthetic and Fixed Classifier", ICCV 2023), the published method,
not the seed repository's ``fedrod_etf.py`` variant (spec fedloge.md §8).

Read from the official code (ZexiLee/ICCV-2023-FedETF, ``models_dict/*.py``,
``client_funct.py``), not copied:

- **Model** (:class:`ETFNet`): backbone features f → learnable projection
  ``h = W_p f + b_p`` (dimension ``proj_dim``; the official ResNets use K) →
  L2-normalised ``ĥ = h/‖h‖`` → logits ``β · ĥᵀ M`` with M a fixed random
  simplex ETF (``proj_dim × K``, :func:`~fedtrust.models.etf.simplex_etf`) and
  β a learnable temperature (official init 1.0 for ResNets).
- **Training**: balanced-softmax loss with the client's label counts,
  CE(z + log n_k, y); the ETF never trains; the server averages everything
  else (backbone, projection, β). The ETF is sent to clients and never re-sent.
- **Personalization** (local adaptation): the official code alternates
  fine-tuning the ETF prototypes (SGD lr 0.1) and the projection (lr 0.05) with
  plain CE, 20×(3+3) epochs. GUESS: here one joint fine-tuning of projection
  and ETF with CE for ``ft_epochs`` at ``ft_lr`` (``train.lr`` by default),
  stored as the client's personal entries (see
  :class:`~fedtrust.algorithms.personal.FineTuned`, general path).

Predictors: ``global`` (the shared ETF model) and ``personalized``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedtrust.algorithms.personal import (
    LABEL_COUNTS, FineTuned, FineTuneParams, balanced_softmax_ce, log_prior, split_backbone, with_label_counts,
)
from fedtrust.data.types import ImageSet
from fedtrust.errors import ConfigError
from fedtrust.fl.protocol import Batch, ClientContext, LocalTraining, Message, with_prefix
from fedtrust.models.etf import simplex_etf
from fedtrust.registry import register

FIXED = "etf"


class ETFNet(nn.Module):
    """Backbone, projection ``proj``, fixed ETF ``etf`` (proj_dim × K) and temperature ``beta``."""

    def __init__(self, model: nn.Module, num_classes: int, proj_dim: int, beta_init: float) -> None:
        super().__init__()
        self.backbone, head = split_backbone(model)
        if proj_dim < num_classes:
            raise ConfigError(f"algorithm.proj_dim must be >= the number of classes {num_classes}, got {proj_dim}")
        self.proj = nn.Linear(head.in_features, proj_dim)
        self.etf = nn.Parameter(torch.zeros(proj_dim, num_classes), requires_grad=False)
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def features(self, x: Tensor) -> Tensor:
        return self.backbone.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """``β · normalize(W_p f + b_p)ᵀ M``."""
        h = F.normalize(self.proj(self.features(x)), dim=1)
        return self.beta * (h @ self.etf)


@register("algorithm", "fedetf")
class FedETF(FineTuned):
    """Fixed simplex-ETF classifier behind a learnable projection and temperature; balanced softmax."""

    name = "fedetf"

    class Params(FineTuneParams):
        proj_dim: int | None = Field(None, ge=2, description="projection / ETF dimension; null: the number of classes")
        beta_init: float = Field(1.0, gt=0, description="initial learnable temperature β")

    def _net(self) -> ETFNet:
        k = self.ctx.num_classes
        return ETFNet(self.ctx.new_model(), k, self.params.proj_dim or k, self.params.beta_init)

    @functools.cached_property
    def template(self) -> nn.Module:
        return self._net().to(self.ctx.device)

    def init(self) -> Message:
        """A fresh ETFNet whose ETF is drawn from a generator seeded from the run-seeded global RNG."""
        net = self._net()
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        with torch.no_grad():
            net.etf.copy_(simplex_etf(net.etf.shape[0], self.ctx.num_classes, gen))
        return Message(arrays=with_prefix("model", net.state_dict()), meta={})

    def is_fixed(self, name: str) -> bool:
        return name == FIXED

    def trainable(self, model: nn.Module) -> tuple[str, ...]:
        return tuple(n for n, _ in model.named_parameters() if n != FIXED)

    def local_loss(self, model: nn.Module, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        """Balanced softmax CE(β ĥᵀM + log n_k, y)."""
        return balanced_softmax_ce(model(batch["x"]), batch["y"], ref["log_prior"])

    def plan(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining:
        base = super().plan(message, client_state, ctx)
        return dataclasses.replace(base, ref={"log_prior": log_prior(client_state.arrays[LABEL_COUNTS])})

    def finetune_names(self, model: nn.Module) -> tuple[str, ...]:
        return tuple(n for n, _ in model.named_parameters() if n.startswith("proj.") or n == FIXED)

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        return super().client_update(message, data, with_label_counts(client_state, data), ctx)
