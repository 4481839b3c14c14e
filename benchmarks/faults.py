"""Fault benchmark (issue 19): FedAvg under crashing, hanging, garbage-sending and straggling clients, and
under kill-and-resume.

Reproduce (from the repository root; about 10 min on 2 CPU cores):

    python benchmarks/faults.py --seeds 0,1,2 --jobs 2

For each data set, FedAvg from the preset (the same scaled settings as benchmarks/byzantine.py: digits 20
rounds; MNIST from ../shared/data 12 rounds of 5 local steps, model ``cnn2``) is run

- fault-free (the reference);
- with ``faults.crash``, ``faults.hang`` or ``faults.garbage`` at 10 % and 30 % (a client's fault is drawn per
  (seed, round, client): the rate is the expected fraction of each round's sampled clients). In process a
  hang is simulated: the client is reported at once as silent past the deadline, so a hang costs what a
  crash costs; on Flower a hanging node really sleeps (tests/flower/test_simulation.py);
- with stragglers: the straggler model (``faults.speed``, lognormal σ 0.5 per client and round) with a
  deadline ``faults.round_timeout`` set to the 90th or 70th percentile of the clients' simulated round
  times, so that about 10 % or 30 % of client-rounds are dropped; which ones depends on each client's
  data size (a big client straggles more often);
- killed with SIGKILL each time its metrics reach a multiple of N rounds (N = 5 on digits, 4 on MNIST)
  and resumed with ``--resume`` (checkpoints every round).

Reported per cell: final test accuracy (mean ± std over seeds) and its difference to the fault-free run
(points), the measured fraction of sampled clients that failed or whose reply was rejected, the rounds
lost (rounds skipped for too few valid replies; for kill-and-resume, the rounds re-run because the kill
came after the round's metrics but before its checkpoint), and seconds per round. Results:
``benchmarks/results/faults.md``; runs under ``--work``.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runpool import (benchmark_parser, Job, md_table, mean_std, REPO, run_header, run_jobs, SHARED_DATA,
                     shared_data_available, with_analysis, write_results)

COMMON = ["eval.personalized=false", "executor=sequential"]
RATES = (0.1, 0.3)
KINDS = ("crash", "hang", "garbage", "straggler")
SPEED, SIGMA = 100.0, 0.5


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    preset: str
    overrides: tuple[str, ...]
    rounds: int
    kill_every: int


SETTINGS = {
    "digits": Setting("digits", "digits (20 clients, Dirichlet 0.5, 10 per round)", "fedavg-digits.yaml",
                      tuple(COMMON), 20, 5),
    "mnist": Setting("mnist", "MNIST (100 clients, Dirichlet 0.5, 10 per round)", "fedavg-mnist.yaml",
                     (f"data.root={SHARED_DATA}", "data.alpha=0.5", "model.name=cnn2", "model.hidden=64",
                      "train.steps=5", "train.batch_size=16", "eval.batch_size=64", *COMMON), 12, 4),
}
Cell = tuple[str, float]  # (fault kind or "none" / "kill", rate)


def straggler_timeout(s: Setting, rate: float, seed: int) -> float:
    """The deadline at which about ``rate`` of the client-rounds straggle: the (1 − rate) quantile of the
    simulated round times of every client in every round (the straggler model of fedtrust.fl.faults)."""
    from fedtrust.runner.config import build_config, load_yaml
    from fedtrust.runner.federation import build_federation

    cfg = build_config(load_yaml(REPO / "configs" / s.preset),
                       [*s.overrides, f"rounds={s.rounds}", f"seed={seed}", f"faults.speed={SPEED}",
                        f"faults.speed_sigma={SIGMA}", "faults.round_timeout=1"])
    fed = build_federation(cfg)
    faults = fed.executor.faults
    times = sorted(faults.seconds(c, r) for r in range(1, s.rounds + 1) for c in fed.executor.sample(r))
    return round(times[min(int((1 - rate) * len(times)), len(times) - 1)], 4)


def fault_overrides(kind: str, rate: float, s: Setting, seed: int) -> list[str]:
    if kind in ("none", "kill"):
        return []
    if kind == "straggler":
        return [f"faults.speed={SPEED}", f"faults.speed_sigma={SIGMA}",
                f"faults.round_timeout={straggler_timeout(s, rate, seed)}"]
    return [f"faults.{kind}={rate}"]


def cells() -> list[Cell]:
    return [("none", 0.0), *[(k, r) for k in KINDS for r in RATES], ("kill", 0.0)]


def job(s: Setting, cell: Cell, seed: int, work: Path) -> Job:
    kind, rate = cell
    name = f"{s.name}/{kind}-{round(rate * 100)}/s{seed}"
    return Job(name, REPO / "configs" / s.preset,
               [*s.overrides, f"rounds={s.rounds}", f"seed={seed}", *fault_overrides(kind, rate, s, seed)],
               work / name)


# ---------------------------------------------------------------- kill and resume


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _rounds_written(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    done = 0
    for line in path.read_text().splitlines():
        try:
            done = max(done, json.loads(line)["round"])
        except (json.JSONDecodeError, KeyError):
            continue
    return done


def _checkpoint_round(out: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as fh:
        return json.loads(fh.metadata()["fedtrust"])["round"]


def run_with_kills(j: Job, every: int, rounds: int) -> None:
    """Run ``j``, SIGKILL it as soon as its metrics reach each multiple of ``every`` rounds, resume it; record
    the kills and the rounds each resume re-ran in ``kills.json``."""
    if j.done():
        return
    if j.out.exists():
        import shutil
        shutil.rmtree(j.out)
    kills, start = [], time.time()
    cmd = [sys.executable, "-m", "fedtrust.cli", "run", "--quiet", str(j.config), *j.overrides, f"out={j.out}"]
    for target in range(every, rounds, every):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and _rounds_written(j.out) < target:
            time.sleep(0.002)
        if proc.poll() is not None:
            raise SystemExit(f"{j.name}: the run ended before round {target}: {proc.stderr.read()[-500:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        written, kept = _rounds_written(j.out), _checkpoint_round(j.out)
        kills.append({"after_round": written, "checkpoint": kept, "rerun": written - kept})
        cmd = [sys.executable, "-m", "fedtrust.cli", "run", "--quiet", "--resume", str(j.out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{j.name}: resume failed: {done.stderr[-500:]}")
    (j.out / "kills.json").write_text(json.dumps({"kills": kills, "wall_s": time.time() - start}))


# ---------------------------------------------------------------- tables


def measured(out: Path, sampled: int) -> tuple[float, int, float]:
    """(fraction of sampled clients failed or rejected, rounds lost, seconds per round) of a finished run."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bad = [len(r.get("failed", {})) + len(r.get("rejected", {})) for r in records]
    lost = sum("skipped" in r for r in records)
    kills = out / "kills.json"
    if kills.exists():
        lost += sum(k["rerun"] for k in json.loads(kills.read_text())["kills"])
        seconds = json.loads(kills.read_text())["wall_s"] / len(records)
    else:
        times = [r["time_s"] for r in records]
        seconds = (times[-1] - times[0]) / max(len(times) - 1, 1)
    return sum(bad) / (sampled * len(records)), lost, seconds


