#!/usr/bin/env python
"""fedtrust speed benchmark (issue 4): fedtrust's executors against the tools users would otherwise pick.

Run from the repository root::

    python benchmarks/speed.py                    # full run, medians of 3 runs -> benchmarks/results/speed.md
    python benchmarks/speed.py --quick            # smoke test (~3 min on a quiet 2-core CPU) -> speed-quick.md
    python benchmarks/speed.py --only w-vectorized,w-flower --repeats 5
    python benchmarks/speed.py --device cuda --profile
    python benchmarks/speed.py --threads 1        # on a machine shared with other jobs (no thread thrashing)

Three parts, each a list of rows (``--only`` takes row ids, parts, workloads or systems):

1. ``w``: workload W of the issue. FedAvg on the bundled digits, 100 IID clients, 10 per
   round, 200 rounds, batch 10, 1 local epoch, SGD lr 0.05 without momentum, model ``cnn``.
   Rows: fedtrust vectorised / sequential (``fedtrust.run``), a paper-repository style
   loop written here, Flower's simulation engine (Ray), pfl-research's simulated backend,
   and centralised training over the same number of sample-visits at batch 10 and 100.
2. ``scaling``: time per round of fedtrust vectorised and sequential as clients per round
   grow (10, 50, 100, 500) at a fixed client size (W's digits clients with 20 images, the
   set repeated as needed), peak memory, and a 10,000-client / 100-per-round row.
3. ``cifar``: the shape of pfl-research's CIFAR-10 benchmark (1,000 clients x 50 images,
   50 per round, batch 10, 1 epoch, the 2-conv CNN ``cnn2``); ``--rounds`` rounds (5 on a
   CPU, the full 1,500 on a GPU), fedtrust and pfl.

Every measurement runs in a fresh process (this file with ``--worker``), so each pays the
same one-off costs, its peak memory is that run's own, and a crashed row does not take the
others down. Repeats are interleaved (row 1, row 2, ..., then again) so a drift in machine
load spreads over all rows. Flower and pfl run with whichever Python can import them: the
current one, else a venv under ``benchmarks/.venvs/`` created on first use with
``--system-site-packages`` (pfl pins ``packaging<26``, so it never goes into the main
environment).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import random
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runpool import with_analysis

# ====================================================================== setup

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS_DIR = REPO / "benchmarks" / "results"
VENVS_DIR = REPO / "benchmarks" / ".venvs"
ANALYSIS = "benchmarks/speed_analysis.md"  # hand-written reading of the full CPU run, appended to its results
RESULT_MARK = "@@speed-result@@ "  # prefix of the one stdout line a worker reports on

Result = dict[str, Any]  # one run of one row: wall_s, loop_s, visits, test_acc, ... or error
Results = dict[str, list[Result]]  # row id -> its runs
Table = tuple[list[str], list[list[str]]]  # header, rows of cells

# What each external system needs importable, and what to pip-install into its venv otherwise.
EXTERNAL = {
    "flower": {"probe": "import flwr.simulation, ray", "dist": "flwr", "requirement": "flwr[simulation]"},
    "pfl": {"probe": "import pfl.model.pytorch", "dist": "pfl", "requirement": "pfl[pytorch]"},
}

PROFILED = ("vectorized", "sequential")  # executors profiled by --profile, in this order

# Targets of issue 4 on W: (row, kind, bound). "faster": row time / fedtrust time >= bound;
# "within": fedtrust time / row time <= bound.
TARGETS = [
    ("w-flower", "faster", 10.0),
    ("w-paper", "faster", 3.0),
    ("w-pfl", "faster", 3.0),
    ("w-central-b100", "within", 2.0),
]


@dataclass(frozen=True)
class Workload:
    """A federated job, stated once and run by every system the same way.

    ``num_clients`` IID clients split the training set; ``clients_per_round`` are sampled
    each round and run ``epochs`` of SGD (``lr``, no momentum, batch ``batch_size``) from
    the global model; the server takes the sample-weighted mean. No augmentation.
    """

    name: str
    dataset: str  # a fedtrust data set name: digits, cifar10, npz (a replicated set, see client_size)
    num_clients: int
    clients_per_round: int
    rounds: int
    batch_size: int = 10
    epochs: int = 1
    lr: float = 0.05
    model: str = "cnn"
    data_root: str | None = None  # for file-based sets
    client_size: int | None = None  # set: dataset "npz" is digits repeated to num_clients x client_size images
    synthetic: bool = False  # dataset "npz" is random CIFAR-shaped images (--cifar synthetic): speed only

    @property
    def label(self) -> str:
        """One line describing the workload, for table headings."""
        return (f"{self.dataset}, {self.num_clients:,} IID clients, {self.clients_per_round} per round, "
                f"{self.rounds:,} rounds, batch {self.batch_size}, {self.epochs} local epoch, model `{self.model}`")


@dataclass(frozen=True)
class Row:
    """One line of a results table: a system run on a workload."""

    id: str  # e.g. "w-flower"; what --only matches
    part: str  # "w", "scaling" or "cifar"
    system: str  # fedtrust-vectorized, fedtrust-sequential, paper, flower, pfl, central
    label: str
    workload: Workload
    options: dict[str, Any] = field(default_factory=dict)  # e.g. the centralised batch size


def workload_w(rounds: int) -> Workload:
    """Workload W of issue 4 (``rounds`` is 200, or 20 with --quick)."""
    return Workload("W", "digits", num_clients=100, clients_per_round=10, rounds=rounds)


def scaling_workloads(quick: bool, device: str, data_dir: Path) -> list[Workload]:
    """Clients per round 10..500 at 20 images per client (1,000 clients), plus 10,000 clients x 100.

    The client is W's: digits images and the ``cnn`` model, with 20 images (two full local
    steps at batch 10) instead of ~14, the training set repeated to exactly
    ``num_clients x 20`` images and written as an ``npz`` data set under ``data_dir``
    (made by :func:`prepare_data`). Not MNIST: at 28x28 the ``cnn`` costs about eight
    times more per image, so on a 2-core CPU one round of 500 clients would take minutes
    and the sweep most of an hour; on digits the k = 10 row is directly W's round with
    20-image clients. The 10,000-client row (200,000 images, 20 each) shows memory.
    """
    rounds = 2 if quick else (3 if device == "cpu" else 10)
    size = 20
    ks = (10, 100) if quick else (10, 50, 100, 500)
    out = []
    for name, clients, per_round in [*((f"scale-k{k}", 1_000, k) for k in ks), ("scale-10k", 10_000, 100)]:
        root = data_dir / f"digits-{clients * size}"
        out.append(Workload(name, "npz", num_clients=clients, clients_per_round=per_round, rounds=rounds,
                            data_root=str(root), client_size=size))
    return out


def cifar_workload(rounds: int, source: str = "real", data_dir: Path | None = None) -> Workload | None:
    """pfl-research's CIFAR-10 benchmark shape; None where ../shared/data/cifar10 is absent.

    ``source="synthetic"``: random 32x32x3 images of the same count, written under ``data_dir``
    (a machine without ../shared, such as a lent GPU; the times hold, the accuracy means nothing).
    """
    shape = dict(num_clients=1_000, clients_per_round=50, rounds=rounds, model="cnn2")
    if source == "synthetic":
        assert data_dir is not None
        return Workload("cifar-pfl-shape", "npz", data_root=str(data_dir / "cifar-synthetic"), synthetic=True,
                        **shape)  # type: ignore[arg-type]
    if not (SHARED_DATA / "cifar10").is_dir():
        return None
    return Workload("cifar-pfl-shape", "cifar10", data_root=str(SHARED_DATA), **shape)  # type: ignore[arg-type]


def build_rows(quick: bool, device: str, cifar_rounds: int, data_dir: Path, cifar_source: str = "real") -> list[Row]:
    """Every row of the benchmark, in table order."""
    w = workload_w(20 if quick else 200)
    rows = [
        Row("w-vectorized", "w", "fedtrust-vectorized", "fedtrust vectorised", w),
        Row("w-sequential", "w", "fedtrust-sequential", "fedtrust sequential", w),
        Row("w-paper", "w", "paper", "paper-repository loop", w),
        Row("w-flower", "w", "flower", "Flower simulation (Ray)", w),
        Row("w-pfl", "w", "pfl", "pfl-research (simulated)", w),
        Row("w-central-b10", "w", "central", "centralised, batch 10", w, {"batch_size": w.batch_size}),
        Row("w-central-b100", "w", "central", "centralised, batch 100", w,
            {"batch_size": w.batch_size * w.clients_per_round}),
    ]
    for s in scaling_workloads(quick, device, data_dir):
        for ex, label in (("vectorized", "vectorised"), ("sequential", "sequential")):
            rows.append(Row(f"{s.name}-{ex}", "scaling", f"fedtrust-{ex}", label, s))
    c = cifar_workload(cifar_rounds, cifar_source, data_dir)
    if c is not None:
        rows += [Row("cifar-vectorized", "cifar", "fedtrust-vectorized", "fedtrust vectorised", c),
                 Row("cifar-sequential", "cifar", "fedtrust-sequential", "fedtrust sequential", c),
                 Row("cifar-pfl", "cifar", "pfl", "pfl-research (simulated)", c)]
    return rows


def select_rows(rows: list[Row], only: str | None) -> list[Row]:
    """Rows with a name in ``only``: the row id, its part, its workload or its system (``fedtrust-`` optional)."""
    if not only:
        return rows
    names = lambda r: {r.id, r.part, r.workload.name, r.system, r.system.removeprefix("fedtrust-")}  # noqa: E731
    wanted = {t.strip() for t in only.split(",") if t.strip()}
    unknown = wanted - set().union(*(names(r) for r in rows))
    if unknown:
        valid = sorted(set().union(*(names(r) for r in rows)))
        raise SystemExit(f"error: unknown row(s) {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
    return [r for r in rows if wanted & names(r)]


# ====================================================================== shared helpers (run inside workers)


@dataclass
class Tensors:
    """A data set as normalised float tensors (what every non-fedtrust row trains on)."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    shape: tuple[int, int, int]


