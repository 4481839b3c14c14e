"""FLIP's key effect on bundled digits (spec flip.md §6), with the preset configs/flip-digits-continuous.yaml:
FedAvg pre-trained 20 rounds, then 16 rounds of continuous DBA (4 attackers of 10 each round, target 2).

Without defense the backdoor takes over (ASR >= 80 %); FLIP's benign clients harden against the triggers they
invert from their own model and, with tau-rejection at 0.4, bring the final ASR to 20 % or less at a clean
accuracy within 3 points of the undefended run without attack. Fixed seed, CPU: deterministic numbers. On a
lent GPU (``FEDTRUST_TEST_DEVICE=cuda``, benchmarks/device_flip.sh) the same runs go through CUDA end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedtrust
from fedtrust.runner.config import load_config

PRESET = Path(__file__).resolve().parents[2] / "configs" / "flip-digits-continuous.yaml"


def final(run) -> dict:
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "test_acc" in r][-1]


@pytest.mark.slow
def test_flip_removes_a_continuous_dba_backdoor_on_digits(tmp_path, one_thread, executor_device):
    pre = tmp_path / "pre"
    fedtrust.run(None, ["rounds=20", "eval.every=20", "eval.personalized=false", "checkpoint_every=0",
                        f"device={executor_device}", f"out={pre}"], progress=False, report=False)
    cfg = load_config(PRESET, [f"init_from={pre}"])
    assert cfg.attack.ids == [1, 5, 9, 13] and cfg.eval.reject_tau == 0.4

    def run(name: str, *overrides: str) -> dict:
        return final(fedtrust.run(PRESET, [f"init_from={pre}", "checkpoint_every=0", f"out={tmp_path / name}",
                                           f"device={executor_device}", *overrides], progress=False, report=False))

    clean = run("clean", "algorithm.invert=false", "attack.rounds=[]")  # attackers that never attack
    undefended = run("undefended", "algorithm.invert=false")
    flip = run("flip")
    assert undefended["asr"] >= 0.8, f"the attack must work without defense: ASR {undefended['asr']:.3f}"
    assert flip["asr_tau"] <= 0.2, f"FLIP (tau 0.4) final ASR {flip['asr_tau']:.3f}, undefended {undefended['asr']:.3f}"
    assert flip["acc_tau"] >= clean["test_acc"] - 0.03, \
        f"FLIP's clean accuracy with rejection {flip['acc_tau']:.3f} vs {clean['test_acc']:.3f} without attack"
    assert flip["flip"]["steps"] > 0 and flip["flip"]["flip_pairs"] > 0, "the benign clients did harden"
