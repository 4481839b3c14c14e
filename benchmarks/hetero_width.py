"""Heterogeneous widths benchmark (issue 16): Split-Mix against SHeteroFL, HeteroFL, FedRolex and width-1/8 FedAvg on
digits domains: accuracy per width with MACs and parameters, accuracy per domain, Split-Mix + DAT's clean /
robust trade-off over the test-time mix μ, and the cost of a round with the bases vectorised or one by one.

Reproduce (from the repository root; about 30 min on 2 CPU cores):

    python benchmarks/hetero_width.py --seeds 0,1,2 --jobs 2

Setup: the presets ``configs/{splitmix,sheterofl,heterofl,fedrolex,fedavg-width}-digits-domains.yaml``: bundled digits
rendered as five domains (plain, inverted, MNIST-M-style photo blend, noisy, rotated), two clients per domain
(domain-major), budgets in contiguous blocks {1/8, 1/4, 1/2, 1} (budget tied to domain, as in the paper's
Digits setting: plain digits get 1/8, rotated get 1), ``cnn`` of width 32 with batch-statistics BN, 30
rounds, all clients every round. Robustness: ``configs/splitmix-dat-digits.yaml`` (one full-width dual-BN net
trained by DAT, λ 0.5, PGD-7 at ε = 0.2 in pixel units, 15 rounds on bundled digits), scored by ``robust_acc``
at μ ∈ {0, 0.2, 0.5, 0.8, 1}, every seed. Timing: the Split-Mix preset with executor=vectorized (every
(client, base) job of a round in one vmapped step) against executor=sequential (one client, and within it one
base, after another), seed 0, on digits domains (8×8) and on MNIST domains (28×28, 100 clients of ~600
images, 10 a round). Figures (seed 0): accuracy per width and robust vs clean accuracy per μ, drawn by the
run report's own plot functions. Results: ``benchmarks/results/hetero_width.md``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from runpool import Job, REPO, RESULTS, benchmark_parser, md_table, mean_std, run_jobs, shared_data_available, \
    total_minutes, with_analysis, write_results

METHODS = {
    "splitmix": ("Split-Mix", "splitmix-digits-domains.yaml"),
    "sheterofl": ("SHeteroFL", "sheterofl-digits-domains.yaml"),
    "heterofl": ("HeteroFL", "heterofl-digits-domains.yaml"),
    "fedrolex": ("FedRolex", "fedrolex-digits-domains.yaml"),
    "fedavg": ("FedAvg at width 1/8", "fedavg-width-digits-domains.yaml"),
}
WIDTHS = (0.125, 0.25, 0.5, 1.0)
DOMAINS = ("plain", "inverted", "mnist_m", "noisy", "rotated")
MUS = (0.0, 0.2, 0.5, 0.8, 1.0)
TIMING_ROUNDS = 4
TIMING = {"digits domains (8×8, 10 clients, all per round)": ["eval.metrics=[accuracy]"],
          "MNIST domains (28×28, 100 clients, 10 per round)": [
              "data.dataset=mnist_domains", f"data.root={REPO.parent / 'shared' / 'data'}", "data.num_clients=100",
              "data.clients_per_round=10", "eval.metrics=[accuracy]"]}


def final(job: Job) -> dict:
    records = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in reversed(records) if "test_acc" in r)


def round_seconds(job: Job) -> float:
    """Median wall seconds of a run's rounds that did not evaluate (``time_s`` is cumulative)."""
    records = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [0.0, *(r["time_s"] for r in records)]
    return statistics.median(b - a for a, b, r in zip(times, times[1:], records) if "test_acc" not in r)


def per_width(record: dict, width: float) -> dict | None:
    by = record.get("by_predictor")
    if by is None:  # a single predictor (FedAvg): its width is its own
        return record if width == 0.125 else None
    return by.get(f"x{width:g}")