def load_tensors(w: Workload, device: str | torch.device = "cpu") -> Tensors:
    """Load ``w.dataset`` with fedtrust's loader and normalise it with the data set's mean and std."""
    from fedtrust.data.augment import normalize
    from fedtrust.data.datasets import load_dataset

    ds = load_dataset(w.dataset, w.data_root)
    norm = lambda x: normalize(x, ds.mean, ds.std)  # noqa: E731
    return Tensors(norm(ds.train.x).to(device), ds.train.y.to(device), norm(ds.test.x).to(device),
                   ds.test.y.to(device), ds.num_classes, ds.shape)


def iid_split(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation of ``n`` samples cut into ``num_clients`` near-equal parts."""
    return np.array_split(np.random.default_rng(seed).permutation(n), num_clients)


def new_model(w: Workload, data: Tensors) -> nn.Module:
    """The workload's model, built with fedtrust's registry (the same network in every row)."""
    from fedtrust.models import create_model

    return create_model(w.model, data.num_classes, data.shape)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work so wall-clock readings are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    ``VmHWM`` from /proc/self/status where there is one: Linux carries ``ru_maxrss`` over
    fork and exec, so a fresh worker's ``ru_maxrss`` starts at its parent's peak (here the
    benchmark's driver). Elsewhere ``resource.getrusage(...).ru_maxrss``.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peak_mib(device: str) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB on a CUDA device, else None."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.device(device).type == "cuda" else None


def process_cache() -> types.ModuleType:
    """A namespace that lives as long as this process.

    Flower's Ray backend ships the ClientApp's functions by value on every call, so their
    module globals start empty each time; a module in ``sys.modules`` does persist in the
    actor, as a Flower user's imported ``task.py`` would.
    """
    return sys.modules.setdefault("_fedtrust_speed_cache", types.ModuleType("_fedtrust_speed_cache"))


# ====================================================================== rows: fedtrust


class LoopTimer:
    """A fedtrust callback placed first in the round loop.

    It marks the loop's start (``on_begin``) and the end of each round's training and
    aggregation: it runs before the evaluator, metrics logger and checkpointer of that
    round, so the last mark excludes the final evaluation and checkpoint. It also counts
    sample-visits (each reply's ``num_examples`` x local epochs).
    """

    def __init__(self, device: str, epochs: int) -> None:
        self.device, self.epochs = device, epochs
        self.start = math.nan
        self.ends: list[float] = []
        self.visits = 0

    def on_begin(self, start_round: int, rounds: int) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def after_round(self, report: Any) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())
        self.visits += self.epochs * sum(m.get("num_examples", 0) for m in report.reply_meta.values())

    def on_end(self) -> None: ...

    @property
    def loop_s(self) -> float:
        """Seconds from the loop's start to the end of the last round seen."""
        return self.ends[-1] - self.start if self.ends else math.nan

    @property
    def round_s(self) -> list[float]:
        """Seconds each round took."""
        marks = [self.start, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]


@contextmanager
def first_callbacks(*extra: Any) -> Iterator[None]:
    """Run fedtrust's round loop (``Executor.run``) with ``extra`` callbacks before its own."""
    from fedtrust.fl.executor import Executor

    original = Executor.run

    def run(self: Any, state: Any, store: Any, start_round: int, rounds: int, callbacks: Sequence[Any] = (),
            *args: Any, **kwargs: Any) -> Any:
        return original(self, state, store, start_round, rounds, [*extra, *callbacks], *args, **kwargs)

    Executor.run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        Executor.run = original  # type: ignore[method-assign]


def fedtrust_overrides(w: Workload, executor: str, device: str, seed: int, out: Path) -> list[str]:
    """``fedtrust run`` overrides for workload ``w``: evaluation and checkpoint only at the end."""
    overrides = [
        f"executor={executor}", f"device={device}", f"seed={seed}", f"rounds={w.rounds}", f"out={out}",
        f"data.dataset={w.dataset}", f"data.num_clients={w.num_clients}",
        f"data.clients_per_round={w.clients_per_round}", "data.partition=iid", "data.augment=none",
        f"model.name={w.model}", "algorithm.name=fedavg", "objective.name=ce",
        "train.optimizer=sgd", "train.momentum=0", "train.weight_decay=0", "train.lr_schedule=constant",
        f"train.lr={w.lr}", f"train.batch_size={w.batch_size}", f"train.epochs={w.epochs}",
        f"eval.every={w.rounds}", "eval.personalized=false", "checkpoint_every=0",
    ]
    if w.data_root:
        overrides.append(f"data.root={w.data_root}")
    return overrides


def run_fedtrust(w: Workload, executor: str, device: str, seed: int) -> Result:
    """``fedtrust.run`` as a user calls it; wall time is the whole call (data, partition, run dir, eval)."""
    import fedtrust

    timer = LoopTimer(device, w.epochs)
    with tempfile.TemporaryDirectory(prefix="fedtrust-speed-") as tmp, first_callbacks(timer):
        overrides = fedtrust_overrides(w, executor, device, seed, Path(tmp) / "run")
        sync(device)
        t0 = time.perf_counter()
        result = fedtrust.run(None, overrides, progress=False, report=False)
        sync(device)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "loop_s": timer.loop_s, "round_s": timer.round_s, "visits": timer.visits,
            "test_acc": result.summary.get("test_acc"), "executor_used": result.summary.get("executor")}


# ====================================================================== rows: paper-repository loop


def average_state_dicts(states: list[dict[str, Tensor]], weights: list[int]) -> dict[str, Tensor]:
    """Sample-weighted mean of every state_dict entry, cast back to its dtype (BN's int counter too)."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        acc = sum(s[key].double() * (n / total) for s, n in zip(states, weights))
        out[key] = acc.to(first.dtype)
    return out


def run_paper_loop(w: Workload, device: str, seed: int) -> Result:
    """FedAvg written the way the five seed repositories write it.

    Per sampled client and round: a DataLoader over a TensorDataset of that client's
    samples (kept on the CPU, batches moved to the device), ``copy.deepcopy`` of the global
    model, a new ``torch.optim.SGD``, and a deep copy of its ``state_dict``; the server
    averages the state_dicts (sample-weighted, as fedtrust's FedAvg).
    """
    from torch.utils.data import DataLoader, TensorDataset

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = load_tensors(w, "cpu")
    parts = iid_split(len(data.y), w.num_clients, seed)
    global_model = new_model(w, data).to(device)
    visits = 0
    sync(device)
    t_loop = time.perf_counter()
    for _ in range(w.rounds):
        chosen = rng.choice(w.num_clients, w.clients_per_round, replace=False)
        states, sizes = [], []
        for c in chosen:
            idx = torch.from_numpy(parts[c])
            loader = DataLoader(TensorDataset(data.x[idx], data.y[idx]), batch_size=w.batch_size, shuffle=True)
            local = copy.deepcopy(global_model)
            local.train()
            optimizer = torch.optim.SGD(local.parameters(), lr=w.lr)
            for _ in range(w.epochs):
                for xb, yb in loader:
                    xb, yb = xb.to(device), yb.to(device)
                    optimizer.zero_grad()
                    loss = F.cross_entropy(local(xb), yb)
                    loss.backward()
                    optimizer.step()
                    visits += len(yb)
            states.append(copy.deepcopy(local.state_dict()))
            sizes.append(len(idx))
        global_model.load_state_dict(average_state_dicts(states, sizes))
    sync(device)
    loop = time.perf_counter() - t_loop
    acc = accuracy(global_model, data.x_test.to(device), data.y_test.to(device))
    return {"wall_s": time.perf_counter() - t0, "loop_s": loop, "visits": visits, "test_acc": acc}


# ====================================================================== rows: centralised floor


def sample_visits(w: Workload, n_train: int) -> int:
    """Sample-visits of a federated run of ``w``: rounds x clients per round x mean client size x epochs."""
    return round(w.rounds * w.clients_per_round * n_train / w.num_clients * w.epochs)


def run_centralized(w: Workload, batch_size: int, device: str, seed: int) -> Result:
    """Plain minibatch SGD on the pooled training set for as many sample-visits as ``w`` makes.

    The fast path of a single model: tensors on the device, a permutation sliced into
    batches, no DataLoader. The floor a federated simulator can approach.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    data = load_tensors(w, device)
    model = new_model(w, data).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=w.lr)
    target = sample_visits(w, len(data.y))
    generator = torch.Generator().manual_seed(seed)
    visits = 0
    sync(device)
    t_loop = time.perf_counter()
    while visits < target:
        for idx in torch.randperm(len(data.y), generator=generator).to(device).split(batch_size):
            idx = idx[: target - visits]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            optimizer.step()
            visits += len(idx)
            if visits >= target:
                break
    sync(device)
    loop = time.perf_counter() - t_loop
    acc = accuracy(model, data.x_test, data.y_test)
    return {"wall_s": time.perf_counter() - t0, "loop_s": loop, "visits": visits, "test_acc": acc}


# ====================================================================== rows: Flower simulation


def flower_client_data(cfg: dict[str, Any]) -> tuple[Tensors, list[np.ndarray]]:
    """The data set and its IID split, loaded once per Ray actor process (like a quickstart's cached data)."""
    cache = process_cache()
    if not hasattr(cache, "flower_data"):
        w = Workload(**json.loads(cfg["workload"]))
        data = load_tensors(w, "cpu")
        cache.flower_data = (data, iid_split(len(data.y), w.num_clients, int(cfg["seed"])))
    return cache.flower_data


def flower_train(msg: Any, context: Any) -> Any:
    """The ClientApp's train handler, as in Flower's PyTorch quickstart: new model, DataLoader, new optimizer."""
    import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch in the actor's sys.modules)
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from torch.utils.data import DataLoader, TensorDataset

    cfg = dict(msg.content["config"])
    w, device = Workload(**json.loads(cfg["workload"])), str(cfg["device"])
    if int(cfg["threads"]):  # --threads; else Ray's default for the actor (OMP_NUM_THREADS = its CPUs)
        torch.set_num_threads(int(cfg["threads"]))
    data, parts = flower_client_data(cfg)
    idx = torch.from_numpy(parts[int(context.node_config["partition-id"])])
    model = new_model(w, data).to(device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    loader = DataLoader(TensorDataset(data.x[idx], data.y[idx]), batch_size=w.batch_size, shuffle=True)
    total, count = 0.0, 0
    for _ in range(w.epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss) * len(yb), count + len(yb)
    metrics = MetricRecord({"train_loss": total / max(count, 1), "num-examples": len(idx)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


def run_flower(w: Workload, device: str, seed: int, threads: int = 0) -> Result:
    """Flower's simulation engine: ``run_simulation`` with the Ray backend and the Message API.

    A ServerApp runs the built-in ``FedAvg`` strategy (fraction_train = per round / clients,
    no federated evaluation, a centralised ``evaluate_fn`` after the last round only); a
    ClientApp trains like the PyTorch quickstart (DataLoader, fresh optimizer). Client
    resources are Flower's defaults (2 CPUs per client), plus 0.2 GPU per client on CUDA.
    Wall time is data loading plus the ``run_simulation`` call (Ray start and stop included);
    the loop runs from ``strategy.start`` to the final round's ``evaluate_fn`` call.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    t0 = time.perf_counter()
    random.seed(seed)  # Flower samples nodes with Python's random
    torch.manual_seed(seed)
    np.random.seed(seed)
    data = load_tensors(w, device)
    marks: dict[str, Any] = {"visits": 0}

    client_app = ClientApp()
    client_app.train()(flower_train)

    def count_visits(records: list[Any], weighting_key: str) -> Any:
        n = [int(r["metrics"]["num-examples"]) for r in records]
        marks["visits"] += w.epochs * sum(n)
        loss = sum(int(k) * float(r["metrics"]["train_loss"]) for k, r in zip(n, records)) / max(sum(n), 1)
        return MetricRecord({"train_loss": loss})

    def evaluate(server_round: int, arrays: Any) -> Any:
        if server_round != w.rounds:
            return None
        marks["loop_end"] = time.perf_counter()
        model = new_model(w, data).to(device)
        model.load_state_dict(arrays.to_torch_state_dict())
        marks["test_acc"] = accuracy(model, data.x_test, data.y_test)
        return MetricRecord({"accuracy": marks["test_acc"]})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=w.clients_per_round / w.num_clients, fraction_evaluate=0.0,
                          min_train_nodes=w.clients_per_round, min_available_nodes=w.num_clients,
                          train_metrics_aggr_fn=count_visits)
        config = ConfigRecord({"lr": w.lr, "device": device, "seed": seed, "threads": threads,
                               "workload": json.dumps(asdict(w))})
        marks["loop_start"] = time.perf_counter()
        strategy.start(grid=grid, initial_arrays=ArrayRecord(new_model(w, data).state_dict()),
                       num_rounds=w.rounds, train_config=config, evaluate_fn=evaluate)

    resources: dict[str, Any] = {"num_cpus": 2, "num_gpus": 0.2 if device.startswith("cuda") else 0.0}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=w.num_clients,
                   backend_config={"client_resources": resources})
    wall = time.perf_counter() - t0
    if "loop_end" not in marks:
        raise RuntimeError("Flower run ended before its last round (see the log above)")
    return {"wall_s": wall, "loop_s": marks["loop_end"] - marks["loop_start"], "visits": marks["visits"],
            "test_acc": marks.get("test_acc")}


# ====================================================================== rows: pfl-research


class PflNet(nn.Module):
    """The workload's network with the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.visits = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, x: Tensor, y: Tensor, eval: bool = False) -> Tensor:  # noqa: A002  (pfl's keyword)
        self.eval() if eval else self.train()
        self.visits += 0 if eval else len(y)
        return F.cross_entropy(self.net(x), y)

    @torch.no_grad()
    def metrics(self, x: Tensor, y: Tensor, eval: bool = True) -> dict[str, Any]:  # noqa: A002
        from pfl.metrics import Weighted

        self.eval()
        logits = self.net(x)
        return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), len(y)),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), len(y))}


