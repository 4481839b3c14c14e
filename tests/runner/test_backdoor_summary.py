"""A backdoor run's summary: ASR before the attack (measured on the start model, recorded in config.yaml),
peak ASR and lifespan (rounds after the last attack until the ASR is back below twice its pre-attack level)."""

from __future__ import annotations

import pytest
import yaml

import fedtrust
from fedtrust.robust.attacks import Targets
from fedtrust.runner.rundir import read_metrics
from fedtrust.runner.run import backdoor_summary


def test_last_attack_round_of_every_schedule_kind():
    """Rules out the last round of the run (instead of the last attack) and attack rounds past the run."""
    assert Targets(frozenset({1, 2})).last_round(10) == 10
    assert Targets(frozenset({1}), first=3, last=5).last_round(10) == 5
    assert Targets(frozenset({1}), first=3, last=50).last_round(10) == 10
    assert Targets(frozenset({1}), first=12).last_round(10) is None
    assert Targets(frozenset({1}), rounds=frozenset({2, 7, 30})).last_round(10) == 7
    assert Targets(frozenset({1, 5}), schedule={2: frozenset({1}), 6: frozenset({5}), 40: frozenset({1})}
                   ).last_round(10) == 6
    assert Targets(frozenset()).last_round(10) is None


def test_backdoor_summary_on_hand_written_records():
    """Baseline 0.05 → threshold 0.1: last attack at round 4, ASR 0.9 (4), 0.3 (6), 0.08 (8): lifespan 4."""
    records = [{"round": 2, "asr": 0.2, "asr_tau": 0.1}, {"round": 4, "asr": 0.9, "asr_tau": 0.7},
               {"round": 6, "asr": 0.3}, {"round": 8, "asr": 0.08}, {"round": 9}]
    out = backdoor_summary(records, 0.05, 4)
    assert out == {"asr_peak": 0.9, "asr_tau_peak": 0.7, "asr_baseline": 0.05, "last_attack_round": 4,
                   "lifespan": 4}
    assert backdoor_summary(records, 0.01, 4)["lifespan"] is None, "never below 0.02: outlives the run"
    assert backdoor_summary(records, 0.05, None)["lifespan"] is None


@pytest.mark.usefixtures("one_thread")
def test_single_shot_run_records_baseline_peak_and_lifespan(tmp_path):
    """A scaled single-shot DBA in round 2 of a FedAvg digits run: the summary's lifespan is recomputed here
    from metrics.jsonl and the recorded baseline; the baseline is in config.yaml and a run given it keeps it."""
    args = ["rounds=6", "eval.every=1", "eval.personalized=false", "checkpoint_every=0", "data.num_clients=10",
            "data.clients_per_round=5", "attack.name=backdoor", "attack.schedule={2: [3]}", "attack.scale=5",
            "attack.epochs=3"]
    run = fedtrust.run(None, [*args, f"out={tmp_path / 'a'}"], progress=False, report=False)
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    baseline = config["eval"]["asr_baseline"]
    assert baseline is not None and 0.0 <= baseline <= 1.0
    asr = {r["round"]: r["asr"] for r in read_metrics(run.run_dir) if "asr" in r}
    assert sorted(asr) == [1, 2, 3, 4, 5, 6]
    s = run.summary
    assert s["asr_baseline"] == baseline and s["last_attack_round"] == 2 and s["asr_peak"] == max(asr.values())
    after = [r for r in sorted(asr) if r >= 2 and asr[r] < 2 * baseline]
    assert s["lifespan"] == (after[0] - 2 if after else None)
    given = fedtrust.run(None, [*args, "eval.asr_baseline=0.5", f"out={tmp_path / 'b'}"], progress=False,
                         report=False)
    assert given.summary["asr_baseline"] == 0.5
