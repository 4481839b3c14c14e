"""Federated OOD detection benchmark (issue 17): IS&BC and its ablations against FedAvg's post-hoc scores,
FedOE and federated RNA, with the bytes each sends.

Reproduce (from the repository root; about 20 min on 2 CPU cores, 4 of them for digits; Fashion-MNIST
needs ../shared/data and is skipped with a note without it):

    python benchmarks/fed_ood.py --seeds 0,1,2 --jobs 2 --datasets digits,fmnist

Fashion-MNIST setup: all 10 classes, 20 clients (Dirichlet 0.5), cnn of width 16, 10 local steps of 32
images; server outliers OpenClipArt 28 × 28; OOD tests MNIST, notMNIST fonts and Animal-MNIST; FedAvg 15
rounds, IS&BC 3 rounds (``configs/isbc-fmnist.yaml``, at most 200 samples a client a round).

Digits setup (spec fedood_isbc.md §6, ``configs/isbc-digits.yaml``): ID = digits 0–5, 20 clients
(Dirichlet 0.5, all in every round), the ``cnn``; the server's outlier pool is photo crops + digits 6–7
(training split, 576 images); test OOD sets the server never sees: digits 8–9 (test split), textures, noise.

- **FedAvg** (step 1, 20 rounds) scored by MSP, Energy, MaxLogit and RN (post-hoc, one run);
- **FedAvg, as many more rounds**: the step-1 run continued for as many rounds as IS&BC's step 2 (the extra
  training alone, without the split or the outliers);
- **FedOE**: FedAvg with the OE objective, each round's clients getting an equal share of the outlier pool
  (they receive outlier images);
- **FedAvg + RNA** (variant A: outliers shipped to the clients, spec rna.md §8) scored by RN;
- **federated RNA, variant B** (``algorithm.name=rna_moments``: the outliers stay on the server, which sends
  every BN layer's OOD moments; clients train LA + RNA on ID-only batches normalised by the mixture moments)
  scored by RN;
- **FedLoGe + RNA** (FedLoGe with the RNA objective, variant A's outlier shares) scored by RN on its first
  predictor (the SSE-C "universal" model);
- **IS&BC** (step 2 from each seed's FedAvg run, 5 rounds, ``configs/isbc-digits.yaml``) and its ablations:
  β = 0 (no outliers), without mixup, back-layer OE without the concat head (``head=plain``), head-only OE
  (``train=head``).

Reported per method: ID accuracy, and per OOD set AUROC, AUPR-in, AUPR-out, FPR95 (OOD recall, the RNA
repository's convention) and FPR95 (ID recall), mean ± std over seeds in %; and the bytes a client sends
and receives per round (weights for the FedAvg family, plus its outlier share for FedOE and RNA; the front
down and the mixed features up for IS&BC; the weights plus the OOD BN moments down for RNA variant B).
Results: ``benchmarks/results/fed_ood.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from runpool import (benchmark_parser, fmnist_available, Job, md_table, mean_std, REPO, run_jobs, SHARED_DATA,
                     total_minutes, with_analysis, write_results)

@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    config: str
    """Step-1 preset (FedAvg, FedOE, RNA); IS&BC runs ``isbc_config`` from the FedAvg run."""
    common: tuple[str, ...]
    outliers: tuple[str, ...]
    ood: dict[str, str]
    """OOD test set → its title."""
    isbc_config: str
    isbc: tuple[str, ...]
    rounds1: int
    rounds2: int
    subdir: str
    outlier_bytes: int
    """Bytes of the outlier pool (uint8 images), for FedOE's and RNA's per-client download share."""


SETTINGS = {
    "digits": Setting(
        "digits", "digits, ID 0–5, 20 clients (Dirichlet 0.5, all every round), cnn; server outliers photo crops + "
        "digits 6–7 (train, 576); OOD tests digits 8–9 (test), textures, noise (71 each); FedAvg 20 rounds, IS&BC "
        "5 rounds from it (configs/isbc-digits.yaml)", "fedavg-digits.yaml",
        ("data.id_classes=[0,1,2,3,4,5]", "data.num_clients=20", "data.clients_per_round=20", "data.alpha=0.5",
         "eval.personalized=false", "eval.num_ood=71", 'eval.ood=["classes:digits:test:8,9",textures,noise]',
         "eval.every=5"),
        ('data.outliers=[photos,"classes:digits:train:6,7"]', "data.num_outliers=576"),
        {"classes:digits:test:8,9": "digits 8–9", "textures": "textures", "noise": "noise"},
        "isbc-digits.yaml", ("eval.every=5",), 20, 5, "", 576 * 64),
    "fmnist": Setting(
        "fmnist", "Fashion-MNIST, 20 clients (Dirichlet 0.5, all every round), cnn of width 16, 10 local steps of "
        "32; server outliers OpenClipArt 28 × 28 (2,000); OOD tests MNIST, notMNIST fonts, Animal-MNIST (1,000 "
        "each); FedAvg 15 rounds, IS&BC 3 rounds from it (configs/isbc-fmnist.yaml, at most 200 samples a "
        "client a round, concat head of rank 128)", "fedavg-mnist.yaml",
        ("data.dataset=fashion_mnist", f"data.root={SHARED_DATA}", "data.num_clients=20", "data.clients_per_round=20",
         "data.alpha=0.5", "model.width=16", "train.steps=10", "train.batch_size=32", "eval.personalized=false",
         "eval.num_ood=1000", "eval.ood=[mnist,notmnist_fonts,animal_mnist]", "eval.every=5",
         "eval.batch_size=512"),
        ("data.outliers=openclipart_28", "data.num_outliers=2000"),
        {"mnist": "MNIST", "notmnist_fonts": "notMNIST fonts", "animal_mnist": "Animal-MNIST"},
        "isbc-fmnist.yaml", (f"data.root={SHARED_DATA}", "data.num_clients=20", "data.clients_per_round=20",
                             "model.width=16", "data.num_outliers=2000", "eval.num_ood=1000", "eval.every=3",
                             "eval.batch_size=512", "algorithm.max_samples=200", "algorithm.hidden=128"),
        15, 3, "fmnist", 2000 * 784),
}


@dataclass(frozen=True)
class Method:
    title: str
    overrides: tuple[str, ...] = ()
    score: str = "msp"
    step2: bool = False
    run: str = ""
    """Another method's runs this one reads (post-hoc scores of the FedAvg run)."""
    outliers: bool = False
    """The run needs ``data.outliers`` (the server's pool)."""
    share: bool = True
    """With ``outliers``: clients download a share of the pool (False: it stays on the server, RNA variant B)."""


