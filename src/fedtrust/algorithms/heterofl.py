"""HeteroFL (Diao et al., ICLR 2021) and FedRolex (Alam et al., NeurIPS 2022): width-w slices of one global
model, aggregated where they overlap (spec splitmix.md §5).

The server keeps one full-width model (``cnn``, ``digitnet`` or ``preresnet18``). A client of width budget
``R_k`` (config section ``budget``; 1 without budgets) receives and trains the sub-net of width ``R_k``:
every hidden layer's first ``ceil(R_k·C)`` channels (HeteroFL), or a cyclic window of that many channels that
rolls by one channel each round (FedRolex, ``rolling: true``: channels ``(round + j) mod C``). With
``rescale_layer`` (HeteroFL's "scaler", on by default) the sub-net divides its hidden outputs by ``R_k`` in
training, which needs batch-statistics BN (``model.norm=bn_static``, HeteroFL's "static BN").

Aggregation is element-wise over the overlaps (spec §5): each entry of the global model becomes the
sample-weighted mean over the clients whose slice covers it, and an entry no client covered keeps its value:

    θ[e] ← Σ_k n_k·[e ∈ S_k]·θ_k[e] / Σ_k n_k·[e ∈ S_k]

(the server knows each client's slice from the budget and the round; it does not trust the reply for that).
This is the published HeteroFL averaging, not SHeteroFL's seed-code upload quirk (spec §9: a client's
max-width slice added once per trained width, which over-weights rich clients on the narrow slice).

Evaluated as the prefix sub-nets of each width in ``widths`` (predictors ``x1``, ``x0.5``, ...; the widest
first, the primary one). Bytes uploaded per client are logged (``heterofl`` in ``metrics.jsonl``).

SHeteroFL (``slimmable: true``, spec §5): a client of budget ``R_k`` trains every width ``w ≤ R_k`` of
``widths`` on each batch, the sum of their losses in one step, each narrower net the prefix of its own
sub-net (:class:`~fedtrust.models.slimmable.SlimNet`, hidden outputs divided by ``w`` in training with
``rescale_layer``); BN weights are shared and sliced, with batch statistics.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.errors import ConfigError
from fedtrust.fl.aggregate import mean_upload_bytes, reply_weights
from fedtrust.fl.protocol import Algorithm, Batch, ClientContext, LocalTraining, Message, TrainResult, with_prefix
from fedtrust.models.slimmable import Indices, SlimNet, coverage, embed, extract, slice_indices
from fedtrust.registry import register

MODEL = "model"
SLICE = "slice"
"""Messages and replies carry a client's sub-net under ``slice/`` (its tensors are smaller than the server
state's ``model/`` entries of the same names, which validation would otherwise reject)."""


