"""Flower deployment cost per round (issue 20): the README's loopback deployment, timed, and where the time goes.

Reproduce (from the repository root; about 4 min on 2 CPU cores; needs ``fedtrust[flower]``, MNIST from
``../shared/data`` for its row):

    python benchmarks/flower_rounds.py --rounds 4

For each data set, the README's deployment steps (:func:`fedtrust.flower.deployment.deployment_steps`: TLS,
guarded SuperLink, two SuperNodes, ``flwr run --stream``) run as one bash script on free loopback ports,
FedAvg with two clients and an evaluation every round (digits: the preset; MNIST: ``configs/fedavg-mnist.yaml``
with 2 clients, ``cnn2``, 5 local steps of 16 images). Measured:

- **round**: the seconds of each round as the ServerApp streams them (first round apart: it installs the app
  and starts the SuperExecs);
- **ClientApp process**: the lifetime of every ``flwr-clientapp`` process (one per message in Flower's default
  ``subprocess`` isolation), sampled from ``/proc`` every 50 ms;
- **fedtrust's share of it**, measured apart in fresh processes, the way a ClientApp process pays it: Python
  with ``import fedtrust.flower.app`` (torch, flwr, fedtrust), building the node's runtime (the config's data
  set, partition and algorithm: ``_build_runtime``) with and without the digits cache, and one client update.

The rest of a round is Flower's: spawning the ClientApp process, the SuperNode's and SuperExec's polling
for work, moving messages, and the ServerApp's own pulls. Results: ``benchmarks/results/flower_rounds.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from runpool import md_table, REPO, machine_note, shared_data_available, SHARED_DATA, with_analysis, write_results

sys.path.insert(0, str(REPO / "src"))
from fedtrust.flower.deployment import LINK_PORT, NODE_PORT, deployment_steps  # noqa: E402

SETTINGS = {
    "digits": ("configs/fedavg-digits.yaml", "eval.every=1"),
    "mnist": ("configs/fedavg-mnist.yaml", f"data.root={SHARED_DATA} model.name=cnn2 model.hidden=64 train.steps=5 "
                                           "train.batch_size=16 eval.batch_size=256 eval.every=1"),
}
ROUND = re.compile(r"round (\d+)/(\d+): .* ([\d.]+) s \([\d.]+ s in all\)")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class ClientAppSampler(threading.Thread):
    """Lifetimes of ``flwr-clientapp`` processes: first and last time each pid was seen (50 ms sampling)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[int, list[float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"flwr-clientapp" in cmd:
                    self.seen.setdefault(int(pid), [now, now])[1] = now
            time.sleep(0.05)

    def lifetimes(self) -> list[float]:
        return [last - first for first, last in self.seen.values()]


def deploy(name: str, rounds: int, work: Path) -> tuple[list[float], list[float]]:
    """Run the README's steps for ``name``; (seconds of each round, ClientApp process lifetimes)."""
    config, overrides = SETTINGS[name]
    link, n0, n1 = free_ports(3)
    steps = deployment_steps(2, config=config, overrides=f"out=runs/{name} {overrides}", rounds=rounds)
    steps = re.sub(rf"\b({LINK_PORT}|{NODE_PORT}|{NODE_PORT + 1})\b",
                   lambda m: str({LINK_PORT: link, NODE_PORT: n0, NODE_PORT + 1: n1}[int(m.group(1))]), steps)
    wait = f"until (exec 3<>/dev/tcp/127.0.0.1/{link}) 2>/dev/null; do sleep 0.2; done\n"
    steps = steps.replace("--disable-runtime-dependency-installation &\n",
                          f"--disable-runtime-dependency-installation > superlink.log 2>&1 &\n{wait}")
    steps = re.sub(r'(num-partitions=2") &', r'\1 > /dev/null 2>&1 &', steps)
    (work / "configs").symlink_to(REPO / "configs")
    (work / "steps.sh").write_text(steps)
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    sampler = ClientAppSampler()
    sampler.start()
    proc = subprocess.Popen(["bash", "steps.sh"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        sampler.stop.set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            time.sleep(1)
    times = [float(m.group(3)) for m in ROUND.finditer(out)]
    if len(times) != rounds:
        raise SystemExit(f"{name}: expected {rounds} round lines, got {len(times)}:\n{out[-3000:]}")
    return times, sampler.lifetimes()


SHARE = r"""
import json, os, sys, time
t0 = time.perf_counter()
import fedtrust.flower.app  # what a ClientApp process imports
t1 = time.perf_counter()
from fedtrust.fl.protocol import ClientContext
from fedtrust.fl.sampling import client_generator
from fedtrust.flower.client_app import _build_runtime
from fedtrust.runner.config import config_to_dict, load_config
cfg = load_config(sys.argv[1], sys.argv[2].split() + ["executor=sequential", "data.num_clients=2",
                                                      "data.clients_per_round=2"])
t2 = time.perf_counter()
rt = _build_runtime(json.dumps(config_to_dict(cfg), sort_keys=True))
t3 = time.perf_counter()
state = rt.algorithm.init()
msg = rt.algorithm.configure(state, 1, [0])[0]
ctx = ClientContext(0, 1, client_generator(rt.seed, 1, 0), rt.device)
from fedtrust.fl.protocol import Message
rt.client.run(msg, rt.data.client(0), Message(), ctx)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "build": t3 - t2, "update": t4 - t3}))
"""


def fedtrust_share(name: str, cache: bool) -> dict[str, float]:
    """Seconds a fresh process spends importing, building the node runtime and running one client update
    (median of 3); ``cache`` False: the digits cache points at an unwritable place, so scikit-learn is imported."""
    config, overrides = SETTINGS[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    if not cache:
        env["FEDTRUST_CACHE"] = "/proc/no-cache"
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", SHARE, str(REPO / config), overrides], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process"] = time.perf_counter() - start
        runs.append(row)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--datasets", default="digits,mnist")
    args = parser.parse_args()
    names = [n for n in args.datasets.split(",") if n != "mnist" or shared_data_available("mnist")]
    start = time.time()
    rows, notes = [], []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            times, lives = deploy(name, args.rounds, Path(tmp))
        share = fedtrust_share(name, cache=True)
        cold = fedtrust_share(name, cache=False) if name == "digits" else None
        later = times[1:]
        per_msg = statistics.median(lives) if lives else float("nan")
        rows.append([name, f"{times[0]:.1f}", f"{statistics.mean(later):.1f}", f"{len(lives)}", f"{per_msg:.2f}",
                     f"{share['import']:.2f}", f"{share['build']:.2f}" + (f" ({cold['build']:.2f})" if cold else ""),
                     f"{share['update']:.2f}", f"{statistics.mean(later) - per_msg:.1f}"])
        notes.append(f"- {name}: rounds {', '.join(f'{t:.1f}' for t in times)} s; ClientApp lifetimes "
                     f"{', '.join(f'{t:.1f}' for t in sorted(lives))} s; fresh process total {share['process']:.2f} s.")
        print(rows[-1], flush=True)
    lines = ["# Flower deployment: cost per round on loopback (issue 20)", "",
             f"Reproduce: `python benchmarks/flower_rounds.py --rounds {args.rounds} --datasets {args.datasets}` "
             "(from the repository root).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine_note()}; "
             f"{(time.time() - start) / 60:.1f} min.",
             "- Two SuperNodes and the SuperLink on this machine (OMP_NUM_THREADS=1), TLS, FedAvg, evaluation every "
             "round (on the server: FedAvg has no client state), Flower's default `subprocess` isolation.", "",
             *md_table(["data", "round 1 (s)", "later rounds (s)", "ClientApp processes", "ClientApp lifetime (s)",
                        "import (s)", "node build (s) (without cache)", "client update (s)",
                        "round − ClientApp (s)"], rows),
             "", *notes]
    write_results("flower_rounds.md", with_analysis(lines, "benchmarks/flower_rounds_analysis.md"))


if __name__ == "__main__":
    main()