def run_pfl(w: Workload, device: str, seed: int) -> Result:
    """pfl-research's simulated backend: ``FederatedAveraging`` over a ``PyTorchModel``.

    Users are ``FederatedDataset.from_slices`` of the same IID split, drawn by pfl's
    ``minimize_reuse`` sampler (each cohort distinct users, cycling through all); updates
    are weighted by data points; the central optimizer is SGD with lr 1 on the averaged
    model difference (= FedAvg). pfl federates trainable parameters only: BN running
    statistics stay in the one simulated module. pfl evaluates each user before and after
    local training at central iteration 0 (its evaluation frequency cannot skip it).
    Wall time is data setup + ``algorithm.run`` + the final test evaluation.
    """
    os.environ["PFL_PYTORCH_DEVICE"] = device
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    class Timer(TrainingProcessCallback):
        """Marks the start of training and the end of each central iteration."""

        def __init__(self) -> None:
            self.start = math.nan
            self.ends: list[float] = []

        def on_train_begin(self, *, model: Any) -> Any:
            sync(device)
            self.start = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics: Any, model: Any, *, central_iteration: int) -> Any:
            sync(device)
            self.ends.append(time.perf_counter())
            return False, Metrics()

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    data = load_tensors(w, device)
    parts = iid_split(len(data.y), w.num_clients, seed)
    users = {u: (data.x[torch.from_numpy(p).to(device)], data.y[torch.from_numpy(p).to(device)])
             for u, p in enumerate(parts)}
    train_data = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", list(users)))
    net = PflNet(new_model(w, data)).to(device)
    model = PyTorchModel(net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=train_data, val_data=train_data,
                               postprocessors=[WeightByDatapoints()])
    params = NNAlgorithmParams(central_num_iterations=w.rounds, evaluation_frequency=w.rounds,
                               train_cohort_size=w.clients_per_round, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_learning_rate=w.lr, local_num_epochs=w.epochs,
                                      local_batch_size=w.batch_size)
    timer = Timer()
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model,
                             model_train_params=train_params,
                             model_eval_params=NNEvalHyperParams(local_batch_size=1024), callbacks=[timer])
    acc = accuracy(net.net, data.x_test, data.y_test)
    marks = [timer.start, *timer.ends]
    return {"wall_s": time.perf_counter() - t0, "loop_s": timer.ends[-1] - timer.start,
            "round_s": [b - a for a, b in zip(marks, marks[1:])], "visits": net.visits, "test_acc": acc}


