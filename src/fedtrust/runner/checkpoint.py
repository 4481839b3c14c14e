"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON metadata in its header.

One file ``checkpoint.safetensors`` holds the server state (``server/…``),
every client's persistent state (``client/<id>/…``) and the torch RNG state,
plus JSON metadata: the round, the resolved config (to refuse a checkpoint of
another config), the messages' ``meta`` and a SHA-256 of each part's tensor
bytes (server, clients, RNG). It is written to a temporary file, flushed to
disk, then renamed into place; the checkpoint it replaces is kept as
``checkpoint.prev.safetensors``, so the last two rounds checkpointed are on disk.

Reading verifies the file: a bad header, a truncated file or tensor bytes that
fail their checksum are a one-line :class:`CheckpointError` naming the file.
:func:`load_checkpoint` (``--resume``) then falls back to the previous
checkpoint when that one is sound, says so, and sets the unsound file aside as
``checkpoint.corrupt.safetensors``; a kill between the two renames (no current
file, a sound previous one) resumes from the previous one as well.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from fedtrust.errors import CheckpointError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import Message

CHECKPOINT_NAME = "checkpoint.safetensors"
PREVIOUS_NAME = "checkpoint.prev.safetensors"
CORRUPT_NAME = "checkpoint.corrupt.safetensors"
FORMAT_VERSION = 2
"""2: per-part SHA-256 digests in the metadata (version-1 files, without them, still load)."""
_PARTS = {"server": "server/", "clients": "client/", "rng": "rng/"}


def _part(key: str) -> str:
    return next(name for name, prefix in _PARTS.items() if key.startswith(prefix))


def _digests(tensors: dict[str, torch.Tensor], parts: tuple[str, ...] = tuple(_PARTS)) -> dict[str, str]:
    """SHA-256 per part over its tensors' names, dtypes, shapes and bytes, in name order."""
    hashes = {name: hashlib.sha256() for name in parts}
    for key in sorted(tensors):
        part = _part(key)
        if part not in hashes:
            continue
        t = tensors[key].detach().cpu().contiguous()
        h = hashes[part]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {name: h.hexdigest() for name, h in hashes.items()}


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
    write_verified(path, tensors, meta, previous=run_dir / PREVIOUS_NAME)
    return path


def write_verified(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                   previous: Path | None = None) -> None:
    """Write ``tensors`` (names under ``server/``, ``client/`` or ``rng/``) and JSON ``meta`` plus their
    per-part SHA-256 to ``path`` atomically (temporary file, fsync, rename); the file it replaces is
    moved to ``previous`` when given."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # no shared storage
    meta = {**meta, "sha256": _digests(tensors, tuple(sorted({_part(k) for k in tensors})))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"fedtrust": json.dumps(meta)})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_verified(path: Path, clients: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a file :func:`write_verified` wrote (``clients=False``: without the
    ``client/`` tensors); unreadable or failing its checksum: a one-line CheckpointError naming it."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["fedtrust"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if clients or not k.startswith("client/")}
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); expected a fedtrust "
                              "safetensors checkpoint") from None
    stored = meta.get("sha256")
    if stored is not None:
        parts = tuple(p for p in stored if clients or p != "clients")
        bad = [p for p, d in _digests(tensors, parts).items() if stored.get(p) != d]
        if bad:
            raise CheckpointError(f"checkpoint {str(path)!r} fails its checksum ({', '.join(bad)} tensor bytes "
                                  f"changed since it was written)")
    return tensors, meta


def load_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None) -> Checkpoint:
    """Read the checkpoint of ``run_dir``, falling back to the previous one when the latest is missing or
    unsound (``warn`` says so); nothing sound is a one-line CheckpointError naming the files."""
    path, previous = run_dir / CHECKPOINT_NAME, run_dir / PREVIOUS_NAME
    if not path.is_file() and not previous.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; the run has not finished a round yet, start it anew")
    try:
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {str(path)!r} (killed while replacing it?)")
        return read_checkpoint(path)
    except CheckpointError as latest:
        if not previous.is_file():
            raise
        try:
            ckpt = read_checkpoint(previous)
        except CheckpointError as older:
            raise CheckpointError(f"{latest}; the previous one is unsound too: {older}") from None
        if path.is_file():
            os.replace(path, run_dir / CORRUPT_NAME)
        (warn or (lambda message: None))(f"{latest}; resuming from the previous checkpoint {str(previous)!r} "
                                         f"(round {ckpt.round})" + (f", the unsound file kept as {CORRUPT_NAME}"
                                                                    if (run_dir / CORRUPT_NAME).exists() else ""))
        return ckpt


def read_checkpoint(path: Path, *, clients: bool = True, rng: bool = True) -> Checkpoint:
    """Read the checkpoint file ``path``; an unreadable file is a one-line CheckpointError.

    ``clients=False`` skips the client store (left empty) and ``rng=False`` leaves the torch RNG
    alone: what ``init_from`` needs, the server state of another run without its side effects.
    """
    tensors, meta = read_verified(path, clients)
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


RELOCATABLE = ("out", "device", "data.root")
"""Config keys that say where a run runs, not what it computes: a resume may change them, so a run moves between
machines (a CPU run continued on a GPU, a data set kept elsewhere). The algorithm, data and seed are the same;
on another device the floats may differ in their last bits from an uninterrupted run."""


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ("out",)) -> list[str]:
    """Dotted keys whose values differ between two resolved configs.

    A key one side lacks (a component's parameter left at its default there) shows as ``unset``."""
    diffs: list[str] = []
    unset = object()

    def show(v: Any) -> str:
        return "unset (the default)" if v is unset else repr(v)

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                key = f"{prefix}{k}"
                if key in ignore:
                    continue
                walk(a.get(k, unset), b.get(k, unset), key + ".")
        elif a != b:
            diffs.append(f"{prefix.rstrip('.')} (checkpoint {show(a)}, now {show(b)})")

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
