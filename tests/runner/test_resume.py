"""SIGKILL a `fedtrust run` mid-run, `--resume` it, and demand the uninterrupted run's numbers exactly.

Beyond stateless FedAvg (tests/runner/test_run.py): personal client state kept in the executor's client
store (FedLoGe's local heads L_k, Ditto's personal models v_k), training outliers and augmentation (RNA
inside FedAvg), and a kill that lands between two checkpoints. "The same" means: every metrics.jsonl
record and summary.json minus timing fields, and every tensor of the final checkpoint (server state,
each client's state, RNG state) plus its metadata (round, client ids, messages' meta, config but `out`).

The killed run and its resume are fresh `python -m fedtrust.cli` processes, so a resume can lean on
nothing left in memory; the uninterrupted reference runs in this process (no report: 3 s saved). The
children import the same `fedtrust` source as this test (PYTHONPATH), so breaking `src/` on purpose
reaches them, and every run uses one torch thread: on 2 shared cores, torch's intra-op threads make a
0.1 s round take seconds (and the kill would miss its window).
"""

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
from safetensors import safe_open
from safetensors.torch import load_file

import fedtrust
from fedtrust.fl.sampling import sample_clients
from fedtrust.runner.rundir import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TIMING = {"time_s", "wall_time_s", "run_dir"}
# Small digits federations: 4 clients, 2 a round, a few local steps; every run is a few seconds.
CLIENTS, PER_ROUND = 4, 2
SMALL = [f"data.num_clients={CLIENTS}", f"data.clients_per_round={PER_ROUND}", "train.steps=5", "eval.every=2"]


