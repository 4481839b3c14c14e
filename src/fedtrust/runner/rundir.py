"""The run directory: resolved config, partition statistics, metrics, summary (DESIGN principle 5).

``metrics.jsonl`` is appended and flushed as each round ends, so a killed run
keeps every finished round; ``summary.json`` and ``config.yaml`` are written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from fedtrust.errors import FedTrustError

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
PARTITION = "partition.json"


def jsonable(x: Any) -> Any:
    """Plain JSON data with NaN/inf written as null."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        return jsonable(x.item())
    return x


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def new_run_dir(out: str | None, label: str, base: Path = Path("runs")) -> Path:
    """The directory of a new run: ``out`` if given (must not hold a run), else a fresh one under ``runs/``."""
    if out is not None:
        path = Path(out)
        if (path / METRICS).exists() or (path / "checkpoint.safetensors").exists():
            raise FedTrustError(f"run directory {str(path)!r} already holds a run; "
                                f"resume it with --resume {path} or choose another out=DIR")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{stamp}-{label}"
    n = 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{label}-{n}"
    path.mkdir(parents=True)
    return path


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_atomic(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(jsonable(data), indent=2) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of ``metrics.jsonl`` (a torn last line is skipped)."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep the records of rounds ≤ ``last_round`` (those the checkpoint covers), drop the rest."""
    kept = [r for r in read_metrics(run_dir) if r.get("round", 0) <= last_round]
    write_atomic(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class MetricsWriter:
    """Appends one JSON object per line and flushes it to disk at once."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / METRICS

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(jsonable(record)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