METHODS = {
    "fedavg": Method("FedAvg + MSP", ("eval.scores=[msp,energy,maxlogit,rn]",)),
    "fedavg_energy": Method("FedAvg + Energy", score="energy", run="fedavg"),
    "fedavg_maxlogit": Method("FedAvg + MaxLogit", score="maxlogit", run="fedavg"),
    "fedavg_rn": Method("FedAvg + RN", score="rn", run="fedavg"),
    "fedavg_more": Method("FedAvg, as many more rounds + MSP", step2=True),
    "fedoe": Method("FedOE (clients get outliers)", ("objective.name=oe",), outliers=True),
    "rna": Method("FedAvg + RNA (variant A) + RN", ("objective.name=rna", "eval.scores=[rn,msp]"), "rn",
                  outliers=True),
    "rna_b": Method("federated RNA (variant B: OOD BN moments) + RN",
                    ("algorithm.name=rna_moments", "objective.name=rna_no_outliers", "eval.scores=[rn,msp]"), "rn",
                    outliers=True, share=False),
    "fedloge_rna": Method("FedLoGe + RNA (variant A) + RN",
                          ("algorithm.name=fedloge", "objective.name=rna", "eval.scores=[rn,msp]"), "rn",
                          outliers=True),
    "isbc": Method("IS&BC", step2=True),
    "isbc_beta0": Method("IS&BC, β = 0", ("algorithm.beta=0",), step2=True),
    "isbc_nomix": Method("IS&BC without mixup", ("algorithm.mixup=false",), step2=True),
    "isbc_plain": Method("back-layer OE, no concat head", ("algorithm.head=plain",), step2=True),
    "isbc_head": Method("head-only OE", ("algorithm.train=head",), step2=True),
}


def jobs_for(s: Setting, seeds: list[int], work: Path) -> dict[tuple[str, int], Job]:
    jobs: dict[tuple[str, int], Job] = {}
    folder = work / s.subdir if s.subdir else work
    for seed in seeds:
        for name, m in METHODS.items():
            if m.run:
                continue
            out = folder / f"{name}-s{seed}"
            if name == "fedavg_more":
                job = Job(f"{s.name}-{name}-s{seed}", REPO / "configs" / s.config,
                          [*s.common, f"rounds={s.rounds2}", f"seed={seed}", f"init_from={jobs['fedavg', seed].out}"],
                          out)
            elif m.step2:
                job = Job(f"{s.name}-{name}-s{seed}", REPO / "configs" / s.isbc_config,
                          [*s.isbc, *m.overrides, f"rounds={s.rounds2}", f"seed={seed}",
                           f"init_from={jobs['fedavg', seed].out}"], out)
            else:
                job = Job(f"{s.name}-{name}-s{seed}", REPO / "configs" / s.config,
                          [*s.common, *(s.outliers if m.outliers else ()), *m.overrides, f"rounds={s.rounds1}",
                           f"seed={seed}"], out)
            jobs[name, seed] = job
    return jobs