@register("algorithm", "heterofl")
class HeteroFL(FedAvg):
    """HeteroFL / FedRolex (module docstring): each client trains its width's slice of one global model."""

    name = "heterofl"
    declarative = True
    train_options = frozenset()

    class Params(Algorithm.Params):
        rolling: bool = Field(False, description="FedRolex: the slice is a cyclic window rolling one channel a "
                                                 "round (false: HeteroFL's prefix)")
        rescale_layer: bool = Field(True, description="HeteroFL's scaler: a width-w sub-net divides its hidden "
                                                      "outputs by w in training (needs model.norm bn_static or none)")
        widths: list[float] | None = Field(None, description="widths evaluated (prefix sub-nets) and, with "
                                                             "slimmable, trained; null: the budget widths and 1, "
                                                             "else 1/8, 1/4, 1/2, 1")
        slimmable: bool = Field(False, description="SHeteroFL: a client trains every width <= its budget on each "
                                                   "batch (losses summed, one step; spec §5)")

    def __init__(self, params: Params, ctx: Any) -> None:
        super().__init__(params, ctx)
        if not ctx.defense.is_plain_mean:
            raise ConfigError("algorithm heterofl averages overlapping slices element-wise; it cannot combine with "
                              f"defense.aggregator={ctx.defense.aggregator.name!r} (use mean)")
        for w in self.widths + sorted(set(ctx.budgets or ())):
            if not 0 < w <= 1:
                raise ConfigError(f"algorithm heterofl: width {w} outside (0, 1]")
        try:
            for w in self.widths:
                self.sub_template(w)
        except ConfigError as e:
            raise ConfigError(f"algorithm heterofl slices a width-scalable model (cnn, digitnet, preresnet18): {e}") \
                from None

    @property
    def widths(self) -> list[float]:
        """The evaluated widths, widest first."""
        if self.params.widths is not None:
            return sorted(self.params.widths, reverse=True)
        if self.ctx.budgets is not None:
            return sorted({*self.ctx.budgets, 1.0}, reverse=True)
        return [1.0, 0.5, 0.25, 0.125]

    @functools.cached_property
    def template(self) -> nn.Module:
        """The full-width global model."""
        return self.ctx.new_model().to(self.ctx.device)

    @functools.lru_cache(maxsize=None)
    def sub_template(self, width: float) -> nn.Module:
        """The standalone width-``width`` model a client of that budget trains (weights overwritten)."""
        return self.ctx.new_model(width_ratio=width, rescale_layer=self.params.rescale_layer).to(self.ctx.device)

    @functools.lru_cache(maxsize=256)
    def indices(self, width: float, offset: int) -> Indices:
        """The entries of the global model the width-``width`` slice at ``offset`` holds."""
        return slice_indices(self.template, width, offset)

    def budget(self, client: int) -> float:
        return 1.0 if self.ctx.budgets is None else float(self.ctx.budgets[client])

    def offset(self, round: int) -> int:
        return round if self.params.rolling else 0

    # ---- server side -------------------------------------------------
    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        """Each client's slice of the global model (its budget's width, the round's offset) and the lr."""
        full = state.prefixed(MODEL)
        shares = self.ctx.outlier_shares(round, clients) if self.ctx.objective.needs_outliers else {}
        out = {}
        for c in clients:
            w = self.budget(c)
            arrays = with_prefix(SLICE, extract(full, self.indices(w, self.offset(round))))
            if c in shares:
                arrays["outliers/x"] = shares[c]
            out[c] = Message(arrays=arrays, meta={"lr": self.ctx.lr(round), "round": round, "width": w,
                                                  "offset": self.offset(round)})
        return out

    def reply_spec(self, message: Message) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The state of the width-``meta["width"]`` sub-net, nothing else."""
        sub = self.sub_template(float(message.meta["width"]))
        return {f"{SLICE}/{k}": (tuple(v.shape), v.dtype) for k, v in sub.state_dict().items()}

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        """The overlap-aware sample-weighted mean (module docstring)."""
        full = state.prefixed(MODEL)
        weights = reply_weights(replies)
        num = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in full.items()}
        den = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in full.items()}
        zeros = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in full.items()}
        for c, reply in replies.items():
            idx = self.indices(self.budget(c), self.offset(round))
            sub = {k: v.double() for k, v in reply.prefixed(SLICE).items()}
            placed = embed(sub, idx, zeros)
            covered = coverage(idx, full)
            for k in full:
                num[k] += weights[c] * placed[k]
                den[k] += weights[c] * covered[k].double()
        new = {}
        for k, old in full.items():
            mean = torch.where(den[k] > 0, num[k] / den[k].clamp_min(1e-300), old.double())
            new[k] = mean.round().to(old.dtype) if not old.is_floating_point() else mean.to(old.dtype)
        arrays = dict(state.arrays) | with_prefix(MODEL, new)
        return Message(arrays=arrays, meta=dict(state.meta)), {
            "heterofl": {"upload_bytes_mean": mean_upload_bytes(replies),
                         "widths": {str(c): self.budget(c) for c in sorted(replies)}}}

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        """The prefix sub-net of every width in ``widths``, widest first (the primary one)."""
        full = state.prefixed(MODEL)
        out = {}
        for w in self.widths:
            model = self.ctx.new_model(width_ratio=w, rescale_layer=self.params.rescale_layer).to(self.ctx.device)
            model.load_state_dict(extract(full, self.indices(w, 0)))
            out[f"x{w:g}"] = model
        return out

    # ---- client side -------------------------------------------------
    def slim(self, model: nn.Module, width: float) -> nn.Module:
        """``model`` (a width-R sub-net) run at the narrower global width ``width`` (its prefix)."""
        key = (id(model), width)
        if key not in self._slims:
            self._slims[key] = SlimNet(model, width / model.width_ratio, rescale_layer=self.params.rescale_layer)
        return self._slims[key]

    @functools.cached_property
    def _slims(self) -> dict[tuple[int, float], nn.Module]:
        return {}

    def local_loss(self, model, params: dict[str, Tensor], batch: Batch, ref: dict[str, Tensor]) -> Tensor:
        """The objective on the client's sub-net; SHeteroFL: summed over every width up to its budget."""
        if not self.params.slimmable:
            return super().local_loss(model, params, batch, ref)
        budget = float(model.width_ratio)
        loss = self.ctx.objective(model, batch)
        for w in self.widths:
            if w < budget - 1e-9:
                loss = loss + self.ctx.objective(self.slim(model, w), batch)
        return loss

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining:
        """FedAvg's local training of the width-``meta["width"]`` sub-net."""
        plan = super().local_training(message, client_state, ctx)
        model = self.sub_template(float(message.meta["width"]))
        if self.params.slimmable:  # build the narrower views here: not inside the vectorised executor's vmap
            for w in self.widths:
                if w < model.width_ratio - 1e-9:
                    self.slim(model, w)
        return dataclasses.replace(plan, model=model, init=message.prefixed(SLICE))

    def finish(self, message: Message, result: TrainResult, client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        """The trained sub-net under ``slice/``; the weight is the client's training size."""
        reply = Message(arrays=with_prefix(SLICE, result.state),
                        meta={"num_examples": result.num_examples, "loss": result.mean_loss, "steps": result.steps})
        return reply, client_state
