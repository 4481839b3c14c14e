"""Heterogeneous widths benchmark (issue 16): Split-Mix against SHeteroFL, HeteroFL, FedRolex and width-1/8 FedAvg on
digits domains: accuracy per width with MACs and parameters, accuracy per domain, Split-Mix + DAT's clean /
robust trade-off over the test-time mix μ, and the cost of a round with the bases vectorised or one by one.

Reproduce (from the repository root; about 15 min on 2 CPU cores):

    python benchmarks/hetero_width.py --seeds 0,1,2 --jobs 2

Setup: the presets ``configs/{splitmix,sheterofl,heterofl,fedrolex,fedavg-width}-digits-domains.yaml``: bundled digits
rendered as five domains (plain, inverted, MNIST-M-style photo blend, noisy, rotated), two clients per domain
(domain-major), budgets in contiguous blocks {1/8, 1/4, 1/2, 1} (budget tied to domain, as in the paper's
Digits setting: plain digits get 1/8, rotated get 1), ``cnn`` of width 32 with batch-statistics BN, 30
rounds, all clients every round. Robustness: Split-Mix with the ``dat`` objective (λ 0.5,
PGD-7 at ε = 8/255 in pixel units) on dual-BN bases, scored by ``robust_acc`` at μ ∈ {0, 0.2, 0.5, 0.8, 1}
(one training of 15 rounds: PGD makes a step about 9× dearer). Timing: the executor=vectorized and executor=sequential runs of the Split-Mix preset, seed 0.
Results: ``benchmarks/results/hetero_width.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from runpool import Job, REPO, benchmark_parser, md_table, mean_std, run_jobs, total_minutes, with_analysis, \
    write_results

METHODS = {
    "splitmix": ("Split-Mix", "splitmix-digits-domains.yaml"),
    "sheterofl": ("SHeteroFL", "sheterofl-digits-domains.yaml"),
    "heterofl": ("HeteroFL", "heterofl-digits-domains.yaml"),
    "fedrolex": ("FedRolex", "fedrolex-digits-domains.yaml"),
    "fedavg": ("FedAvg at width 1/8", "fedavg-width-digits-domains.yaml"),
}
WIDTHS = (0.125, 0.25, 0.5, 1.0)
DOMAINS = ("plain", "inverted", "mnist_m", "noisy", "rotated")
DAT = ("objective.name=dat", "objective.lam=0.5", "model.norm=dual_bn", "algorithm.rescale_layer=false",
       "eval.metrics=[accuracy,robust_acc]", "eval.robust.num_samples=500")


def final(job: Job) -> dict:
    records = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in reversed(records) if "test_acc" in r)


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
    jobs["dat", 0] = Job("splitmix-dat-s0", REPO / "configs" / METHODS["splitmix"][1],
                         ["seed=0", "rounds=15", "eval.every=15", "checkpoint_every=0", *DAT],
                         work / "splitmix-dat-s0")
    timing = {ex: Job(f"splitmix-{ex}", REPO / "configs" / METHODS["splitmix"][1],
                      ["seed=0", "rounds=4", "eval.every=4", "checkpoint_every=0", f"executor={ex}"],
                      work / f"timing-{ex}") for ex in ("vectorized", "sequential")}
    every = [*jobs.values()]
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

    dat = final(jobs["dat", 0]).get("robust") or final(jobs["dat", 0]).get("by_predictor", {}).get("x1", {}).get("robust")
    if dat:
        rows = [[f"{mu:g}", f"{100 * c:.1f}", f"{100 * r:.1f}"] for mu, c, r in
                zip(dat["mu"], dat["clean_acc"], dat["robust_acc"])]
        lines += ["", "## Robustness: Split-Mix + DAT, one training of 15 rounds, test-time mix μ (x1, seed 0)", "",
                  f"PGD-{dat['steps']} at ε = {dat['eps']:.4f} (pixel units), {dat['samples']} test images.", "",
                  *md_table(["μ", "clean acc", "PGD acc"], rows)]

    t = {ex: j.summary().get("wall_time_s") for ex, j in timing.items()}
    lines += ["", "## Time per round: bases vectorised against one base at a time (Split-Mix preset, 4 rounds)", "",
              *md_table(["executor", "wall time (s, 4 rounds incl. evaluation)"],
                        [[ex, f"{v:.1f}" if v else "—"] for ex, v in t.items()])]
    write_results("hetero_width.md", with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