# ====================================================================== profile (where the time goes)


class ProfileWindow:
    """A fedtrust callback that profiles rounds ``warmup+1 .. warmup+rounds`` (torch.profiler + cProfile)."""

    def __init__(self, warmup: int, rounds: int, device: str) -> None:
        import cProfile

        self.warmup, self.rounds, self.device = warmup, rounds, device
        self.cprofile = cProfile.Profile()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.torch_profiler = torch.profiler.profile(activities=activities)
        self.seconds = math.nan
        self._t0 = math.nan

    def on_begin(self, start_round: int, rounds: int) -> None:
        if self.warmup == 0:
            self._start()

    def after_round(self, report: Any) -> None:
        if report.round == self.warmup:
            self._start()
        elif report.round == self.warmup + self.rounds:
            sync(self.device)
            self.cprofile.disable()
            self.torch_profiler.stop()
            self.seconds = time.perf_counter() - self._t0

    def on_end(self) -> None: ...

    def _start(self) -> None:
        sync(self.device)
        self.torch_profiler.start()
        self.cprofile.enable()
        self._t0 = time.perf_counter()


def run_profile(w: Workload, executor: str, device: str, seed: int, rounds: int = 5, warmup: int = 2) -> Result:
    """Profile ``rounds`` steady-state rounds of fedtrust's ``executor`` on ``w`` (after ``warmup`` rounds)."""
    import pstats

    import fedtrust

    window = ProfileWindow(warmup, rounds, device)
    run_w = replace(w, rounds=warmup + rounds)
    with tempfile.TemporaryDirectory(prefix="fedtrust-speed-") as tmp, first_callbacks(window):
        fedtrust.run(None, fedtrust_overrides(run_w, executor, device, seed, Path(tmp) / "run"),
                     progress=False, report=False)
    sort = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    ops = window.torch_profiler.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=48)
    stats = pstats.Stats(window.cprofile)
    python_rows = []
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = func if path == "~" else f"{_short_path(path)}:{line}({func})"
        python_rows.append({"function": where, "calls": ncalls, "self_s": tottime, "cum_s": cumtime})
    python_rows.sort(key=lambda r: r["self_s"], reverse=True)
    return {"profiled_rounds": rounds, "warmup_rounds": warmup, "profiled_s": window.seconds,
            "torch_ops_table": ops, "python_top": python_rows[:20]}


