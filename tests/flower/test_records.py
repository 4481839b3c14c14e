"""fedtrust Message <-> Flower records: exact tensors, JSON meta, Flower's wire format, client state, scores."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")

from flwr.app import RecordDict  # noqa: E402
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402

from fedtrust.errors import FedTrustError  # noqa: E402
from fedtrust.fl.protocol import Message  # noqa: E402
from fedtrust.flower.records import (  # noqa: E402
    SCORES, from_records, has_message, record_keys, scores_from_record, scores_to_record, store_message,
    to_recorddict, to_records,
)


def over_the_wire(rd: RecordDict) -> RecordDict:
    """What the other side receives: protobuf bytes, parsed back."""
    proto = ProtoRecordDict.FromString(recorddict_to_proto(rd).SerializeToString())
    return recorddict_from_proto(proto)


TENSORS = {
    "model/conv.weight": torch.randn(4, 3, 3, 3),
    "model/bn.num_batches_tracked": torch.tensor(7),
    "model/empty": torch.zeros(0, 5),
    "f64": torch.randn(3, dtype=torch.float64),
    "f16": torch.randn(3).half(),
    "bf16": torch.randn(5).bfloat16(),
    "mask": torch.tensor([True, False, True]),
    "u8": torch.arange(10, dtype=torch.uint8),
    "i32": torch.arange(-3, 3, dtype=torch.int32),
    "transposed": torch.randn(3, 4).t(),
}
META = {"num_examples": 57, "loss": 0.25, "nan": float("nan"), "flag": True, "name": "client",
        "none": None, "list": [1, 2.5], "nested": {"a": [1, {"b": None}]}, "huge": 2**80, "neg": -(2**63)}


def test_tensors_and_meta_round_trip_exactly_through_flowers_wire_format():
    msg = Message(dict(TENSORS), dict(META))
    back = from_records(over_the_wire(to_recorddict(msg)))
    assert set(back.arrays) == set(TENSORS)
    for k, t in TENSORS.items():
        assert back.arrays[k].dtype == t.dtype and back.arrays[k].shape == t.shape, k
        assert torch.equal(back.arrays[k], t), k
    nan = back.meta.pop("nan")
    assert math.isnan(nan)
    assert back.meta == {k: v for k, v in META.items() if k != "nan"}
    assert type(back.meta["flag"]) is bool and type(back.meta["num_examples"]) is int


def test_layout_scalars_plain_nested_values_json_and_bitcast_dtypes_recorded():
    records = to_records(Message({"bf16": torch.ones(2).bfloat16(), "x": torch.ones(1)}, {"a": 1, "b": [1]}))
    arrays, meta, meta_json, dtypes = record_keys()
    assert set(records) == {arrays, meta, meta_json, dtypes}
    assert dict(records[meta]) == {"a": 1} and dict(records[meta_json]) == {"b": "[1]"}
    assert dict(records[dtypes]) == {"bf16": "bfloat16"}
    assert record_keys("other")[0] not in records


def test_decode_to_a_device_and_an_empty_message():
    back = from_records(to_recorddict(Message()), device=torch.device("cpu"))
    assert back.arrays == {} and back.meta == {}


def test_bad_meta_and_foreign_messages_are_one_line_errors():
    with pytest.raises(FedTrustError, match=r"meta\['obj'\] is not JSON-able"):
        to_records(Message({}, {"obj": object()}))
    with pytest.raises(FedTrustError, match="no record 'fedtrust.arrays'"):
        from_records(RecordDict())


def test_client_state_is_stored_replaced_and_removed_under_its_prefix():
    state = RecordDict()
    store_message(state, Message({"head": torch.ones(2)}, {"k": 1}), "client_state")
    assert has_message(state, "client_state") and not has_message(state, "fedtrust")
    store_message(state, Message({"other": torch.zeros(1)}, {}), "client_state")
    back = from_records(state, "client_state")
    assert list(back.arrays) == ["other"] and back.meta == {}
    store_message(state, Message(), "client_state")
    assert len(state) == 0


def test_client_scores_travel_as_one_metric_record_of_exact_numbers():
    scores = {"universal": (2 / 3, 0.75), "personalized": (float(torch.tensor(0.1)), 1.0)}
    back = over_the_wire(RecordDict({SCORES: scores_to_record(scores)}))
    assert list(back.metric_records) == [SCORES] and not back.array_records
    assert dict(back[SCORES]) == {"client_acc/universal": 2 / 3, "client_acc_masked/universal": 0.75,
                                  "client_acc/personalized": float(torch.tensor(0.1)),
                                  "client_acc_masked/personalized": 1.0}
    assert scores_from_record(back[SCORES]) == scores  # bit for bit


@pytest.mark.parametrize(("record", "error"), [
    ({"client_acc/g": 0.5}, "evaluation reply has no metric 'client_acc_masked/g'"),
    ({"client_acc/g": 0.5, "client_acc_masked/g": 0.5, "loss": 1.0}, "has an unexpected metric 'loss'"),
])
def test_malformed_scores_are_one_line_errors_naming_the_key(record, error):
    with pytest.raises(FedTrustError, match=error):
        scores_from_record(record)
