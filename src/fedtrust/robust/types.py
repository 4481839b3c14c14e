"""Types of the Byzantine-robust layer: the round's flattened client updates and an aggregator's result.

Imports nothing of fedtrust but :mod:`fedtrust.errors`, so every module of
``fedtrust.robust`` (and the core that wires it in) can import it without cycles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedtrust.errors import FedTrustError


@dataclass(frozen=True)
class Updates:
    """n client updates (deltas: client weights minus the round's global weights), flattened.

    Checked on construction: ``deltas`` is a finite floating (n, d) tensor with
    n >= 1; ``weights`` has n entries, finite, >= 0, with a positive sum (stored
    as float64 on the deltas' device); ``ids`` are n distinct ints. Any
    violation is a one-line :class:`~fedtrust.errors.FedTrustError` naming the
    field (and the client for a non-finite row).
    """

    deltas: Tensor
    """(n, d) float; row i is client ``ids[i]``'s update."""
    weights: Tensor
    """(n,) float64 sample weights (num_examples), >= 0."""
    ids: tuple[int, ...]
    """Client ids, len n."""

    def __post_init__(self) -> None:
        deltas = self.deltas
        if not isinstance(deltas, Tensor) or deltas.dim() != 2 or not deltas.is_floating_point():
            got = f"{deltas.dtype} tensor of shape {tuple(deltas.shape)}" if isinstance(deltas, Tensor) else type(deltas).__name__
            raise FedTrustError(f"Updates.deltas must be a floating (n, d) tensor; got {got}")
        n = deltas.shape[0]
        if n == 0:
            raise FedTrustError("Updates.deltas has no rows; expected at least one client update")
        weights = torch.as_tensor(self.weights, dtype=torch.float64, device=deltas.device)
        if weights.shape != (n,):
            raise FedTrustError(f"Updates.weights has shape {tuple(weights.shape)}; expected ({n},), one per update")
        ids = tuple(int(i) for i in self.ids)
        if len(ids) != n or len(set(ids)) != n:
            raise FedTrustError(f"Updates.ids must be {n} distinct client ids, one per update; got {list(ids)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise FedTrustError(f"Updates.weights must be finite, >= 0 and not all zero; got {weights.tolist()}")
        finite = torch.isfinite(deltas).all(dim=1)
        if not bool(finite.all()):
            bad = [ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
            raise FedTrustError(f"Updates.deltas of client(s) {bad} contain NaN or Inf; reject them before aggregating")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "ids", ids)

    @property
    def n(self) -> int:
        """Number of updates."""
        return self.deltas.shape[0]

    @property
    def d(self) -> int:
        """Length of one flattened update."""
        return self.deltas.shape[1]

    @classmethod
    def stack(cls, deltas: Mapping[int, Tensor], weights: Mapping[int, float]) -> Updates:
        """``Updates`` from per-client flat deltas and sample weights, both keyed by client id (ids sorted)."""
        ids = sorted(deltas)
        missing = [i for i in ids if i not in weights]
        if missing:
            raise FedTrustError(f"no sample weight for client(s) {missing}")
        return cls(torch.stack([deltas[i] for i in ids]), torch.tensor([float(weights[i]) for i in ids],
                                                                        dtype=torch.float64), tuple(ids))


@dataclass
class Aggregate:
    """An aggregator's result for one round."""

    delta: Tensor
    """(d,) the aggregated update the server adds to the global weights."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """JSON-able: ``"weights"`` {id: share of the aggregate}, ``"rejected"`` [ids], and per-method scores."""


def flatten(arrays: Mapping[str, Tensor], keys: Sequence[str]) -> Tensor:
    """The arrays under ``keys`` (in that order) as one flat float vector; a missing key is an error naming it."""
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise FedTrustError(f"cannot flatten: key {missing[0]!r} is missing")
    if not keys:
        return torch.empty(0)
    return torch.cat([arrays[k].reshape(-1).to(torch.promote_types(arrays[k].dtype, torch.float32)) for k in keys])


def unflatten(vector: Tensor, like: Mapping[str, Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`: split ``vector`` into the shapes (and dtypes) of ``like[k]`` for ``k`` in ``keys``."""
    sizes = [like[k].numel() for k in keys]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise FedTrustError(f"cannot unflatten a vector of shape {tuple(vector.shape)} into {sum(sizes)} values")
    parts = vector.split(sizes)
    return {k: _cast(p.reshape(like[k].shape), like[k].dtype) for k, p in zip(keys, parts)}


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, rounded (not truncated) when ``dtype`` is integral (BN's ``num_batches_tracked``)."""
    return x.to(dtype) if dtype.is_floating_point else x.round().to(dtype)
