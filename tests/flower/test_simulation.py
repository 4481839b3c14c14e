"""executor=flower on Flower's simulation engine (Ray): parity with the sequential executor, failed clients.

Starting Ray takes seconds, so these are slow tests. Ray gives each virtual
client one CPU thread; the sequential reference runs with
one torch thread too, so both compute in the same order and agree to the bit
(the tolerances only absorb a different BLAS on another machine). FedLoGe's
parity covers personalized evaluation, which runs on the nodes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed: pip install 'fedtrust[flower]'")
pytest.importorskip("ray", reason="Flower's simulation engine needs Ray: pip install 'fedtrust[flower]'")

import fedtrust  # noqa: E402
from fedtrust.errors import FedTrustError  # noqa: E402
from fedtrust.fl.executor import Callback, ClientStore, RoundReport  # noqa: E402
from fedtrust.flower.app_config import FlowerSettings  # noqa: E402
from fedtrust.flower.client_app import make_client_app  # noqa: E402
from fedtrust.runner.config import build_config, config_to_dict  # noqa: E402
from fedtrust.runner.federation import build_federation  # noqa: E402
from fedtrust.runner.rundir import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow

ARGS = ["data.num_clients=6", "data.clients_per_round=3", "rounds=3", "eval.every=1"]
KEYS = ("round", "clients", "train_loss", "test_acc", "test_loss", "client_acc", "client_acc_mean",
        "client_acc_masked", "client_acc_masked_mean")
FEDLOGE = ARGS + ["data.imbalance_ratio=10", "algorithm.name=fedloge", "algorithm.refine_steps=100",
                  "algorithm.norm_target=1.0", "model.width=16", "train.batch_size=8"]


def assert_close(a, b, rel: float, abs: float, where: str = "") -> None:
    """Nested metrics (dicts, lists, numbers, None) equal in structure, numbers within the tolerances."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], rel, abs, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rel, abs, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=rel, abs=abs, nan_ok=True), where
    else:
        assert a == b, where


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Runs in ``dtype`` (float64: where the vectorised executor's reordered sums equal the sequential ones)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def metrics(run_dir) -> list[dict]:
    """A run's metrics records without the wall-clock time."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run_dir)]


class Recorder(Callback):
    def __init__(self) -> None:
        self.reports: list[RoundReport] = []

    def after_round(self, report: RoundReport) -> None:
        self.reports.append(report)


def failing_mod(plan: dict[int, set[int]]):
    """A Flower mod making the ClientApps of clients ``plan[round]`` raise (pickled to Ray by value)."""
    def mod(msg, context, call_next):
        if msg.metadata.message_type == "train" and \
                context.node_config["partition-id"] in plan.get(int(msg.metadata.group_id), set()):
            raise RuntimeError(f"injected fault in client {context.node_config['partition-id']}")
        return call_next(msg, context)
    return mod


def test_raising_clients_fail_their_round_and_all_failing_stops_the_run_without_hanging():
    cfg = build_config({}, ["data.num_clients=4", "data.clients_per_round=4", "rounds=3", "executor=flower",
                            "train.steps=2"])
    fed = build_federation(cfg)
    app = make_client_app(config_to_dict(cfg), mods=[failing_mod({1: {1}, 2: {0, 1, 2, 3}})])
    recorder = Recorder()
    start = time.monotonic()
    with pytest.raises(FedTrustError, match=r"^round 2: all 4 sampled clients failed; client 0: .*injected fault"):
        fed.executor.simulate(app, fed.algorithm.init(), ClientStore(), 0, 3, [recorder],
                              settings=FlowerSettings(round_timeout=120.0, join_timeout=120.0))
    assert time.monotonic() - start < 240
    assert [r.round for r in recorder.reports] == [1]
    assert sorted(recorder.reports[0].reply_meta) == [0, 2, 3]  # client 1 failed, the rest were aggregated


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_ray():
    """One Ray instance for the parity runs: Ray's start-up is most of a small simulation's time.

    Flower's Ray backend starts Ray only when none is running and shuts it
    down after each simulation; that shutdown is deferred to the end of the
    module. (The failure test runs first, on Flower's own start-up and shutdown.)
    """
    import ray

    ray.init(include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    patch = pytest.MonkeyPatch()
    patch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
    yield
    patch.undo()
    ray.shutdown()


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_flower_simulation_matches_sequential(algorithm, tmp_path, one_thread, shared_ray):
    args = ARGS + [f"algorithm.name={algorithm}"]
    seq = fedtrust.run(None, args + ["executor=sequential", f"out={tmp_path / 'seq'}"], progress=False, report=False)
    flw = fedtrust.run(None, args + ["executor=flower", f"out={tmp_path / 'flower'}"], progress=False, report=False)
    assert flw.summary["executor"] == "flower"
    a, b = read_metrics(tmp_path / "seq"), read_metrics(tmp_path / "flower")
    assert [r["round"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            assert_close(ra[key], rb[key], rel=1e-5, abs=1e-6, where=f"round {ra['round']}: {key}")
    assert seq.state.arrays.keys() == flw.state.arrays.keys()
    for k, v in seq.state.arrays.items():
        torch.testing.assert_close(flw.state.arrays[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert b[-1]["test_acc"] > 0.3  # three short rounds on 8x8 digits: well above chance (0.1)


def test_fedloge_metrics_equal_on_sequential_vectorized_and_flower(tmp_path, one_thread, shared_ray):
    """Every metric (global, per client, masked, per predictor: universal, global, personalized) matches.

    Flower scores each client on its node with the local head L_k kept there;
    float32, as it runs. The vectorised executor reorders float sums (vmap), so
    it is compared with the sequential one in float64, where both agree to ~1e-9.
    """
    def run(executor: str, name: str) -> list[dict]:
        out = tmp_path / name
        fedtrust.run(None, FEDLOGE + [f"executor={executor}", f"out={out}"], progress=False, report=False)
        return metrics(out)

    seq, flw = run("sequential", "seq"), run("flower", "flower")
    assert [r["round"] for r in flw] == [1, 2, 3]
    assert set(flw[-1]["by_predictor"]) == {"universal", "global", "personalized"}
    kept = sorted(p.parent.name for p in (tmp_path / "flower" / "nodes").glob("client-*/round-*.safetensors"))
    assert kept and set(kept) <= {f"client-{k}" for k in range(6)}, "the nodes kept no state on disk for a resume"
    assert_close(seq, flw, rel=1e-5, abs=1e-6)
    personal = flw[-1]["by_predictor"]["personalized"]
    assert personal["client_acc"] != flw[-1]["by_predictor"]["global"]["client_acc"]  # L_k counts

    with default_dtype(torch.float64):
        seq64, vec64 = run("sequential", "seq64"), run("vectorized", "vec64")
    assert_close(seq64, vec64, rel=1e-7, abs=1e-9)
    assert seq64[-1]["test_loss"] != seq[-1]["test_loss"], "float64 is a different run: did the dtype switch?"


def test_attack_and_defense_equal_on_sequential_vectorized_and_flower(tmp_path, one_thread, shared_ray):
    """One attack (a Gaussian update with σ = 1e39 from client 1: it overflows float32 to ±Inf) and one defense
    (coordinate-wise median) give the same metrics on every executor: the attack wraps the client runtime
    on the Flower nodes too, the bad reply is rejected with its reason (never aggregated, the run goes
    on), and the median's per-client weights match. Rules out an attack or validation that exists on one
    executor only, and a Flower node that bypasses the client runtime."""
    args = ARGS + ["attack.name=gaussian", "attack.ids=[1]", "attack.std=1e39", "defense.aggregator=median",
                   "data.clients_per_round=4", "eval.personalized=false"]

    def run(executor: str, name: str) -> list[dict]:
        fedtrust.run(None, args + [f"executor={executor}", f"out={tmp_path / name}"], progress=False, report=False)
        return metrics(tmp_path / name)

    seq, flw = run("sequential", "seq"), run("flower", "flower")
    assert [r["round"] for r in flw] == [1, 2, 3]
    attacked = [r for r in seq if "rejected" in r]
    assert attacked, "client 1 was never sampled: the test would not test the attack"
    for r in attacked:
        assert r["rejected"] == {"1": "key 'model/body.0.0.weight' holds NaN or Inf"}
        assert "1" not in r["aggregator/model"]["weights"]
    assert_close(seq, flw, rel=1e-5, abs=1e-6)
    assert seq[-1]["test_acc"] > 0.3

    with default_dtype(torch.float64):
        seq64, vec64 = run("sequential", "seq64"), run("vectorized", "vec64")
    assert_close(seq64, vec64, rel=1e-7, abs=1e-9)


def test_injected_faults_fail_the_same_clients_on_flower_as_in_process(tmp_path, one_thread, shared_ray):
    """The same fault schedule on Flower's nodes as on the sequential executor: a crashing node (an error
    reply), a hanging node (it really sleeps 40 s, past the 30 s deadline: the server hears nothing; the
    deadline leaves a loaded machine time to build the clients in round 1), a node replying a wrong shape
    (rejected by validation with its reason), and a round where every client crashes (the previous state
    is kept). Metrics equal the sequential run's; failures carry the same
    clients. Rules out faults drawn from anything a node does not share with the server, a silent node
    that stalls the run, and a malformed reply that reaches the aggregator on Flower."""
    args = ARGS + ["faults.crash=0.2", "faults.hang=0.2", "faults.garbage=0.2", "faults.garbage_kinds=[shape]",
                   "faults.round_timeout=30", "faults.hang_seconds=40", "seed=6", "eval.personalized=false"]

    def run(executor: str, name: str) -> list[dict]:
        fedtrust.run(None, args + [f"executor={executor}", f"out={tmp_path / name}"], progress=False, report=False)
        return metrics(tmp_path / name)

    seq, flw = run("sequential", "seq"), run("flower", "flower")
    # the schedule of seed 6 (tests/fl/test_faults.py checks schedules in general): round 1 client 2 replies a
    # wrong shape; round 2 client 1 hangs, 3 crashes; round 3 clients 0, 2, 4 all crash
    assert [sorted(r.get("failed", {})) for r in seq] == [[], ["1", "3"], ["0", "2", "4"]]
    assert [sorted(r.get("failed", {})) for r in flw] == [[], ["1", "3"], ["0", "2", "4"]]
    assert flw[1]["failed"]["1"] == "no reply within 30 s" and "injected hang" in seq[1]["failed"]["1"]
    assert flw[1]["failed"]["3"] == seq[1]["failed"]["3"] == "injected crash (faults.crash=0.2)"
    for records in (seq, flw):
        assert "has shape" in records[0]["rejected"]["2"]
        assert "kept the previous server state" in records[2]["skipped"]
    drop = ("failed",)
    assert_close([{k: v for k, v in r.items() if k not in drop} for r in seq],
                 [{k: v for k, v in r.items() if k not in drop} for r in flw], rel=1e-5, abs=1e-6)
