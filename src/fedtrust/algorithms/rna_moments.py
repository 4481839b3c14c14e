"""Federated RNA, variant B: the outliers stay on the server, which sends their BN moments (spec rna.md §8).

Variant A (``algorithm.name=fedavg objective.name=rna``) ships each sampled client a share of the outlier
images and trains exactly as centralized RNA, one train-mode forward of ``cat(ID, OOD)``. Variant B keeps
the images on the server. Each round:

1. **configure**: the server forwards its outliers (``data.outliers``) through the current global model in
   eval mode and sends, besides the weights, every BN layer's OOD input moments ``ood/<layer>/{mean,var}``
   (per-channel mean and biased variance; two vectors per layer, a few KiB). The running statistics in the
   weights it sends are the pooled **ID** moments of the previous round (``id/`` in the server state; the
   global model's own running statistics before the first aggregation), so a client's running statistics
   keep tracking ID data only.
2. **client**: trains the configured objective on ID-only batches (``rna_no_outliers`` in the preset: LA +
   the RNA loss) with every BN layer normalising by the mixture moments ``μ = ½(μ_b + μ_o)``,
   ``σ² = ½(σ_b² + σ_o²) + ¼(μ_b − μ_o)²`` of its batch and the OOD constants
   (:class:`~fedtrust.models.mixture_bn.MixtureBatchNorm2d`): the lost gradient path through the outliers'
   activations is approximated, and the constants grow stale over the local steps. Its running statistics
   are the EMA of its ID batch moments, as for any BN.
3. **aggregate**: weights by the configured aggregator (BN running statistics by pooled moments under the
   plain mean: the clients' ID moments pooled, ``μ = Σ w_k μ_k``, ``σ² = Σ w_k(σ_k² + μ_k²) − μ²``); then the
   server recomputes the running statistics layer by layer in forward order: layer l's become the mixture of
   the pooled ID moments and the OOD moments of its outliers measured with layers 1..l−1 already set, which
   are the statistics centralized RNA's joint batches would give its running averages (the spec's "do not
   only recompute BN with outliers after training": the model was trained under mixture normalisation).

The global model is evaluated as usual (eval mode, the mixture running statistics), scored by RN. What it
costs: one forward of the outlier pool per BN layer on the server each round (the recompute stops at the
layer it measures) plus one for configure; clients receive 2·Σ channels floats more than FedAvg's weights
and no image. What it does not protect: the OOD moments reveal aggregate statistics of the server's
outliers, the pooled ID running statistics those of the clients (as in FedAvg).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.errors import ConfigError
from fedtrust.fl.protocol import Algorithm, Batch, Message, with_prefix
from fedtrust.models.mixture_bn import (MEAN, VAR, bn_input_moments, convert_to_mixture, mixture_layers,
                                        mixture_moments, moment_key, ood_moments)
from fedtrust.registry import register

OOD, ID = "ood/", "id/"


@register("algorithm", "rna_moments")
class RNAMoments(FedAvg):
    """Federated RNA variant B (module docstring): FedAvg whose clients normalise with the mixture of their
    batch and the server's OOD BN moments; the server keeps the outliers and sets the running statistics."""

    name = "rna_moments"
    declarative = True
    train_options = frozenset()

    class Params(Algorithm.Params):
        chunk: int = Field(1024, ge=1, description="outlier images per forward pass on the server (memory bound)")

    def __init__(self, params: Params, ctx: Any) -> None:
        super().__init__(params, ctx)
        if ctx.objective.needs_outliers:
            raise ConfigError(f"algorithm rna_moments keeps the outliers on the server; objective "
                              f"{ctx.objective.name!r} needs outlier images on the clients: use rna_no_outliers "
                              f"(or la), or algorithm fedavg for variant A")
        if ctx.outliers is None or not len(ctx.outliers):
            raise ConfigError("algorithm rna_moments needs the server's outliers: set data.outliers (e.g. photos, "
                              "openclipart; `fedtrust list outliers`)")
        if not self.layers:
            raise ConfigError(f"algorithm rna_moments needs a model with batch norm (running statistics); "
                              f"{type(self.template).__name__} has none (model.norm=bn)")

    @functools.cached_property
    def template(self) -> nn.Module:
        """The architecture with every BN replaced by :class:`MixtureBatchNorm2d` (same state-dict keys)."""
        return convert_to_mixture(self.ctx.new_model()).to(self.ctx.device)

    @functools.cached_property
    def layers(self) -> list[str]:
        """The BN layers whose moments travel, in forward order."""
        return mixture_layers(self.template)

    def _model(self, arrays: dict[str, Tensor]) -> nn.Module:
        model = self.ctx.new_model().to(self.ctx.device)
        model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
        return model

    def ood_moments(self, model: nn.Module, until: str | None = None,
                    layers: list[str] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Per BN layer, the mean and biased variance of what the server's outliers feed it through ``model``
        in eval mode (:func:`~fedtrust.models.mixture_bn.bn_input_moments`)."""
        return bn_input_moments(model, self.ctx.outliers.to(self.ctx.device), self.ctx.normalize,
                                layers=layers, chunk=self.params.chunk, until=until)

    # ---- server side -------------------------------------------------
    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        """FedAvg's payload with the running statistics set to the pooled ID moments, plus the outliers' BN
        moments through the current global model (``ood/<layer>/mean``, ``ood/<layer>/var``)."""
        messages = super().configure(state, round, clients)
        moments = self.ood_moments(self._model(state.arrays))
        extra: dict[str, Tensor] = {}
        for layer, (mean, var) in moments.items():
            dtype = state.arrays[f"model/{layer}.running_mean"].dtype
            extra[OOD + moment_key(layer, MEAN)] = mean.to(dtype)
            extra[OOD + moment_key(layer, VAR)] = var.to(dtype)
            if ID + moment_key(layer, MEAN) in state.arrays:
                extra[f"model/{layer}.running_mean"] = state.arrays[ID + moment_key(layer, MEAN)]
                extra[f"model/{layer}.running_var"] = state.arrays[ID + moment_key(layer, VAR)]
        return {c: Message(arrays=m.arrays | extra, meta=m.meta) for c, m in messages.items()}

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        """Weights by the aggregator (ID moments pooled), then each layer's running statistics set, in forward
        order, to the mixture of the pooled ID moments and the outliers' moments (module docstring)."""
        pooled = "pooled" if self.ctx.defense.is_plain_mean else "mean"
        merged, metrics = self.ctx.defense.merge(state, replies, ["model"], round, pooled)
        model = self._model(merged.arrays)
        ids: dict[str, Tensor] = {}
        for layer in self.layers:
            bn = model.get_submodule(layer)
            id_mean, id_var = bn.running_mean.clone(), bn.running_var.clone()
            ids[ID + moment_key(layer, MEAN)], ids[ID + moment_key(layer, VAR)] = id_mean, id_var
            ood_mean, ood_var = self.ood_moments(model, until=layer, layers=[layer])[layer]
            mean, var = mixture_moments(id_mean.double(), id_var.double(), ood_mean, ood_var)
            with torch.no_grad():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
        arrays = merged.arrays | with_prefix("model", {k: v.detach().clone() for k, v in model.state_dict().items()})
        arrays |= ids
        channels = sum(model.get_submodule(layer).num_features for layer in self.layers)
        metrics["rna_moments"] = {"layers": len(self.layers), "outliers": len(self.ctx.outliers),
                                  "moment_bytes": 2 * channels * 4}
        return Message(arrays=arrays, meta=merged.meta), metrics

    # ---- client side -------------------------------------------------
    def local_ref(self, message: Message) -> dict[str, Tensor]:
        """The OOD moments, constants of the local loss."""
        missing = [layer for layer in self.layers if OOD + moment_key(layer, MEAN) not in message.arrays]
        if missing:
            raise ConfigError(f"algorithm rna_moments: the message has no OOD moments for BN layer {missing[0]!r}")
        return {k: v for k, v in message.arrays.items() if k.startswith(OOD)}

    def local_loss(self, model, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        """The configured objective with every BN normalising by the batch / OOD mixture moments."""
        with ood_moments(model, ref, prefix=OOD):
            return self.ctx.objective(model, batch)
