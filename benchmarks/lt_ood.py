"""Long-tailed OOD detection benchmark (issue 6): RNA vs its baselines on digits-LT.

Reproduce (from the repository root):

    python benchmarks/lt_ood.py --seeds 0,1,2 --jobs 2

Each method is its preset in configs/ (rna-digits-lt.yaml and rna-baseline-*-digits-lt.yaml: centralised,
one client holding all the long-tailed training data, imbalance ratio 10, 40 epochs, Adam 1e-3 cosine,
outliers = bundled skimage photo crops), evaluated on OOD test sets never used for training (skimage
textures and noise). Columns follow the RNA paper's Table 2 (AUC, AUPR, FPR95, ACC, Many, Medium, Few),
OOD metrics averaged over the OOD sets with each method's own score, plus ECE; mean ± std over seeds.
The score ablation (MSP / Energy / RN on every trained model) is a second table. Results go to
benchmarks/results/lt_ood.md. Runs are in separate processes (``--jobs``), one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
# method -> (preset, the score the method's paper reports with)
METHODS = {
    "CE + MSP": ("rna-baseline-ce-digits-lt.yaml", "msp"),
    "LA + MSP": ("rna-baseline-la-digits-lt.yaml", "msp"),
    "OE": ("rna-baseline-oe-digits-lt.yaml", "msp"),
    "EnergyOE": ("rna-baseline-energy_oe-digits-lt.yaml", "energy"),
    "OECC": ("rna-baseline-oecc-digits-lt.yaml", "msp"),
    "PASCL (stage 1)": ("rna-baseline-pascl-digits-lt.yaml", "msp"),
    "BEL": ("rna-baseline-bel-digits-lt.yaml", "energy"),
    "RNA": ("rna-digits-lt.yaml", "rn"),
    "RNA, no outliers in BN (ablation)": ("rna-baseline-rna_no_outliers-digits-lt.yaml", "rn"),
}
OOD_SETS = ("textures", "noise")
SCORES = ("msp", "energy", "rn")


def run_one(preset: str, seed: int, out_dir: Path) -> subprocess.Popen:
    """Start one training run in its own process (one torch thread)."""
    args = [sys.executable, "-m", "fedtrust.cli", "run", "--quiet", str(REPO / "configs" / preset),
            f"seed={seed}", f"out={out_dir}", "eval.every=40", f"eval.ood=[{','.join(OOD_SETS)}]",
            f"eval.scores=[{','.join(SCORES)}]"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def row(summary: dict, score: str) -> dict[str, float]:
    """Table-2 columns of one run: OOD metrics averaged over the OOD sets with ``score``."""
    ood = summary["ood"]

    def avg(metric: str) -> float:
        return statistics.mean(ood[f"{s}/{score}"][metric] for s in OOD_SETS)

    g = summary["group_acc"]
    return {"AUC": avg("auroc"), "AUPR": avg("aupr_out"), "FPR95": avg("fpr95_ood_recall"),
            "FPR95 (ID recall)": avg("fpr95_id_recall"), "ACC": summary["test_acc"], "Many": g["many"],
            "Medium": g["medium"], "Few": g["few"], "ECE": summary["ece"]}


def fmt(values: list[float]) -> str:
    mean = statistics.mean(values) * 100
    std = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", default="runs/bench-lt-ood")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    todo = [(m, s) for m in METHODS for s in seeds if not (work / f"{METHODS[m][0][:-5]}-s{s}" / "summary.json").exists()]
    start, running = time.time(), []
    while todo or running:
        while todo and len(running) < args.jobs:
            m, s = todo.pop(0)
            d = work / f"{METHODS[m][0][:-5]}-s{s}"
            if d.exists():
                import shutil
                shutil.rmtree(d)
            running.append((m, s, run_one(METHODS[m][0], s, d)))
        time.sleep(0.5)
        for item in list(running):
            if item[2].poll() is not None:
                running.remove(item)
                if item[2].returncode:
                    raise SystemExit(f"{item[0]} seed {item[1]} failed: {item[2].stderr.read()}")
                print(f"done {item[0]} seed {item[1]} ({time.time() - start:.0f} s)", flush=True)

    summaries = {m: [json.loads((work / f"{METHODS[m][0][:-5]}-s{s}" / "summary.json").read_text()) for s in seeds]
                 for m in METHODS}
    cols = ["AUC", "AUPR", "FPR95", "FPR95 (ID recall)", "ACC", "Many", "Medium", "Few", "ECE"]
    lines = [
        "# Long-tailed OOD detection on digits-LT (issue 6)", "",
        f"Reproduce: `python benchmarks/lt_ood.py --seeds {args.seeds} --jobs {args.jobs}` (from the repository root).", "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(seeds)} seeds; 2 CPU cores, one torch thread per run.",
        "- ID: sklearn digits, training set long-tailed with imbalance ratio 10 (class 0: 142 images … class 9: 13), "
        "balanced 360-image test set; model `cnn` with non-affine BN; centralised (one client), 40 epochs, Adam 1e-3, "
        "wd 5e-4, cosine, batch 64 (+64 outliers).",
        "- Training outliers: bundled skimage photo crops (3,000). OOD test sets: skimage textures and noise "
        "(1,000 each), never used for training. OOD columns are the mean over the two sets.",
        "- AUPR is AUPR-out; FPR95 is the RNA repository's convention (FPR on ID at 95 % OOD recall, nearest recall, "
        "last index on ties); `FPR95 (ID recall)` is the common alternative. Values in %, mean ± std over seeds.", "",
        "## Main table (each method with its own score)", "",
        "| method | score | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for m, (preset, score) in METHODS.items():
        rows = [row(s, score) for s in summaries[m]]
        lines.append(f"| {m} | {score} | " + " | ".join(fmt([r[c] for r in rows]) for c in cols) + " |")
    lines += ["", "## Score ablation (AUC, mean over OOD sets)", "", "| method | " + " | ".join(SCORES) + " |",
              "|---|" + "---:|" * len(SCORES)]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(fmt([row(s, sc)["AUC"] for s in summaries[m]]) for sc in SCORES) + " |")
    lines += ["", "## Mean representation norm ‖z‖ (ID test / textures / noise)", "", "| method | ID | textures | noise |",
              "|---|---:|---:|---:|"]
    for m in METHODS:
        norms = [s["feature_norm"] for s in summaries[m]]
        lines.append(f"| {m} | " + " | ".join(f"{statistics.mean(n[k] for n in norms):.2f}" for k in ("id", *OOD_SETS)) + " |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lt_ood.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
