"""FLIP against continuous DBA on MNIST in the paper's own regime (issue 15), resumable across sessions.

``benchmarks/backdoor.py`` scales FLIP down (a few hardening batches, server lr 1, 8–30 rounds) to fit a CPU;
this script runs ``configs/flip-mnist-continuous.yaml`` as it is (FLIP's settings, spec flip.md §1–§3: 100
clients, 10 a round, 4 attackers in every round, server lr η = 0.1, benign clients hardening up to 110 batches
with 400 / 200 / 50 inversion steps, τ 0.4, 90 rounds) after the FedAvg pre-training its header names, for
each seed:

- ``pretrain-s{seed}``: ``configs/fedavg-mnist.yaml`` with the header's overrides (10 rounds, lenet);
- ``fedavg-none-s{seed}``: the preset with ``algorithm.invert=false train.epochs=1 attack.rounds=[]`` (FedAvg
  with FLIP's benign SGD, no attack: the clean-accuracy reference of the issue's target);
- ``fedavg-dba-s{seed}``: the same under the attack (the undefended run);
- ``flip-dba-s{seed}``: the preset (FLIP, τ read from the same run), checkpointed every round.

One FLIP round costs about 5.5 min on one core of this CPU (the FedAvg runs 4–9 s), so a 90-round FLIP run
takes about 8 h. ``--budget-min`` stops the runs after that many minutes; a stopped run resumes from its
checkpoint (``fedtrust run --resume``) the next time the script runs with the same ``--work``. The table is
written from the rounds each run has done, so a partial FLIP run is reported as partial (its round count is
in the table), never extrapolated.

Reported per run and seed, in %: clean accuracy and ASR at the last round done, both at the last round that
every run of the seed reached (the fair comparison while FLIP is partial), and the first round whose ASR
reaches 10 % and 50 % ("—": not within the rounds done); FLIP also read with τ 0.4 (``acc_tau``, ``asr_tau``;
refusals count as errors). The ASR per round every 10 rounds follows. Seconds per round: the median of the
run's per-round durations.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runpool import (REPO, _die_with_parent, _one_thread_env, benchmark_parser, machine_note,  # noqa: E402
                     md_table, shared_data_available, with_analysis, write_results)

PRESET = "configs/flip-mnist-continuous.yaml"
PRETRAIN = ("configs/fedavg-mnist.yaml", "rounds=10", "model.name=lenet", "data.alpha=0.5", "data.normalize=none",
            "train.lr=0.1", "train.weight_decay=0.0005", "train.batch_size=64", "train.lr_schedule=constant",
            "eval.every=10", "eval.personalized=false")
FEDAVG = ("algorithm.invert=false", "train.epochs=1")
EVERY = 10  # the ASR-per-round table's spacing


@dataclass
class PaperRun:
    """One ``fedtrust run`` of the study; resumed from its checkpoint when it was stopped half-way."""

    name: str
    args: tuple[str, ...]
    out: Path

    def done(self) -> bool:
        return (self.out / "summary.json").is_file()

    def start(self) -> subprocess.Popen:
        if (self.out / "checkpoint.safetensors").is_file():
            cmd = ["--resume", str(self.out)]
        else:  # never started, or stopped before its first checkpoint: start anew
            shutil.rmtree(self.out, ignore_errors=True)
            cmd = [*self.args, f"out={self.out}"]
        with open(self.out.parent / f"{self.name}.log", "a") as log:  # the child keeps its own copy of the file
            return subprocess.Popen([sys.executable, "-m", "fedtrust.cli", "run", "--quiet", *cmd],
                                    env=_one_thread_env(), stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        return [r for r in map(json.loads, path.read_text().splitlines()) if "test_acc" in r]


def plan(seeds: list[int], work: Path) -> tuple[list[PaperRun], dict[tuple[str, int], PaperRun]]:
    """The pre-trainings, then every attack run, in the order they run."""
    common = ("device=cpu", "eval.personalized=false")
    pre = [PaperRun(f"pretrain-s{s}", (*PRETRAIN, f"seed={s}", "device=cpu"), work / f"pretrain-s{s}")
           for s in seeds]
    runs: dict[tuple[str, int], PaperRun] = {}
    for kind, extra in (("fedavg-none", (*FEDAVG, "attack.rounds=[]", "checkpoint_every=0")),
                        ("fedavg-dba", (*FEDAVG, "checkpoint_every=0")),
                        ("flip-dba", ("checkpoint_every=1",))):
        for s in seeds:
            runs[(kind, s)] = PaperRun(f"{kind}-s{s}", (PRESET, *extra, *common, f"init_from={work}/pretrain-s{s}",
                                                        f"seed={s}"), work / f"{kind}-s{s}")
    return pre, runs


def run_all(todo: list[PaperRun], parallel: int, deadline: float) -> None:
    """Run ``todo`` in order, ``parallel`` at a time, until done or ``deadline`` (SIGTERM to what still runs)."""
    pending, running = list(todo), []
    while pending or running:
        while pending and len(running) < parallel and time.time() < deadline:
            job = pending.pop(0)
            job.out.parent.mkdir(parents=True, exist_ok=True)
            running.append((job, job.start()))
        time.sleep(2)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                if proc.returncode != 0:
                    sys.exit(f"{job.name} failed (exit {proc.returncode}); see {job.out.parent / job.name}.log")
        if time.time() >= deadline:
            for job, proc in running:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                print(f"budget spent: stopped {job.name} after round {len(job.rows())} (resumes next time)")
            return


def first_round(rows: list[dict], key: str, level: float) -> str:
    return next((str(r["round"]) for r in rows if r.get(key) is not None and r[key] >= level), "—")


def at_round(rows: list[dict], rnd: int, key: str) -> str:
    row = next((r for r in rows if r["round"] == rnd), None)
    return "—" if row is None or row.get(key) is None else f"{100 * row[key]:.1f}"


def round_seconds(rows: list[dict]) -> str:
    t = [r["time_s"] for r in rows]
    steps = [b - a for a, b in zip(t, t[1:])]
    return f"{statistics.median(steps):.1f}" if steps else "—"


def tables(seeds: list[int], runs: dict[tuple[str, int], PaperRun]) -> list[str]:
    readings = (("FedAvg, no attack", "fedavg-none", "test_acc", "asr"),
                ("FedAvg, continuous DBA", "fedavg-dba", "test_acc", "asr"),
                ("FLIP (τ = 0), continuous DBA", "flip-dba", "test_acc", "asr"),
                ("FLIP + τ 0.4, continuous DBA", "flip-dba", "acc_tau", "asr_tau"))
    lines: list[str] = []
    for s in seeds:
        rows = {kind: runs[(kind, s)].rows() for kind in ("fedavg-none", "fedavg-dba", "flip-dba")}
        have = [r[-1]["round"] for r in rows.values() if r]
        if not have:
            continue
        common = min(have)
        lines += ["", f"## Seed {s}", "",
                  f"Rounds after the pre-training. \"Shared round\": round {common}, the last every run of this "
                  "seed reached.", ""]
        body, curve = [], []
        for label, kind, acc, asr in readings:
            r = rows[kind]
            if not r:
                continue
            last = r[-1]["round"]
            body.append([label, str(last), at_round(r, last, acc), at_round(r, last, asr), at_round(r, common, acc),
                         at_round(r, common, asr), first_round(r, asr, 0.1), first_round(r, asr, 0.5),
                         round_seconds(r)])
            curve.append([label, *(at_round(r, k, asr) for k in range(EVERY, 91, EVERY))])
        lines += md_table(["run", "rounds done", "clean acc, last", "ASR, last", f"clean acc, round {common}",
                           f"ASR, round {common}", "ASR ≥ 10 % in round", "ASR ≥ 50 % in round", "s / round"], body)
        lines += ["", f"ASR (%) every {EVERY} rounds:", ""]
        lines += md_table(["run", *(str(k) for k in range(EVERY, 91, EVERY))], curve)
    return lines


def main() -> None:
    parser = benchmark_parser(__doc__, "backdoor_paper")
    parser.set_defaults(work="runs/bench-backdoor-paper", datasets="mnist", analysis=None)
    parser.add_argument("--budget-min", type=float, default=600.0,
                        help="stop the runs after this many minutes; they resume on the next invocation")
    parser.add_argument("--results", default="backdoor_mnist_paper")
    parser.add_argument("--report-only", action="store_true", help="write the table from the runs as they are")
    args = parser.parse_args()
    if args.datasets != "mnist":
        parser.error("only --datasets mnist: the paper regime is configured for MNIST (configs/flip-mnist-*.yaml)")
    if not shared_data_available("mnist"):
        sys.exit("MNIST is not in ../shared/data (see shared/DESIGN.md, 'Data available without internet')")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.chdir(REPO)  # --work is relative to the repository root, as the configs' data paths are
    work = Path(args.work)
    pre, runs = plan(seeds, work)
    start = time.time()
    if not args.report_only:
        run_all([j for j in [*pre, *runs.values()] if not j.done()], args.jobs, start + 60 * args.budget_min)
    cmd = (f"python benchmarks/backdoor_paper.py --seeds {args.seeds} --jobs {args.jobs} --work {args.work} "
           f"--budget-min {args.budget_min:g}")
    lines = [f"# FLIP against continuous DBA on MNIST in the paper's regime (issue 15) — `{args.results}`", "",
             f"Reproduce: `{cmd}` (from the repository root; rerun the same command to continue stopped runs; "
             "`PYTHONPATH=src` where fedtrust is not installed).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}.",
             f"- Hardware: {machine_note()}; one torch thread per run, {args.jobs} at a time.",
             f"- Runs: `{PRESET}` as it is (module docstring); FedAvg rows add `{' '.join(FEDAVG)}`; pre-training "
             f"`{' '.join(PRETRAIN)}`. Accuracies and ASRs in %."]
    lines += tables(seeds, runs)
    write_results(f"{args.results}.md", with_analysis(lines, args.analysis or f"benchmarks/{args.results}_analysis.md"))


if __name__ == "__main__":
    main()
