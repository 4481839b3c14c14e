"""Runs that go wrong say so in one line: diverged training stops at its round, an unusable ``out`` before the run.

The divergence cases are real configs on bundled digits (4 clients, 2 a round, 3 local steps), each pushed
over the edge by one key: ``train.lr=1e3`` makes a client's BatchNorm statistics overflow in round 2,
``defense.server_lr`` overshoots the server step (NaN/Inf weights, a negative BatchNorm variance, or finite
weights whose outputs overflow). Before the guard these runs ended with a null-filled metrics file or with
"confidence holds 360 non-finite scores" from the report's calibration code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import fedtrust
from fedtrust.cli import main
from fedtrust.errors import ConfigError, DivergenceError
from fedtrust.fl.executor import ClientStore, RoundReport
from fedtrust.fl.protocol import Message
from fedtrust.runner import rundir
from fedtrust.runner.callbacks import DivergenceGuard
from fedtrust.runner.rundir import read_metrics

SMALL = ["data.num_clients=4", "data.clients_per_round=2", "rounds=3", "train.steps=3"]


def _diverge(tmp_path: Path, *overrides: str) -> tuple[str, list[dict]]:
    """Run SMALL plus ``overrides`` into tmp_path/run, expecting a DivergenceError: (message, metrics kept)."""
    out = tmp_path / "run"
    with pytest.raises(DivergenceError) as err:
        fedtrust.run(None, [*SMALL, *overrides, f"out={out}"], progress=False, report=False)
    message = str(err.value)
    assert "\n" not in message
    return message, read_metrics(out)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_client_divergence_stops_at_its_round_and_keeps_earlier_metrics(tmp_path, executor):
    """train.lr=1e3: round 1 trains (finite, huge loss), in round 2 a client's update holds NaN. Rules out a
    run that goes on skipping rounds to a null-filled end, a stop that loses round 1's record or writes round
    2's, and an executor (vectorized) whose replies escape the check."""
    message, records = _diverge(tmp_path, "train.lr=1e3", f"executor={executor}")
    assert message.startswith("round 2: local training diverged on 1 of 2 clients (client ")
    assert "holds NaN or Inf" in message and "train.lr=1000 too high? try a smaller train.lr" in message
    assert [r["round"] for r in records] == [1] and math.isfinite(records[0]["train_loss"])
    assert not (tmp_path / "run" / rundir.SUMMARY).exists()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("overrides, expected", [
    (["defense.server_lr=1e40"], "round 1: the server model holds NaN/Inf after aggregation (key 'model/"),
    (["defense.server_lr=5"], "round 1: the server model's BatchNorm variance 'model/body.0.1.running_var' is "
                              "negative after aggregation"),
    (["defense.server_lr=1e15", "model.norm=none", "eval.every=1"],
     "round 1: the server model's test outputs are NaN/Inf (its largest weight is 2.88e+13"),
], ids=["nonfinite-state", "negative-variance", "overflowing-outputs"])
def test_server_side_divergence_names_round_and_cause(tmp_path, overrides, expected):
    """Each way the server model breaks has its own line naming the key or the size, and the hint names the
    server step. Rules out a check of the replies only (they are finite here), and a model that is only
    checked for NaN weights (a negative variance or overflowing logits pass that)."""
    message, records = _diverge(tmp_path, *overrides)
    assert message.startswith(expected), message
    server_lr = overrides[0].split("=")[1]
    assert f"defense.server_lr={float(server_lr):.12g} or train.lr=0.05 too high?" in message
    assert records == []


