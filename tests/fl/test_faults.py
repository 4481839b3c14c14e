"""Client faults (crash, hang, garbage) and the straggler model on the in-process executors
(Flower: tests/flower/test_simulation.py): each failure is recorded with its client id and reason, left
out of the round, and the run goes on; the schedule is a function of (seed, round, client) only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fedtrust
from fedtrust.errors import ConfigError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.faults import GARBAGE_KINDS, ClientFault, Faults, corrupt_reply, failure_reason, is_injected
from fedtrust.fl.runtime import ClientRuntime
from fedtrust.fl.types import ClientContext, Message
from fedtrust.fl.validate import validate_replies
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation
from fedtrust.runner.rundir import read_metrics

pytestmark = [pytest.mark.usefixtures("one_thread")]

SMALL = ["data.num_clients=6", "data.clients_per_round=4", "rounds=4", "eval.every=2", "train.steps=4",
         "eval.personalized=false"]


def ctx(client: int, round: int = 1) -> ClientContext:
    return ClientContext(client, round, torch.Generator().manual_seed(0), torch.device("cpu"))


def test_the_schedule_depends_on_seed_round_and_client_only_with_the_configured_rates():
    """Rules out draws from a shared RNG (a different schedule on another executor or after a resume),
    kinds that overlap, and rates off their configuration."""
    f = Faults(seed=3, crash=0.1, hang=0.2, garbage=0.3)
    draws = [f.fault(c, r) for r in range(1, 201) for c in range(50)]
    torch.rand(100)  # the global RNG does not move the schedule
    assert draws == [Faults(seed=3, crash=0.1, hang=0.2, garbage=0.3).fault(c, r)
                     for r in range(1, 201) for c in range(50)]
    n = len(draws)
    for kind, p in (("crash", 0.1), ("hang", 0.2), ("garbage", 0.3), (None, 0.4)):
        assert abs(draws.count(kind) / n - p) < 0.015, kind
    other = [Faults(seed=4, crash=0.1, hang=0.2, garbage=0.3).fault(c, 1) for c in range(50)]
    assert other != draws[:50]
    kinds = {f.garbage_kind(c, r) for r in range(1, 30) for c in range(20)}
    assert kinds == set(GARBAGE_KINDS)


@pytest.mark.parametrize("kind, reason", [("nan", "holds NaN or Inf"), ("shape", "has shape (3,)"),
                                          ("keys", "missing key 'model/w'"), ("weight", "no valid sample weight")])
def test_each_garbage_kind_is_rejected_by_validation_with_its_reason(kind, reason):
    """Rules out garbage that validation lets through (it would reach the aggregator)."""
    state = Message({"model/b": torch.zeros(2), "model/w": torch.zeros(2, 2)})
    good = Message({"model/b": torch.ones(2), "model/w": torch.ones(2, 2)}, {"num_examples": 5})
    replies = {0: good, 1: corrupt_reply(good, kind), 2: good}
    valid, rejected = validate_replies(state, replies)
    assert sorted(valid) == [0, 2] and list(rejected) == [1] and reason in rejected[1], rejected
    assert torch.equal(good.arrays["model/w"], torch.ones(2, 2)), "the corruption changed the original reply"


def test_a_crashing_client_keeps_its_state_and_a_garbage_one_keeps_its_new_state():
    """Rules out a crash that half-ran the client (its state changed) and garbage that discards the work
    the client did (its state is the trained one; only the reply is garbage)."""
    calls = []

    class Stateful:
        name = "stateful"

        def client_update(self, message, data, client_state, c):
            calls.append(c.client_id)
            return Message({"model/w": torch.ones(2)}, {"num_examples": 1}), Message({"h": torch.full((1,), 7.0)})

    f = Faults(seed=0, crash=0.5, garbage=0.5, garbage_kinds=("nan",))
    crash = next(c for c in range(20) if f.fault(c, 1) == "crash")
    garbage = next(c for c in range(20) if f.fault(c, 1) == "garbage")
    runtime = ClientRuntime(Stateful(), None, f)  # type: ignore[arg-type]
    with pytest.raises(ClientFault, match="^injected crash"):
        runtime.run(Message(), None, Message({"h": torch.zeros(1)}), ctx(crash))
    assert calls == []
    reply, state = runtime.run(Message(), None, Message({"h": torch.zeros(1)}), ctx(garbage))
    assert calls == [garbage] and torch.isnan(reply.arrays["model/w"]).all() and state.arrays["h"].item() == 7.0


def expected_failures(cfg_args: list[str], rounds: int) -> tuple[dict[int, dict[str, str]], dict[int, set[str]]]:
    """The schedule's prediction: per round, crashed/hung clients and garbage clients among the sampled."""
    fed = build_federation(build_config({}, cfg_args))
    faults = fed.executor.faults
    failed, garbage = {}, {}
    for r in range(1, rounds + 1):
        sampled = fed.executor.sample(r)
        failed[r] = {str(c): faults.fault(c, r) for c in sampled if faults.fault(c, r) in ("crash", "hang")}
        garbage[r] = {str(c) for c in sampled if faults.fault(c, r) == "garbage"}
    return failed, garbage