def _short_path(path: str) -> str:
    """A source path shortened to its package-relative part, for the profile table."""
    for marker in ("site-packages/", "src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return Path(path).name


# ====================================================================== worker: one measurement, one process


def preimport() -> None:
    """Import what the rows share before any clock starts, so no row's wall time holds imports.

    fedtrust's ``run`` imports its runner lazily and digits come through scikit-learn; Flower
    and pfl import their own modules before their clocks start.
    """
    import fedtrust.runner.run  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import sklearn.model_selection  # noqa: F401

    import fedtrust.data.datasets  # noqa: F401
    import fedtrust.models  # noqa: F401


def worker(spec: dict[str, Any]) -> None:
    """Run one measurement and print its result as one JSON line after ``RESULT_MARK``."""
    w = Workload(**spec["workload"])
    system, device, seed = spec["system"], spec["device"], spec["seed"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rss_before = rss_mib()
    preimport()
    load_start = os.getloadavg()[0]
    if system.startswith("fedtrust-"):
        out = run_fedtrust(w, system.removeprefix("fedtrust-"), device, seed)
    elif system == "paper":
        out = run_paper_loop(w, device, seed)
    elif system == "central":
        out = run_centralized(w, int(spec["options"]["batch_size"]), device, seed)
    elif system == "flower":
        out = run_flower(w, device, seed, int(spec.get("threads") or 0))
    elif system == "pfl":
        out = run_pfl(w, device, seed)
    elif system.startswith("profile-"):
        out = run_profile(w, system.removeprefix("profile-"), device, seed)
    else:
        raise SystemExit(f"unknown system {system!r}")
    out.update(rss_before_mib=rss_before, peak_rss_mib=rss_mib(), cuda_peak_mib=cuda_peak_mib(device),
               load_avg=[load_start, os.getloadavg()[0]], torch_threads=torch.get_num_threads())
    print(RESULT_MARK + json.dumps(out), flush=True)


# ====================================================================== orchestration (parent process)


def can_import(python: str, probe: str) -> bool:
    """Whether ``python -c probe`` succeeds."""
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=300).returncode == 0


def dist_version(python: str, dist: str) -> str | None:
    """``importlib.metadata.version(dist)`` as seen by ``python``."""
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return r.stdout.strip() if r.returncode == 0 else None


def find_python(system: str) -> tuple[str | None, str]:
    """An interpreter that can already run ``system`` (this one, else its venv), without installing."""
    spec = EXTERNAL.get(system)
    if spec is None or can_import(sys.executable, spec["probe"]):
        return sys.executable, "this Python"
    venv = VENVS_DIR / system
    python = str(venv / "bin" / "python")
    if Path(python).exists() and can_import(python, spec["probe"]):
        return python, f"venv {venv.relative_to(REPO)}"
    return None, f"{spec['dist']} is not importable"


def resolve_python(system: str, install: bool, install_timeout: int) -> tuple[str | None, str]:
    """The interpreter that runs ``system``'s rows and where it came from (or None and why not).

    Where neither this Python nor ``benchmarks/.venvs/SYSTEM`` can import it, that venv is
    created with ``--system-site-packages`` (so it sees torch and fedtrust) and the
    system's package is pip-installed into it, within ``install_timeout`` seconds.
    """
    python, where = find_python(system)
    if python is not None:
        return python, where
    spec = EXTERNAL[system]
    if not install:
        return None, f"{where} and installing was not allowed (--no-install)"
    venv = VENVS_DIR / system
    python = str(venv / "bin" / "python")
    print(f"installing {spec['requirement']} into {venv.relative_to(REPO)} (up to {install_timeout} s) ...",
          flush=True)
    try:
        if not Path(python).exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                           capture_output=True, timeout=300)
        r = subprocess.run([python, "-m", "pip", "install", "-q", spec["requirement"]], capture_output=True,
                           text=True, timeout=install_timeout)
    except subprocess.TimeoutExpired:
        return None, f"installing {spec['requirement']} took over {install_timeout} s"
    except subprocess.CalledProcessError as e:
        return None, f"creating the venv failed: {e}"
    if r.returncode != 0 or not can_import(python, spec["probe"]):
        return None, f"pip install {spec['requirement']} failed: {(r.stderr or '').strip().splitlines()[-1:]}"
    return python, f"venv {venv.relative_to(REPO)} (installed now)"


def measure(python: str, spec: dict[str, Any], timeout: int, log_path: Path) -> Result:
    """Run one worker process; its output goes to ``log_path``. Returns its result or an error."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", RAY_DEDUP_LOGS="0")
    if spec.get("threads"):
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    with open(log_path, "w") as log:
        # its own session and process group, so a timeout or Ctrl-C ends the worker and its children
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"timed out after {timeout} s"}
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.write(stdout)
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = [ln for ln in log_path.read_text().splitlines() if ln.strip()][-3:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)[-400:]}


def replicated_digits(folder: Path, num_images: int) -> None:
    """Write digits' training set repeated and cut to ``num_images`` images, and its test set, as npz."""
    from fedtrust.data.datasets import load_digits

    ds = load_digits()
    copies = math.ceil(num_images / len(ds.train))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=ds.train.x.repeat(copies, 1, 1, 1)[:num_images].numpy(),
             y=ds.train.y.repeat(copies)[:num_images].numpy())
    np.savez(folder / "test.npz", x=ds.test.x.numpy(), y=ds.test.y.numpy())


def synthetic_cifar(folder: Path, seed: int = 0) -> None:
    """CIFAR-10's shape as npz: 50,000 training and 10,000 test images of uniform noise, 10 labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 50_000), ("test", 10_000)):
        np.savez(folder / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, n).astype(np.int64))


def prepare_data(rows: list[Row]) -> None:
    """Write the replicated sets and load each data set once, untimed (CIFAR decodes its JPEGs to a cache)."""
    from fedtrust.data.datasets import load_dataset

    for w in {r.workload for r in rows}:
        if w.synthetic and not (Path(str(w.data_root)) / "train.npz").exists():
            synthetic_cifar(Path(str(w.data_root)))
        elif w.client_size and not (Path(str(w.data_root)) / "train.npz").exists():
            replicated_digits(Path(str(w.data_root)), w.num_clients * w.client_size)
    for dataset, root in sorted({(r.workload.dataset, r.workload.data_root) for r in rows}, key=str):
        t = time.perf_counter()
        load_dataset(dataset, root)
        print(f"data {dataset}{f' ({root})' if root else ''}: ready ({time.perf_counter() - t:.1f} s)", flush=True)


def run_all(rows: list[Row], pythons: dict[str, str | None], repeats: int, device: str, seed: int,
            threads: int | None, timeout: int, log_dir: Path) -> Results:
    """Measure every row ``repeats`` times, interleaved; returns the raw results per row id."""
    results: Results = {r.id: [] for r in rows}
    runnable = [r for r in rows if pythons.get(r.system, sys.executable)]
    total, done = repeats * len(runnable), 0
    for rep in range(repeats):
        for row in runnable:
            done += 1
            spec = {"system": row.system, "workload": asdict(row.workload), "device": device, "seed": seed,
                    "threads": threads, "options": row.options}
            res = measure(pythons.get(row.system) or sys.executable, spec, timeout,
                          log_dir / f"{row.id}-{rep + 1}.log")
            results[row.id].append(res)
            status = res["error"] if "error" in res else \
                f"wall {res['wall_s']:.1f} s, loop {res['loop_s']:.1f} s, acc {res.get('test_acc') or 0:.3f}"
            print(f"[{done}/{total}] {row.id} (run {rep + 1}): {status}", flush=True)
    return results


# ====================================================================== statistics and formatting


@dataclass
class Stat:
    """Median, min and max of one quantity over the repeats."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat | None:
        """The statistics of ``values``, ignoring None and NaN; None when nothing is left."""
        v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
        return cls(statistics.median(v), min(v), max(v), len(v)) if v else None

    def fmt(self, digits: int = 2, spread: bool = True) -> str:
        """``"median (min–max)"``, or the median alone for one run or ``spread=False``."""
        text = _num(self.median, digits)
        if spread and self.n > 1:
            text += f" ({_num(self.low, digits)}–{_num(self.high, digits)})"
        return text


