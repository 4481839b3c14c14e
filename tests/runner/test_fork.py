"""`fedtrust fork`: a branch of a run from its last checkpoint, continued with `run --resume`.

A fork without changes must continue exactly as the parent would have (so the copy loses nothing: server
state, client store, RNG state, metrics); a fork with a change must keep the parent's rounds and differ only
after them; keys that fix the checkpoint's contents, and every other bad request, are one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedtrust
from fedtrust.cli import main
from fedtrust.errors import CheckpointError, ConfigError, FedTrustError
from fedtrust.runner.checkpoint import sha256_file
from fedtrust.runner.fork import FORK_INFO, fork_run
from fedtrust.runner.rundir import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TIMING = {"time_s", "wall_time_s", "run_dir"}
# 4 digits clients, 2 a round, 5 steps each; constant lr, so a longer run is the shorter one continued.
SMALL = ["data.num_clients=4", "data.clients_per_round=2", "train.steps=5", "eval.every=2",
         "train.lr_schedule=constant"]
FLIP = ["algorithm.name=flip", "algorithm.warmup_steps=20", "algorithm.pair_steps=10", "algorithm.refine_steps=5",
        "algorithm.tau_inv=0.3", "algorithm.max_mask_frac=0.5", "attack.name=backdoor", "attack.ids=[3]"]


def _run(out: Path, args: list[str], rounds: int) -> None:
    fedtrust.run(None, [*args, f"rounds={rounds}", f"out={out}"], progress=False, report=False)


def _resume(out: Path) -> None:
    fedtrust.run(resume=out, progress=False, report=False)


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A 4-round Ditto run (personal models in the client store) to fork from."""
    out = tmp_path_factory.mktemp("fork") / "parent"
    _run(out, SMALL + ["algorithm.name=ditto"], 4)
    return out


@pytest.mark.parametrize("algorithm", [["algorithm.name=ditto"], FLIP], ids=["ditto", "flip"])
def test_a_fork_without_changes_continues_exactly_as_the_parent_would(tmp_path, algorithm):
    """Parent: 4 rounds; fork it with rounds=6 and resume; reference: 6 rounds uninterrupted. Every metrics
    record (but timing), the summary and every tensor of the final checkpoint (server, each client's state:
    Ditto's personal models, FLIP's pair matrices and trigger caches; RNG) must be equal. Rules out a fork
    that drops the client store or the RNG state, or that keeps the parent's rounds twice."""
    args = SMALL + algorithm
    parent, full = tmp_path / "parent", tmp_path / "full"
    _run(parent, args, 4)
    _run(full, args, 6)
    fork = fork_run(parent, tmp_path / "fork", ["rounds=6"])
    _resume(fork)
    got, want = read_metrics(fork), read_metrics(full)
    assert [r["round"] for r in got] == list(range(1, 7))
    assert [_strip(r) for r in got] == [_strip(r) for r in want]
    summary = [_strip(json.loads((d / "summary.json").read_text())) for d in (fork, full)]
    assert summary[0] == summary[1]
    w_got, w_want = load_file(str(fork / "checkpoint.safetensors")), load_file(str(full / "checkpoint.safetensors"))
    assert w_got.keys() == w_want.keys() and any(k.startswith("client/") for k in w_want)
    for k in w_want:
        assert torch.equal(w_got[k], w_want[k]), k


def test_a_fork_with_a_change_keeps_the_parents_rounds_and_differs_after_them(tmp_path, parent):
    """train.lr changed at the fork: rounds 1-4 are the parent's records, rounds 5-6 differ from the
    unchanged continuation; fork.json names the parent, the round and the change, and the parent's files
    are untouched."""
    before = {p.name: sha256_file(p) for p in parent.iterdir() if p.is_file()}
    same = fork_run(parent, tmp_path / "same", ["rounds=6"])
    changed = fork_run(parent, tmp_path / "changed", ["rounds=6", "train.lr=0.3"])
    for d in (same, changed):
        _resume(d)
    base, new = read_metrics(same), read_metrics(changed)
    assert [_strip(r) for r in new[:4]] == [_strip(r) for r in read_metrics(parent)]
    assert new[5]["test_acc"] != base[5]["test_acc"] or new[5]["test_loss"] != base[5]["test_loss"]
    info = json.loads((changed / FORK_INFO).read_text())
    assert info["parent"] == str(parent) and info["round"] == 4
    assert [c.split(" ")[0] for c in info["changed"]] == ["rounds", "train.lr"]
    assert info["checkpoint_sha256"] == before["checkpoint.safetensors"]
    assert {p.name: sha256_file(p) for p in parent.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("override, words", [
    ("seed=1", "cannot change seed"),
    ("data.alpha=0.3", "cannot change data.alpha"),
    ("model.name=digitnet", "cannot change model.name"),
    ("algorithm.name=fedavg", "cannot change algorithm.name"),
    ("executor=sequential", "cannot change executor"),
    ("rounds=4", "rounds > 4"),
    ("out=elsewhere", "cannot be overridden"),
    ("train.nosuchkey=1", "nosuchkey"),
    ("train.lr=-1", "train.lr"),
])
def test_a_fork_refuses_what_the_checkpoint_cannot_continue(tmp_path, parent, override, words):
    extra = [] if override.startswith("rounds=") else ["rounds=6"]
    with pytest.raises(ConfigError, match=words):
        fork_run(parent, tmp_path / "fork", [*extra, override])
    assert not (tmp_path / "fork").exists(), "a refused fork leaves nothing behind"


def test_a_fork_may_move_the_data_root(tmp_path, parent):
    import fedtrust.data as data_pkg

    root = Path(data_pkg.__file__).parent  # any existing folder: digits are bundled, the root is not read
    fork = fork_run(parent, tmp_path / "fork", ["rounds=5", f"data.root={root}"])
    assert json.loads((fork / FORK_INFO).read_text())["changed"][0].startswith("data.root")


def test_fork_errors_on_the_command_line(tmp_path, parent, capsys):
    """One `error:` line and status 2: no checkpoint, a run directory already there, a stray argument."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("rounds: 3\n")
    assert main(["fork", str(empty), str(tmp_path / "a"), "rounds=5"]) == 2
    assert "nothing to fork" in capsys.readouterr().err
    assert main(["fork", str(parent), str(parent), "rounds=6"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["fork", str(parent), str(tmp_path / "b"), "rounds"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["fork", str(tmp_path / "nothing"), str(tmp_path / "c")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["fork", str(parent), str(tmp_path / "d"), "rounds=6"]) == 0
    assert "fedtrust run --resume" in capsys.readouterr().out


def test_fork_falls_back_to_the_previous_checkpoint_and_leaves_the_parent_alone(tmp_path, parent):
    """A damaged latest checkpoint: the fork starts from the previous one (round 3) and does not rename
    the parent's damaged file (as --resume would)."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in parent.iterdir():
        if p.is_file():
            (damaged / p.name).write_bytes(p.read_bytes())
    ckpt = damaged / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    fork = fork_run(damaged, tmp_path / "fork", ["rounds=6"])
    assert json.loads((fork / FORK_INFO).read_text())["round"] == 3
    assert [r["round"] for r in read_metrics(fork)] == [1, 2, 3]
    assert ckpt.exists() and not (damaged / "checkpoint.corrupt.safetensors").exists()
    with pytest.raises((CheckpointError, FedTrustError)):
        fork_run(tmp_path / "fork" / "missing", tmp_path / "x", ["rounds=6"])
