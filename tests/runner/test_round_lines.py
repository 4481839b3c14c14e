"""``round_lines``: one plain line per round (what a Flower deployment streams to ``flwr run --stream``).

Checked on a real digits run with injected crashes, against the run's own ``metrics.jsonl``: one line per
round in order, the replied / failed counts and the failed clients' ids and reasons, the test accuracy on
evaluation rounds only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fedtrust
from fedtrust.runner.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_line_per_round_matches_the_metrics(tmp_path: Path) -> None:
    lines: list[str] = []
    result = fedtrust.run(None, ["rounds=4", "data.num_clients=6", "data.clients_per_round=4", "train.steps=2",
                                 "eval.every=2", "eval.personalized=false", "faults.crash=0.4",
                                 f"out={tmp_path / 'run'}"],
                          progress=False, report=False, round_lines=lines.append)
    records = read_metrics(result.run_dir)
    assert len(lines) == 4 and len(records) == 4
    assert any(r.get("failed") for r in records), "the seed must crash some client for this test to bite"
    for line, record in zip(lines, records):
        assert line.startswith(f"round {record['round']}/4: ")
        failed = record.get("failed") or {}
        assert f"{4 - len(failed)} of 4 clients replied" in line
        for client, reason in failed.items():
            assert f"{client}: {reason}" in line
        if not failed:
            assert "failed:" not in line
        if "test_acc" in record:
            assert f"test_acc {record['test_acc']:.4f}" in line
        else:
            assert "test_acc" not in line
        assert re.search(r"\d+\.\d s \(\d+\.\d s in all\)$", line)
    assert [r["round"] for r in records if "test_acc" in r] == [2, 4]