def main() -> None:
    parser = benchmark_parser(__doc__, "hetero_width")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    jobs = {(m, s): Job(f"{m}-s{s}", REPO / "configs" / cfg, [f"seed={s}", "eval.every=30", "checkpoint_every=0"],
                        work / f"{m}-s{s}") for m, (_, cfg) in METHODS.items() for s in seeds}
    dat = {s: Job(f"splitmix-dat-s{s}", REPO / "configs" / "splitmix-dat-digits.yaml",
                  [f"seed={s}", "eval.every=15", "checkpoint_every=0"], work / f"dat-s{s}") for s in seeds}
    timing = {(where, ex): Job(f"splitmix-{ex}-{k}", REPO / "configs" / METHODS["splitmix"][1],
                               ["seed=0", f"rounds={TIMING_ROUNDS}", f"eval.every={TIMING_ROUNDS}", "checkpoint_every=0",
                                f"executor={ex}", *over], work / f"timing{k}-{ex}")
              for k, (where, over) in enumerate(TIMING.items()) for ex in ("vectorized", "sequential")
              if k == 0 or shared_data_available("mnist")}
    every = [*jobs.values(), *dat.values()]
    todo = sum(not j.done() for j in every)
    start = time.time()
    run_jobs(every, args.jobs)
    run_jobs(list(timing.values()), 1)  # one at a time: the timing rows are the code's own speed

    cmd = f"python benchmarks/hetero_width.py --seeds {args.seeds} --jobs {args.jobs}"
    lines = ["# Heterogeneous widths: Split-Mix, SHeteroFL, HeteroFL, FedRolex, FedAvg at width 1/8 (issue 16)", "",
             f"Reproduce: `{cmd}` (from the repository root; runs kept under `{args.work}`).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}; {len(every)} runs "
             f"({todo} run by this invocation in {(time.time() - start) / 60:.1f} min; the runs' own wall times add up "
             f"to {total_minutes(every):.1f} min); 2 CPU cores, one torch thread per run, {args.jobs} at a time.",
             "- Digits domains, 10 clients (2 per domain), block budgets {1/8, 1/4, 1/2, 1} tied to domain (plain 1/8, "
             "inverted 1/4, mnist_m 1/2, noisy and rotated split 1/2 and 1 by the blocks), `cnn` width 32, static BN, "
             "30 rounds; accuracy in % (mean ± std over seeds) on every domain's test images at every width whatever "
             "the budget (spec §6). MACs and parameters of one 3×8×8 input from `torch.utils.flop_counter`.", ""]

    rows = []
    for m, (title, _) in METHODS.items():
        recs = [final(jobs[m, s]) for s in seeds]
        for w in WIDTHS:
            vals = [per_width(r, w) for r in recs]
            if any(v is None for v in vals):
                continue
            cost = vals[0].get("cost", {})
            rows.append([title, f"x{w:g}", mean_std([v["test_acc"] for v in vals]),
                         f"{cost.get('macs', 0) / 1e3:.1f}k", f"{cost.get('params', 0) / 1e3:.1f}k"])
    lines += ["## Accuracy per width", "", *md_table(["method", "width", "accuracy", "MACs", "params"], rows, 2)]

    rows = []
    for m, (title, _) in METHODS.items():
        recs = [final(jobs[m, s]) for s in seeds]
        for w in (WIDTHS if m != "fedavg" else (0.125,)):
            vals = [per_width(r, w) for r in recs]
            if any(v is None or "domain_acc" not in v for v in vals):
                continue
            rows.append([title, f"x{w:g}", *(mean_std([v["domain_acc"][d] for v in vals]) for d in DOMAINS)])
    lines += ["", "## Accuracy per domain (budget of the domain's clients in brackets)", "",
              *md_table(["method", "width", "plain (1/8)", "inverted (1/4)", "mnist_m (1/2)", "noisy (1/2, 1)",
                         "rotated (1)"], rows, 2)]

    sweeps = [final(dat[s]).get("robust") for s in seeds]
    rows = [[f"{mu:g}", mean_std([sw["clean_acc"][i] for sw in sweeps]), mean_std([sw["robust_acc"][i] for sw in sweeps])]
            for i, mu in enumerate(sweeps[0]["mu"])]
    lines += ["", "## Robustness: one DAT training, test-time BN mix μ (configs/splitmix-dat-digits.yaml)", "",
              f"One full-width dual-BN `cnn` (width 32) per seed, DAT λ 0.5, 15 rounds on bundled digits (10 IID "
              f"clients); white-box PGD-{sweeps[0]['steps']} at ε = {sweeps[0]['eps']:g} (pixel units, random start) "
              f"against the μ-mixed model, {sweeps[0]['samples']} test images; accuracy in % over seeds {args.seeds}.",
              "", *md_table(["μ", "clean acc", "PGD acc"], rows)]

    rows = []
    for where in TIMING:
        per = {ex: round_seconds(timing[where, ex]) for ex in ("vectorized", "sequential") if (where, ex) in timing}
        if len(per) == 2:
            rows.append([where, f"{per['vectorized']:.2f}", f"{per['sequential']:.2f}",
                         f"{per['sequential'] / per['vectorized']:.2f}×"])
    lines += ["", "## Time per round: bases vectorised against one base at a time (Split-Mix preset, seed 0)", "",
              f"Median seconds of the {TIMING_ROUNDS - 1} training rounds without evaluation, one torch thread, "
              "runs one at a time. Vectorised: every (client, base) job of the round in one vmapped step; "
              "sequential: one client after another, its bases one after another on each batch. `executor=auto` "
              "picks sequential on a CPU for images above 16×16 (fedtrust.fl.vectorized.CPU_MAX_PIXELS).", "",
              *md_table(["data", "vectorised (s)", "one at a time (s)", "vectorised speed-up"], rows)]

    from fedtrust.report import load_run, plots
    figures = {"hetero_width-accuracy.png": plots.width_png([load_run(jobs[m, seeds[0]].out) for m in METHODS]),
               "hetero_width-robust.png": plots.robust_png([load_run(dat[seeds[0]].out)])}
    lines += ["", f"## Figures (seed {seeds[0]}; the run report's plots)", ""]
    for name, png in figures.items():
        if png is not None:
            (RESULTS / name).write_bytes(png)
            lines += [f"![{name}]({name})", ""]
    write_results("hetero_width.md", with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