SENT = ("server/model/", "server/backbone/", "server/head_g/", "server/sse_c/")
"""Server-state arrays a client of the FedAvg family downloads and uploads (FedLoGe: backbone and heads)."""


def bytes_per_round(job: Job, share: int) -> tuple[float, float]:
    """(up, down) bytes per client per round of a finished run; ``share``: the outlier bytes it downloads."""
    records = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if "isbc" in records[-1]:
        return records[-1]["isbc"]["upload_bytes_mean"], records[-1]["isbc"]["download_bytes"]
    from safetensors import safe_open

    with safe_open(str(job.out / "checkpoint.safetensors"), "pt") as f:
        model = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(SENT)) * 4
    moments = records[-1].get("rna_moments", {}).get("moment_bytes", 0)
    return model, model + share + moments


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tables(s: Setting, jobs: dict[tuple[str, int], Job], seeds: list[int]) -> list[str]:
    rows, per_set = [], {o: [] for o in s.ood}
    clients = int(next(o for o in s.common if o.startswith("data.num_clients=")).split("=")[1])
    for name, m in METHODS.items():
        runs = [jobs[m.run or name, seed] for seed in seeds]
        finals = [r.summary() for r in runs]
        source = METHODS[m.run or name]
        share = s.outlier_bytes // clients if source.outliers and source.share else 0
        up, down = bytes_per_round(runs[0], share)
        rows.append([m.title, mean_std([f["test_acc"] for f in finals]),
                     mean_std([sum(f["ood"][f"{o}/{m.score}"]["auroc"] for o in s.ood) / len(s.ood) for f in finals]),
                     f"{up / 1024:.1f}", f"{down / 1024:.1f}"])
        for o in s.ood:
            vals = [f["ood"][f"{o}/{m.score}"] for f in finals]
            per_set[o].append([m.title, *(mean_std([v[k] for v in vals]) for k in
                                          ("auroc", "aupr_in", "aupr_out", "fpr95_ood_recall", "fpr95_id_recall"))])
    lines = ["", f"## {s.name}", "", f"{s.title}.", "",
             *md_table(["method", "ID acc", f"mean AUROC ({len(s.ood)} OOD sets)", "up KiB / client / round",
                        "down KiB / client / round"], rows)]
    for o, title in s.ood.items():
        lines += ["", f"### {s.name}, OOD: {title}", "",
                  *md_table(["method", "AUROC", "AUPR-in", "AUPR-out", "FPR95 (OOD recall)", "FPR95 (ID recall)"],
                            per_set[o])]
    return lines


def main() -> None:
    parser = benchmark_parser(__doc__, "fed_ood")
    parser.set_defaults(datasets="digits,fmnist")
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    work = Path(args.work)
    chosen, notes = [], []
    for name in args.datasets.split(","):
        if name == "fmnist" and not fmnist_available():
            notes.append("- Fashion-MNIST skipped: ../shared/data/fashion_mnist/train.npz is absent on this machine.")
            continue
        chosen.append(SETTINGS[name])
    jobs = {s.name: jobs_for(s, seeds, work) for s in chosen}
    every = [j for js in jobs.values() for j in js.values()]
    start = time.time()
    for phase in (False, True):  # step 1 first, then what starts from it
        run_jobs([j for js in jobs.values() for (n, _), j in js.items() if METHODS[n].step2 == phase], args.jobs,
                 per_process=3)
    cmd = f"python benchmarks/fed_ood.py --seeds {args.seeds} --jobs {args.jobs} --datasets {args.datasets}"
    lines = ["# Federated OOD detection: IS&BC, its ablations and baselines (issue 17)", "",
             f"Reproduce: `{cmd}` (from the repository root; runs kept under `{args.work}`).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}; 2 CPU cores, one "
             f"torch thread per run, {args.jobs} at a time; {(time.time() - start) / 60:.1f} min for this invocation, "
             f"the runs' own wall times add up to {total_minutes(every):.1f} min.",
             "- Values in %, mean ± std over seeds. Training outliers and OOD test sets are disjoint sources; "
             "\"as many more rounds\" continues the FedAvg run for as many rounds as IS&BC's step 2.", *notes]
    for s in chosen:
        lines += tables(s, jobs[s.name], seeds)
    write_results("fed_ood.md", with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
