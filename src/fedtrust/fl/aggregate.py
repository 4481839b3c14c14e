"""Aggregation helpers shared by algorithms: replies are checked before they are averaged."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fedtrust.errors import FedTrustError
from fedtrust.fl.types import Message


def message_bytes(message: Message) -> int:
    """Bytes of a message's arrays (what it costs to send them, metadata aside)."""
    return sum(v.numel() * v.element_size() for v in message.arrays.values())


def mean_upload_bytes(replies: Mapping[int, Message]) -> float | None:
    """The mean of :func:`message_bytes` over the replies (None without replies): bytes uploaded per client."""
    sizes = [message_bytes(r) for r in replies.values()]
    return sum(sizes) / len(sizes) if sizes else None


def reply_weights(replies: Mapping[int, Message], key: str = "num_examples") -> dict[int, float]:
    """The sample weight of every reply; a missing or negative weight is an error naming the client."""
    weights = {}
    for cid, msg in replies.items():
        w = msg.meta.get(key)
        if not isinstance(w, (int, float)) or w < 0:
            raise FedTrustError(f"reply of client {cid} has no valid weight meta[{key!r}] (got {w!r}); expected a number >= 0")
        weights[cid] = float(w)
    if sum(weights.values()) <= 0:
        raise FedTrustError(f"all {len(replies)} replies have zero weight {key!r}; nothing to aggregate")
    return weights


def check_same_keys(replies: Mapping[int, Message], prefix: str) -> list[str]:
    """The sorted keys under ``prefix`` shared by every reply; any difference is an error naming the key."""
    ref_id, ref = next(iter(replies.items()))
    keys = sorted(k for k in ref.arrays if k.startswith(prefix))
    for cid, msg in replies.items():
        other = sorted(k for k in msg.arrays if k.startswith(prefix))
        if other != keys:
            diff = sorted(set(keys) ^ set(other))
            raise FedTrustError(f"reply of client {cid} differs from client {ref_id} in key {diff[0]!r}")
        for k in keys:
            if msg.arrays[k].shape != ref.arrays[k].shape:
                raise FedTrustError(f"key {k!r}: client {cid} sent shape {tuple(msg.arrays[k].shape)}, "
                                    f"client {ref_id} sent {tuple(ref.arrays[k].shape)}")
    return keys


def weighted_mean(replies: Mapping[int, Message], prefix: str = "", weight_key: str = "num_examples") -> dict[str, Tensor]:
    """Σ_k w_k θ_k / Σ_k w_k for every array under ``prefix`` (McMahan et al. 2017, Alg. 1).

    Integer tensors (BN's ``num_batches_tracked``) are averaged in float and rounded.
    """
    if not replies:
        raise FedTrustError("no replies to aggregate")
    weights = reply_weights(replies, weight_key)
    keys = check_same_keys(replies, prefix)
    total = sum(weights.values())
    out: dict[str, Tensor] = {}
    for k in keys:
        acc = None
        for cid, msg in replies.items():
            term = msg.arrays[k].double() * (weights[cid] / total)
            acc = term if acc is None else acc + term
        ref = next(iter(replies.values())).arrays[k]
        out[k] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out


def pool_bn_moments(replies: Mapping[int, Message], averaged: dict[str, Tensor],
                    weight_key: str = "num_examples") -> dict[str, Tensor]:
    """Replace averaged BN variances by the pooled variance of the clients' moments (spec rna.md §8).

    For each BN layer with running mean μ_k and variance σ²_k on client k and
    weights w_k = n_k / Σn: μ = Σ w_k μ_k and σ² = Σ w_k (σ²_k + μ²_k) − μ², the
    variance of the union of the clients' feature distributions. Plain
    averaging of σ²_k ignores the spread of the means between clients, which
    matters when their data differ (e.g. ID-only vs ID+outlier batches).
    """
    weights = reply_weights(replies, weight_key)
    total = sum(weights.values())
    out = dict(averaged)
    for key in averaged:
        if not key.endswith("running_var"):
            continue
        mean_key = key[: -len("running_var")] + "running_mean"
        if mean_key not in averaged:
            continue
        second = sum((weights[c] / total) * (m.arrays[key].double() + m.arrays[mean_key].double() ** 2)
                     for c, m in replies.items())
        out[key] = (second - averaged[mean_key].double() ** 2).clamp_min(0).to(averaged[key].dtype)
    return out
