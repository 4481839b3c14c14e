"""``init_from``: a new run starts from another run's last server weights (fedtrust.runner.run's docstring).

What run() hands the round loop is read by a spy on ``Executor.run`` (start round, server state, client
store, and the messages ``configure`` sends in the first round), so "starts from the source's weights"
is checked on the exact tensors, not inferred from accuracy. Sources are real runs on bundled digits
(4 clients, 2 a round) or, for errors raised before any training, a checkpoint written by
``save_checkpoint`` from a fresh ``algorithm.init()``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fedtrust
from fedtrust.errors import ConfigError
from fedtrust.fl.executor import ClientStore, Executor
from fedtrust.fl.protocol import Message
from fedtrust.fl.sampling import sample_clients
from fedtrust.runner.callbacks import Checkpointer
from fedtrust.runner.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from fedtrust.runner.config import build_config, config_to_dict, load_yaml
from fedtrust.runner.federation import build_federation
from fedtrust.runner.rundir import read_metrics
from fedtrust.runner.run import warm_start

pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS, PER_ROUND = 4, 2
SMALL = [f"data.num_clients={CLIENTS}", f"data.clients_per_round={PER_ROUND}", "eval.personalized=false"]
TRAIN = [*SMALL, "train.steps=20", "eval.every=1"]


def run(out: Path, *args: str):
    return fedtrust.run(None, [*args, f"out={out}"], progress=False, report=False)


def server_arrays(run_dir: Path) -> dict[str, torch.Tensor]:
    """The server state of a run's checkpoint, as saved (``server/`` stripped)."""
    return {k[len("server/"):]: v for k, v in load_file(str(run_dir / CHECKPOINT_NAME)).items()
            if k.startswith("server/")}


def client_ids(run_dir: Path) -> set[int]:
    """The clients whose state a run's checkpoint holds."""
    return {int(k.split("/")[1]) for k in load_file(str(run_dir / CHECKPOINT_NAME)) if k.startswith("client/")}


def assert_equal_arrays(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].cpu(), want[k]), k


@pytest.fixture(scope="module")
def fedavg_source(tmp_path_factory) -> Path:
    """A finished FedAvg run: 5 rounds of 20 local steps (test accuracy ~0.9, ~0.3 after round 1)."""
    out = tmp_path_factory.mktemp("src") / "fedavg"
    run(out, *TRAIN, "rounds=5")
    return out


@pytest.fixture
def handed(monkeypatch) -> list[dict]:
    """Spy on what run() hands the round loop: one entry per ``Executor.run`` call with the start round,
    a copy of the server state and of the client store, and the messages of the first round played."""
    seen: list[dict] = []
    original = Executor.run

    def spy(self, state, store, start_round, rounds, callbacks=(), should_stop=None):
        entry = {"start": start_round, "state": {k: v.clone() for k, v in state.arrays.items()},
                 "store": dict(store.states), "messages": None}
        configure = self.algorithm.configure

        def recording(st, r, clients):
            messages = configure(st, r, clients)
            if r == start_round + 1:
                entry["messages"] = {c: {k: v.clone() for k, v in m.arrays.items()} for c, m in messages.items()}
            return messages

        self.algorithm.configure = recording
        seen.append(entry)
        return original(self, state, store, start_round, rounds, callbacks, should_stop)

    monkeypatch.setattr(Executor, "run", spy)
    return seen


def fake_source(run_dir: Path, *overrides: str) -> Path:
    """A run directory whose checkpoint holds a fresh ``init()`` of the given config (no training)."""
    cfg = build_config({}, [*SMALL, *overrides])
    torch.manual_seed(cfg.seed)
    state = build_federation(cfg).algorithm.init()
    run_dir.mkdir(parents=True)
    save_checkpoint(run_dir, Checkpoint(cfg.rounds, state, ClientStore(), config_to_dict(cfg), {}))
    return run_dir


# ---------------------------------------------------------------- (1) the weights carry over


