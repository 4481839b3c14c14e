"""fedtrust :class:`~fedtrust.fl.protocol.Message` <-> Flower records, without pickling.

A fedtrust message is flat ``dict[str, Tensor]`` plus JSON-able ``meta``. On
Flower it becomes records under one key prefix ``P`` (default ``"fedtrust"``):

| record | type | holds |
| --- | --- | --- |
| ``P.arrays`` | ``ArrayRecord`` | every tensor, as a NumPy ``.npy`` buffer (saved with ``allow_pickle=False``) |
| ``P.meta`` | ``ConfigRecord`` | meta values that are bool, int (64-bit), float or str, as themselves |
| ``P.meta_json`` | ``ConfigRecord`` | every other meta value (None, lists, dicts, huge ints) as a JSON string |
| ``P.dtypes`` | ``ConfigRecord`` | key → torch dtype, only for tensors NumPy cannot hold (bfloat16, float8…), |
| | | which travel bit-cast to a same-width integer |

Decoding inverts this exactly for tensors (dtype, shape, values, bit for bit)
and as JSON does for meta (a tuple comes back as a list). The same layout
stores a client's persistent state in Flower's ``Context.state`` under another
prefix, so it never leaves the node.

A node's personalized evaluation reply is one ``MetricRecord`` (``SCORES``),
numbers only: ``client_acc/<predictor>`` and ``client_acc_masked/<predictor>``
(:data:`~fedtrust.evaluation.ClientScores`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtrust.errors import FedTrustError
from fedtrust.fl.protocol import Message

if TYPE_CHECKING:
    from fedtrust.evaluation import ClientScores

Record = ArrayRecord | ConfigRecord | MetricRecord

PREFIX = "fedtrust"
SCORES = f"{PREFIX}.scores"
"""The ``MetricRecord`` of a personalized evaluation reply."""
_ACC, _MASKED = "client_acc/", "client_acc_masked/"
_INT64 = (-(2**63), 2**63 - 1)

_FLOAT8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_BITCAST: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.int16, **{getattr(torch, n): torch.uint8 for n in _FLOAT8 if hasattr(torch, n)}}
"""torch dtypes NumPy has no equivalent for, and the same-width integer they travel as."""


def record_keys(prefix: str = PREFIX) -> tuple[str, str, str, str]:
    """The record names a message uses under ``prefix``: arrays, meta, meta_json, dtypes."""
    return f"{prefix}.arrays", f"{prefix}.meta", f"{prefix}.meta_json", f"{prefix}.dtypes"


# ---------------------------------------------------------------- tensors


def _encode_tensor(key: str, t: torch.Tensor, dtypes: dict[str, str]) -> Array:
    t = t.detach().cpu().contiguous()
    if t.dtype in _BITCAST:
        dtypes[key] = str(t.dtype).removeprefix("torch.")
        t = t.view(_BITCAST[t.dtype])
    try:
        return Array(t.numpy())
    except TypeError:
        raise FedTrustError(f"message array {key!r} has dtype {t.dtype}, which cannot be sent over Flower") from None


def _decode_tensor(key: str, array: Array, dtypes: Mapping[str, Any], device: torch.device | None) -> torch.Tensor:
    t = torch.from_numpy(np.require(array.numpy(), requirements=("C", "W")))
    if key in dtypes:
        t = t.view(getattr(torch, str(dtypes[key])))
    return t.to(device) if device is not None else t


# ---------------------------------------------------------------- meta


def _is_plain(v: Any) -> bool:
    """True when ``v`` travels as itself in a ConfigRecord."""
    if isinstance(v, (bool, float, str)):
        return True
    return isinstance(v, int) and _INT64[0] <= v <= _INT64[1]


def _encode_meta(meta: Mapping[str, Any]) -> tuple[ConfigRecord, ConfigRecord]:
    plain, encoded = {}, {}
    for k, v in meta.items():
        if not isinstance(k, str):
            raise FedTrustError(f"message meta key {k!r} is not a string")
        if _is_plain(v):
            plain[k] = v
            continue
        try:
            encoded[k] = json.dumps(v)
        except (TypeError, ValueError):
            raise FedTrustError(f"message meta[{k!r}] is not JSON-able (got {type(v).__name__})") from None
    return ConfigRecord(plain), ConfigRecord(encoded)


# ---------------------------------------------------------------- messages


def to_records(message: Message, prefix: str = PREFIX) -> dict[str, Record]:
    """The records of ``message`` under ``prefix`` (see the module docstring)."""
    k_arrays, k_meta, k_json, k_dtypes = record_keys(prefix)
    dtypes: dict[str, str] = {}
    arrays = ArrayRecord({k: _encode_tensor(k, v, dtypes) for k, v in message.arrays.items()})
    plain, encoded = _encode_meta(message.meta)
    records: dict[str, Record] = {k_arrays: arrays, k_meta: plain, k_json: encoded}
    if dtypes:
        records[k_dtypes] = ConfigRecord(dtypes)
    return records


def to_recorddict(message: Message, prefix: str = PREFIX) -> RecordDict:
    """``message`` as a Flower ``RecordDict`` (a message's content)."""
    return RecordDict(to_records(message, prefix))


def has_message(records: Mapping[str, Any], prefix: str = PREFIX) -> bool:
    """True when ``records`` hold a message under ``prefix``."""
    return record_keys(prefix)[0] in records


def from_records(records: Mapping[str, Any], prefix: str = PREFIX,
                 device: torch.device | None = None) -> Message:
    """The fedtrust message stored under ``prefix`` in ``records`` (a RecordDict or a mapping of records)."""
    k_arrays, k_meta, k_json, k_dtypes = record_keys(prefix)
    if k_arrays not in records:
        raise FedTrustError(f"Flower message has no record {k_arrays!r}; was it sent by fedtrust?")
    dtypes = records.get(k_dtypes) or {}
    arrays = {k: _decode_tensor(k, a, dtypes, device) for k, a in records[k_arrays].items()}
    meta: dict[str, Any] = dict(records.get(k_meta) or {})
    for k, v in (records.get(k_json) or {}).items():
        meta[k] = json.loads(v)
    return Message(arrays=arrays, meta=meta)


def store_message(state: MutableMapping[str, Any], message: Message | None, prefix: str) -> None:
    """Replace the message under ``prefix`` in ``state`` (e.g. ``Context.state``); empty or None removes it."""
    for key in record_keys(prefix):
        if key in state:
            del state[key]
    if message is not None and (message.arrays or message.meta):
        for key, record in to_records(message, prefix).items():
            state[key] = record


# ---------------------------------------------------------------- evaluation replies


def scores_to_record(scores: ClientScores) -> MetricRecord:
    """One client's scores as a ``MetricRecord``: ``client_acc/<name>``, ``client_acc_masked/<name>``."""
    values: dict[str, float] = {}
    for name, (acc, masked) in scores.items():
        values[_ACC + name], values[_MASKED + name] = float(acc), float(masked)
    return MetricRecord(values)


def scores_from_record(record: Mapping[str, Any]) -> ClientScores:
    """The scores in a :func:`scores_to_record` record; a missing or foreign key is an error naming it."""
    names = [k[len(_ACC):] for k in record if k.startswith(_ACC)]
    expected = {key for name in names for key in (_ACC + name, _MASKED + name)}
    wrong = sorted(set(record) ^ expected)
    if wrong:
        key = wrong[0]
        raise FedTrustError(f"evaluation reply has {'no' if key in expected else 'an unexpected'} metric {key!r}")
    return {name: (float(record[_ACC + name]), float(record[_MASKED + name])) for name in names}