def run(tmp_path: Path, name: str, *args: str) -> tuple[object, list[dict]]:
    result = fedtrust.run(None, [*SMALL, *args, f"out={tmp_path / name}"], progress=False, report=False)
    return result, read_metrics(tmp_path / name)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_every_fault_kind_is_recorded_left_out_and_the_run_finishes(tmp_path, executor):
    """Crash, hang and garbage together at 60 %: exactly the scheduled clients fail or are rejected, each
    with its reason, in every round; the run finishes with a finite model that still learned. Rules out
    a fault that crashes the run, one that is aggregated, a failure logged under the wrong client, and
    executors that disagree on the schedule."""
    faults = ["faults.crash=0.2", "faults.hang=0.2", "faults.garbage=0.2", "seed=1", "train.steps=12"]
    result, records = run(tmp_path, executor, f"executor={executor}", *faults)
    want_failed, want_garbage = expected_failures([*SMALL, *faults], 4)
    assert any(want_failed.values()) and any(want_garbage.values()), "the schedule holds no fault: no test"
    assert {"crash", "hang"} <= {k for v in want_failed.values() for k in v.values()}
    for rec in records:
        r = rec["round"]
        failed = rec.get("failed", {})
        assert {c: ("crash" if "crash" in v else "hang") for c, v in failed.items()} == want_failed[r], r
        assert all(is_injected(v) for v in failed.values())
        assert rec.get("failed_fraction", 0.0) == pytest.approx(len(want_failed[r]) / 4)
        assert set(rec.get("rejected", {})) == want_garbage[r], r
        assert all(c not in rec.get("aggregator/model", {}).get("weights", {}) for c in [*failed, *want_garbage[r]])
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(v.float()).all() for v in result.state.arrays.values())
    assert result.summary["test_acc"] > 0.25  # measured 0.35 (0.70 without faults; chance 0.1)


