"""Byzantine-robustness benchmark (issue 13): every registered attack against every registered aggregator.

Reproduce (from the repository root; about 1 h on 2 CPU cores; the exact command of a table is in its header):

    python benchmarks/byzantine.py --seeds 0,1,2 --jobs 2

FedAvg with ``defense.aggregator`` swapped, ``attack.fraction`` of the clients malicious (drawn once from the
seed; they attack whenever the sampler picks them, so a round holds 10·fraction of them on average), every
registered attack × every registered aggregator (registry kinds ``attack`` and ``aggregator``, read at start;
``--attacks``/``--aggregators`` pick some); final test accuracy
(mean ± std over seeds) and time per round. The no-attack row (0 %) is run once per aggregator and shared by
every attack. Results: ``benchmarks/results/byzantine.md`` and one heatmap PNG per data set beside it; runs
under ``--work``.

Data sets, from the presets with overrides (no new YAML):

- digits (``configs/fedavg-digits.yaml``): sklearn digits, 20 clients, Dirichlet 0.5, 10 per round, 1 local
  epoch of batch 16 (≈5 steps), SGD lr 0.05 momentum 0.9, cosine schedule, model ``cnn``; 10, 20, 30 %.
- MNIST (``configs/fedavg-mnist.yaml`` with ``data.alpha=0.5``, ``data.root=../shared/data``; skipped with a
  note where ../shared/data/mnist is absent): 100 clients, Dirichlet 0.5, 10 per round; 20 %.

Scaled down for 2 CPU cores. The full grid is 792 digits runs (12 aggregators × (1 + 7 attacks × 3
fractions) × 3 seeds) and 288 MNIST runs (12 × (1 + 7 × 1) × 3): 1,080 runs. Measured per run (one torch
thread, inside a batch process; CPU time, the machine shared with other work at load average 2–3): digits
20 rounds ≈ 5.5 s (5–10 s of wall time under that load; FLTrust and FoolsGold ≈ 30 % more), MNIST as below
≈ 9.5 s (9–12 s wall); a fresh ``fedtrust run`` process adds ≈ 5 s of imports and HTML report to each.
Estimate: 792 × 5.5 + 288 × 9.5 ≈ 7,100 CPU-seconds, plus ~70 process start-ups, ≈ 1 h with ``--jobs 2``
(more on a busy machine). To get there:

- every run: ``executor=sequential`` (at one thread 0.26 s/round vs 0.33 s vectorised on digits; 0.9 vs 1.4 s
  on MNIST with ``cnn`` width 16), checkpoint only at the end (deleted once the run is done), evaluation only
  after the last round, no personalized evaluation, and 16 runs per process (runpool ``per_process``, which
  skips the per-process start-up; a run in a batch equals the same run in its own process, bit for bit);
- digits: 20 rounds instead of the preset's 30 (clean accuracy ≈ 0.90–0.94 instead of ≈ 0.97);
- MNIST: 12 rounds (preset: 50) of 5 local steps of batch 16 (preset: 1 epoch ≈ 19 steps of batch 32), model
  ``cnn2`` with hidden 64 (McMahan et al.'s MNIST CNN: 0.86 after 10 rounds, where ``cnn`` width 8 with BN
  reaches 0.26 and width 8 or 16 without norm 0.11), evaluation batch 64 (about 2× faster than 1024 on one
  thread), and one fraction, 20 %, instead of three. Clean accuracy ≈ 0.88.

Attack parameters: ``sign_flip`` scale 4 (measured with ``mean`` on digits, seed 0: scale 1 at 20 % only
costs 7 points, 0.94 → 0.87; scale 4 breaks it already at 10 %: 0.46); ``gaussian`` σ such that the noise
norm σ·√d is 10× the clean runs' 90th-percentile update norm (digits: d = 94,634, σ = 0.08; MNIST: d =
253,514, σ = 0.02); ALIE (z from n and f), IPM (ε = 0.5), min-max and min-sum (std perturbation) at their
defaults; ``label_flip`` has none.

Aggregator parameters, sized to the fraction f of the cell (the 0 % row uses the smallest attacked fraction,
so it shows what a defense ready for attackers costs when none come): ``trimmed_mean`` β = f, ``krum`` and
``multikrum`` ``num_byzantine`` = f (of the n replies, floored; Multi-Krum averages n − f); ``fltrust`` a
100-sample root set (``defense.root_size=100``, held out of training); ``norm_clipping`` clip M and
``centered_clipping`` τ both at the 90th percentile of the client update norms of a clean run (seed 0,
``norm_clipping`` with clip 1e9, whose ``aggregator/model`` metrics hold every client's norm): digits 2.5
(quantiles 10/50/90 %: 0.10 / 0.49 / 2.54; round medians fall from 5.0 to 0.07 under the cosine schedule),
MNIST 1.0 (0.10 / 0.73 / 1.03). At the median instead (digits 0.49) norm clipping clips every update every
round and the clean run ends at 0.26 (centered clipping 0.82); at the 90th percentile both stay within
2 points of ``mean`` (digits 0.92 and 0.93 vs 0.94; MNIST 0.87 and 0.88 vs 0.88). ``median``, ``geomedian``
(10 Weiszfeld steps), ``foolsgold`` (κ = 1), ``rlr`` (θ = 0.4·n, inside [f + 1, n − f] for every f ≤ 30 % of
10) and ``flame`` (λ = 0.001) at their defaults.

Time per round is measured inside each run (``metrics.jsonl`` ``time_s``, rounds 2 … R − 1: no first-round
warm-up, no final evaluation), so it holds the 10 clients' local training, which is the same for every
aggregator; the aggregator's own cost is the difference to ``mean``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from runpool import (benchmark_parser, Job, md_table, mean_std, REPO, RESULTS, run_header, run_jobs, SHARED_DATA,
                     shared_data_available, with_analysis, write_results)

SIGN_FLIP_SCALE = 4.0
ROOT_SIZE = 100  # FLTrust's root data set, held out of the training set
RUNS_PER_PROCESS = 16
COMMON = ["eval.personalized=false", "checkpoint_every=0", "executor=sequential"]


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    preset: str
    overrides: tuple[str, ...]  # the data set's scale-down and fixed choices
    clip: float  # norm_clipping's M and centered_clipping's τ: 90th percentile of clean update norms
    gaussian_std: float  # σ with σ·√d = 10 × clip
    description: str


SETTINGS = {
    "digits": Setting(
        "digits", "digits (20 clients, Dirichlet 0.5)", "fedavg-digits.yaml", tuple(COMMON), 2.5, 0.08,
        "sklearn digits, 20 clients, Dirichlet 0.5, 10 per round, 1 local epoch of batch 16, SGD lr 0.05 momentum "
        "0.9 cosine, model `cnn` (width 32, BN)"),
    "mnist": Setting(
        "mnist", "MNIST (100 clients, Dirichlet 0.5)", "fedavg-mnist.yaml",
        (f"data.root={SHARED_DATA}", "data.alpha=0.5", "model.name=cnn2", "model.hidden=64", "train.steps=5",
         "train.batch_size=16", "eval.batch_size=64", *COMMON), 1.0, 0.02,
        "MNIST from ../shared/data, 100 clients, Dirichlet 0.5, 10 per round, 5 local steps of batch 16, SGD lr "
        "0.05 momentum 0.9 cosine, model `cnn2` (hidden 64)"),
}
DEFAULTS = {"fractions": "0.1,0.2,0.3", "fractions_mnist": "0.2", "rounds_digits": 20, "rounds_mnist": 12,
            "seeds": "0,1,2", "datasets": "digits,mnist"}
QUICK = {"fractions": "0.2", "fractions_mnist": "0.2", "rounds_digits": 5, "rounds_mnist": 3, "seeds": "0",
         "datasets": "digits", "attacks": "sign_flip,alie", "aggregators": "mean,median,krum"}

Cell = tuple[str | None, float]  # (attack or None, malicious fraction)


# ---------------------------------------------------------------- the grid


def attack_overrides(attack: str | None, fraction: float, s: Setting) -> list[str]:
    if attack is None:
        return []
    params = {"sign_flip": [f"attack.scale={SIGN_FLIP_SCALE}"], "gaussian": [f"attack.std={s.gaussian_std}"]}
    return [f"attack.name={attack}", f"attack.fraction={fraction}", *params.get(attack, [])]


def defense_overrides(aggregator: str, fraction: float, s: Setting) -> list[str]:
    """The aggregator with its parameters sized to ``fraction`` (and to the data set's update norms)."""
    params = {"trimmed_mean": [f"defense.beta={fraction}"], "krum": [f"defense.num_byzantine={fraction}"],
              "multikrum": [f"defense.num_byzantine={fraction}"], "centered_clipping": [f"defense.tau={s.clip}"],
              "norm_clipping": [f"defense.clip={s.clip}"], "fltrust": [f"defense.root_size={ROOT_SIZE}"]}
    return [f"defense.aggregator={aggregator}", *params.get(aggregator, [])]


def cells_of(attacks: list[str], fractions: list[float]) -> list[Cell]:
    return [(None, 0.0), *((a, f) for a in attacks for f in fractions)]


def pct(fraction: float) -> str:
    return f"{round(fraction * 100)} %"


def jobs_for(s: Setting, rounds: int, cells: list[Cell], aggregators: list[str], seeds: list[int],
             work: Path) -> dict[tuple[str, Cell, int], Job]:
    ready_for = min((f for _, f in cells if f > 0), default=0.0)  # the 0 % row's defense parameters
    out = {}
    for agg in aggregators:
        for attack, frac in cells:
            sized = defense_overrides(agg, frac if attack else ready_for, s)
            for seed in seeds:
                tag = f"{attack or 'none'}-{round(frac * 100)}"
                out[agg, (attack, frac), seed] = Job(
                    f"{s.name}/{agg}/{tag}/s{seed}", REPO / "configs" / s.preset,
                    [*s.overrides, f"rounds={rounds}", f"eval.every={rounds}", *attack_overrides(attack, frac, s),
                     *sized, f"seed={seed}"], work / s.name / agg / f"{tag}-s{seed}", keep_checkpoint=False)
    return out


# ---------------------------------------------------------------- reading the runs


def seconds_per_round(run_dir: Path) -> float | None:
    """Mean duration of rounds 2 … R − 1 from ``metrics.jsonl`` (no warm-up round, no final evaluation)."""
    t = [json.loads(line)["time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    if len(t) < 3:
        return t[-1] / len(t) if t else None
    return (t[-2] - t[0]) / (len(t) - 2)


def accuracy_table(jobs: dict, cells: list[Cell], aggregators: list[str], seeds: list[int],
                   fractions: list[float]) -> tuple[list[str], dict[tuple[str, Cell], float]]:
    """Markdown rows (attack × fraction) × aggregators of test accuracy, best mean of a row in bold; plus the
    mean accuracy of every (aggregator, cell)."""
    means: dict[tuple[str, Cell], float] = {}
    rows = []
    for cell in cells:
        accs = {agg: [jobs[agg, cell, seed].summary()["test_acc"] for seed in seeds] for agg in aggregators}
        means.update({(agg, cell): 100 * statistics.mean(v) for agg, v in accs.items()})
        best = max(means[agg, cell] for agg in aggregators)
        row = [cell[0] or "none", pct(cell[1])]
        for agg in aggregators:
            text = mean_std(accs[agg])
            row.append(f"**{text}**" if means[agg, cell] == best else text)
        rows.append(row)
    attacks = sorted({a for a, _ in cells if a})
    for frac in fractions:  # the worst attack each defense meets, per fraction
        rows.append([f"*worst of {len(attacks)}*", pct(frac),
                     *(f"{min(means[agg, (a, frac)] for a in attacks):.1f}" for agg in aggregators)])
    return md_table(["attack", "malicious", *aggregators], rows, 2), means


def heatmap(s: Setting, means: dict[tuple[str, Cell], float], aggregators: list[str], attacks: list[str],
            fraction: float, n_seeds: int, path: Path) -> None:
    """Aggregator × attack at ``fraction`` (plus the no-attack column), colored by mean final accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [(None, 0.0), *((a, fraction) for a in attacks)]
    grid = np.array([[means[agg, c] for c in cols] for agg in aggregators])
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.6, 0.42 * len(aggregators) + 1.6))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < 12 or grid[i, j] > 88 else "black")
    ax.set_xticks(range(len(cols)), ["no attack (0 %)", *attacks], rotation=30, ha="right")
    ax.set_yticks(range(len(aggregators)), aggregators)
    ax.set_xlabel(f"attack ({pct(fraction)} malicious clients)")
    ax.set_title(f"{s.title}\nfinal test accuracy (%), mean of {n_seeds} seed(s)", fontsize=10)
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args():
    parser = benchmark_parser(__doc__, "byzantine")
    parser.set_defaults(seeds=None, datasets=None)
    parser.add_argument("--fractions", help=f"malicious fractions on digits (default {DEFAULTS['fractions']}; "
                                            "0 %% is always run, once per aggregator)")
    parser.add_argument("--fractions-mnist",
                        help=f"malicious fractions on MNIST (default {DEFAULTS['fractions_mnist']})")
    parser.add_argument("--attacks", help="comma-separated (default: every registered attack)")
    parser.add_argument("--aggregators", help="comma-separated (default: every registered aggregator)")
    parser.add_argument("--rounds-digits", type=int, help=f"default {DEFAULTS['rounds_digits']} (preset: 30)")
    parser.add_argument("--rounds-mnist", type=int, help=f"default {DEFAULTS['rounds_mnist']} (preset: 50)")
    parser.add_argument("--runs-per-process", type=int, default=RUNS_PER_PROCESS,
                        help="runs one process does in turn (1: a fresh `fedtrust run` process per run)")
    parser.add_argument("--quick", action="store_true", help="smoke test: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + "; results in byzantine-quick.md")
    args = parser.parse_args()
    for key in ("fractions", "fractions_mnist", "rounds_digits", "rounds_mnist", "seeds", "datasets", "attacks",
                "aggregators"):  # explicit option > --quick > full default
        if getattr(args, key) is None:
            setattr(args, key, (QUICK if args.quick else DEFAULTS).get(key))
    if args.quick and args.work == "runs/bench-byzantine":
        args.work = "runs/bench-byzantine-quick"
    return args


def registered(kind: str, wanted: str | None) -> list[str]:
    from fedtrust.registry import names

    known = names(kind)
    if wanted is None:  # every registered one; mean first, as the reference
        return sorted(known, key=lambda n: (n != "mean", n))
    chosen = [n for n in wanted.split(",") if n]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown {kind} {unknown[0]!r}; registered: {', '.join(known)}")
    return chosen


@dataclass
class Plan:
    """One data set's part of the benchmark: its cells and their runs."""

    setting: Setting
    rounds: int
    fractions: list[float]
    cells: list[Cell]
    jobs: dict[tuple[str, Cell, int], Job]


def scaled_note(p: Plan) -> str:
    if p.setting.name == "digits":
        return f"digits {p.rounds} rounds instead of the preset's 30"
    return (f"MNIST {p.rounds} rounds (preset 50) of 5 local steps of batch 16 (preset: 1 epoch of batch 32), model "
            f"`cnn2` hidden 64 instead of `cnn`, evaluation batch 64, malicious "
            f"{', '.join(pct(f) for f in p.fractions)} only")


def header_lines(args, plans: dict[str, Plan], every: list[Job], todo: int, elapsed_min: float,
                 cmd: str, notes: list[str]) -> list[str]:
    quick = " — QUICK SMOKE TEST" if args.quick else ""
    lines = run_header(f"Byzantine robustness: attacks × aggregators under FedAvg (issue 13){quick}", cmd, args, every, todo, elapsed_min)
    for p in plans.values():
        walls = [j.summary()["wall_time_s"] for j in p.jobs.values()]
        lines.append(f"- {p.setting.title}: {p.setting.description}; {p.rounds} rounds; malicious fractions "
                     f"{', '.join(pct(f) for f in p.fractions)}; median run {statistics.median(walls):.1f} s "
                     f"(inside the process, start-up excluded). Overrides: "
                     f"`{' '.join(p.setting.overrides).replace(str(SHARED_DATA), '../shared/data')}`.")

    def per_set(attr: str) -> str:
        return ", ".join(f"{d} {getattr(p.setting, attr):g}" for d, p in plans.items())

    return lines + [
        "- Scaled down so the full grid fits about an hour on 2 CPU cores (the script's docstring has the "
        f"measurements): {'; '.join(scaled_note(p) for p in plans.values())}; every run with the sequential "
        "executor, evaluation and checkpoint only after the last round, no personalized evaluation.",
        f"- Attacks: `sign_flip` scale {SIGN_FLIP_SCALE:g}; `gaussian` σ with σ·√d = 10 × the clean "
        f"90th-percentile update norm ({per_set('gaussian_std')}); ALIE, IPM (ε 0.5), min-max, min-sum at their "
        "defaults. Malicious clients are drawn once per seed and attack whenever sampled.",
        "- Aggregators, sized to the cell's fraction f (the 0 % row: the smallest attacked fraction): "
        f"`trimmed_mean` β = f, `krum`/`multikrum` num_byzantine = f; `fltrust` root set of {ROOT_SIZE} samples "
        "held out of training; `norm_clipping` clip and `centered_clipping` τ = the 90th percentile of a clean "
        f"run's client update norms ({per_set('clip')}); the others at their defaults.",
        "- Final test accuracy in %, mean ± std over seeds; the best mean of a row in bold; the 0 % row (no "
        "attack) is shared by every attack. *worst of N*: the lowest mean over the attacks at that fraction.",
        *notes]


def time_lines(plans: dict[str, Plan], aggregators: list[str]) -> list[str]:
    ref = aggregators[0]
    header, rows = ["aggregator"], {agg: [agg] for agg in aggregators}
    for d, p in plans.items():
        header += [f"{d} (s / round)", f"{d} × {ref}"]
        secs = {key: seconds_per_round(j.out) for key, j in p.jobs.items()}
        per = {agg: [x for (a, _, _), x in secs.items() if a == agg and x is not None] for agg in aggregators}
        for agg in aggregators:
            rows[agg] += [mean_std(per[agg], scale=1, digits=3),
                          f"{statistics.mean(per[agg]) / statistics.mean(per[ref]):.2f}"]
    return ["", "## Time per round", "",
            "Seconds per round inside the run (rounds 2 … R − 1), mean ± std over every run of the aggregator "
            "(all attacks, fractions and seeds); it includes the 10 clients' local training, the same for every "
            f"aggregator. × {ref}: the ratio to `{ref}` on the same data set.", "",
            *md_table(header, list(rows.values()))]


def main() -> None:
    args = parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    attacks, aggregators = registered("attack", args.attacks), registered("aggregator", args.aggregators)
    fractions = {"digits": [float(x) for x in args.fractions.split(",")],
                 "mnist": [float(x) for x in args.fractions_mnist.split(",")]}
    rounds = {"digits": args.rounds_digits, "mnist": args.rounds_mnist}
    notes, plans = [], {}
    for d in [d for d in args.datasets.split(",") if d]:
        if d not in SETTINGS:
            raise SystemExit(f"unknown data set {d!r}; this benchmark knows {', '.join(SETTINGS)}")
        if d == "mnist" and not shared_data_available("mnist"):
            notes.append("- MNIST skipped: ../shared/data/mnist/train.npz is absent on this machine.")
            continue
        cells = cells_of(attacks, fractions[d])
        plans[d] = Plan(SETTINGS[d], rounds[d], fractions[d], cells,
                        jobs_for(SETTINGS[d], rounds[d], cells, aggregators, seeds, Path(args.work)))
    every = [j for d in ("mnist", "digits") if d in plans for j in plans[d].jobs.values()]  # long runs first
    todo = sum(not j.done() for j in every)
    start = time.time()
    run_jobs(every, args.jobs, args.runs_per_process)
    elapsed_min = (time.time() - start) / 60

    cmd = (f"python benchmarks/byzantine.py --seeds {args.seeds} --jobs {args.jobs} --datasets {args.datasets} "
           f"--fractions {args.fractions} --fractions-mnist {args.fractions_mnist} --rounds-digits "
           f"{args.rounds_digits} --rounds-mnist {args.rounds_mnist} --attacks {','.join(attacks)} "
           f"--aggregators {','.join(aggregators)}")
    name = "byzantine-quick" if args.quick else "byzantine"
    lines = header_lines(args, plans, every, todo, elapsed_min, cmd, notes)
    for d, p in plans.items():
        table, means = accuracy_table(p.jobs, p.cells, aggregators, seeds, p.fractions)
        at = 0.2 if 0.2 in p.fractions else max(p.fractions)
        png = f"{name}-{d}.png"
        heatmap(p.setting, means, aggregators, attacks, at, len(seeds), RESULTS / png)
        lines += ["", f"## {p.setting.title}", "", *table, "", f"![{d}: aggregator × attack at {pct(at)}]({png})"]
    lines += time_lines(plans, aggregators)
    write_results(f"{name}.md", lines if args.quick else with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