def _num(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals below 100, fewer above, thousands separators above 1,000."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.{max(digits - 2, 0)}f}"
    return f"{x:.{digits}f}"


def ok(results: list[Result]) -> list[Result]:
    """The runs that produced a result (no ``error``)."""
    return [r for r in results if "error" not in r]


def stat(results: list[Result], key: str | Callable[[Result], float | None]) -> Stat | None:
    """Median, min and max of ``key`` (a result field, or a function of a result) over the good runs."""
    get = key if callable(key) else (lambda r: r.get(key))
    return Stat.of([get(r) for r in ok(results)])


def steady_round_s(r: Result) -> float | None:
    """Median round time after the first (warm-up) round; the only round when there is one."""
    rounds = r.get("round_s") or []
    if not rounds:
        return None
    return statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]


def with_failures(label: str, results: list[Result]) -> str:
    """``label``, marked when some (not all) of its runs failed; the JSON file keeps their errors."""
    bad = len(results) - len(ok(results))
    return f"{label} ({bad} of {len(results)} runs failed)" if bad and len(ok(results)) else label


def failure(results: list[Result], reason: str | None) -> str | None:
    """Why a row has no number: not run (reason), or every run failed (the first error)."""
    if reason:
        return reason
    if results and not ok(results):
        return results[0]["error"]
    return None


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """The same table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console(width=200).print(table)


# ====================================================================== tables


def table_w(rows: list[Row], res: Results, why: dict[str, str]) -> Table:
    """Workload W: wall, in-loop, samples/s, accuracy, ratios to fedtrust vectorised."""
    header = ["row", "wall (s)", "in-loop (s)", "samples/s (in-loop)", "test acc", "wall ÷ vectorised",
              "in-loop ÷ vectorised"]
    base_wall, base_loop = stat(res.get("w-vectorized", []), "wall_s"), stat(res.get("w-vectorized", []), "loop_s")
    out = []
    for r in (r for r in rows if r.part == "w"):
        results = res.get(r.id, [])
        fail = failure(results, why.get(r.id))
        if fail or not ok(results):
            out.append([r.label, f"not run: {fail}" if fail else "—", "", "", "", "", ""])
            continue
        wall, loop = stat(results, "wall_s"), stat(results, "loop_s")
        rate = stat(results, lambda x: x["visits"] / x["loop_s"])
        acc = stat(results, "test_acc")
        ratio = lambda s, b: f"{s.median / b.median:.2f}×" if s and b else "—"  # noqa: E731
        out.append([with_failures(r.label, results), wall.fmt(1), loop.fmt(1), rate.fmt(0),
                    acc.fmt(3, spread=False) if acc else "—",
                    ratio(wall, base_wall), ratio(loop, base_loop)])
    return header, out


def table_targets(res: Results, why: dict[str, str]) -> Table:
    """Issue 4's targets on W, met or missed and by how much: for fedtrust vectorised (the issue's
    reference, and what ``executor=auto`` picks for W) on wall and in-loop time, and for fedtrust
    sequential on in-loop time."""
    header = ["target (speed-up = row's time ÷ fedtrust's time)", "vectorised, wall time",
              "vectorised, in-loop time", "sequential, in-loop time"]
    names = {"w-flower": "Flower", "w-paper": "the paper-repository loop", "w-pfl": "pfl-research",
             "w-central-b100": "centralised training at batch 100"}
    out = []
    for row_id, kind, bound in TARGETS:
        goal = (f"fedtrust ≥ {bound:g}× faster than {names[row_id]}" if kind == "faster"
                else f"fedtrust within {bound:g}× of {names[row_id]}")
        cells = []
        for base_id, key in (("w-vectorized", "wall_s"), ("w-vectorized", "loop_s"), ("w-sequential", "loop_s")):
            a, b = stat(res.get(row_id, []), key), stat(res.get(base_id, []), key)
            if a is None or b is None:
                cells.append(f"not measured ({failure(res.get(row_id, []), why.get(row_id)) or 'row not run'})"
                             if b is not None else f"not measured ({base_id} row missing)")
                continue
            if kind == "faster":
                x = a.median / b.median
                verdict = "met" if x >= bound else f"MISSED, {bound / x:.2f}× short of {bound:g}×"
                cells.append(f"speed-up {x:.2f}×: {verdict}")
            else:
                x = b.median / a.median
                verdict = "met" if x <= bound else f"MISSED, {x / bound:.2f}× over the {bound:g}× bound"
                cells.append(f"takes {x:.2f}× as long: {verdict}")
        out.append([goal, *cells])
    return header, out


def table_scaling(rows: list[Row], res: Results, device: str) -> Table:
    """Per-round time and peak memory of both executors as clients per round grow."""
    header = ["clients / per round / client size", "fedtrust executor", "time per round (s)", "first round (s)",
              "samples/s", "vectorised speed-up", "peak RSS (MiB)", "RSS before the run (MiB)"]
    if device.startswith("cuda"):
        header.append("peak CUDA alloc (MiB)")
    out = []
    for r in (r for r in rows if r.part == "scaling"):
        w, results = r.workload, res.get(r.id, [])
        size = f"{w.num_clients:,} / {w.clients_per_round} / {_client_size(w)}"
        if not ok(results):
            out.append([size, r.label, f"failed: {failure(results, None)}"] + [""] * (len(header) - 3))
            continue
        per_round = stat(results, steady_round_s)
        first = stat(results, lambda x: (x.get("round_s") or [None])[0])
        visits_per_round = stat(results, lambda x: x["visits"] / w.rounds)
        other = res.get(r.id.replace("vectorized", "sequential"), []) if "vectorized" in r.id else []
        seq = stat(other, steady_round_s)
        speedup = f"{seq.median / per_round.median:.2f}×" if seq and per_round else ""
        cells = [size, with_failures(r.label, results), per_round.fmt(3), first.fmt(3, spread=False),
                 f"{visits_per_round.median / per_round.median:,.0f}", speedup,
                 stat(results, "peak_rss_mib").fmt(0), stat(results, "rss_before_mib").fmt(0, spread=False)]
        if device.startswith("cuda"):
            peak = stat(results, "cuda_peak_mib")
            cells.append(peak.fmt(0) if peak else "—")
        out.append(cells)
    return header, out


def table_cifar(rows: list[Row], res: Results, why: dict[str, str]) -> Table:
    """pfl-research's CIFAR-10 shape: time per round, in-loop and wall time, 1,500-round extrapolation."""
    header = ["row", "rounds run", "time per round (s)", "in-loop (s)", "wall (s)", "1,500 rounds at this rate (h)",
              "test acc", "peak RSS (MiB)"]
    out = []
    for r in (r for r in rows if r.part == "cifar"):
        results = res.get(r.id, [])
        fail = failure(results, why.get(r.id))
        if fail or not ok(results):
            out.append([r.label, f"not run: {fail}" if fail else "—"] + [""] * (len(header) - 2))
            continue
        per_round = stat(results, steady_round_s)
        out.append([with_failures(r.label, results), str(r.workload.rounds), per_round.fmt(3),
                    stat(results, "loop_s").fmt(1),
                    stat(results, "wall_s").fmt(1), f"{per_round.median * 1500 / 3600:.2f}",
                    stat(results, "test_acc").fmt(3, spread=False), stat(results, "peak_rss_mib").fmt(0)])
    return header, out