@pytest.mark.slow
def test_fedprox_starts_from_a_finished_fedavg_run(tmp_path, fedavg_source, handed):
    """5 rounds of FedProx from a finished FedAvg run: the server state handed to round 1, and every
    weight sent to the round-1 clients, equal the source's final weights bit for bit; round 1's
    accuracy is far above the source's own round 1 (a fresh init after one round). Rules out silently
    starting from a fresh init (init_from parsed but never applied), applying it after round 1 was
    configured, or loading the source's first rather than its last checkpoint."""
    source = server_arrays(fedavg_source)
    result = run(tmp_path / "b", *TRAIN, "rounds=5", "algorithm.name=fedprox", f"init_from={fedavg_source}")

    (entry,) = handed
    assert entry["start"] == 0
    assert_equal_arrays(entry["state"], source)
    for c, arrays in entry["messages"].items():
        assert_equal_arrays({k: v for k, v in arrays.items() if k.startswith("model/")}, source)

    records = read_metrics(result.run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    fresh_round1 = read_metrics(fedavg_source)[0]["test_acc"]
    assert records[0]["test_acc"] >= fresh_round1 + 0.3, (records[0]["test_acc"], fresh_round1)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedrep", "ditto", "fedper"])
def test_personalized_algorithms_start_from_fedavg_weights(tmp_path, fedavg_source, handed, algorithm):
    """FedRep, Ditto and FedPer keep FedAvg's ``model/…`` server state, so one round of each from the
    FedAvg run starts from its weights exactly (server state and round-1 messages). Rules out a rule
    that only accepts a source of the same algorithm, or one that copies only the body and leaves a
    fresh head (the head is in ``model/head.*``)."""
    source = server_arrays(fedavg_source)
    fast = ["algorithm.head_epochs=1"] if algorithm == "fedrep" else []
    run(tmp_path / algorithm, *SMALL, "train.steps=2", "rounds=1", f"algorithm.name={algorithm}", *fast,
        f"init_from={fedavg_source / CHECKPOINT_NAME}")
    (entry,) = handed
    assert_equal_arrays(entry["state"], source)
    for arrays in entry["messages"].values():
        assert_equal_arrays({k: v for k, v in arrays.items() if k in source}, source)
        assert {k for k in arrays if k.startswith("model/")} == source.keys()


# ---------------------------------------------------------------- (2) mismatching sources


@pytest.mark.parametrize("overrides, first", [
    (["model.width=16"], "array 'model/body.0.0.weight' has shape (32, 1, 3, 3) there but (16, 1, 3, 3) here"),
    (["model.name=cnn2"], "has no array 'model/body.0.weight'"),
    (["algorithm.name=fedloge", "algorithm.refine_steps=0"],
     "has no array 'backbone/body.0.0.weight' (it holds model/; "
     "fedloge needs backbone/, head_g/, head_l_init/, sse_c/)"),
    (["model.bn_affine=false"], "has array 'model/body.0.1.bias', which fedavg's state lacks"),
])
def test_a_mismatching_source_is_a_one_line_error_naming_the_first_key(tmp_path, overrides, first):
    """A source of another width, another model, another algorithm's key layout, or with arrays the new
    model lacks (BN affine weights) is refused before anything is written, naming the first mismatching
    key. Rules out a load that skips what does not fit (``strict=False``: the width-16 or cnn2 run would
    train from a fresh init, the bn_affine=false run would silently drop the learned BN scales), an
    error that names some later key, and one raised only after the run directory was made."""
    src = fake_source(tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        run(out, *SMALL, "rounds=1", *overrides, f"init_from={src}")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config key 'init_from'") and str(src / CHECKPOINT_NAME) in msg
    assert first in msg
    assert not out.exists()


def test_warm_start_dtype_and_prefix_rules():
    """Hand-made states: a float64 source array is cast to the init's float32; an int array against a
    float one is an error; a source prefix the new state lacks (``c/``) is ignored and reported; the
    new state keeps the init's meta. Rules out an exact-dtype rule that refuses float64 weights, a cast
    that turns integer counters into floats silently, and carrying the source's meta (server round
    counters) over."""
    init = Message({"model/w": torch.zeros(2, dtype=torch.float32), "model/n": torch.tensor(0)}, {"mine": 1})
    src = Message({"model/w": torch.tensor([1.5, 2.5], dtype=torch.float64), "model/n": torch.tensor(7),
                   "c/w": torch.ones(3)}, {"round": 9})
    state, ignored = warm_start(init, src, "src", "fedavg")
    assert state.arrays["model/w"].dtype == torch.float32 and state.arrays["model/w"].tolist() == [1.5, 2.5]
    assert state.arrays["model/n"].item() == 7 and state.arrays.keys() == init.arrays.keys()
    assert ignored == ["c/"] and state.meta == {"mine": 1}
    bad = Message({**src.arrays, "model/n": torch.tensor(7.0)})
    with pytest.raises(ConfigError, match=r"array 'model/n' is torch.float32 there but torch.int64 here"):
        warm_start(init, bad, "src", "fedavg")


def test_fresh_prefixes_start_from_init_only_when_the_source_has_none_of_them():
    """An algorithm's ``fresh_prefixes`` (IS&BC's new ``backstage/`` head) keep the init's arrays when the
    source holds nothing under them; every other array still must come from the source, and a source that
    does hold the prefix (a run of the same algorithm) must supply all of it. Rules out a fresh prefix
    that silently lets a missing ``model/`` array through, or ignores a source's own head."""
    init = Message({"model/w": torch.zeros(2), "backstage/w1": torch.full((3,), 7.0)})
    fedavg = Message({"model/w": torch.ones(2)})
    state, _ = warm_start(init, fedavg, "src", "isbc", ("backstage/",))
    assert state.arrays["model/w"].tolist() == [1.0, 1.0] and state.arrays["backstage/w1"].tolist() == [7.0] * 3
    with pytest.raises(ConfigError, match="has no array 'backstage/w1'"):
        warm_start(init, fedavg, "src", "fedavg")
    own = Message({"model/w": torch.ones(2), "backstage/w1": torch.full((3,), 2.0)})
    assert warm_start(init, own, "src", "isbc", ("backstage/",))[0].arrays["backstage/w1"].tolist() == [2.0] * 3
    with pytest.raises(ConfigError, match="has no array 'model/w'"):
        warm_start(init, Message({"other/w": torch.ones(2)}), "src", "isbc", ("backstage/",))


# ---------------------------------------------------------------- (3) the resolved config pins the source


class _Stop(Exception):
    pass


def _interrupted(monkeypatch, out: Path, args: list[str], after: int) -> None:
    """Run until round ``after`` is checkpointed, then stop as a crash would."""
    original = Checkpointer.after_round

    def stop(self, report):
        original(self, report)
        if report.round == after:
            raise _Stop

    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "after_round", stop)
        with pytest.raises(_Stop):
            run(out, *args)


@pytest.mark.slow
@pytest.mark.parametrize("resume_with", ["config.yaml", "own overrides"])
def test_config_pins_source_and_resume_does_not_reapply_it(tmp_path, fedavg_source, handed, monkeypatch,
                                                           resume_with):
    """config.yaml records ``init_from: {path, sha256}`` with the checkpoint file's absolute path and its
    hashlib SHA-256. A run stopped after round 2 resumes (re-reading config.yaml, or the user's own
    command line with the unpinned ``init_from``) from its own round-2 weights even though the source
    file changed meanwhile (a warning), and a new run from the pinned config refuses the changed file.
    Rules out recording the path as typed or no hash, a resolved config that does not validate again,
    a resume that re-applies init_from over its checkpoint, one that fails because the source changed,
    and a pinned hash that is never checked."""
    src = tmp_path / "pretrained.safetensors"
    shutil.copyfile(fedavg_source / CHECKPOINT_NAME, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    (tmp_path / "sub").mkdir()
    typed = f"{tmp_path}/sub/../{src.name}"  # recorded resolved, not as typed
    args = [*SMALL, "train.steps=5", "rounds=3", "algorithm.name=fedprox", f"init_from={typed}"]
    b = tmp_path / "b"
    _interrupted(monkeypatch, b, args, after=2)
    pinned = load_yaml(b / "config.yaml")["init_from"]
    assert pinned == {"path": str(src.resolve()), "sha256": digest}
    round2 = server_arrays(b)

    fake_source(tmp_path / "other")  # the source file changes after the run started
    shutil.copyfile(tmp_path / "other" / CHECKPOINT_NAME, src)
    with pytest.warns(UserWarning, match="changed since this run started"):
        fedtrust.run(None, args if resume_with == "own overrides" else None, resume=b, progress=False,
                     report=False)
    resumed = handed[-1]
    assert resumed["start"] == 2
    assert_equal_arrays(resumed["state"], round2)
    assert [r["round"] for r in read_metrics(b)] == [1, 2, 3]
    assert load_yaml(b / "config.yaml")["init_from"] == pinned

    again = yaml.safe_load((b / "config.yaml").read_text()) | {"out": str(tmp_path / "c")}
    with pytest.raises(ConfigError, match=f"has sha256 [0-9a-f]{{64}}, the config pins {digest}") as e:
        fedtrust.run(again, progress=False, report=False)
    assert "\n" not in str(e.value) and not (tmp_path / "c").exists()


# ---------------------------------------------------------------- (4) bad paths


def test_bad_paths_are_one_line_errors(tmp_path):
    """A path that does not exist, a directory without a checkpoint (a run that never finished a round:
    only config.yaml) and a file that is not a fedtrust checkpoint are one-line ConfigErrors naming the
    path and what was expected, raised before a run directory is made. Rules out a traceback from
    safetensors or open(), a missing source silently ignored (a fresh start), and an error only after
    data loading and directory creation."""
    empty = tmp_path / "unfinished"
    empty.mkdir()
    (empty / "config.yaml").write_text("rounds: 3\n")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    cases = [(tmp_path / "nope", "does not exist; expected a run directory"),
             (empty, f"holds no {CHECKPOINT_NAME}; expected a run directory with a checkpoint"),
             (junk, "is unreadable (SafetensorError); expected a fedtrust safetensors checkpoint")]
    for path, expected in cases:
        out = tmp_path / "out"
        with pytest.raises(ConfigError) as e:
            run(out, *SMALL, "rounds=1", f"init_from={path}")
        msg = str(e.value)
        assert "\n" not in msg and str(path.name) in msg and expected in msg, msg
        assert not out.exists()


# ---------------------------------------------------------------- (5) weights only


@pytest.mark.slow
def test_client_store_and_round_are_not_carried_over(tmp_path, handed):
    """From a FedPer run (its clients keep personal heads in the client store, its checkpoint is at round
    3), a new FedPer run starts at round 1 with an empty client store, and its checkpoint holds only
    the clients it sampled itself. Rules out init_from implemented as a resume (round 3 + 1, the
    source's heads handed back to its clients) or copying the source's client store along."""
    src = tmp_path / "src"
    run(src, *SMALL, "train.steps=5", "rounds=3", "algorithm.name=fedper")
    src_clients = client_ids(src)
    new = tmp_path / "new"
    run(new, *SMALL, "train.steps=5", "rounds=1", "algorithm.name=fedper", f"init_from={src}")
    round1 = set(sample_clients(CLIENTS, PER_ROUND, 0, 1))
    assert src_clients - round1, "every source client is sampled again in round 1: nothing to test"

    (_, entry) = handed
    assert entry["start"] == 0 and entry["store"] == {}
    assert_equal_arrays(entry["state"], server_arrays(src))
    assert [r["round"] for r in read_metrics(new)] == [1]
    assert client_ids(new) == round1
