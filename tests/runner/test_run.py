"""End-to-end runs on bundled digits: accuracy of the main job, run artefacts, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedtrust
from fedtrust.errors import CheckpointError, FedTrustError
from fedtrust.runner.rundir import read_metrics

pytestmark = pytest.mark.slow

TIMING = {"time_s", "wall_time_s", "run_dir"}


def strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def test_main_job_defaults_reach_090_and_write_every_artefact(tmp_path):
    result = fedtrust.run(None, [f"out={tmp_path / 'run'}"], progress=False)
    assert result.summary["test_acc"] >= 0.90
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "partition.json", "metrics.jsonl", "summary.json", "checkpoint.safetensors",
                 "report.html"):
        assert (run_dir / name).is_file(), name
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == list(range(1, result.config.rounds + 1))
    evals = [r for r in records if "test_acc" in r]
    assert evals[-1]["round"] == result.config.rounds
    assert all(0 <= r["test_acc"] <= 1 for r in evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_acc"] == pytest.approx(evals[-1]["test_acc"])
    part = json.loads((run_dir / "partition.json").read_text())
    assert sum(part["sizes"]) == 1437 and len(part["label_hist"]) == 20


def test_iid_fedavg_reaches_093(tmp_path):
    result = fedtrust.run(None, [f"out={tmp_path}", "data.partition=iid", "eval.every=100"],
                          progress=False, report=False)
    assert result.summary["test_acc"] >= 0.93


def test_same_seed_same_numbers_different_seed_different(tmp_path):
    args = ["rounds=4", "eval.every=2"]
    a = fedtrust.run(None, args + [f"out={tmp_path / 'a'}"], progress=False, report=False)
    b = fedtrust.run(None, args + [f"out={tmp_path / 'b'}"], progress=False, report=False)
    c = fedtrust.run(None, args + [f"out={tmp_path / 'c'}", "seed=1"], progress=False, report=False)
    ra, rb, rc = (list(map(strip_timing, read_metrics(tmp_path / n))) for n in "abc")
    assert ra == rb and ra != rc
    for k in a.state.arrays:
        assert torch.equal(a.state.arrays[k], b.state.arrays[k])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtrust.cli", "run", "--quiet", *args]


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    args = ["rounds=12", "eval.every=3", "data.num_clients=10", "data.clients_per_round=4"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli(*args, f"out={full}"), check=True, timeout=300)

    proc = subprocess.Popen(cli(*args, f"out={killed}"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(read_metrics(killed)) < 5:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(read_metrics(killed))
    assert 5 <= done < 12, f"the kill came too late to test anything ({done} rounds done)"
    with open(killed / "metrics.jsonl", "a") as fh:  # a line torn by the kill
        fh.write('{"round": 99, "test_a')

    subprocess.run([sys.executable, "-m", "fedtrust.cli", "run", "--quiet", "--resume", str(killed)],
                   check=True, timeout=300)
    assert [strip_timing(r) for r in read_metrics(killed)] == [strip_timing(r) for r in read_metrics(full)]
    s_full = json.loads((full / "summary.json").read_text())
    s_killed = json.loads((killed / "summary.json").read_text())
    assert strip_timing(s_full) == strip_timing(s_killed)
    w_full = load_file(str(full / "checkpoint.safetensors"))
    w_killed = load_file(str(killed / "checkpoint.safetensors"))
    for k in w_full:
        if k.startswith("server/"):
            assert torch.equal(w_full[k], w_killed[k]), k


def test_resume_refuses_a_different_config_and_a_used_out_dir(tmp_path):
    fedtrust.run(None, [f"out={tmp_path}", "rounds=2", "eval.every=2"], progress=False, report=False)
    with pytest.raises(CheckpointError, match="data.alpha"):
        fedtrust.run(None, ["rounds=2", "eval.every=2", "data.alpha=0.1"], resume=tmp_path, progress=False)
    with pytest.raises(FedTrustError, match="already holds a run"):
        fedtrust.run(None, [f"out={tmp_path}"], progress=False)


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path):
    for args in (["run", "data.alpha=-1"], ["run", "algorithm.name=nope"], ["run", "--resume", str(tmp_path)],
                 ["run", "data.dataset=mnist", f"data.root={tmp_path}"]):
        proc = subprocess.run([sys.executable, "-m", "fedtrust.cli", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_list_shows_every_registry():
    proc = subprocess.run([sys.executable, "-m", "fedtrust.cli", "list"], capture_output=True, text=True,
                          timeout=120, check=True)
    for name in ("fedavg", "fedprox", "digits", "dirichlet", "cnn", "resnet18", "ce", "sign_flip", "alie",
                 "krum", "flame", "accuracy", "calibration", "uniform"):
        assert name in proc.stdout


@pytest.mark.parametrize("kind, names", [("attack", ["label_flip", "min_sum"]), ("aggregator", ["median", "rlr"]),
                                         ("evaluator", ["accuracy", "ood"]), ("sampler", ["uniform"])])
def test_cli_list_shows_the_threat_and_evaluation_registries(kind, names):
    """Rules out a ``fedtrust list KIND`` that does not know the new kinds or lists them empty."""
    proc = subprocess.run([sys.executable, "-m", "fedtrust.cli", "list", kind], capture_output=True, text=True,
                          timeout=120, check=True)
    assert all(n in proc.stdout for n in names), proc.stdout


def test_cli_list_outliers_names_each_source_and_its_side(capsys):
    from fedtrust.cli import main

    assert main(["list", "outliers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "outliers:"
    lines = {line.split()[0]: line for line in out[1:]}
    assert "Animal-MNIST (for OOD tests)" in lines["animal_mnist"]
    assert "skimage photos (for training outliers)" in lines["photos"]


def test_cli_list_executor_explains_auto(capsys):
    from fedtrust.cli import main

    assert main(["list", "executor"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {"sequential", "vectorized", "flower", "auto"}
    assert "(the default)" in lines["auto"] and "sequential" in lines["auto"]
