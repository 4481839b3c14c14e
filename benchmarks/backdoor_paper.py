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
- ``flip-dba-s{seed}``: the preset (FLIP, τ read from the same run), checkpointed every round;
- ``noinv-dba-s{seed}``: the preset with 0 inversion steps (``NOINV``), the ablation of FLIP's triggers: every
  inversion fails at once, so its mask is all zeros, nothing is stamped and no batch is skipped as oversized,
  and the benign clients take FLIP's Adam steps (lr 0.01, betas (0.5, 0.9), up to 110 batches) on their clean
  data. What FLIP holds back that this run does not is the inversion's doing; what both hold back is Adam's
  larger benign updates diluting the attackers' in the η/n-weighted mean;
- ``fliptau05-dba-s{seed}``: the preset with ``algorithm.tau_inv=0.5`` (``TAU05``; FLIP hard-codes 0.9), a
  fedtrust tuning, checkpointed every round: an inversion then needs to flip half the source images, not 90 %,
  so a backdoor the global model has only partly learnt can already be the cheapest trigger
  (``benchmarks/inversion_probe.py``: on seed 0's FLIP model at 6 % ASR, half the inverted mask's mass lies
  near the real trigger at τ_inv 0.5, a fifth to a third at 0.9);
- ``flipnocache-dba-s{seed}``: the preset with ``algorithm.keep_cache=false`` (``NOCACHE``), a fedtrust option,
  checkpointed every round: a visit's first inversion of a pair starts at random, not from the trigger the
  client cached on an older global model (``benchmarks/flip_warm_start.py``: on seed 0's round-69 model the
  cached starts end in larger masks further from the trigger).