def _plural(n: int, word: str) -> str:
    """``"1 round"``, ``"5 rounds"``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _client_size(w: Workload) -> str:
    """Images per client of ``w`` (mean for an even split of a standard set)."""
    if w.client_size:
        return str(w.client_size)
    n = 50_000 if w.synthetic else {"mnist": 60_000, "digits": 1_437, "cifar10": 50_000}.get(w.dataset)
    return f"{n / w.num_clients:.4g}" if n else "?"


# ====================================================================== results file


def machine_info(device: str, threads: int | None, pythons: dict[str, str | None]) -> dict[str, Any]:
    """CPU, cores, memory, accelerator and versions, for the results header."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
                 platform.processor() or "unknown")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kib = next((int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal")), 0)
    info = {
        "cpu": model, "logical_cores": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
        "memory_gib": round(mem_kib / 2**20, 1), "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "fedtrust": dist_version(sys.executable, "fedtrust"), "os": platform.platform(),
        "git": _git_revision(),
    }
    for system, spec in EXTERNAL.items():
        python = pythons[system] if system in pythons else find_python(system)[0]
        info[spec["dist"]] = dist_version(python, spec["dist"]) if python else None
        if system == "flower" and python:
            info["ray"] = dist_version(python, "ray")
    return info


def _git_revision() -> str | None:
    """``git describe --always --dirty`` of the checkout, if it is one."""
    r = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return r.stdout.strip() or None


def load_range(res: Results) -> tuple[float, float] | None:
    """Lowest and highest 1-minute load average seen at the start and end of the runs."""
    loads = [x for rs in res.values() for r in ok(rs) for x in r.get("load_avg", [])]
    return (min(loads), max(loads)) if loads else None


MEASURES = """\
- **wall (s)**: the system's whole run as a user starts it, in a fresh process after imports: data
  loading and partitioning, model building, the rounds, the final test evaluation (for Flower also
  Ray's start and stop).
- **in-loop (s)**: the round loop only, from its first round's start to the end of the last round's
  aggregation, before the final evaluation. fedtrust: a callback placed first in `Executor.run`'s
  callbacks (so it runs before that round's evaluation and metrics write); paper loop and centralised:
  around the loop; Flower: from `strategy.start` to the last round's `evaluate_fn` call; pfl: a
  callback from `on_train_begin` to the last `after_central_iteration`.
- **samples/s**: sample-visits (images passed through a training step; each client's images × local
  epochs, summed over the sampled clients and rounds) ÷ in-loop time.
- **test acc**: accuracy of the final global model on the test split, computed by the same code for
  every non-fedtrust row (fedtrust: its own evaluation).
- **fedtrust vectorised / sequential**: `fedtrust.run(None, overrides, progress=False, report=False)`
  with `executor=vectorized|sequential`, `data.partition=iid`, `train.momentum=0`,
  `train.lr_schedule=constant`, `data.augment=none`, evaluation only after the last round
  (`eval.every=ROUNDS`, `eval.personalized=false`) and `checkpoint_every=0` (one checkpoint at the end).
- **paper-repository loop**: FedAvg written here as the five seed repositories write it: per sampled
  client and round a `DataLoader` over a `TensorDataset` of the client's images (shuffled),
  `copy.deepcopy` of the global model, a new `torch.optim.SGD`, a deep-copied `state_dict`; the
  server averages the state_dicts (sample-weighted). Only fedtrust's data loader and model builder are used.
- **Flower simulation (Ray)**: `flwr.simulation.run_simulation` with the Ray backend and default client
  resources (2 CPUs per virtual client, so one client at a time on 2 cores; 0.2 GPU on CUDA), a
  Message-API `ServerApp` running the built-in `FedAvg` (10 of 100 virtual clients per round, no
  federated evaluation) and a quickstart-style `ClientApp` (new model, DataLoader, new optimizer per
  call); data loaded once per Ray actor; `--threads` also sets the actors' torch threads.
- **pfl-research (simulated)**: `FederatedAveraging` on `SimulatedBackend` over a `PyTorchModel` of the
  same network, users from `FederatedDataset.from_slices` (IID split, `minimize_reuse` sampling),
  updates weighted by data points, central SGD with lr 1. pfl averages trainable parameters only (BN
  running statistics stay in the single simulated module) and does not shuffle a user's data.
- **centralised, batch B**: plain SGD on the pooled training set (tensors in memory, a permutation
  sliced into batches) for the same number of sample-visits as the federated run
  (rounds × clients per round × mean client size); batch 100 = clients per round × local batch, the
  effective batch of one vectorised step.
- **scaling**: `time per round` is the median of each run's round times after its first round
  (which includes one-off warm-up, shown separately); `samples/s` = sample-visits per round ÷ time per
  round. `peak RSS` is the peak resident memory of the run's process (`VmHWM`; Linux's `ru_maxrss`
  would carry over the driver's peak into a fresh worker), data and imports included; `RSS before the
  run` is the same after importing torch. On CUDA, `peak CUDA alloc` is `torch.cuda.max_memory_allocated`.
"""


def write_results(path: Path, args: argparse.Namespace, rows: list[Row], res: Results,
                  why: dict[str, str], info: dict[str, Any], tables: dict[str, Table],
                  profile: dict[str, Result] | None, started: str, elapsed: float) -> None:
    """Write the Markdown results file and its machine-readable JSON twin."""
    command = "python benchmarks/speed.py" + ("" if not args.argv else " " + shlex.join(args.argv))
    loads = load_range(res)
    lines = [
        "# fedtrust speed benchmark",
        "",
        f"Reproduce: `{command}` (from the repository root; "
        f"`--repeats {args.repeats}`, device `{args.device}`{', quick mode' if args.quick else ''}).",
        "",
        f"- Date: {started} (took {elapsed / 60:.1f} min); code: `{info['git']}`",
        f"- Machine: {info['cpu']}, {info['logical_cores']} logical cores, {info['memory_gib']} GiB RAM; "
        f"torch uses {info['torch_threads']} thread{'s' if info['torch_threads'] != 1 else ''} per process"
        f"{' (--threads)' if args.threads else ''}; {info['os']}",
        f"- Device: {args.device}" + (f" ({info['gpu']})" if info.get("gpu") else ""),
        f"- Versions: Python {info['python']}, torch {info['torch']}, fedtrust {info['fedtrust']}, "
        f"flwr {info.get('flwr') or 'n/a'} (ray {info.get('ray') or 'n/a'}), pfl {info.get('pfl') or 'n/a'}",
        f"- Numbers: median of {args.repeats} run(s), (min–max) in brackets; every run in a fresh process, "
        f"repeats interleaved across rows.",
    ]
    if loads:
        lines.append(f"- 1-minute load average during the runs: {loads[0]:.1f}–{loads[1]:.1f} "
                     f"(on {info['logical_cores']} cores; above the core count the timings are noisy)")
    lines.append("")
    w = next((r.workload for r in rows if r.part == "w"), None)
    if "w" in tables and w is not None:
        lines += [f"## 1. Workload W: FedAvg, {w.label}, SGD lr {w.lr}, no momentum", "",
                  md_table(*tables["w"]), "", "### Targets (issue 4, on this machine)", "",
                  md_table(*tables["targets"]), ""]
        missed = any("MISSED" in c for row in tables["targets"][1] for c in row)
        if missed and profile is None:
            lines += ["A target is missed: run with `--profile` to add where the time goes.", ""]
    if "scaling" in tables:
        s = next(r.workload for r in rows if r.part == "scaling")
        lines += ["## 2. Scaling: time per round as clients per round grow", "",
                  f"W's clients, more of them: digits 8×8 repeated to exactly clients × {s.client_size} images "
                  f"(IID, {s.client_size} images per client), batch {s.batch_size}, {s.epochs} local epoch, "
                  f"SGD lr {s.lr}, model `{s.model}`, {s.rounds} rounds per run. Not MNIST: at 28×28 the model "
                  "costs about 8× more per image, and one 500-client round would take minutes on 2 CPU cores.", "",
                  md_table(*tables["scaling"]), ""]
    if "cifar" in tables:
        c = next(r.workload for r in rows if r.part == "cifar")
        lines += ["## 2b. pfl-research's CIFAR-10 benchmark shape", "",
                  ("Synthetic CIFAR-10 (`--cifar synthetic`: uniform-noise 32×32×3 images, 50,000 + 10,000; "
                   "times as for CIFAR-10, the accuracy is chance)" if c.synthetic
                   else "CIFAR-10 (the JPEG copy in ../shared/data)") + f", {c.num_clients:,} IID clients × "
                  f"{_client_size(c)} images, {c.clients_per_round} per round, batch {c.batch_size}, "
                  f"{c.epochs} local epoch, SGD lr {c.lr}, model `{c.model}`, no augmentation. "
                  f"{_plural(c.rounds, 'round')} per run (`--rounds`); the 1,500-round column extrapolates the "
                  f"time per round to pfl's full run, and the accuracy after so few rounds means little.", "",
                  md_table(*tables["cifar"]), ""]
    for executor, prof in (profile or {}).items():
        lines += profile_section(executor, prof)
    if not args.quick and not args.only and args.device == "cpu":  # the analysis reads the full CPU run
        lines = [*with_analysis(lines, ANALYSIS), ""]
    lines += ["## What each row measures", "", MEASURES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    payload = {"command": command, "date": started, "elapsed_s": elapsed, "machine": info,
               "repeats": args.repeats, "device": args.device, "quick": args.quick,
               "rows": [{**asdict(r), "not_run": why.get(r.id), "runs": res.get(r.id, [])} for r in rows],
               "profile": profile}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))


def profile_section(executor: str, profile: dict[str, Any]) -> list[str]:
    """The "where the time goes" section of one executor from its profile worker's result."""
    title = f"## Where the time goes (fedtrust {executor} on W)"
    if "error" in profile:
        return [title, "", f"Profiling failed: {profile['error']}", ""]
    total = profile["profiled_s"]
    rows = [[f"`{p['function']}`", str(p["calls"]), f"{p['self_s']:.3f}", f"{100 * p['self_s'] / total:.1f}%",
             f"{p['cum_s']:.3f}"] for p in profile["python_top"][:15]]
    return [
        title, "",
        f"{profile['profiled_rounds']} rounds after {profile['warmup_rounds']} warm-up rounds, "
        f"{total:.2f} s profiled ({total / profile['profiled_rounds']:.3f} s per round, profiler overhead "
        "included). Top torch operators by self time (torch.profiler):", "",
        "```", profile["torch_ops_table"].rstrip(), "```", "",
        "Top Python functions by own time (cProfile; torch operators appear as built-in methods):", "",
        md_table(["function", "calls", "own (s)", "share", "cumulative (s)"], rows), "",
    ]


# ====================================================================== main


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options, with the defaults that depend on --quick, --device and --only filled in."""
    p = argparse.ArgumentParser(description="fedtrust speed benchmark (issue 4); see the module docstring.")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 20 rounds on W, 1 repeat, a trimmed scaling sweep, 1 CIFAR round")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per row; the tables show medians (default 3; 1 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of the CIFAR-10 pfl-shape rows (default 5 on CPU, 1500 on CUDA, 1 with --quick)")
    p.add_argument("--only", default=None,
                   help="comma-separated row ids (w-flower), parts (w, scaling, cifar), workloads (scale-k100) "
                        "or systems (vectorized, sequential, paper, flower, pfl, central)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device for every row")
    p.add_argument("--cifar", default="real", choices=["real", "synthetic"],
                   help="data of the CIFAR-10 pfl-shape rows: ../shared/data/cifar10, or random images of its "
                        "shape (a machine without ../shared; times only)")
    p.add_argument("--profile", action="store_true",
                   help="also profile fedtrust vectorised and sequential on W (where the time goes)")
    p.add_argument("--no-install", action="store_true",
                   help="skip Flower/pfl rows instead of installing them into venvs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: torch's own choice, one per core); "
                        "1 avoids thread thrashing on a machine shared with other jobs")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (model, split, sampling); same in repeats")
    p.add_argument("--timeout", type=int, default=None,
                   help="seconds per run before it is killed (default 3600; 600 with --quick)")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default benchmarks/results/speed.md; speed-quick.md with --quick, "
                        "speed-partial.md with --only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.rounds is None:
        args.rounds = 1 if args.quick else (1500 if args.device == "cuda" else 5)
    if args.timeout is None:
        args.timeout = 600 if args.quick else 3600
    if args.out is None:  # a smoke test or a partial run never overwrites the full results
        name = "speed-quick.md" if args.quick else "speed-partial.md" if args.only else "speed.md"
        args.out = RESULTS_DIR / name
    if args.repeats < 1 or args.rounds < 1:
        p.error("--repeats and --rounds must be at least 1")
    return args


def main(argv: list[str]) -> int:
    """Resolve interpreters, prepare data, measure every selected row, print and write the results."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtrust-speed-") as tmp:
        rows = select_rows(build_rows(args.quick, args.device, args.rounds, Path(tmp) / "data", args.cifar),
                           args.only)

        # -- which Python runs each system (Flower and pfl may need their own venvs)
        pythons: dict[str, str | None] = {}
        why: dict[str, str] = {}
        for system in sorted({r.system for r in rows} & set(EXTERNAL)):
            pythons[system], where = resolve_python(system, not args.no_install, 180 if args.quick else 1200)
            print(f"{system}: {where}", flush=True)
            if pythons[system] is None:
                why.update({r.id: where for r in rows if r.system == system})
        prepare_data(rows)

        # -- measure (worker logs go to $FEDTRUST_SPEED_LOGS when set, else they are dropped at the end)
        log_dir = Path(os.environ.get("FEDTRUST_SPEED_LOGS") or Path(tmp) / "logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        res = run_all(rows, pythons, args.repeats, args.device, args.seed, args.threads, args.timeout, log_dir)
        profile: dict[str, Result] | None = None
        if args.profile:
            profile = {}
            for executor in PROFILED:
                spec = {"system": f"profile-{executor}", "workload": asdict(workload_w(200)),
                        "device": args.device, "seed": args.seed, "threads": args.threads, "options": {}}
                profile[executor] = measure(sys.executable, spec, args.timeout, log_dir / f"profile-{executor}.log")
                got = profile[executor]
                print(f"profile {executor}: " + (got.get("error") or f"{got['profiled_s']:.2f} s profiled"),
                      flush=True)

    # -- tables
    parts = {r.part for r in rows}
    tables: dict[str, Table] = {}
    if "w" in parts:
        tables["w"] = table_w(rows, res, why)
        tables["targets"] = table_targets(res, why)
    if "scaling" in parts:
        tables["scaling"] = table_scaling(rows, res, args.device)
    if "cifar" in parts:
        tables["cifar"] = table_cifar(rows, res, why)
    titles = {"w": "Workload W", "targets": "Targets (issue 4)", "scaling": "Scaling",
              "cifar": "pfl-research CIFAR-10 shape"}
    for key, (header, body) in tables.items():
        print_table(titles[key], header, body)
    info = machine_info(args.device, args.threads, pythons)
    write_results(args.out, args, rows, res, why, info, tables, profile, started, time.perf_counter() - t_start)
    shown = args.out.resolve().relative_to(REPO) if args.out.resolve().is_relative_to(REPO) else args.out
    print(f"results: {shown} (+ {args.out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
