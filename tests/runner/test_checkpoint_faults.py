"""Corrupted artefacts: the last two checkpoints are kept; a truncated file, a bad header or changed tensor
bytes are one-line errors naming the file, and ``--resume`` falls back to the previous checkpoint when that
one is sound (end to end, with a real SIGKILL: tests/runner/test_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtrust.errors import CheckpointError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.types import Message
from fedtrust.runner.checkpoint import (
    CHECKPOINT_NAME, CORRUPT_NAME, PREVIOUS_NAME, Checkpoint, config_mismatch, load_checkpoint, read_checkpoint,
    save_checkpoint,
)

pytestmark = [pytest.mark.usefixtures("one_thread")]


def checkpoint(round: int) -> Checkpoint:
    state = Message({"model/w": torch.full((64,), float(round))}, {"round": round})
    store = ClientStore({3: Message({"personal/h": torch.arange(8.0) * round}, {})})
    return Checkpoint(round, state, store, {"seed": 0}, {})


@pytest.fixture
def two_rounds(tmp_path: Path) -> Path:
    save_checkpoint(tmp_path, checkpoint(1))
    save_checkpoint(tmp_path, checkpoint(2))
    return tmp_path


def flip_byte_in_tensor(path: Path, key: str) -> None:
    """Change one byte inside tensor ``key``'s data (safetensors: an 8-byte header length, the JSON header
    with each tensor's data offsets, then the data); the header stays intact."""
    raw = bytearray(path.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8:8 + size])[key]["data_offsets"]
    raw[8 + size + start] ^= 0x01
    path.write_bytes(bytes(raw))


def test_the_last_two_checkpoints_are_kept(two_rounds):
    assert read_checkpoint(two_rounds / CHECKPOINT_NAME).round == 2
    assert read_checkpoint(two_rounds / PREVIOUS_NAME).round == 1
    save_checkpoint(two_rounds, checkpoint(3))
    assert read_checkpoint(two_rounds / PREVIOUS_NAME).round == 2
    assert not (two_rounds / "checkpoint.safetensors.tmp").exists()


def corrupt_bytes(path: Path) -> None:
    flip_byte_in_tensor(path, "server/model/w")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def bad_header(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(b"\xff" * 8 + raw[8:])


@pytest.mark.parametrize("damage, fragment", [(corrupt_bytes, "fails its checksum (server tensor bytes"),
                                              (truncate, "is unreadable"), (bad_header, "is unreadable")])
def test_a_damaged_checkpoint_is_a_one_line_error_and_resume_falls_back_to_the_previous_one(two_rounds, damage,
                                                                                          fragment):
    """Rules out a damaged file read as if sound (changed weights resumed silently), a traceback, and a
    resume that gives up while a sound previous checkpoint exists."""
    latest = two_rounds / CHECKPOINT_NAME
    damage(latest)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(latest)
    assert fragment in str(err.value) and str(latest) in str(err.value) and "\n" not in str(err.value)
    said: list[str] = []
    ckpt = load_checkpoint(two_rounds, said.append)
    assert ckpt.round == 1 and torch.equal(ckpt.state.arrays["model/w"], torch.full((64,), 1.0))
    assert torch.equal(ckpt.store.get(3).arrays["personal/h"], torch.arange(8.0))
    assert len(said) == 1 and fragment in said[0] and "resuming from the previous checkpoint" in said[0]
    assert (two_rounds / CORRUPT_NAME).exists() and not latest.exists()


def test_changed_client_bytes_are_caught_too(two_rounds):
    flip_byte_in_tensor(two_rounds / CHECKPOINT_NAME, "client/3/personal/h")
    with pytest.raises(CheckpointError, match="fails its checksum \\(clients tensor bytes"):
        read_checkpoint(two_rounds / CHECKPOINT_NAME)
    assert read_checkpoint(two_rounds / CHECKPOINT_NAME, clients=False).round == 2  # init_from reads no clients


def test_a_kill_between_the_renames_resumes_from_the_previous_one_and_both_damaged_is_one_error(two_rounds):
    (two_rounds / CHECKPOINT_NAME).unlink()
    said: list[str] = []
    assert load_checkpoint(two_rounds, said.append).round == 1 and "killed while replacing it" in said[0]
    save_checkpoint(two_rounds, checkpoint(2))
    truncate(two_rounds / CHECKPOINT_NAME)
    truncate(two_rounds / PREVIOUS_NAME)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(two_rounds)
    msg = str(err.value)
    assert "\n" not in msg and str(two_rounds / CHECKPOINT_NAME) in msg and str(two_rounds / PREVIOUS_NAME) in msg


def test_config_mismatch_names_each_changed_key_and_shows_a_missing_one_as_unset():
    """A component parameter set on one side only (the parent left it at its default, a newer fedtrust added
    it) reads ``unset``, not ``None`` (which is also a value a key can hold). Rules out: nested keys missed,
    ignored keys reported, and an explicit None confused with a key that is absent."""
    saved = {"out": "a", "algorithm": {"name": "flip", "tau_inv": 0.9}, "init_from": None}
    now = {"out": "b", "algorithm": {"name": "flip", "tau_inv": 0.5, "keep_cache": False}, "init_from": None}
    assert config_mismatch(saved, now) == ["algorithm.keep_cache (checkpoint unset (the default), now False)",
                                           "algorithm.tau_inv (checkpoint 0.9, now 0.5)"]
    assert config_mismatch(saved, saved | {"init_from": "x"}, ignore=()) == ["init_from (checkpoint None, now 'x')"]
