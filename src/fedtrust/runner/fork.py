"""``fedtrust fork``: branch a run from its last checkpoint with some config keys changed.

A study often asks "what if, from round r on, the defense did X?": a τ_inv lowered once a backdoor starts to
creep in, a learning rate decayed late, an attack switched off. Rerunning from round 0 repeats r rounds that are
already on disk; a fork copies them instead. :func:`fork_run` writes a new run directory that holds the parent's
last sound checkpoint (server state, every client's persistent state, the torch RNG state), its metrics up to
that round and its ``partition.json`` (and, for a Flower simulation, its ``nodes/`` client states), under the
parent's config with ``overrides`` applied; ``fedtrust run --resume NEW_DIR`` then continues from there. A fork
without overrides continues exactly as the parent would have (same numbers on CPU).

A fork may change any key except those that fix what the checkpoint holds or how it was made: ``seed``, the
data set and its partition (``data.*`` but ``data.root``), the model (``model.*``), ``algorithm.name``,
``init_from`` and ``executor``. Changing one is a one-line error naming it; so are an unknown key or a bad
value (the config's own validation), ``rounds`` not beyond the checkpoint's round, and an ``out`` that already
holds a run. The parent is only read. ``fork.json`` in the new directory records where it came from: the
parent directory, the round, the checkpoint file's SHA-256 and the keys changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedtrust.errors import CheckpointError, ConfigError
from fedtrust.runner import rundir
from fedtrust.runner.checkpoint import (CHECKPOINT_NAME, PREVIOUS_NAME, RELOCATABLE, config_mismatch,
                                        read_verified, sha256_file, write_verified)
from fedtrust.runner.config import build_config, config_to_dict

FORK_INFO = "fork.json"
FROZEN = ("seed", "data", "model", "algorithm.name", "init_from", "executor")
"""Config keys (and key prefixes) a fork may not change: they fix the checkpoint's contents (RELOCATABLE keys
such as ``data.root`` excepted)."""
NODES = "nodes"
"""A Flower simulation's per-client state folder inside the run directory (copied with the fork)."""


def fork_run(run_dir: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Write a new run directory ``out`` that continues ``run_dir`` from its last sound checkpoint under its
    config with ``overrides`` (``key=value``) applied; returns ``out`` (module docstring)."""
    src, dst = Path(run_dir), Path(out)
    if not (src / rundir.CONFIG).is_file():
        raise CheckpointError(f"{str(src)!r} is not a run directory (no {rundir.CONFIG})")
    path, tensors, meta = _last_sound_checkpoint(src)
    saved: dict[str, Any] = meta["config"]
    for item in overrides or []:
        if item.split("=", 1)[0].strip() == "out":
            raise ConfigError("config key 'out' cannot be overridden in a fork: the new run directory is OUT")
    cfg = build_config(saved, [*(overrides or []), f"out={dst}"])
    forked = config_to_dict(cfg)
    changed = config_mismatch(saved, forked, ignore=("out",))
    frozen = [d for d in changed if _is_frozen(d.split(" ", 1)[0])]
    if frozen:
        raise ConfigError(f"a fork cannot change {'; '.join(frozen)}: these keys fix what the checkpoint holds "
                          f"(frozen: {', '.join(FROZEN)}); start a new run instead")
    if cfg.rounds <= int(meta["round"]):
        raise ConfigError(f"config key 'rounds' is {cfg.rounds} but {str(src)!r} is checkpointed at round "
                          f"{meta['round']}: a fork needs rounds > {meta['round']} to have rounds to run")
    rundir.check_writable(dst, advice="choose a writable OUT")
    dst = rundir.new_run_dir(str(dst), "fork")
    kept = [r for r in rundir.read_metrics(src) if r.get("round", 0) <= int(meta["round"])]
    rundir.write_atomic(dst / rundir.METRICS, "".join(_json_line(r) for r in kept))
    if (src / rundir.PARTITION).is_file():
        shutil.copy2(src / rundir.PARTITION, dst / rundir.PARTITION)
    if (src / NODES).is_dir():
        shutil.copytree(src / NODES, dst / NODES)
    forked["out"] = str(dst)
    rundir.write_config(dst, forked)
    write_verified(dst / CHECKPOINT_NAME, tensors, {**{k: v for k, v in meta.items() if k != "sha256"},
                                                    "config": forked})
    rundir.write_json(dst / FORK_INFO, {"parent": str(src), "round": int(meta["round"]),
                                        "checkpoint": path.name, "checkpoint_sha256": sha256_file(path),
                                        "changed": changed})
    return dst


def _is_frozen(key: str) -> bool:
    if key in RELOCATABLE:
        return False
    return any(key == f or key.startswith(f + ".") for f in FROZEN)


def _last_sound_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``(file, tensors, meta)`` of the run's checkpoint, else of the previous one when the latest is
    missing or unsound (as ``--resume`` picks it, but the parent's files are left as they are)."""
    errors = []
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            tensors, meta = read_verified(path)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        return path, tensors, meta
    if errors:
        raise CheckpointError("; ".join(errors))
    raise CheckpointError(f"no checkpoint in {str(run_dir)!r}: the run has not finished a round yet, "
                          "nothing to fork")


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"
