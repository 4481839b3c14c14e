"""Split-Mix FL (Hong et al., ICLR 2022; spec splitmix.md §2–§3): K base nets, mixed on demand by width.

The model is ``K = 1/r`` independent **base nets**, each the configured architecture with every hidden width
multiplied by the atom ratio ``r`` (``base_ratio``, default 1/8; ``model.width_ratio`` of the builder), with its
own parameters, BN and classifier. A client with budget ``R_k`` (config section ``budget``; 1 without budgets)
trains ``n_k = R_k / r`` of them each round, and the mixed model of width ``w`` is the mean of the logits of
bases ``0 .. w/r − 1`` (:class:`~fedtrust.models.ensemble.MixedModel`). Each round:

1. **configure**: for each sampled client, in client order, the first base comes from a shuffled cycle over
   the K indices (a fresh permutation of the round's server generator for every K clients), which balances
   how often each base trains; the other ``n_k − 1`` are distinct random picks from the rest (spec §3.1).
   The client receives those bases only (``base<i>/...``) and their indices (``meta["bases"]``).
2. **client**: trains each of its bases as a standalone classifier on the configured objective (CE, or DAT
   for robustness), all on one batch schedule: the same minibatches, one step of each base per batch (spec
   §3.3: the ensemble is never trained jointly). The vectorised executor stacks the (client, base) jobs,
   so one vmapped step trains every base of every client in the round. It replies the trained bases.
3. **aggregate**: per base, the configured aggregate (the sample-weighted mean, weights = the clients'
   training sizes) over the clients that trained it; a base nobody trained keeps its values (spec §3.5).

Evaluated as the mixed models of each width in ``widths`` (predictors ``x1``, ``x0.5``, ...; the widest
is the primary one), every client's test data at every width whatever its budget (spec §6). Bytes uploaded
per client are logged (``splitmix`` in ``metrics.jsonl``) with the per-base training counts.

Departures: the cycle restarts each round (the code's cycle runs on across rounds); budgets come from the
``budget`` section for any data set, not from client order alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.algorithms.personal import PERSONAL, personal_overrides, split_state
from fedtrust.errors import ConfigError
from fedtrust.fl.aggregate import mean_upload_bytes
from fedtrust.fl.protocol import Algorithm, ClientContext, LocalTraining, Message, TrainResult, with_prefix
from fedtrust.models.ensemble import MixedModel
from fedtrust.models.norms import norm_state_keys
from fedtrust.registry import register

BASE = "base"
_TOLERANCE = 1e-9


def base_prefix(i: int) -> str:
    """The state prefix of base ``i``: ``"base<i>"``."""
    return f"{BASE}{i}"


def bases_for(budget: float, ratio: float) -> int:
    """How many base nets a client of width budget ``budget`` trains: ``floor(budget / ratio)``, at least 1."""
    return max(1, math.floor(budget / ratio + _TOLERANCE))


def choose_bases(counts: list[int], k: int, generator: torch.Generator) -> list[list[int]]:
    """Each client's bases (spec §3.1): the first from a shuffled cycle over ``range(k)`` (a fresh permutation
    every ``k`` clients), the others distinct random picks from the remaining indices; ``counts[j]`` bases for
    the j-th client."""
    out, cycle = [], []
    for n in counts:
        if not cycle:
            cycle = torch.randperm(k, generator=generator).tolist()
        first = cycle.pop(0)
        rest = [i for i in range(k) if i != first]
        picks = torch.randperm(len(rest), generator=generator)[: min(n, k) - 1].tolist()
        out.append([first, *(rest[p] for p in picks)])
    return out


@register("algorithm", "splitmix")
class SplitMix(FedAvg):
    """Split-Mix (module docstring): K base nets of width r, each client trains as many as its budget allows."""

    name = "splitmix"
    declarative = True
    train_options = frozenset()

    class Params(Algorithm.Params):
        base_ratio: float = Field(0.125, gt=0, le=1, description="atom width r of a base net; K = 1/r bases")
        rescale_init: bool = Field(True, description="re-initialise the bases with the full-width fan-in (spec §2)")
        rescale_layer: bool = Field(True, description="divide hidden outputs by r in training (spec §2; needs "
                                                      "model.norm bn_static or none)")
        widths: list[float] | None = Field(None, description="widths evaluated (mixed models of the first w/r "
                                                             "bases), multiples of r; null: r, 2r, 4r, ... and 1")
        local_bn: bool = Field(False, description="keep every base's norm layers on the client, FedBN-style "
                                                  "(spec §2 --lbn, 'locally tracked'); evaluation is then "
                                                  "personalized")

        @field_validator("base_ratio")
        @classmethod
        def _ratio(cls, v: float) -> float:
            k = round(1 / v)
            if abs(k * v - 1) > 1e-6:
                raise ValueError(f"must be 1/K for an integer K (e.g. 0.125, 0.25), got {v}")
            return v

    def __init__(self, params: Params, ctx: Any) -> None:
        super().__init__(params, ctx)
        # with local_bn each client is scored with its own norm layers (personalized evaluation); the class
        # attribute stays False, the default configuration's
        self.personalized = params.local_bn  # type: ignore[misc]
        r = params.base_ratio
        for w in self.widths:
            if not (0 < w <= 1) or abs(round(w / r) * r - w) > 1e-6:
                raise ConfigError(f"algorithm.widths: {w} is not a multiple of base_ratio={r} in (0, 1]; expected "
                                  f"widths like {[r * i for i in (1, 2)]} ... 1")
        if ctx.budgets is not None and min(ctx.budgets) < r - _TOLERANCE:
            raise ConfigError(f"a client budget {min(ctx.budgets)} is below one base net (base_ratio={r}); "
                              f"expected budget.widths >= {r}")
        try:
            self.template  # noqa: B018  (a model without width_ratio fails here, before any round)
        except ConfigError as e:
            raise ConfigError(f"algorithm splitmix builds its base nets with the model options width_ratio, "
                              f"rescale_init and rescale_layer (models cnn, digitnet, preresnet18): {e}") from None

    @property
    def widths(self) -> list[float]:
        """The evaluated widths, widest first."""
        r = self.params.base_ratio
        if self.params.widths is not None:
            return sorted(self.params.widths, reverse=True)
        doubling = [r * 2 ** j for j in range(round(1 / r).bit_length()) if r * 2 ** j <= 1 + _TOLERANCE]
        return sorted({*doubling, 1.0}, reverse=True)

    @functools.cached_property
    def _norm_keys(self) -> frozenset[str]:
        return norm_state_keys(self.template) if self.params.local_bn else frozenset()

    def _local(self, key: str) -> bool:
        """Whether a base's state entry stays on the client (its norm layers under ``local_bn``)."""
        return key in self._norm_keys

    @property
    def num_bases(self) -> int:
        return round(1 / self.params.base_ratio)

    def new_base(self) -> nn.Module:
        """One base net: the configured model at width ``base_ratio`` with the rescale options."""
        p = self.params
        return self.ctx.new_model(width_ratio=p.base_ratio, rescale_init=p.rescale_init, rescale_layer=p.rescale_layer)

    @functools.cached_property
    def template(self) -> nn.Module:
        return self.new_base().to(self.ctx.device)

    def budget(self, client: int) -> float:
        return 1.0 if self.ctx.budgets is None else float(self.ctx.budgets[client])

    # ---- server side -------------------------------------------------
    def init(self) -> Message:
        """K independently initialised base nets under ``base<i>/``."""
        arrays: dict[str, Tensor] = {}
        for i in range(self.num_bases):
            arrays |= with_prefix(base_prefix(i), self.new_base().state_dict())
        return Message(arrays=arrays, meta={})

    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        """Each client's bases (module docstring, step 1), the lr and, when the objective needs them, its
        outlier share."""
        order = sorted(clients)
        counts = [bases_for(self.budget(c), self.params.base_ratio) for c in order]
        chosen = dict(zip(order, choose_bases(counts, self.num_bases, self.ctx.generator(round, stream=1))))
        shares = self.ctx.outlier_shares(round, clients) if self.ctx.objective.needs_outliers else {}
        out = {}
        for c in clients:
            arrays = {k: v for i in chosen[c] for k, v in state.arrays.items() if k.startswith(base_prefix(i) + "/")}
            if c in shares:
                arrays["outliers/x"] = shares[c]
            out[c] = Message(arrays=arrays, meta={"lr": self.ctx.lr(round), "round": round, "bases": chosen[c]})
        return out

    def reply_spec(self, message: Message) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The state of every base the message names, nothing else."""
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in self.template.state_dict().items() if not self._local(k)}
        return {f"{base_prefix(i)}/{k}": s for i in message.meta["bases"] for k, s in shapes.items()}

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        """Per base, the configured aggregate over the clients that trained it (spec §3.5)."""
        arrays, metrics = dict(state.arrays), {}
        counts = []
        for i in range(self.num_bases):
            tag = base_prefix(i) + "/"
            trained = {c: r for c, r in replies.items() if any(k.startswith(tag) for k in r.arrays)}
            counts.append(len(trained))
            if not trained:
                continue
            merged, m = self.ctx.defense.merge(state, trained, [base_prefix(i)], round)
            arrays.update({k: v for k, v in merged.arrays.items() if k.startswith(tag) or k.startswith("defense/")})
            metrics.update(m)
        metrics["splitmix"] = {"base_counts": counts, "upload_bytes_mean": mean_upload_bytes(replies)}
        return Message(arrays=arrays, meta=dict(state.meta)), metrics

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        """The mixed model of every width in ``widths``, widest first (the primary one); with ``local_bn`` and
        a client state, each base with the client's own norm layers where it has trained that base."""
        own = personal_overrides(client_state)
        bases = []
        for i in range(self.num_bases):
            base = self.new_base().to(self.ctx.device)
            base.load_state_dict({**state.prefixed(base_prefix(i)), **_prefixed(own, base_prefix(i))})
            bases.append(base)
        r = self.params.base_ratio
        return {f"x{w:g}": MixedModel(bases[: round(w / r)]) for w in self.widths}

    # ---- client side -------------------------------------------------
    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> list[LocalTraining]:
        """One plan per base the client received, on one shared batch schedule."""
        plan = super().local_training(message, client_state, ctx)
        own = personal_overrides(client_state)
        return [dataclasses.replace(plan, init={**message.prefixed(base_prefix(i)), **_prefixed(own, base_prefix(i))})
                for i in message.meta["bases"]]

    def finish(self, message: Message, result: list[TrainResult], client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        """The trained bases under their prefixes (without their norm layers under ``local_bn``: those go to
        the client state, ``personal/base<i>/…``); the weight is the client's training size."""
        arrays: dict[str, Tensor] = {}
        own: dict[str, Tensor] = {}
        for i, res in zip(message.meta["bases"], result):
            shared, local = split_state(res.state, self._local)
            arrays |= with_prefix(base_prefix(i), shared)
            own |= with_prefix(f"{PERSONAL}/{base_prefix(i)}", local)
        losses = [res.mean_loss for res in result]
        reply = Message(arrays=arrays, meta={"num_examples": result[0].num_examples,
                                             "loss": sum(losses) / len(losses), "steps": result[0].steps})
        if own:
            client_state = Message(arrays={**client_state.arrays, **own}, meta=dict(client_state.meta))
        return reply, client_state


def _prefixed(arrays: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``arrays`` under ``prefix/``, the prefix stripped."""
    tag = prefix + "/"
    return {k[len(tag):]: v for k, v in arrays.items() if k.startswith(tag)}
