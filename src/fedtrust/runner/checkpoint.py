"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON metadata in its header.

One file ``checkpoint.safetensors`` holds the server state (``server/…``),
every client's persistent state (``client/<id>/…``) and the torch RNG state,
plus JSON metadata: the round, the resolved config (to refuse a checkpoint of
another config) and the messages' ``meta``. It is written to a temporary file,
flushed to disk, then renamed over the old one, so a kill at any instant
leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from fedtrust.errors import CheckpointError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import Message

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    round: int
    state: Message
    store: ClientStore
    config: dict[str, Any]
    extra: dict[str, Any]


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``run_dir/checkpoint.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in ckpt.state.arrays.items():
        tensors[f"server/{k}"] = v
    client_meta = {}
    for cid, msg in ckpt.store.states.items():
        for k, v in msg.arrays.items():
            tensors[f"client/{cid}/{k}"] = v
        client_meta[str(cid)] = msg.meta
    tensors["rng/torch"] = torch.get_rng_state()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {
        "version": FORMAT_VERSION,
        "round": ckpt.round,
        "config": ckpt.config,
        "server_meta": ckpt.state.meta,
        "client_meta": client_meta,
        "client_ids": sorted(ckpt.store.states),
        "extra": ckpt.extra,
    }
    path = run_dir / CHECKPOINT_NAME
    tmp = run_dir / (CHECKPOINT_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"fedtrust": json.dumps(meta)})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(run_dir)
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the checkpoint of ``run_dir``; a missing or corrupt file is a one-line CheckpointError."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; the run has not finished a round yet, start it anew")
    return read_checkpoint(path)


def read_checkpoint(path: Path, *, clients: bool = True, rng: bool = True) -> Checkpoint:
    """Read the checkpoint file ``path``; an unreadable file is a one-line CheckpointError.

    ``clients=False`` skips the client store (left empty) and ``rng=False`` leaves the torch RNG
    alone: what ``init_from`` needs, the server state of another run without its side effects.
    """
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["fedtrust"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if clients or not k.startswith("client/")}
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); expected a fedtrust safetensors checkpoint") from None
    server = {k[len("server/"):]: v for k, v in tensors.items() if k.startswith("server/")}
    states: dict[int, Message] = {}
    for cid in meta["client_ids"] if clients else ():
        p = f"client/{cid}/"
        arrays = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
        states[int(cid)] = Message(arrays, meta["client_meta"].get(str(cid), {}))
    if rng and "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    return Checkpoint(meta["round"], Message(server, meta["server_meta"]), ClientStore(states),
                      meta["config"], meta.get("extra", {}))


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ("out",)) -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                key = f"{prefix}{k}"
                if key in ignore:
                    continue
                walk(a.get(k), b.get(k), key + ".")
        elif a != b:
            diffs.append(f"{prefix.rstrip('.')} (checkpoint {a!r}, now {b!r})")

    walk(saved, current, "")
    return diffs


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
