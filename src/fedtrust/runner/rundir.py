"""The run directory: resolved config, partition statistics, metrics, summary (DESIGN principle 5).

``metrics.jsonl`` is appended and flushed as each round ends, so a killed run
keeps every finished round; ``summary.json``, ``config.yaml`` and
``eval_scores.npz`` (per-sample scores of the final evaluation, for the
report's OOD plots) are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from fedtrust.data.outliers import display_name
from fedtrust.errors import ConfigError, FedTrustError

if TYPE_CHECKING:
    from fedtrust.evaluation import EvalScores

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
PARTITION = "partition.json"
EVAL_SCORES = "eval_scores.npz"
EVAL_SCORES_VERSION = 1


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


def _unwritable(path: Path, e: OSError, advice: str = "choose a writable out=DIR") -> ConfigError:
    return ConfigError(f"config key 'out': cannot create or write the run directory {str(path)!r} "
                       f"({' '.join(str(e).split())}); {advice}")


def check_writable(out: str | Path | None, base: Path = Path("runs"),
                   advice: str = "choose a writable out=DIR") -> None:
    """Fail early, in one line, when no run directory can be made at ``out`` (None: under ``base``).

    It tries for real (``os.access`` says yes to root even for ``/proc``): it
    writes and deletes a probe file in ``out``, or, when ``out`` does not exist
    yet, in its nearest existing ancestor (where the run will create the
    missing folders). Nothing is created, so a run failing before it creates
    its directory (:func:`new_run_dir`) leaves nothing behind, and runs started
    in parallel under one new parent do not race on creating and removing it.
    """
    target = Path(out) if out is not None else base
    anchor = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    try:
        if not anchor.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(anchor))
        with tempfile.NamedTemporaryFile(dir=anchor, prefix=".fedtrust-probe-"):
            pass
    except OSError as e:
        reason = OSError(e.errno, e.strerror, str(target)) if e.errno is not None else e
        raise _unwritable(target, reason, advice) from e


def new_run_dir(out: str | None, label: str, base: Path = Path("runs")) -> Path:
    """The directory of a new run: ``out`` if given (must not hold a run), else a fresh one under ``runs/``.

    A directory that cannot be created is a one-line :class:`ConfigError`.
    """
    if out is not None:
        path = Path(out)
        if (path / METRICS).exists() or (path / "checkpoint.safetensors").exists():
            raise FedTrustError(f"run directory {str(path)!r} already holds a run; "
                                f"resume it with --resume {path} or choose another out=DIR")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(path, e) from e
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{stamp}-{label}"
    n = 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{label}-{n}"
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise _unwritable(path, e) from e
    return path


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_atomic(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(jsonable(data), indent=2) + "\n")


def write_eval_scores(run_dir: Path, eval_round: int, scores: EvalScores) -> Path:
    """Save the final evaluation's per-sample outputs as ``run_dir/eval_scores.npz``, atomically.

    A plain ``.npz`` (no pickled objects: ``np.load`` reads it with the
    default ``allow_pickle=False``) of the primary predictor's outputs:

    ============  ==========  =====================================================
    key           dtype       shape, meaning
    ============  ==========  =====================================================
    version       int64       (), format version (1)
    round         int64       (), the round evaluated
    predictor     str         (), the predictor's name
    labels        int64       (N,) ID test labels
    pred          int64       (N,) predicted class (argmax)
    confidence    float64     (N,) max softmax probability, as ``ece`` bins it
    scores        str         (S,) score names (``eval.scores``; empty without OOD sets)
    ood_sets      str         (K,) OOD set names as configured (``eval.ood``)
    ood_titles    str         (K,) their display names ("Textures-GIMP", ...)
    id/<score>    float32     (N,) the score on the ID test set
    ood/<k>/<s>   float32     (N_k,) score ``s`` on OOD set ``ood_sets[k]``
    ============  ==========  =====================================================

    Scores are ID-ness scores (higher = more in-distribution).
    """
    assert scores.labels is not None and scores.logits is not None, "evaluate() did not fill the scores"
    prob = torch.softmax(scores.logits.detach().double(), dim=1)  # as fedtrust.ood.metrics.calibration_from_logits
    confidence, pred = prob.max(dim=1)
    names = list(scores.id_scores)
    sets = list(scores.ood_scores)
    arrays: dict[str, np.ndarray] = {
        "version": np.asarray(EVAL_SCORES_VERSION, dtype=np.int64),
        "round": np.asarray(eval_round, dtype=np.int64),
        "predictor": np.asarray(scores.predictor, dtype=np.str_),
        "labels": scores.labels.detach().cpu().numpy().astype(np.int64),
        "pred": pred.cpu().numpy().astype(np.int64),
        "confidence": confidence.cpu().numpy(),
        "scores": np.asarray(names, dtype=np.str_).reshape(-1),
        "ood_sets": np.asarray(sets, dtype=np.str_).reshape(-1),
        "ood_titles": np.asarray([display_name(s) for s in sets], dtype=np.str_).reshape(-1),
    }
    for name, values in scores.id_scores.items():
        arrays[f"id/{name}"] = values.detach().float().cpu().numpy()
    for k, set_name in enumerate(sets):
        for name, values in scores.ood_scores[set_name].items():
            arrays[f"ood/{k}/{name}"] = values.detach().float().cpu().numpy()
    path = run_dir / EVAL_SCORES
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


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
    """Appends one JSON object per line, handed to the OS at once: a run that crashes or is
    killed keeps every record it wrote.

    ``fsync`` (which survives a power loss too) runs on the first record, then at most every
    ``sync_every_s`` seconds, and on :meth:`sync`: one per round cost fast simulations ~5 % of
    their time on this machine's disk. Checkpoints are fsynced on their own, and a resume
    truncates the metrics to the checkpoint's round anyway.
    """

    def __init__(self, run_dir: Path, sync_every_s: float = 2.0) -> None:
        self.path = run_dir / METRICS
        self.sync_every_s = sync_every_s
        self._synced_at = -math.inf

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(jsonable(record)) + "\n")
            fh.flush()
            now = time.monotonic()
            if now - self._synced_at >= self.sync_every_s:
                os.fsync(fh.fileno())
                self._synced_at = now

    def sync(self) -> None:
        """Force what was written to disk (the end of a run)."""
        if self.path.exists():
            with open(self.path, "a") as fh:
                os.fsync(fh.fileno())
            self._synced_at = time.monotonic()
