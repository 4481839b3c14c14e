"""metrics.jsonl: every record readable as soon as it is written; fsync throttled, forced at the end."""

import json
import os

import torch

from fedtrust.runner import rundir
from fedtrust.runner.rundir import MetricsWriter, read_metrics


def test_metrics_are_readable_at_once_and_fsync_is_throttled(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(rundir.os, "fsync", lambda fd: synced.append(fd))
    clock = iter([0.0, 0.5, 1.0, 2.5, 2.6, 2.7]).__next__
    monkeypatch.setattr(rundir.time, "monotonic", clock)
    writer = MetricsWriter(tmp_path, sync_every_s=2.0)
    for r in range(1, 6):
        writer.write({"round": r, "train_loss": 1.0 / r})
        assert [m["round"] for m in read_metrics(tmp_path)] == list(range(1, r + 1))  # visible before any fsync
    # record 1 at t=0 syncs; 0.5 and 1.0 are within 2 s of it; 2.5 syncs again; 2.6 does not
    assert len(synced) == 2
    writer.sync()
    assert len(synced) == 3


def strict_json(line: str):
    """Standard JSON only: Python's json accepts NaN/Infinity, which other readers (jq, JS, pandas' ujson) reject."""
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_real_fsync_path_writes_standard_json_with_null_for_nan_and_inf(tmp_path):
    """Rules out writing ``NaN``/``Infinity`` (invalid JSON) for a non-finite metric, in a top-level
    value, a nested dict, a list or a 0-d tensor: each becomes ``null``, finite values stay as they are."""
    writer = MetricsWriter(tmp_path)
    writer.write({"round": 1, "x": float("nan"), "y": float("inf"), "nested": {"a": float("-inf"), "b": 0.5},
                  "list": [1.0, float("nan")], "t": torch.tensor(float("nan")), "ok": torch.tensor(0.25)})
    writer.sync()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and os.path.getsize(tmp_path / "metrics.jsonl") > 0
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    record = strict_json(lines[0])
    assert record == {"round": 1, "x": None, "y": None, "nested": {"a": None, "b": 0.5}, "list": [1.0, None],
                      "t": None, "ok": 0.25}
    assert read_metrics(tmp_path) == [record]