@pytest.mark.slow
def test_sequential_and_vectorized_agree_under_faults_in_float64(tmp_path, float64):
    """Rules out a faulty client that moves another client's draws (the survivors' training would differ)."""
    faults = ["faults.crash=0.25", "faults.garbage=0.25", "faults.garbage_kinds=[shape]", "seed=2"]
    _, seq = run(tmp_path, "seq", "executor=sequential", *faults)
    _, vec = run(tmp_path, "vec", "executor=vectorized", *faults)
    for a, b in zip(seq, vec, strict=True):
        assert a.get("failed") == b.get("failed") and a.get("rejected") == b.get("rejected")
        for k in ("train_loss", "test_loss", "test_acc"):
            if a.get(k) is not None:
                assert b[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (a["round"], k)


@pytest.mark.slow
def test_rounds_lost_to_injected_faults_keep_the_state_and_a_genuine_error_everywhere_stops_the_run(
        tmp_path, monkeypatch):
    """Every client crashes (injected): every round keeps the initial state and the run finishes. Every client
    raising a genuine error is a bug: the run stops with that error instead of skipping every round."""
    result, records = run(tmp_path, "all", "faults.crash=1.0")
    assert all(r["failed_fraction"] == 1.0 and "kept the previous server state" in r["skipped"] for r in records)
    fed = build_federation(build_config({}, SMALL))
    torch.manual_seed(fed.config.seed)
    init = fed.algorithm.init()
    assert all(torch.equal(result.state.arrays[k], init.arrays[k]) for k in init.arrays)

    from fedtrust.algorithms.fedavg import FedAvg

    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("a bug in local training")

    monkeypatch.setattr(FedAvg, "local_training", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in local training"):
        run(tmp_path, "bug", "executor=sequential")


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_stragglers_past_the_deadline_are_dropped_by_their_work_and_speed(tmp_path, executor):
    """σ = 0: every client processes ``speed`` examples a second, so exactly the clients whose epoch
    (their data size) takes longer than the deadline are dropped. Rules out a deadline on the wrong
    side, work that ignores the client's data size, and a model drawn per executor call."""
    args = [*SMALL, "train.steps=null", "train.epochs=1", "faults.speed=100", "faults.speed_sigma=0",
            "faults.round_timeout=2.3", "rounds=2", "eval.every=2", f"executor={executor}"]
    fed = build_federation(build_config({}, args))
    sizes = {c: len(i) for c, i in enumerate(fed.data.indices)}
    assert min(sizes.values()) < 230 < max(sizes.values()), sizes
    ex = fed.executor
    torch.manual_seed(0)
    state = fed.algorithm.init()
    messages = fed.algorithm.configure(state, 1, list(range(6)))
    replies = ex.execute(messages, 1, ClientStore())
    slow = {c for c, n in sizes.items() if n > 230}
    assert set(replies.failed) == slow and set(replies) == set(range(6)) - slow
    assert all(r.startswith("straggler: needs") and "faults.round_timeout=2.3 s" in r for r in replies.failed.values())
    assert all(is_injected(r) for r in replies.failed.values())
    lognormal = Faults(seed=0, speed=100, speed_sigma=0.5, round_timeout=1.0, work=lambda c: 100.0)
    secs = [lognormal.seconds(c, 1) for c in range(2000)]
    assert abs(sum(100 / s for s in secs) / len(secs) - 100) < 3  # the speeds' mean is faults.speed


def test_failure_reasons_are_one_line():
    assert failure_reason(ValueError("bad\nvalue")) == "ValueError: bad"
    assert failure_reason(ClientFault("injected crash (faults.crash=1)")) == "injected crash (faults.crash=1)"
    assert not is_injected("RuntimeError: injected fault") and is_injected("injected hang: no reply")


@pytest.mark.parametrize("bad, fragment", [
    (["faults.crash=0.6", "faults.garbage=0.6"], "expected at most 1"),
    (["faults.speed=10"], "set faults.round_timeout"),
    (["faults.crash=1.5"], "faults.crash"),
    (["faults.garbage_kinds=[zeros]"], "faults.garbage_kinds"),
    (["faults.typo=1"], "faults.typo"),
    (["executor=flower", "faults.hang=0.1"], "set faults.round_timeout below it"),
    (["executor=flower", "faults.hang=0.1", "faults.round_timeout=40"], "set faults.round_timeout below it"),
])
def test_fault_config_errors_are_one_line(bad, fragment):
    with pytest.raises(ConfigError) as err:
        build_config({}, bad)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_an_omniscient_attack_crafts_from_the_valid_replies_only(tmp_path):
    """ALIE crafts its update from the benign replies' mean and std: a garbage reply among them (a renamed
    key) used to reach its arithmetic (a KeyError that ended the run). Now it is left out of the crafting
    and rejected; the attackers' crafted replies are still aggregated."""
    args = ["attack.name=alie", "attack.ids=[0, 1, 2]", "faults.garbage=0.5", "faults.garbage_kinds=[keys]",
            "seed=3"]
    _, records = run(tmp_path, "alie", *args)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    rejected = [c for r in records for c, v in r.get("rejected", {}).items() if "missing key" in v]
    assert rejected, "no garbage reply in the schedule: no test"