def table(s: Setting, jobs: dict[tuple[Cell, int], Job], seeds: list[int]) -> list[str]:
    ref = [jobs[(("none", 0.0), seed)].summary()["test_acc"] for seed in seeds]
    rows = []
    for cell in cells():
        kind, rate = cell
        accs = [jobs[(cell, seed)].summary()["test_acc"] for seed in seeds]
        stats = [measured(jobs[(cell, seed)].out, 10) for seed in seeds]
        delta = [a - r for a, r in zip(accs, ref)]
        label = {"none": "fault-free", "kill": f"SIGKILL every {s.kill_every} rounds + resume"}.get(
            kind, f"{kind} {round(rate * 100)} %")
        rows.append([label, mean_std(accs), f"{statistics.mean(delta) * 100:+.1f}",
                     f"{statistics.mean(x[0] for x in stats) * 100:.1f}",
                     f"{statistics.mean(x[1] for x in stats):.1f}",
                     f"{statistics.mean(x[2] for x in stats):.2f}"])
    return md_table(["faults", "test acc (%)", "Δ vs fault-free (points)", "failed or rejected (% of sampled)",
                     "rounds lost", "s / round"], rows)


def main() -> None:
    parser = benchmark_parser(__doc__, "faults")
    parser.set_defaults(datasets="digits,mnist")
    args = parser.parse_args()
    args.runs_per_process = 1
    seeds = [int(x) for x in args.seeds.split(",")]
    notes, plans = [], {}
    for d in [d for d in args.datasets.split(",") if d]:
        if d not in SETTINGS:
            raise SystemExit(f"unknown data set {d!r}; this benchmark knows {', '.join(SETTINGS)}")
        if d == "mnist" and not shared_data_available("mnist"):
            notes.append("- MNIST skipped: ../shared/data/mnist/train.npz is absent on this machine.")
            continue
        s = SETTINGS[d]
        plans[d] = {(cell, seed): job(s, cell, seed, Path(args.work)) for cell in cells() for seed in seeds}
    every = [j for p in plans.values() for j in p.values()]
    todo = sum(not j.done() for j in every)
    start = time.time()
    run_jobs([j for p in plans.values() for (cell, _), j in p.items() if cell[0] != "kill"], args.jobs)
    for d, p in plans.items():
        for (cell, _), j in p.items():
            if cell[0] == "kill":
                run_with_kills(j, SETTINGS[d].kill_every, SETTINGS[d].rounds)
    elapsed = (time.time() - start) / 60
    cmd = f"python benchmarks/faults.py --seeds {args.seeds} --jobs {args.jobs} --datasets {args.datasets}"
    lines = run_header("Faults: FedAvg under client faults and kill-and-resume (issue 19)", cmd, args, every, todo,
                       elapsed)
    lines += [f"- {SETTINGS[d].title}: {SETTINGS[d].rounds} rounds, preset `configs/{SETTINGS[d].preset}` with "
              f"`{' '.join(SETTINGS[d].overrides).replace(str(SHARED_DATA), '../shared/data')}`." for d in plans]
    lines += ["- Rates are probabilities per sampled client and round (seeded per (seed, round, client)); "
              "stragglers: deadline at the 90th / 70th percentile of the simulated round times (speed "
              f"{SPEED:g} examples/s on average, lognormal σ {SIGMA}). Kill-and-resume runs one process per "
              "segment (its s / round includes the restarts); the others run as in benchmarks/byzantine.py.",
              *notes]
    for d, p in plans.items():
        lines += ["", f"## {SETTINGS[d].title}", "", *table(SETTINGS[d], p, seeds)]
    write_results("faults.md", with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
