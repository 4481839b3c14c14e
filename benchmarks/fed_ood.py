"""Federated OOD detection benchmark (issue 17): IS&BC and its ablations against FedAvg's post-hoc scores,
FedOE and federated RNA, with the bytes each sends.

Reproduce (from the repository root; about 4 min on 2 CPU cores):

    python benchmarks/fed_ood.py --seeds 0,1,2 --jobs 2

Digits setup (spec fedood_isbc.md §6, ``configs/isbc-digits.yaml``): ID = digits 0–5, 20 clients
(Dirichlet 0.5, all in every round), the ``cnn``; the server's outlier pool is photo crops + digits 6–7
(training split, 576 images); test OOD sets the server never sees: digits 8–9 (test split), textures, noise.

- **FedAvg** (step 1, 20 rounds) scored by MSP, Energy, MaxLogit and RN (post-hoc, one run);
- **FedAvg, 5 more rounds**: the step-1 run continued for as many rounds as IS&BC's step 2 (the extra
  training alone, without the split or the outliers);
- **FedOE**: FedAvg with the OE objective, each round's clients getting an equal share of the outlier pool
  (they receive outlier images);
- **FedAvg + RNA** (variant A: outliers shipped to the clients, spec rna.md §8) scored by RN;
- **IS&BC** (step 2 from each seed's FedAvg run, 5 rounds, ``configs/isbc-digits.yaml``) and its ablations:
  β = 0 (no outliers), without mixup, back-layer OE without the concat head (``head=plain``), head-only OE
  (``train=head``).

Reported per method: ID accuracy, and per OOD set AUROC, AUPR-in, AUPR-out, FPR95 (OOD recall, the RNA
repository's convention) and FPR95 (ID recall), mean ± std over seeds in %; and the bytes a client sends
and receives per round (weights for the FedAvg family, plus its outlier share for FedOE and RNA; the front
down and the mixed features up for IS&BC). Federated RNA variant B (BN moments of the server's outliers
instead of images) is not built yet. Results: ``benchmarks/results/fed_ood.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from runpool import benchmark_parser, Job, md_table, mean_std, REPO, run_jobs, total_minutes, with_analysis, write_results

COMMON = ["data.id_classes=[0,1,2,3,4,5]", "data.num_clients=20", "data.clients_per_round=20",
          "data.alpha=0.5", "eval.personalized=false", "eval.num_ood=71",
          'eval.ood=["classes:digits:test:8,9",textures,noise]', "eval.every=5"]
OUTLIERS = ['data.outliers=[photos,"classes:digits:train:6,7"]', "data.num_outliers=576"]
OOD = ("classes:digits:test:8,9", "textures", "noise")
OOD_TITLES = {"classes:digits:test:8,9": "digits 8–9", "textures": "textures", "noise": "noise"}


@dataclass(frozen=True)
class Method:
    title: str
    overrides: tuple[str, ...]
    score: str = "msp"
    step2: bool = False
    run: str = ""
    """Another method's runs this one reads (post-hoc scores of the FedAvg run)."""


FEDAVG = ("rounds=20", "eval.scores=[msp,energy,maxlogit,rn]")
METHODS = {
    "fedavg": Method("FedAvg + MSP", FEDAVG),
    "fedavg_energy": Method("FedAvg + Energy", (), "energy", run="fedavg"),
    "fedavg_maxlogit": Method("FedAvg + MaxLogit", (), "maxlogit", run="fedavg"),
    "fedavg_rn": Method("FedAvg + RN", (), "rn", run="fedavg"),
    "fedavg_more": Method("FedAvg, 5 more rounds + MSP", ("rounds=5",), step2=True),
    "fedoe": Method("FedOE (clients get outliers)", ("rounds=20", "objective.name=oe", *OUTLIERS)),
    "rna": Method("FedAvg + RNA (variant A) + RN", ("rounds=20", "objective.name=rna", *OUTLIERS,
                                                    "eval.scores=[rn,msp]"), "rn"),
    "isbc": Method("IS&BC", (), step2=True),
    "isbc_beta0": Method("IS&BC, β = 0", ("algorithm.beta=0",), step2=True),
    "isbc_nomix": Method("IS&BC without mixup", ("algorithm.mixup=false",), step2=True),
    "isbc_plain": Method("back-layer OE, no concat head", ("algorithm.head=plain",), step2=True),
    "isbc_head": Method("head-only OE", ("algorithm.train=head",), step2=True),
}


