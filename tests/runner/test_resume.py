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
import shutil
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
from fedtrust.errors import CheckpointError
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
      "algorithm.tau_inv=0.3", "algorithm.max_mask_frac=0.5", "attack.name=backdoor", "attack.ids=[3]"], "/flip/"),
], ids=["fedloge", "ditto", "flip"])  # FLIP: max_mask_frac 0.5 as the digits presets (at 1/8 of 8×8 every 20-step
#                                        mask is skipped: the hardening clients would never train, FLIP warns)
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


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_damaged(tmp_path):
    """A killed run's latest checkpoint is truncated (a disk fault): --resume says so, goes back to the
    previous checkpoint (one round earlier), re-runs from there and ends exactly as the uninterrupted run.
    Rules out a resume that trusts the damaged file, one that gives up although a sound one is kept, and
    metrics that keep the rounds the previous checkpoint does not cover."""
    rounds, args = 6, SMALL + ["eval.personalized=false"]
    full = tmp_path / "full"
    run_through(full, args, rounds)
    for attempt in range(3):  # a kill between the checkpoint's two renames leaves no latest file to damage
        killed = tmp_path / f"killed{attempt}"
        run_and_kill(killed, args, rounds, after=3)
        if (killed / "checkpoint.safetensors").is_file():
            break
    latest = killed / "checkpoint.safetensors"
    previous_round = checkpoint_meta(killed)["round"] - 1
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    out = subprocess.run([sys.executable, "-m", "fedtrust.cli", "run", "--resume", str(killed)],
                         check=True, timeout=300, env=_env(), capture_output=True, text=True).stdout
    assert "is unreadable" in out and "resuming from the previous checkpoint" in out
    assert f"resuming {killed} after round {previous_round}" in " ".join(out.split())
    assert (killed / "checkpoint.corrupt.safetensors").exists()
    assert_same_run(killed, full)


def _kill_when(proc: subprocess.Popen, out: Path, point: str, delay: float, deadline: float) -> str:
    """SIGKILL ``proc`` at ``point``: ``checkpoint`` the moment a checkpoint's temporary file exists (a
    checkpoint write under way), ``metrics`` the moment a new metrics record appears (right after a
    metrics write, before the round's checkpoint), ``anytime`` ``delay`` seconds after the run's first
    record (in training or evaluation). Returns where the kill landed (the point, or ``late`` when the
    run was past it)."""
    tmp = out / "checkpoint.safetensors.tmp"
    metrics = out / "metrics.jsonl"
    size0 = metrics.stat().st_size if metrics.exists() else 0
    started = None
    landed = point
    while proc.poll() is None and time.monotonic() < deadline:
        if point == "checkpoint" and tmp.exists():
            break
        size = metrics.stat().st_size if metrics.exists() else 0
        if point == "metrics" and size > size0:
            break
        if point == "anytime" and size > 0:
            started = started or time.monotonic()
            if time.monotonic() - started >= delay:
                break
        time.sleep(0.0005)
    else:
        landed = "late"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return landed


@pytest.mark.slow
def test_kill_anywhere_many_times_then_resume_equals_the_uninterrupted_run(tmp_path):
    """The kill-anywhere harness: one run SIGKILLed 10 times at points drawn from a seeded RNG (during a
    checkpoint write, right after a metrics write, at a random moment in training or evaluation), resumed
    after each kill, then run to the end: its metrics, summary and every tensor of its final checkpoint
    equal an uninterrupted run's. Ditto with the last two checkpoints kept and a client store to carry.
    Rules out a kill point that loses or duplicates a round, tears a checkpoint, or leaves a state that
    a resume cannot read."""
    import random

    rounds, args = 12, SMALL + ["algorithm.name=ditto", "eval.every=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_through(full, args, rounds)
    rng = random.Random(7)
    landed: list[str] = []
    for i in range(10):
        if (killed / "summary.json").exists():
            break
        checkpoints = [killed / "checkpoint.safetensors", killed / "checkpoint.prev.safetensors"]
        if killed.exists() and not any(p.exists() for p in checkpoints):  # killed before its first checkpoint
            shutil.rmtree(killed)
        cmd = (_cli(*args, f"rounds={rounds}", f"out={killed}") if not killed.exists()
               else [sys.executable, "-m", "fedtrust.cli", "run", "--quiet", "--resume", str(killed)])
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        point = rng.choice(["checkpoint", "metrics", "anytime"])
        landed.append(_kill_when(proc, killed, point, rng.uniform(0.0, 1.5), time.monotonic() + 120))
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr.read().decode()[-2000:]
    assert sum(p != "late" for p in landed) >= 8, f"too few kills landed where drawn: {landed}"
    assert {"checkpoint", "metrics", "anytime"} <= set(landed), landed
    while not (killed / "summary.json").exists():
        resume(killed)
    assert_same_run(killed, full)


def test_a_run_moves_to_another_folder_data_root_and_device_on_resume(tmp_path, capsys):
    """A run killed on one machine continues on another: its folder copied elsewhere, resumed with a new
    ``data.root`` and ``device`` (``auto``: the CPU here, as before, so the numbers must stay exact). Rules out
    refusing such a resume (the checkpoint's config names where it ran) and a resume that lets any other key
    change with them."""
    rounds, args = 5, [*SMALL, "device=cpu", "checkpoint_every=1"]
    full, killed, moved = tmp_path / "full", tmp_path / "killed", tmp_path / "elsewhere" / "run"
    run_through(full, args, rounds)
    run_and_kill(killed, args, rounds, after=2)  # round 2 written: round 1's checkpoint is on disk
    shutil.copytree(killed, moved)
    with pytest.raises(CheckpointError, match=r"train\.lr .*a resume may change only out, device, data\.root"):
        fedtrust.run(None, ["train.lr=0.5", "device=auto"], resume=moved, progress=False, report=False)
    fedtrust.run(None, ["device=auto", f"data.root={tmp_path / 'data'}"], resume=moved, progress=True, report=False)
    assert "resuming with a new device (checkpoint 'cpu', now 'auto')" in capsys.readouterr().out
    got, want = read_metrics(moved), read_metrics(full)
    assert [strip_timing(r) for r in got] == [strip_timing(r) for r in want]
    meta = checkpoint_meta(moved)
    assert meta["config"].pop("device") == "auto" and meta["config"]["data"].pop("root") == str(tmp_path / "data")
    reference = checkpoint_meta(full)
    reference["config"].pop("device"), reference["config"]["data"].pop("root")
    assert meta == reference
    w_got, w_want = (load_file(str(d / "checkpoint.safetensors")) for d in (moved, full))
    assert w_got.keys() == w_want.keys() and all(torch.equal(w_got[k], w_want[k]) for k in w_want)
