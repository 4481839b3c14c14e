"""The server's defense: reply validation settings and the aggregator every algorithm averages through.

An algorithm says *what* is averaged (the key prefixes of its shared parts: FedAvg's
``"model/"``, FedLoGe's backbone and global head); :meth:`Defense.average` says *how*
(config ``defense.aggregator``; STYLE.md §6, a strategy that wraps a strategy).

* ``mean`` with ``server_lr = 1`` (the default) is FedAvg's sample-weighted mean of the
  replied tensors, computed exactly as before this joint existed (bit-identical runs).
* Any other aggregator (or a server lr ≠ 1) works on client *updates*: for every
  floating entry under the prefix, Δ_i = θ_i − θ (θ the server's current value), the
  entries flattened into one vector per client (:class:`~fedtrust.robust.types.Updates`);
  the new value is θ + η_s · agg(Δ_1 … Δ_n) with η_s = ``server_lr``. Integer entries
  (BN's ``num_batches_tracked``) take the sample-weighted mean, as before.
* An aggregator's own state across rounds (FoolsGold's histories, centered clipping's
  last aggregate) lives in the server state under ``"defense/<prefix>/"``, so it is
  checkpointed and resumed with the run, and never sent to clients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedtrust.errors import ConfigError
from fedtrust.fl.aggregate import check_same_keys, pool_bn_moments, reply_weights, weighted_mean
from fedtrust.fl.types import Message
from fedtrust.robust.aggregators import Aggregator, Mean
from fedtrust.robust.types import Updates, flatten, unflatten

DEFENSE = "defense"
_DEFENSE_STREAM = 7


def server_generator(seed: int, round: int, stream: int = _DEFENSE_STREAM) -> torch.Generator:
    """The server's seeded torch RNG of one round and purpose (never the global RNG)."""
    state = np.random.SeedSequence([seed, stream, round]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


RootUpdate = Callable[[Message, int], Message]
"""``root(state, round) -> reply``: the server's own training on its root data (FLTrust)."""


@dataclass
class Defense:
    """Config section ``defense``: which aggregator, the update-validation bounds, the server lr."""

    aggregator: Aggregator = field(default_factory=Mean)
    server_lr: float = 1.0
    uniform: bool = False
    """Weight every reply alike (1/n) instead of by its sample count, whatever the aggregator (FLIP's server)."""
    max_update_norm: float | None = None
    min_replies: int = 1
    seed: int = 0
    root: RootUpdate | None = None
    """Set by the run when the aggregator needs the server's root-data update (FLTrust)."""

    @property
    def is_plain_mean(self) -> bool:
        """True when averaging is FedAvg's weighted mean, bit for bit."""
        return type(self.aggregator) is Mean and self.server_lr == 1.0 and not self.uniform

    def average(self, state: Message, replies: Mapping[int, Message], prefix: str, round: int,
                bn_aggregation: str = "mean") -> tuple[dict[str, Tensor], dict[str, Any]]:
        """New values of every entry under ``prefix`` (``"model/"``) and the aggregator's metrics.

        The returned arrays also carry the aggregator's updated state (``"defense/<prefix>..."``);
        lay them over the server state. Metrics are ``{}`` for the plain mean, else
        ``{"aggregator/<prefix>": {...}}`` (weights, rejected ids, the method's scores).
        """
        if self.is_plain_mean:
            averaged = weighted_mean(replies, prefix)
            return (pool_bn_moments(replies, averaged) if bn_aggregation == "pooled" else averaged), {}
        if bn_aggregation == "pooled":
            raise ConfigError(f"bn_aggregation=pooled pools BN moments by the mean; it cannot combine with "
                              f"defense.aggregator={self.aggregator.name!r} (use bn_aggregation=mean)")
        keys = check_same_keys(replies, prefix)
        floats = [k for k in keys if next(iter(replies.values())).arrays[k].is_floating_point()]
        missing = [k for k in floats if k not in state.arrays]
        if missing:
            raise ConfigError(f"defense.aggregator={self.aggregator.name!r} averages updates, but the server "
                              f"state has no entry {missing[0]!r} to take the update from")
        ints = [k for k in keys if k not in floats]
        out = weighted_mean({c: Message({k: m.arrays[k] for k in ints}, m.meta) for c, m in replies.items()}) if ints else {}
        if not floats:
            return out, {}
        updates = self._updates(state, replies, floats)
        tag = f"{DEFENSE}/{prefix}"
        own_state = {k[len(tag):]: v for k, v in state.arrays.items() if k.startswith(tag)}
        root = self._root_delta(state, round, floats)
        result, own_state = self.aggregator(updates, own_state, server_generator(self.seed, round), root)
        delta = unflatten(result.delta * self.server_lr, {k: state.arrays[k] for k in floats}, floats)
        out.update({k: (state.arrays[k].double() + delta[k].double()).to(state.arrays[k].dtype) for k in floats})
        out.update({tag + k: v for k, v in own_state.items()})
        return out, {f"aggregator/{prefix.rstrip('/')}": result.metrics}

    def merge(self, state: Message, replies: Mapping[int, Message], prefixes: list[str], round: int,
              bn_aggregation: str = "mean") -> tuple[Message, dict[str, Any]]:
        """The server state with every array the replies carry under ``prefixes`` aggregated
        (McMahan et al. 2017, Alg. 1 with the mean; the configured aggregator otherwise); arrays
        no reply carries (a frozen or personal head, a fixed classifier) keep their value."""
        arrays, metrics = dict(state.arrays), {}
        for p in prefixes:
            averaged, m = self.average(state, replies, p + "/", round, bn_aggregation)
            arrays.update(averaged)
            metrics.update(m)
        return Message(arrays=arrays, meta=dict(state.meta)), metrics

    def _updates(self, state: Message, replies: Mapping[int, Message], keys: list[str]) -> Updates:
        ids = sorted(replies)
        weights = {c: 1.0 for c in replies} if self.uniform else reply_weights(replies)
        base = flatten(state.arrays, keys).double()
        deltas = torch.stack([flatten(replies[c].arrays, keys).double() - base for c in ids])
        return Updates(deltas, torch.tensor([weights[c] for c in ids], dtype=torch.float64), tuple(ids))

    def _root_delta(self, state: Message, round: int, keys: list[str]) -> Tensor | None:
        if not self.aggregator.needs_root:
            return None
        if self.root is None:
            raise ConfigError(f"defense.aggregator={self.aggregator.name!r} needs a server root data set "
                              f"(defense.root_size > 0)")
        reply = self.root(state, round)
        return flatten(reply.arrays, keys).double() - flatten(state.arrays, keys).double()
