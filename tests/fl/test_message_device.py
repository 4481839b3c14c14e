"""Messages live on the CPU (README "Devices"): ``Message.to`` and the client store's copy."""

from __future__ import annotations

import torch

from fedtrust.fl.executor import ClientStore
from fedtrust.fl.types import Message


def test_message_to_moves_every_array_and_keeps_meta():
    m = Message({"model/w": torch.ones(2, 3), "model/b": torch.zeros(3, dtype=torch.float64)}, {"num_examples": 7})
    moved = m.to("meta")
    assert {k: v.device.type for k, v in moved.arrays.items()} == {"model/w": "meta", "model/b": "meta"}
    assert {k: (v.shape, v.dtype) for k, v in moved.arrays.items()} == \
        {k: (v.shape, v.dtype) for k, v in m.arrays.items()}
    assert moved.meta == {"num_examples": 7}
    assert all(v.device.type == "cpu" for v in m.arrays.values()), "the original stays where it was"


def test_message_to_its_own_device_is_the_same_message():
    m = Message({"a": torch.arange(4)}, {"k": 1})
    assert m.to("cpu") is m and m.to(torch.device("cpu")).arrays["a"] is m.arrays["a"]


def test_client_store_moves_a_device_state_to_the_cpu_through_message_to(monkeypatch):
    """The store asks every state for its CPU copy (``Message.to("cpu")``) and keeps that copy; empty states
    are dropped. (No second device in CI: the move is observed through ``Message.to``.)"""
    asked, kept = [], Message({"flip/l1": torch.ones(2, 2)})

    def fake_to(self, device):
        asked.append(str(device))
        return kept

    monkeypatch.setattr(Message, "to", fake_to)
    store = ClientStore()
    store.set(3, Message({"flip/l1": torch.zeros(2, 2)}))
    assert asked == ["cpu"] and store.get(3) is kept
    store.set(3, Message())
    assert 3 not in store.states and store.get(3).arrays == {}