def jobs_for(seeds: list[int], work: Path) -> dict[tuple[str, int], Job]:
    jobs: dict[tuple[str, int], Job] = {}
    for seed in seeds:
        for name, m in METHODS.items():
            if m.run:
                continue
            if m.step2:
                source = jobs["fedavg", seed].out
                config = "fedavg-digits.yaml" if name == "fedavg_more" else "isbc-digits.yaml"
                extra = COMMON if name == "fedavg_more" else []
                job = Job(f"{name}-s{seed}", REPO / "configs" / config,
                          [*extra, *m.overrides, f"seed={seed}", f"init_from={source}", "eval.every=5"],
                          work / f"{name}-s{seed}")
            else:
                job = Job(f"{name}-s{seed}", REPO / "configs" / "fedavg-digits.yaml",
                          [*COMMON, *m.overrides, f"seed={seed}"], work / f"{name}-s{seed}")
            jobs[name, seed] = job
    return jobs


def bytes_per_round(job: Job, name: str) -> tuple[float, float]:
    """(up, down) bytes per client per round of a finished run."""
    records = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if "isbc" in records[-1]:
        return records[-1]["isbc"]["upload_bytes_mean"], records[-1]["isbc"]["download_bytes"]
    from safetensors import safe_open

    with safe_open(str(job.out / "checkpoint.safetensors"), "pt") as f:
        model = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("server/model/")) * 4
    share = 576 * 64 // 20 if name in ("fedoe", "rna") else 0  # uint8 8x8 outliers, an equal share of 20 clients
    return model, model + share


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = benchmark_parser(__doc__, "fed_ood")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    jobs = jobs_for(seeds, work)
    start = time.time()
    run_jobs([j for (n, _), j in jobs.items() if not METHODS[n].step2], args.jobs, per_process=3)
    run_jobs([j for (n, _), j in jobs.items() if METHODS[n].step2], args.jobs, per_process=3)
    rows, per_set = [], {s: [] for s in OOD}
    for name, m in METHODS.items():
        runs = [jobs[m.run or name, s] for s in seeds]
        finals = [r.summary() for r in runs]
        up, down = bytes_per_round(runs[0], m.run or name)
        rows.append([m.title, mean_std([f["test_acc"] for f in finals]),
                     mean_std([sum(f["ood"][f"{s}/{m.score}"]["auroc"] for s in OOD) / len(OOD) for f in finals]),
                     f"{up / 1024:.1f}", f"{down / 1024:.1f}"])
        for s in OOD:
            vals = [f["ood"][f"{s}/{m.score}"] for f in finals]
            per_set[s].append([m.title, *(mean_std([v[k] for v in vals]) for k in
                                          ("auroc", "aupr_in", "aupr_out", "fpr95_ood_recall", "fpr95_id_recall"))])
    cmd = f"python benchmarks/fed_ood.py --seeds {args.seeds} --jobs {args.jobs}"
    lines = ["# Federated OOD detection: IS&BC, its ablations and baselines (issue 17)", "",
             f"Reproduce: `{cmd}` (from the repository root; runs kept under `{args.work}`).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}; 2 CPU cores, one "
             f"torch thread per run, {args.jobs} at a time; {(time.time() - start) / 60:.1f} min for this invocation, "
             f"the runs' own wall times add up to {total_minutes(list(jobs.values())):.1f} min.",
             "- Digits, ID classes 0–5, 20 clients (Dirichlet 0.5, all every round), cnn; server outliers: photo "
             "crops + digits 6–7 (train, 576); OOD tests: digits 8–9 (test), textures, noise (71 each). FedAvg 20 "
             "rounds; IS&BC 5 rounds from it (configs/isbc-digits.yaml). Values in %, mean ± std over seeds.", "",
             "## Summary", "",
             *md_table(["method", "ID acc", "mean AUROC (3 OOD sets)", "up KiB / client / round",
                        "down KiB / client / round"], rows)]
    for s in OOD:
        lines += ["", f"## OOD: {OOD_TITLES[s]}", "",
                  *md_table(["method", "AUROC", "AUPR-in", "AUPR-out", "FPR95 (OOD recall)", "FPR95 (ID recall)"],
                            per_set[s])]
    write_results("fed_ood.md", with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
