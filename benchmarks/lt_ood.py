"""Long-tailed OOD detection benchmark (issues 6, 14): RNA vs its baselines on digits-LT and Fashion-MNIST-LT.

Reproduce (from the repository root; digits ~25 min, Fashion-MNIST ~60 min on 2 CPU cores):

    python benchmarks/lt_ood.py --seeds 0,1,2 --jobs 2

Each method is its preset in configs/ (rna-digits-lt.yaml and rna-baseline-*-digits-lt.yaml: centralised,
one client holding all the long-tailed training data, one Adam 1e-3 cosine across the epochs, ID batch + as
many outliers). The runs go in two phases: from scratch (CE, LA, OE, PASCL stage 1, RNA, ...), then the
runs that fine-tune one of them through ``init_from`` (OECC, EnergyOE and BEL from that seed's CE model, as
their papers do; PASCL's stage 2 from its stage 1).

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

@dataclass(frozen=True)
class Method:
    """A row of the table: its preset, the score its paper reports with, extra overrides, and the method whose
    run it fine-tunes (``init_from``: the OECC, EnergyOE and BEL baselines fine-tune the CE model; PASCL's
    stage 2 its stage 1)."""

    preset: str
    score: str
    extra: tuple[str, ...] = ()
    after: str | None = None


METHODS: dict[str, Method] = {
    "CE + MSP": Method("rna-baseline-ce-digits-lt.yaml", "msp"),
    "LA + MSP": Method("rna-baseline-la-digits-lt.yaml", "msp"),
    "OE": Method("rna-baseline-oe-digits-lt.yaml", "msp"),
    "EnergyOE (fine-tuned from CE)": Method("rna-baseline-energy_oe-digits-lt.yaml", "energy", after="CE + MSP"),
    "OECC (fine-tuned from CE)": Method("rna-baseline-oecc-digits-lt.yaml", "msp", after="CE + MSP"),
    "PASCL (stage 1)": Method("rna-baseline-pascl-digits-lt.yaml", "msp"),
    "PASCL (OOD: stage 1, ACC: stage 2)": Method("rna-baseline-pascl-stage2-digits-lt.yaml", "msp",
                                                  after="PASCL (stage 1)"),
    "BEL (fine-tuned from CE)": Method("rna-baseline-bel-digits-lt.yaml", "energy", after="CE + MSP"),
    "RNA": Method("rna-digits-lt.yaml", "rn"),
    "RNA, no outliers in BN (ablation)": Method("rna-baseline-rna_no_outliers-digits-lt.yaml", "rn"),
    "RNA, federated (FedAvg, 20 clients)": Method("rna-fedavg-digits-lt.yaml", "rn"),
    # the federated control: the same federated recipe and model with LA and no outliers
    "LA + MSP, federated (FedAvg, 20 clients)": Method("rna-fedavg-digits-lt.yaml", "msp",
                                                       ("objective.name=la", "data.outliers=null")),
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
    epochs: dict[str, int] = field(default_factory=dict)
    """Epochs (rounds) per method where the preset's are scaled down; absent: the preset's."""


def settings(fmnist_epochs: int, fmnist_width: int) -> dict[str, Setting]:
    digits = Setting(
        "digits", "digits-LT", ("textures", "noise"), ["eval.every=1000"], list(METHODS),
        ["ID: sklearn digits, training set long-tailed with imbalance ratio 10 (class 0: 142 images … class 9: 13), "
         "balanced 360-image test set; model `cnn` with non-affine BN; centralised (one client), 40 epochs, one Adam "
         "(1e-3, wd 5e-4, cosine) across them, batch 64 (+64 outliers). Fine-tuned from the CE model (as their "
         "papers): OECC 15 epochs, EnergyOE 10, BEL 20, SGD Nesterov 1e-3 cosine, batch 64 + 128 outliers; PASCL's "
         "stage 2: 10 epochs of LA on the head (BN non-affine: its running statistics), Adam 5e-4, OOD scored with "
         "the stage-1 model. The federated row: 20 clients, Dirichlet 0.5, 10 per round, 60 rounds of 2 local "
         "epochs, batch 16 (+16), BN statistics pooled by moments.",
         "Training outliers: bundled skimage photo crops (3,000). OOD test sets: skimage textures and noise "
         "(1,000 each), never used for training."])
    fmnist = Setting(
        "fmnist", "Fashion-MNIST-LT", ("animal_mnist", "notmnist_fonts", "mnist"),
        ["data.dataset=fashion_mnist", f"data.root={REPO.parent / 'shared' / 'data'}", "data.imbalance_ratio=100",
         "data.outliers=openclipart_28", "data.num_outliers=5000", f"model.width={fmnist_width}",
         "eval.every=1000"],
        [m for m in METHODS if "federated" not in m and "ablation" not in m],
        [f"ID: Fashion-MNIST, training set long-tailed with imbalance ratio 100 (6,000 … 60 per class, 14,913 "
         f"images), balanced 10,000-image test set; model `cnn` width {fmnist_width} (d = {4 * fmnist_width}) with "
         f"non-affine BN; centralised, {fmnist_epochs} epochs (scaled for 2 CPU cores), otherwise the digits "
         "recipe.",
         "Training outliers: OpenClipArt 28x28 (5,000 of ../shared/data/ood/openclipart_28.npz). OOD test sets "
         "(1,000 each): Animal-MNIST and notMNIST-fonts (near-OOD proxies) and MNIST (cross-dataset)."])
    # from scratch: fmnist_epochs instead of the presets' 40; fine-tuning scaled by the same factor (at least 1)
    fmnist.epochs = {m: fmnist_epochs if METHODS[m].after is None else
                     max(1, round(preset_rounds(METHODS[m].preset) * fmnist_epochs / 40)) for m in fmnist.methods}
    fmnist.description.append("Epochs: " + ", ".join(f"{m} {e}" for m, e in fmnist.epochs.items()
                                                      if METHODS[m].after is not None)
                              + f" (the digits presets' fine-tuning epochs × {fmnist_epochs}/40).")
    return {"digits": digits, "fmnist": fmnist}


def preset_rounds(preset: str) -> int:
    import yaml

    return int(yaml.safe_load((REPO / "configs" / preset).read_text())["rounds"])


def run_dir(s: Setting, method: str, seed: int, work: Path) -> Path:
    m = METHODS[method]
    slug = m.preset[:-5] + "".join("-" + o.split("=")[1] for o in m.extra if o.startswith("objective.name="))
    return work / s.name / f"{slug}-s{seed}"


def job(s: Setting, method: str, seed: int, work: Path) -> Job:
    m = METHODS[method]
    ood = [f"eval.ood=[{','.join(s.ood_sets)}]", f"eval.scores=[{','.join(SCORES)}]"]
    source = [f"init_from={run_dir(s, m.after, seed, work).resolve()}"] if m.after else []
    epochs = [f"rounds={s.epochs[method]}"] if method in s.epochs else []
    return Job(f"{s.name}/{method}/s{seed}", REPO / "configs" / m.preset,
               [*s.overrides, *m.extra, *ood, *source, *epochs, f"seed={seed}"], run_dir(s, method, seed, work))


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
        rows = [row(x, METHODS[m].score, s.ood_sets) for x in summaries[m]]
        main_rows.append([m, METHODS[m].score, *(mean_std([r[c] for r in rows]) for c in COLS)])
    per_set = [[m, *(mean_std([x["ood"][f"{o}/{METHODS[m].score}"]["auroc"] for x in summaries[m]]) for o in s.ood_sets)]
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
    for phase in (False, True):  # from scratch first, then the runs that fine-tune them (init_from)
        run_jobs([j for (_, m, _), j in jobs.items() if (METHODS[m].after is not None) == phase], args.jobs)
    cmd = (f"python benchmarks/lt_ood.py --seeds {args.seeds} --jobs {args.jobs} --datasets {args.datasets} "
           f"--fmnist-epochs {args.fmnist_epochs} --fmnist-width {args.fmnist_width}")
    lines = ["# Long-tailed OOD detection: RNA vs baselines (issues 6 and 14)", "",
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