def test_cli_prints_one_line_for_lr_1e6(tmp_path, capsys, one_thread):
    """The issue's case through the console script, progress bar on: exit status 2 and exactly one line on
    stderr naming round 1 and train.lr, no traceback and no 'non-finite scores' from the report code."""
    out = tmp_path / "run"
    assert main(["run", *SMALL, "train.lr=1e6", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: round 1: local training diverged on 2 of 2 clients")
    assert "train.lr=1000000 too high?" in err[0]
    assert read_metrics(out) == []


def test_an_attacked_run_with_nan_replies_goes_on(tmp_path, one_thread):
    """Under an attack a NaN reply is the attacker's (rejected, logged) and a diverged model is the attack's
    result, which the benchmarks count: the guard is off. Rules out a guard that stops Byzantine runs."""
    out = tmp_path / "run"
    fedtrust.run(None, [*SMALL, "data.clients_per_round=4", "rounds=2", "attack.name=gaussian", "attack.ids=[0]",
                        "attack.std=1e39", f"out={out}"], progress=False, report=False)
    records = read_metrics(out)
    assert [r["round"] for r in records] == [1, 2]
    assert all("holds NaN or Inf" in r["rejected"]["0"] for r in records)


# ---------------------------------------------------------------- the guard on hand-made rounds


def _report(state: dict[str, torch.Tensor], rejected: dict[str, str] | None = None,
            losses: tuple[float, ...] = (1.0, 2.0)) -> RoundReport:
    meta = {c: {"loss": loss, "num_examples": 5} for c, loss in enumerate(losses)}
    metrics = {"rejected": rejected} if rejected else {}
    return RoundReport(4, list(meta), meta, Message(state), ClientStore(), metrics)


def test_guard_passes_healthy_rounds_and_other_rejections() -> None:
    """A finite state, NaN losses (no step taken), a zero variance and a reply rejected for its shape are not
    divergence. Rules out a guard that stops every run with a rejected reply or a skipped client."""
    guard = DivergenceGuard("HINT")
    state = {"m/w": torch.ones(3), "m/bn.running_var": torch.zeros(2), "m/bn.num_batches_tracked": torch.tensor(3)}
    guard.after_round(_report(state, {"1": "key 'm/w' has shape (4,); expected (3,)"}, (math.nan, 1.0)))
    guard.check_logits(4, torch.randn(5, 3), Message(state))


@pytest.mark.parametrize("state, rejected, losses, expected", [
    ({"m/w": torch.tensor([1.0, math.inf])}, None, (1.0,), "round 4: the server model holds NaN/Inf after "
     "aggregation (key 'm/w'): training diverged; HINT"),
    ({"m/a": torch.ones(1), "m/b": torch.tensor([math.nan])}, None, (1.0,), "(key 'm/b')"),
    ({"m/bn.running_var": torch.tensor([1.0, -1e-3])}, None, (1.0,), "BatchNorm variance 'm/bn.running_var' is "
     "negative"),
    ({"m/w": torch.ones(1)}, {"0": "key 'm/w' holds NaN or Inf"}, (1.0, 1.0), "round 4: local training diverged "
     "on 1 of 2 clients (client 0: key 'm/w' holds NaN or Inf); HINT"),
    ({"m/w": torch.ones(1)}, None, (1.0, math.inf), "round 4: client 1's training loss is inf; HINT"),
])
def test_guard_names_each_divergence(state, rejected, losses, expected) -> None:
    """Hand-made rounds, one broken part each: rules out a check of the first key only, a negative variance
    or an infinite loss passing, and a message without the round or the hint."""
    with pytest.raises(DivergenceError) as err:
        DivergenceGuard("HINT").after_round(_report(state, rejected, losses))
    assert expected in str(err.value)


def test_guard_logits_check_names_the_largest_weight() -> None:
    state = Message({"m/w": torch.tensor([2.0, -3e20]), "m/steps": torch.tensor(7)})
    with pytest.raises(DivergenceError, match=r"round 2: the server model's test outputs are NaN/Inf \(its largest "
                                              r"weight is 3e\+20 in magnitude\)"):
        DivergenceGuard("HINT").check_logits(2, torch.tensor([[0.0, math.inf]]), state)


# ---------------------------------------------------------------- an out that cannot be written


def _refused_out(tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """fedtrust.run with ``out``: the one-line ConfigError, raised before any data is loaded."""
    import fedtrust.runner.run as run_module

    monkeypatch.setattr(run_module, "build_federation", lambda cfg: pytest.fail("the run started before out"))
    with pytest.raises(ConfigError) as err:
        fedtrust.run(None, [*SMALL, f"out={out}"], progress=False, report=False)
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "choose a writable out=DIR" in message
    return message


def test_out_under_proc_is_refused_before_the_run(tmp_path, monkeypatch):
    """/proc/x cannot be created even by root (os.access says yes there): rules out a pre-check by
    permission bits only and the old FileNotFoundError traceback from mkdir."""
    message = _refused_out(tmp_path, Path("/proc/x"), monkeypatch)
    assert message.startswith("config key 'out': cannot create or write the run directory '/proc/x'")


def test_out_under_a_file_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    message = _refused_out(tmp_path, tmp_path / "file" / "run", monkeypatch)
    assert "Not a directory" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_out_where_the_system_denies_writing_is_refused(tmp_path, monkeypatch):
    """A permission error (a read-only directory for a non-root user; as root, which CI is, chmod cannot
    make one, so the OS's refusal is simulated where the probe file is written: the nearest existing
    folder above out) is the same one line."""
    real = rundir.tempfile.NamedTemporaryFile

    def denied(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(rundir.tempfile, "NamedTemporaryFile", denied)
    message = _refused_out(tmp_path, tmp_path / "locked" / "run", monkeypatch)
    assert "Permission denied" in message and not (tmp_path / "locked").exists()


def test_check_writable_tries_for_real_and_leaves_nothing(tmp_path):
    """A new nested out is probed in its nearest existing ancestor and nothing is created (the run makes
    the folders later), so a run failing in between leaves no empty folders; an existing directory keeps
    its content and gets no probe file."""
    rundir.check_writable(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "x.txt").write_text("x")
    rundir.check_writable(tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["x.txt"]


def _start_run_dir(out: Path) -> bool:
    for _ in range(30):
        rundir.check_writable(out)
    return rundir.new_run_dir(str(out), "x").is_dir()


def test_check_writable_in_parallel_under_one_new_parent(tmp_path):
    """Runs started at once under one new parent (a benchmark's ``--jobs 2``) must not fail because one
    run's check removed a folder the other was creating its run directory in (processes, not threads:
    the race needs real parallelism)."""
    import multiprocessing

    outs = [tmp_path / "bench" / "digits" / f"run-{k}" for k in range(6)]
    with multiprocessing.get_context("fork").Pool(6) as pool:
        assert pool.map(_start_run_dir, outs) == [True] * 6
