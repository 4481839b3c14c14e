"""Long-tailed OOD detection benchmark (issue 6): RNA vs its baselines on digits-LT and Fashion-MNIST-LT.

Reproduce (from the repository root; digits ~25 min, Fashion-MNIST ~60 min on 2 CPU cores):

    python benchmarks/lt_ood.py --seeds 0,1,2 --jobs 2

Each method is its preset in configs/ (rna-digits-lt.yaml and rna-baseline-*-digits-lt.yaml: centralised,
one client holding all the long-tailed training data, Adam 1e-3 cosine, ID batch + as many outliers).

- digits-LT: the presets as they are (imbalance ratio 10, 40 epochs, outliers = bundled skimage photo crops),
  evaluated on OOD test sets never used for training (skimage textures and noise); plus RNA inside FedAvg
  (configs/rna-fedavg-digits-lt.yaml: 20 clients, Dirichlet 0.5, pooled BN moments) to compare centralised
  and federated training on the same data.
- Fashion-MNIST-LT (../shared/data; skipped with a note where absent): the same presets with the data swapped
  by overrides: imbalance ratio 100, OpenClipArt 28x28 training outliers, OOD tests Animal-MNIST,
  notMNIST-fonts and MNIST; scaled for 2 CPU cores (``--fmnist-epochs``, ``--fmnist-width``).

Columns follow the RNA paper's Table 2 (AUC, AUPR, FPR95, ACC, Many, Medium, Few), OOD metrics averaged over
the OOD sets with each method's own score, plus ECE; mean ± std over seeds. The score ablation (MSP / Energy /
RN on every trained model) and the mean representation norms are further tables. Results go to
benchmarks/results/lt_ood.md.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runpool import (REPO, Job, benchmark_parser, fmnist_available, md_table, mean_std, run_jobs, total_minutes,
                     with_analysis, write_results)

# method -> (preset, the score the method's paper reports with[, extra overrides])
METHODS: dict[str, tuple] = {
    "CE + MSP": ("rna-baseline-ce-digits-lt.yaml", "msp"),
    "LA + MSP": ("rna-baseline-la-digits-lt.yaml", "msp"),
    "OE": ("rna-baseline-oe-digits-lt.yaml", "msp"),
    "EnergyOE": ("rna-baseline-energy_oe-digits-lt.yaml", "energy"),
    "OECC": ("rna-baseline-oecc-digits-lt.yaml", "msp"),
    "PASCL (stage 1)": ("rna-baseline-pascl-digits-lt.yaml", "msp"),
    "BEL": ("rna-baseline-bel-digits-lt.yaml", "energy"),
    "RNA": ("rna-digits-lt.yaml", "rn"),
    "RNA, no outliers in BN (ablation)": ("rna-baseline-rna_no_outliers-digits-lt.yaml", "rn"),
    "RNA, federated (FedAvg, 20 clients)": ("rna-fedavg-digits-lt.yaml", "rn"),
    # the federated control: the same federated recipe and model with LA and no outliers
    "LA + MSP, federated (FedAvg, 20 clients)": ("rna-fedavg-digits-lt.yaml", "msp",
                                                 ["objective.name=la", "data.outliers=null"]),
}
SCORES = ("msp", "energy", "rn")
COLS = ["AUC", "AUPR", "FPR95", "FPR95 (ID recall)", "ACC", "Many", "Medium", "Few", "ECE"]


@dataclass
class Setting:
    name: str
    title: str
    ood_sets: tuple[str, ...]
    overrides: list[str]
    methods: list[str]
    description: list[str] = field(default_factory=list)


def settings(fmnist_epochs: int, fmnist_width: int) -> dict[str, Setting]:
    digits = Setting(
        "digits", "digits-LT", ("textures", "noise"), ["eval.every=1000"], list(METHODS),
        ["ID: sklearn digits, training set long-tailed with imbalance ratio 10 (class 0: 142 images … class 9: 13), "
         "balanced 360-image test set; model `cnn` with non-affine BN; centralised (one client), 40 epochs, Adam "
         "1e-3, wd 5e-4, cosine, batch 64 (+64 outliers). The federated row: 20 clients, Dirichlet 0.5, 10 per "
         "round, 60 rounds of 2 local epochs, batch 16 (+16), BN statistics pooled by moments.",
         "Training outliers: bundled skimage photo crops (3,000). OOD test sets: skimage textures and noise "
         "(1,000 each), never used for training."])
    fmnist = Setting(
        "fmnist", "Fashion-MNIST-LT", ("animal_mnist", "notmnist_fonts", "mnist"),
        ["data.dataset=fashion_mnist", f"data.root={REPO.parent / 'shared' / 'data'}", "data.imbalance_ratio=100",
         "data.outliers=openclipart_28", "data.num_outliers=5000", f"model.width={fmnist_width}",
         f"rounds={fmnist_epochs}", "eval.every=1000"],
        [m for m in METHODS if "federated" not in m and "ablation" not in m],
        [f"ID: Fashion-MNIST, training set long-tailed with imbalance ratio 100 (6,000 … 60 per class, 14,913 "
         f"images), balanced 10,000-image test set; model `cnn` width {fmnist_width} (d = {4 * fmnist_width}) with "
         f"non-affine BN; centralised, {fmnist_epochs} epochs (scaled for 2 CPU cores), otherwise the digits "
         "recipe.",
         "Training outliers: OpenClipArt 28x28 (5,000 of ../shared/data/ood/openclipart_28.npz). OOD test sets "
         "(1,000 each): Animal-MNIST and notMNIST-fonts (near-OOD proxies) and MNIST (cross-dataset)."])
    return {"digits": digits, "fmnist": fmnist}


def job(s: Setting, method: str, seed: int, work: Path) -> Job:
    preset, _, *extra = METHODS[method]
    extra = list(extra[0]) if extra else []
    ood = [f"eval.ood=[{','.join(s.ood_sets)}]", f"eval.scores=[{','.join(SCORES)}]"]
    slug = preset[:-5] + "".join("-" + o.split("=")[1] for o in extra if o.startswith("objective.name="))
    return Job(f"{s.name}/{method}/s{seed}", REPO / "configs" / preset, [*s.overrides, *extra, *ood, f"seed={seed}"],
               work / s.name / f"{slug}-s{seed}")


def row(summary: dict[str, Any], score: str, ood_sets: tuple[str, ...]) -> dict[str, float]:
    """Table-2 columns of one run: OOD metrics averaged over the OOD sets with ``score``."""
    ood = summary["ood"]

    def avg(metric: str) -> float:
        return statistics.mean(ood[f"{s}/{score}"][metric] for s in ood_sets)

    g = summary["group_acc"]
    return {"AUC": avg("auroc"), "AUPR": avg("aupr_out"), "FPR95": avg("fpr95_ood_recall"),
            "FPR95 (ID recall)": avg("fpr95_id_recall"), "ACC": summary["test_acc"], "Many": g["many"],
            "Medium": g["medium"], "Few": g["few"], "ECE": summary["ece"]}


def tables(s: Setting, summaries: dict[str, list[dict[str, Any]]]) -> list[str]:
    main_rows = []
    for m in s.methods:
        rows = [row(x, METHODS[m][1], s.ood_sets) for x in summaries[m]]
        main_rows.append([m, METHODS[m][1], *(mean_std([r[c] for r in rows]) for c in COLS)])
    per_set = [[m, *(mean_std([x["ood"][f"{o}/{METHODS[m][1]}"]["auroc"] for x in summaries[m]]) for o in s.ood_sets)]
               for m in s.methods]
    ablation = [[m, *(mean_std([row(x, sc, s.ood_sets)["AUC"] for x in summaries[m]]) for sc in SCORES)]
                for m in s.methods]
    norms = [[m, *(f"{statistics.mean(x['feature_norm'][k] for x in summaries[m]):.2f}" for k in ("id", *s.ood_sets))]
             for m in s.methods]
    return ["", f"## {s.title}", "", *(f"- {d}" for d in s.description), "",
            "### Main table (each method with its own score; OOD columns averaged over the OOD sets)", "",
            *md_table(["method", "score", *COLS], main_rows, 2), "",
            "### AUROC per OOD set (each method's own score)", "", *md_table(["method", *s.ood_sets], per_set), "",
            "### Score ablation (AUC, mean over OOD sets)", "", *md_table(["method", *SCORES], ablation), "",
            "### Mean representation norm ‖z‖ (mean over seeds)", "", *md_table(["method", "ID", *s.ood_sets], norms)]


def main() -> None:
    parser = benchmark_parser(__doc__, "lt_ood")
    parser.add_argument("--fmnist-epochs", type=int, default=3)
    parser.add_argument("--fmnist-width", type=int, default=16)
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    work = Path(args.work)
    notes: list[str] = []
    chosen = []
    for name in args.datasets.split(","):
        s = settings(args.fmnist_epochs, args.fmnist_width)[name]
        if name == "fmnist" and not fmnist_available():
            notes.append("- Fashion-MNIST-LT skipped: ../shared/data/fashion_mnist/train.npz is absent on this machine.")
            continue
        chosen.append(s)
    jobs = {(s.name, m, seed): job(s, m, seed, work) for s in chosen for m in s.methods for seed in seeds}
    run_jobs(list(jobs.values()), args.jobs)
    cmd = (f"python benchmarks/lt_ood.py --seeds {args.seeds} --jobs {args.jobs} --datasets {args.datasets} "
           f"--fmnist-epochs {args.fmnist_epochs} --fmnist-width {args.fmnist_width}")
    lines = ["# Long-tailed OOD detection: RNA vs baselines (issue 6)", "",
             f"Reproduce: `{cmd}` (from the repository root; runs kept under `{args.work}`).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}; 2 CPU cores, one "
             f"torch thread per run; the runs took {total_minutes(list(jobs.values())):.0f} min of wall time in all, {args.jobs} at a time.",
             "- AUPR is AUPR-out; FPR95 is the RNA repository's convention (FPR on ID at 95 % OOD recall, nearest "
             "recall, last index on ties); `FPR95 (ID recall)` is the common alternative. Values in %, mean ± std "
             "over seeds. Training outliers and OOD test sets are always disjoint sources.", *notes]
    for s in chosen:
        lines += tables(s, {m: [jobs[s.name, m, seed].summary() for seed in seeds] for m in s.methods})
    write_results("lt_ood.md", with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