One FLIP round costs about 6–7 min on one core of this CPU beside other work (the FedAvg runs 4–9 s; 11–15 min
before session 36's eager inversion step), so a 90-round FLIP run takes about 9–10 h. ``--budget-min`` stops the
runs after that many minutes; a stopped run resumes from its checkpoint (``fedtrust run --resume``) the next time
the script runs with the same ``--work``. The table is written from the rounds each run has done, so a partial
FLIP run is reported as partial (its round count is in the table), never extrapolated. Every run waits for its
own pre-training, so ``--jobs`` may be as large as the machine allows. ``--device cuda`` runs them all on a GPU
and ``--data-root`` names the folder holding ``mnist/`` (``benchmarks/device_flip.sh`` does both on a lent GPU;
results/backdoor_mnist_paper_gpu.md). A stopped run resumes on this invocation's ``--device`` and
``--data-root``, so a run moves between machines: a FLIP run checkpointed on the CPU continues on a GPU with its
folder (and its pre-training's) carried there.

Reported per run and seed, in %: clean accuracy and ASR at the last round done, both at the last round that
every run of the seed reached (the fair comparison while FLIP is partial), and the first round whose ASR
reaches 10 % and 50 % ("—": not within the rounds done); FLIP also read with τ 0.4 (``acc_tau``, ``asr_tau``;
refusals count as errors). The ASR per round every 10 rounds follows. Seconds per round: the median of the
run's per-round durations. A plot (``<results>.png``) draws the ASR and the clean accuracy of every run per
round, one column per seed, and ``<results>_rounds.csv`` keeps every run's readings of every round.

The run folders live under ``--work`` (``runs/``, ignored by git), so a fresh checkout has none (session 42's
had lost the 78 / 56 / 26 rounds of ``backdoor_mnist_paper_flip_cpu``). The script therefore refuses to
overwrite a results file whose tables record a run with more rounds than its folder now holds (or a run whose
folder is gone), naming each such row: write to another ``--results``, or pass ``--replace``.
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
from runpool import (REPO, RESULTS, _die_with_parent, _one_thread_env, benchmark_parser,  # noqa: E402
                     machine_note, md_table, with_analysis, write_results)

PRESET = "configs/flip-mnist-continuous.yaml"
KINDS = ("flip-dba", "fedavg-none", "fedavg-dba", "noinv-dba", "fliptau05-dba", "flipnocache-dba")
"""The attack runs of a seed: FLIP under continuous DBA, FedAvg without attack, FedAvg under DBA, FLIP without
its inversion under DBA, FLIP at τ_inv 0.5 under DBA, FLIP with random-start inversions under DBA."""
COMPARED = ("flip-dba", "fedavg-none", "fedavg-dba")
"""The runs whose last common round is the table's "shared round" (the ablation and the tuning, later and
cheaper or later and slower, are read there when they have reached it, "—" otherwise)."""
PRETRAIN = ("configs/fedavg-mnist.yaml", "rounds=10", "model.name=lenet", "data.alpha=0.5", "data.normalize=none",
            "train.lr=0.1", "train.weight_decay=0.0005", "train.batch_size=64", "train.lr_schedule=constant",
            "eval.every=10", "eval.personalized=false")
FEDAVG = ("algorithm.invert=false", "train.epochs=1")
NOINV = ("algorithm.warmup_steps=0", "algorithm.pair_steps=0", "algorithm.refine_steps=0")
TAU05 = ("algorithm.tau_inv=0.5",)
NOCACHE = ("algorithm.keep_cache=false",)
EVERY = 10  # the ASR-per-round table's spacing


@dataclass
class PaperRun:
    """One ``fedtrust run`` of the study; resumed from its checkpoint when it was stopped half-way."""

    name: str
    args: tuple[str, ...]
    out: Path
    after: "PaperRun | None" = None  # the pre-training this run starts from (init_from), finished first

    def ready(self) -> bool:
        return self.after is None or self.after.done()

    def done(self) -> bool:
        return (self.out / "summary.json").is_file()

    def start(self) -> subprocess.Popen:
        if (self.out / "checkpoint.safetensors").is_file():  # on this invocation's device and data root: a run
            moved = [a for a in self.args if a.startswith(("device=", "data.root="))]  # moves between machines
            cmd = ["--resume", str(self.out), *moved]
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


def plan(seeds: list[int], work: Path, device: str = "cpu", data_root: str = "../shared/data"
         ) -> tuple[list[PaperRun], dict[tuple[str, int], PaperRun]]:
    """The pre-trainings, then every attack run (FLIP's first: the longest), in the order they start."""
    common = (f"device={device}", f"data.root={data_root}")
    pre = {s: PaperRun(f"pretrain-s{s}", (*PRETRAIN, f"seed={s}", *common), work / f"pretrain-s{s}") for s in seeds}
    runs: dict[tuple[str, int], PaperRun] = {}
    extras = {"flip-dba": ("checkpoint_every=1",), "fedavg-none": (*FEDAVG, "attack.rounds=[]", "checkpoint_every=0"),
              "fedavg-dba": (*FEDAVG, "checkpoint_every=0"), "noinv-dba": (*NOINV, "checkpoint_every=5"),
              "fliptau05-dba": (*TAU05, "checkpoint_every=1"), "flipnocache-dba": (*NOCACHE, "checkpoint_every=1")}
    for kind, extra in extras.items():
        for s in seeds:
            runs[(kind, s)] = PaperRun(f"{kind}-s{s}", (PRESET, *extra, *common, "eval.personalized=false",
                                                        f"init_from={work}/pretrain-s{s}", f"seed={s}"),
                                       work / f"{kind}-s{s}", after=pre[s])
    return list(pre.values()), runs


def run_all(todo: list[PaperRun], parallel: int, deadline: float) -> list[str]:
    """Run ``todo`` in order, ``parallel`` at a time, each once its pre-training is done, until all are done or
    ``deadline`` (SIGTERM to what still runs). A failed run does not stop the others (those that start from it
    are dropped); returns one line per failure."""
    pending, running, failed = list(todo), [], []
    while pending or running:
        while len(running) < parallel and time.time() < deadline:
            job = next((j for j in pending if j.ready()), None)
            if job is None:
                break
            pending.remove(job)
            job.out.parent.mkdir(parents=True, exist_ok=True)
            running.append((job, job.start()))
        if pending and not running and not any(j.ready() for j in pending):
            failed += [f"{j.name} not started: {j.after.name} did not finish" for j in pending]
            return failed
        time.sleep(2)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                if proc.returncode != 0:
                    failed.append(f"{job.name} failed (exit {proc.returncode}); see {job.out.parent / job.name}.log")
                    print(failed[-1], flush=True)
        if time.time() >= deadline:
            for job, proc in running:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                print(f"budget spent: stopped {job.name} after round {len(job.rows())} (resumes next time)")
            return failed
    return failed


def first_round(rows: list[dict], key: str, level: float) -> str:
    return next((str(r["round"]) for r in rows if r.get(key) is not None and r[key] >= level), "—")


def at_round(rows: list[dict], rnd: int, key: str) -> str:
    row = next((r for r in rows if r["round"] == rnd), None)
    return "—" if row is None or row.get(key) is None else f"{100 * row[key]:.1f}"


def round_seconds(rows: list[dict]) -> str:
    t = [r["time_s"] for r in rows]
    steps = [b - a for a, b in zip(t, t[1:])]
    return f"{statistics.median(steps):.1f}" if steps else "—"


READINGS = (("FedAvg, no attack", "fedavg-none", "test_acc", "asr"),
            ("FedAvg, continuous DBA", "fedavg-dba", "test_acc", "asr"),
            ("FLIP (τ = 0), continuous DBA", "flip-dba", "test_acc", "asr"),
            ("FLIP + τ 0.4, continuous DBA", "flip-dba", "acc_tau", "asr_tau"),
            ("FLIP without inversion (τ = 0), continuous DBA", "noinv-dba", "test_acc", "asr"),
            ("FLIP without inversion + τ 0.4, continuous DBA", "noinv-dba", "acc_tau", "asr_tau"),
            ("FLIP τ_inv 0.5 (τ = 0), continuous DBA", "fliptau05-dba", "test_acc", "asr"),
            ("FLIP τ_inv 0.5 + τ 0.4, continuous DBA", "fliptau05-dba", "acc_tau", "asr_tau"),
            ("FLIP keep_cache=false (τ = 0), continuous DBA", "flipnocache-dba", "test_acc", "asr"),
            ("FLIP keep_cache=false + τ 0.4, continuous DBA", "flipnocache-dba", "acc_tau", "asr_tau"))
"""The table's rows: label, run kind, clean-accuracy key and ASR key of its metrics."""


def tables(seeds: list[int], runs: dict[tuple[str, int], PaperRun]) -> list[str]:
    lines: list[str] = []
    for s in seeds:
        rows = {kind: runs[(kind, s)].rows() for kind in KINDS}
        if not any(rows.values()):
            continue
        have = [rows[kind][-1]["round"] for kind in COMPARED if rows[kind]]
        common = min(have) if have else min(r[-1]["round"] for r in rows.values() if r)
        lines += ["", f"## Seed {s}", "",
                  f"Rounds after the pre-training. \"Shared round\": round {common}, the last every run of "
                  f"{', '.join(COMPARED)} of this seed reached (the other rows show \"—\" there until they reach it).",
                  ""]
        body, curve = [], []
        for label, kind, acc, asr in READINGS:
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


def table_rounds(seeds: list[int], runs: dict[tuple[str, int], PaperRun]) -> dict[tuple[int, str], int]:
    """(seed, table row) → rounds done, of the rows :func:`tables` would write from the runs as they are."""
    out = {}
    for s in seeds:
        for label, kind, _, _ in READINGS:
            if rows := runs[(kind, s)].rows():
                out[(s, label)] = rows[-1]["round"]
    return out


def recorded_rounds(path: Path) -> dict[tuple[int, str], int]:
    """(seed, table row) → rounds done, as a results file this script wrote records them (its first table
    under each ``## Seed`` heading; the analysis after the tables is not read). Empty when there is no file."""
    out: dict[tuple[int, str], int] = {}
    seed, table = None, 0  # table: 0 before the seed's first table, 1 in it, 2 after it
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.startswith("## "):
            if not line.startswith("## Seed "):
                break
            seed, table = int(line.split()[2]), 0
        elif seed is not None and line.startswith("| ") and table < 2:
            table = 1
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) > 1 and cells[1].isdigit():
                out[(seed, cells[0])] = int(cells[1])
        elif table == 1:
            table = 2
    return out


def lost_rows(recorded: dict[tuple[int, str], int], now: dict[tuple[int, str], int]) -> list[str]:
    """The recorded rows that the new table would drop or show with fewer rounds (the runs behind them are
    gone: a fresh checkout keeps no ``runs/``), one line each."""
    return [f"seed {s}, {label}: {n} rounds recorded, {now[(s, label)] if (s, label) in now else 'no run'} now"
            for (s, label), n in sorted(recorded.items()) if now.get((s, label), 0) < n]


def rounds_csv(seeds: list[int], runs: dict[tuple[str, int], PaperRun]) -> list[str]:
    """Every evaluated round of every run, one CSV line each (seed, run, round, clean accuracy and ASR without
    and with τ, in %): the per-round record kept beside the table, so it outlives the run folders."""
    keys = ("test_acc", "asr", "acc_tau", "asr_tau")
    lines = ["seed,run,round," + ",".join(keys)]
    for s in seeds:
        for kind in KINDS:
            for r in runs[(kind, s)].rows():
                vals = ("" if r.get(k) is None else f"{100 * r[k]:.2f}" for k in keys)
                lines.append(f"{s},{kind},{r['round']}," + ",".join(vals))
    return lines


def curves_plot(seeds: list[int], runs: dict[tuple[str, int], PaperRun], path: Path) -> bool:
    """ASR (top) and clean accuracy (bottom) per round, one column per seed, every run of the table side by
    side (FLIP black, dashed with τ); False (nothing written) when no run has rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in seeds if any(runs[(kind, s)].rows() for kind in KINDS)]
    if not shown:
        return False
    fig, axes = plt.subplots(2, len(shown), figsize=(4.2 * len(shown) + 2.4, 6.4), squeeze=False, sharex=True)
    color = {"fedavg-none": "tab:blue", "fedavg-dba": "tab:red", "flip-dba": "black", "noinv-dba": "tab:green",
             "fliptau05-dba": "tab:purple", "flipnocache-dba": "tab:orange"}
    for col, s in enumerate(shown):
        for label, kind, acc, asr in READINGS:
            rows = runs[(kind, s)].rows()
            line = "--" if asr == "asr_tau" else "-"
            for ax, key in ((axes[0, col], asr), (axes[1, col], acc)):
                ax.plot([r["round"] for r in rows], [100 * r[key] for r in rows], color=color[kind], linestyle=line,
                        linewidth=1.8 if kind == "flip-dba" else 1.2, label=label)
        axes[0, col].set_title(f"seed {s}", fontsize=10)
        axes[0, col].set_ylim(-3, 103)
        axes[1, col].set_xlabel("round (after pre-training)")
    axes[0, 0].set_ylabel("ASR (%)")
    axes[1, 0].set_ylabel("clean accuracy (%)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0, 1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=8, loc="center right", frameon=False)
    fig.suptitle("MNIST, continuous DBA, the paper's regime: ASR and clean accuracy per round (τ: refusals "
                 "count as errors)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (4.2 * len(shown) + 2.4), 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = benchmark_parser(__doc__, "backdoor_paper")
    parser.set_defaults(work="runs/bench-backdoor-paper", datasets="mnist", analysis=None)
    parser.add_argument("--budget-min", type=float, default=600.0,
                        help="stop the runs after this many minutes; they resume on the next invocation")
    parser.add_argument("--results", default="backdoor_mnist_paper")
    parser.add_argument("--report-only", action="store_true", help="write the table from the runs as they are")
    parser.add_argument("--device", default="cpu", help="torch device of every run (cpu, cuda, auto)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"runs to run (comma-separated, of {','.join(KINDS)}); the table shows every run found")
    parser.add_argument("--replace", action="store_true",
                        help="overwrite the results file even where it records more rounds than the runs hold")
    parser.add_argument("--data-root", default="../shared/data",
                        help="folder holding mnist/train.npz (relative to the repository root)")
    args = parser.parse_args()
    if args.datasets != "mnist":
        parser.error("only --datasets mnist: the paper regime is configured for MNIST (configs/flip-mnist-*.yaml)")
    os.chdir(REPO)  # --work and --data-root are relative to the repository root, as the configs' data paths are
    if not (Path(args.data_root) / "mnist" / "train.npz").is_file():
        sys.exit(f"MNIST is not in {args.data_root}/mnist (see shared/DESIGN.md, 'Data available without internet')")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    pre, runs = plan(seeds, work, args.device, args.data_root)
    start = time.time()
    failed: list[str] = []
    if not args.report_only:
        kinds = args.kinds.split(",")
        if unknown := sorted(set(kinds) - set(KINDS)):
            parser.error(f"unknown --kinds {unknown}; expected some of {','.join(KINDS)}")
        chosen = [run for (kind, _), run in runs.items() if kind in kinds]
        failed = run_all([j for j in [*pre, *chosen] if not j.done()], args.jobs, start + 60 * args.budget_min)
    cmd = (f"python benchmarks/backdoor_paper.py --seeds {args.seeds} --jobs {args.jobs} --work {args.work} "
           f"--budget-min {args.budget_min:g}")
    if args.device != "cpu":
        cmd += f" --device {args.device}"
    if args.data_root != "../shared/data":
        cmd += f" --data-root {args.data_root}"
    if args.results != "backdoor_mnist_paper":
        cmd += f" --results {args.results}"
    if args.kinds != ",".join(KINDS):
        cmd += f" --kinds {args.kinds}"
    target = RESULTS / f"{args.results}.md"
    if not args.replace and (lost := lost_rows(recorded_rounds(target), table_rounds(seeds, runs))):
        sys.exit(f"not overwriting {target.relative_to(REPO)}: the runs in {work} hold less than it records "
                 f"({'; '.join(lost)}); write to another --results, or pass --replace\n" + "\n".join(failed))
    hardware = machine_note(args.device)
    lines = [f"# FLIP against continuous DBA on MNIST in the paper's regime (issue 15) — `{args.results}`", "",
             f"Reproduce: `{cmd}` (from the repository root; rerun the same command to continue stopped runs; "
             "`PYTHONPATH=src` where fedtrust is not installed).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}.",
             f"- Hardware: {hardware}; device `{args.device}`; one torch thread per run, {args.jobs} at a time.",
             f"- Runs: `{PRESET}` as it is (module docstring); FedAvg rows add `{' '.join(FEDAVG)}`; FLIP without "
             f"inversion adds `{' '.join(NOINV)}`, FLIP τ_inv 0.5 `{' '.join(TAU05)}`, FLIP keep_cache=false "
             f"`{' '.join(NOCACHE)}`; pre-training "
             f"`{' '.join(PRETRAIN)}`. Accuracies and ASRs in %."]
    lines += tables(seeds, runs)
    if curves_plot(seeds, runs, RESULTS / f"{args.results}.png"):
        lines += ["", f"![ASR and clean accuracy per round, every run side by side]({args.results}.png)"]
    lines += ["", f"Per-round readings of every run: [{args.results}_rounds.csv]({args.results}_rounds.csv)."]
    write_results(f"{args.results}.md", with_analysis(lines, args.analysis or f"benchmarks/{args.results}_analysis.md"))
    (RESULTS / f"{args.results}_rounds.csv").write_text("\n".join(rounds_csv(seeds, runs)) + "\n")
    if failed:
        sys.exit("\n".join(failed))


if __name__ == "__main__":
    main()