def _env() -> dict[str, str]:
    src = str(Path(fedtrust.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtrust.cli", "run", "--quiet", *args]


def run_through(out: Path, args: list[str], rounds: int) -> None:
    """An uninterrupted run of ``rounds`` rounds into ``out``, in this process (on one thread, as the
    children: see ``one_thread``)."""
    fedtrust.run(None, [*args, f"rounds={rounds}", f"out={out}"], progress=False, report=False)


def run_and_kill(out: Path, args: list[str], rounds: int, after: int, between_every: int = 0) -> int:
    """Start a run, SIGKILL it once round ``after`` is in metrics.jsonl (with ``between_every`` > 0: once
    the last written round is also not a multiple of it, i.e. past the last checkpoint), and return the
    number of rounds written. Fails if the kill came after the last round."""

    def ready(done: int) -> bool:
        return done >= after and (between_every == 0 or done % between_every != 0)

    proc = subprocess.Popen(_cli(*args, f"rounds={rounds}", f"out={out}"), env=_env())
    deadline = time.monotonic() + 240
    try:
        while not ready(len(read_metrics(out))) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        status = proc.wait(timeout=30)
    done = len(read_metrics(out))
    assert status == -signal.SIGKILL, f"the run ended on its own (exit status {status}, {done} rounds done)"
    assert after <= done < rounds and not (out / "summary.json").exists(), \
        f"the kill came too late to test anything ({done} of {rounds} rounds done)"
    return done


def resume(out: Path) -> None:
    subprocess.run([sys.executable, "-m", "fedtrust.cli", "run", "--quiet", "--resume", str(out)],
                   check=True, timeout=300, env=_env())


def strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def checkpoint_meta(run_dir: Path) -> dict:
    with safe_open(str(run_dir / "checkpoint.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["fedtrust"])
    meta["config"].pop("out")
    return meta


def assert_same_run(resumed: Path, full: Path) -> None:
    """Metrics, summary and every tensor and metadata field of the final checkpoint are equal."""
    got, want = read_metrics(resumed), read_metrics(full)
    assert [r["round"] for r in got] == [r["round"] for r in want], "rounds in metrics.jsonl differ"
    for g, w in zip(got, want):
        assert strip_timing(g) == strip_timing(w), f"metrics of round {w['round']} differ"
    assert (strip_timing(json.loads((resumed / "summary.json").read_text()))
            == strip_timing(json.loads((full / "summary.json").read_text())))
    assert checkpoint_meta(resumed) == checkpoint_meta(full)
    w_got = load_file(str(resumed / "checkpoint.safetensors"))
    w_want = load_file(str(full / "checkpoint.safetensors"))
    assert w_got.keys() == w_want.keys()
    for k in w_want:
        assert torch.equal(w_got[k], w_want[k]), k


@pytest.mark.parametrize("algorithm, kept", [
    (["algorithm.name=fedloge", "algorithm.refine_steps=50"], "/head_l/"),
    (["algorithm.name=ditto"], "/personal/"),
    (["algorithm.name=flip", "algorithm.warmup_steps=20", "algorithm.pair_steps=10", "algorithm.refine_steps=5",
      "algorithm.tau_inv=0.3", "attack.name=backdoor", "attack.ids=[3]"], "/flip/"),
], ids=["fedloge", "ditto", "flip"])
def test_kill_and_resume_keeps_client_state(tmp_path, algorithm, kept):
    """FedLoGe's local heads L_k, Ditto's personal models v_k and FLIP's inversion state (pair matrices,
    per-pair trigger cache; a DBA attacker beside it) live in the client store, not the server state. Rules out a checkpoint that drops (or a resume that does not restore) the client
    store: the clients sampled after the resume would restart their heads/models from the initial
    one, so their final client states and the personalised metrics would differ."""
    rounds, args = 6, SMALL + algorithm
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_through(full, args, rounds)
    done = run_and_kill(killed, args, rounds, after=2)
    ckpt_round = checkpoint_meta(killed)["round"]
    sampled = {r: set(sample_clients(CLIENTS, PER_ROUND, 0, r)) for r in range(1, rounds + 1)}  # seed 0
    before = set().union(*(sampled[r] for r in range(1, ckpt_round + 1)))
    after = set().union(*(sampled[r] for r in range(ckpt_round + 1, rounds + 1)))
    assert before & after, "no client with state before the kill trains after it: nothing to test"
    assert any(kept in k for k in load_file(str(killed / "checkpoint.safetensors"))), \
        f"the checkpoint at round {ckpt_round} ({done} done) holds no client state {kept!r}"

    resume(killed)
    assert_same_run(killed, full)


def test_kill_and_resume_with_outliers_and_augmentation(tmp_path):
    """RNA inside FedAvg: each round the server deals the sampled clients disjoint shares of the
    training-outlier pool, and every ID and outlier batch is randomly cropped and flipped. Rules out a
    resume that re-seeds outlier dealing or augmentation from round 1 (an RNG kept in memory and
    advanced round by round, not derived from (seed, round, client) nor checkpointed): the rounds after
    the resume would see other outliers and other crops."""
    rounds, args = 6, SMALL + ["objective.name=rna", "data.outliers=photos", "data.num_outliers=200",
                               "data.augment=crop_flip"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_through(full, args, rounds)
    run_and_kill(killed, args, rounds, after=2)
    resume(killed)
    assert_same_run(killed, full)


def test_kill_between_checkpoints_reruns_the_uncheckpointed_rounds(tmp_path):
    """checkpoint_every=3 and a kill after round 4 or 5 (7 at worst): metrics.jsonl holds rounds the
    checkpoint (round 3, or 6) does not cover, and a torn last line. Rules out a resume that restarts
    from the last checkpoint but keeps the metrics of the rounds after it (duplicated rounds), one that
    drops them but continues after the last written round with the checkpoint's weights (other
    weights), and one that keeps the torn line as it is (the next record glued to it is lost)."""
    rounds, args = 8, SMALL + ["algorithm.name=ditto", "checkpoint_every=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_through(full, args, rounds)
    done = run_and_kill(killed, args, rounds, after=4, between_every=3)
    ckpt_round = checkpoint_meta(killed)["round"]
    assert ckpt_round % 3 == 0 and ckpt_round < done, \
        f"the kill did not land between checkpoints (checkpoint {ckpt_round}, {done} rounds written)"
    with open(killed / "metrics.jsonl", "a") as fh:  # a line torn by the kill
        fh.write('{"round": 99, "test_a')

    resume(killed)
    rounds_written = [r["round"] for r in read_metrics(killed)]
    assert rounds_written == list(range(1, rounds + 1)), f"rounds in metrics.jsonl: {rounds_written}"
    assert_same_run(killed, full)


def test_kill_and_resume_keeps_the_optimizer_state(tmp_path):
    """Centralised training with ``train.keep_optimizer``: one Adam across epochs, its moments and step
    in the client store. Rules out a checkpoint that drops the optimizer state (or a resume that restarts
    Adam): the epochs after the resume would take bias-corrected first steps again, other weights."""
    rounds, args = 6, ["data.num_clients=1", "data.clients_per_round=1", "data.partition=iid", "train.steps=5",
                       "eval.every=2", "train.optimizer=adam", "train.lr=0.003", "train.keep_optimizer=true"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_through(full, args, rounds)
    run_and_kill(killed, args, rounds, after=2)
    assert "client/0/optim/step" in load_file(str(killed / "checkpoint.safetensors")), \
        "the checkpoint holds no kept optimizer state"
    resume(killed)
    assert_same_run(killed, full)
