"""Update-privacy benchmark (issue 18): what the clients' prune / clip / noise defense (config ``privacy``) costs in
accuracy and buys against gradient leakage, measured with the ``leakage`` evaluator and ``fedtrust audit``.

Reproduce (from the repository root; about 12 min on 2 CPU cores: 5 for the runs, the rest for the audits):

    python benchmarks/update_privacy.py --seeds 0,1,2 --jobs 2

FedAvg on the digits preset (20 clients, Dirichlet 0.5, 10 a round, 30 rounds of one local epoch) with the
spec's sigmoid ConvNet5 (init U(±0.5), the net gradient inversion succeeds on; lr 0.5, since it barely trains
at the preset's 0.05), once per ``privacy`` setting and seed. Each finished run is then audited in process
(:func:`fedtrust.runner.audit.audit_run`): the first 2 samples of the first 2 clients, one sample's gradient at
the final model, DLG (L-BFGS, 10 steps × 2 restarts, labels given), and the ``privacy`` row: the run's own
defense applied to the update −η·g exactly as its clients apply it (one local step of one sample, the
smallest update a client could share, so the defense's noise weighs most here; a real update of an epoch is
larger). Reported: final test accuracy (mean ± std over seeds), the leakage evaluator's final I_lb of its 4
probes at the reference σ = 1e-3 (how exposed the model itself is), and over the audited samples the median
I_lb and the median DLG and IG PSNR / SSIM against the defended update. Results:
``benchmarks/results/update_privacy.md``; runs under ``--work``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from runpool import benchmark_parser, Job, md_table, mean_std, REPO, run_header, run_jobs, with_analysis, write_results

BASE = ["model.name=convnet5", "train.lr=0.5", "eval.personalized=false", "eval.metrics=[accuracy,leakage]",
        "eval.every=10", "executor=sequential"]
SETTINGS = {  # name -> privacy overrides
    "none": [],
    "clip 1": ["privacy.clip=1"],
    "clip 0.1": ["privacy.clip=0.1"],
    "clip 1, noise 1e-4": ["privacy.clip=1", "privacy.noise=1e-4"],
    "clip 1, noise 1e-3": ["privacy.clip=1", "privacy.noise=1e-3"],
    "clip 1, noise 1e-2": ["privacy.clip=1", "privacy.noise=1e-2"],
    "prune 0.5": ["privacy.prune=0.5"],
    "prune 0.9": ["privacy.prune=0.9"],
}


def _median(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    return f"{statistics.median(vals):.3g}" if vals else "—"


ATTACKS = {"dlg": dict(iterations=10, restarts=2), "ig": dict(iterations=500, restarts=1)}


def audit_rows(run_dir: Path, attack: str) -> list[dict]:
    """The defended ('privacy', else 'none') rows of the run's audit by ``attack`` (cached in
    ``<run>/audit-<attack>/audit/audit.json``)."""
    import json

    from fedtrust.runner.audit import AuditSettings, audit_run, write_audit

    file = run_dir / f"audit-{attack}" / "audit" / "audit.json"
    if not file.is_file():
        settings = AuditSettings(num_clients=2, samples=2, sigmas=(1e-3,), attack=attack, **ATTACKS[attack])
        write_audit(audit_run(run_dir, settings, out=run_dir / f"audit-{attack}"))
    rows = json.loads(file.read_text())["rows"]
    wanted = "privacy" if any(r["defense"] == "privacy" for r in rows) else "none"
    return [r for r in rows if r["defense"] == wanted]


def main() -> None:
    parser = benchmark_parser(__doc__, "update_privacy")
    parser.add_argument("--runs-per-process", dest="runs_per_process", type=int, default=4)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    jobs = {(name, seed): Job(f"{name}-{seed}", REPO / "configs" / "fedavg-digits.yaml",
                              [*BASE, *extra, f"seed={seed}"], work / f"{name.replace(' ', '').replace(',', '-')}-s{seed}")
            for name, extra in SETTINGS.items() for seed in seeds}
    every = list(jobs.values())
    todo = sum(not j.done() for j in every)
    start = time.time()
    run_jobs(every, args.jobs, per_process=args.runs_per_process)
    import torch

    torch.set_num_threads(1)
    table = []
    for name in SETTINGS:
        runs = [jobs[name, s] for s in seeds]
        finals = [r.summary() for r in runs]
        dlg = [row for r in runs for row in audit_rows(r.out, "dlg")]
        ig = [row for r in runs for row in audit_rows(r.out, "ig")]
        table.append([name, mean_std([f.get("test_acc") for f in finals]),
                      _median([(f.get("leakage") or {}).get("i2f_lb") for f in finals]),
                      _median([row["i2f_lb"] for row in dlg]), _median([row["psnr"] for row in dlg]),
                      _median([row["ssim"] for row in dlg]), _median([row["psnr"] for row in ig]),
                      _median([row["ssim"] for row in ig])])
        print(f"done {name}", flush=True)
    lines = run_header("Update privacy: prune / clip / noise against accuracy and gradient leakage (issue 18)",
                       f"python benchmarks/update_privacy.py --seeds {args.seeds} --jobs {args.jobs}", args, every,
                       todo, (time.time() - start) / 60)
    lines += ["", "digits, ConvNet5 (sigmoid, U(±0.5)), FedAvg 30 rounds, lr 0.5; audit: 2 clients × 2 samples per "
              "run, one-sample gradient at the final model; DLG: L2 matching, 10 L-BFGS steps × 2 restarts; IG: "
              "cosine matching (blind to the update's scale), 500 signed-Adam steps, box, 1 restart. Medians over "
              "the 12 audited samples.", "",
              *md_table(["privacy", "test acc (%)", "model I_lb (σ 1e-3)", "audit I_lb", "DLG PSNR (dB)", "DLG SSIM",
                         "IG PSNR (dB)", "IG SSIM"], table)]
    write_results("update_privacy.md", with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
