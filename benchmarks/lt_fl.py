"""Long-tailed federated learning benchmark (issue 7): FedLoGe vs the generic and personalized baselines.

Reproduce (from the repository root; digits part ~20 min, Fashion-MNIST part ~70 min on 2 CPU cores):

    python benchmarks/lt_fl.py --seeds 0,1,2 --jobs 2

Every method runs on the same data, partition, model and client optimizer: the FedLoGe presets
``configs/fedloge-digits-lt.yaml`` (digits, imbalance ratio 10, Dirichlet 0.5, 20 clients, 10 per round,
60 rounds) and ``configs/fedloge-fmnist-lt.yaml`` (Fashion-MNIST from ../shared/data, imbalance ratio 100,
Dirichlet 0.5, 40 clients, 30 % per round), with only ``algorithm`` swapped. Fashion-MNIST is scaled down for
2 CPU cores (``--fmnist-rounds``, ``--fmnist-epochs``, ``--fmnist-width``; the values used are in the results
header). Baselines keep their published defaults (README algorithm table); FedLoGe keeps its preset's
parameters and also scores its diagnostic predictors (raw G, L_k alone, L_k + G).

Columns: global accuracy on the balanced test set and head / middle / tail (spec fedloge.md §6, 75 % / 95 %
cumulative-share rule), personalized accuracy (each client's label-matched local test set, unweighted over
clients) without and with the absent-class mask (spec §10: report both). Generic predictors get both kinds of
columns (their personalized column is the generic model on the local test sets); personalized predictors
(built from a client's own state) only the personalized ones. Mean ± std over seeds, in %.

Diagnostics (spec §9.1): Spearman ρ between the global head's row norms ‖G_c‖ and the global class counts n_c,
and the mean over clients of ρ(‖L_k,c‖, n_k,c) (client k's own counts), read from each run's final checkpoint;
FedAvg's classifier rows for comparison. Ablations on digits: dense vs sparse ETF (sparsity 0 vs 0.6) and the
SSE-C norm target (0.1 / 0.3 / 1.0). Results: benchmarks/results/lt_fl.md; runs under ``--work``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from scipy.stats import spearmanr

from runpool import (REPO, Job, benchmark_parser, fmnist_available, md_table, mean_std, run_jobs, total_minutes,
                     with_analysis, write_results)

PRESETS = {"digits": "fedloge-digits-lt.yaml", "fmnist": "fedloge-fmnist-lt.yaml"}
TITLES = {"digits": "digits-LT (imbalance ratio 10, 20 clients)",
          "fmnist": "Fashion-MNIST-LT (imbalance ratio 100, 40 clients)"}
# label -> algorithm name; FedLoGe's parameters come from its preset
METHODS = {"FedAvg": "fedavg", "FedProx": "fedprox", "FedRoD": "fedrod", "FedBABU": "fedbabu", "FedETF": "fedetf",
           "Ditto": "ditto", "FedRep": "fedrep", "FedPer": "fedper", "FedAvg + FT": "fedavg_ft", "FedLoGe": "fedloge"}
# predictors that are built from a client's own state (scored on local test sets only)
PERSONAL = {"personalized", "local", "local_global"}
PREDICTOR_LABELS = {"universal": "universal (SSE-C)", "global": "global", "personalized": "personalized",
                    "global_raw": "raw G (no GA-FR)", "local": "L_k alone", "local_global": "L_k + G (no LA-FR)"}
FEDLOGE_PREDICTORS = ("universal", "global", "personalized", "global_raw", "local", "local_global")
# digits ablations: label -> FedLoGe overrides (the main FedLoGe row is sparsity 0.6, norm target 1.0)
ABLATIONS = {"dense ETF (sparsity 0)": ["algorithm.sparsity=0.0"],
             "norm target 0.1 (reference)": ["algorithm.norm_target=0.1"],
             "norm target 0.3": ["algorithm.norm_target=0.3"]}


@dataclass
class Setting:
    dataset: str
    base: Path  # the preset without its algorithm section
    fedloge: list[str]  # the preset's FedLoGe parameters as overrides
    extra: list[str]  # scale-down overrides for this machine


def prepare(dataset: str, work: Path, extra: list[str]) -> Setting:
    """Write the preset minus ``algorithm`` to the work folder; FedLoGe's parameters become overrides."""
    tree = yaml.safe_load((REPO / "configs" / PRESETS[dataset]).read_text())
    algo = tree.pop("algorithm", {})
    algo.pop("name", None)
    tree.setdefault("eval", {})["personalized"] = True
    base = work / dataset / "base.yaml"
    base.parent.mkdir(parents=True, exist_ok=True)
    base.write_text(yaml.safe_dump(tree, sort_keys=False))
    fedloge = [f"algorithm.{k}={json.dumps(v)}" for k, v in algo.items()] + ["algorithm.extra_predictors=true"]
    return Setting(dataset, base, fedloge, extra)


def jobs_for(s: Setting, seeds: list[int], work: Path, ablations: bool) -> dict[tuple[str, int], Job]:
    out: dict[tuple[str, int], Job] = {}
    variants = {label: [f"algorithm.name={name}"] + (s.fedloge if name == "fedloge" else [])
                for label, name in METHODS.items()}
    if ablations:
        variants.update({label: ["algorithm.name=fedloge", *s.fedloge, *ov] for label, ov in ABLATIONS.items()})
    for label, overrides in variants.items():
        slug = label.lower().replace(" ", "_").replace("+", "plus").replace("(", "").replace(")", "").replace(".", "")
        for seed in seeds:
            rounds = [o for o in s.extra if o.startswith("rounds=")]
            every = [f"eval.every={rounds[0].split('=')[1]}"] if rounds else ["eval.every=1000"]
            out[label, seed] = Job(f"{s.dataset}/{label}/s{seed}", s.base,
                                   [*overrides, *s.extra, *every, f"seed={seed}"], work / s.dataset / f"{slug}-s{seed}")
    return out


def predictor_view(summary: dict[str, Any], predictor: str) -> dict[str, Any]:
    by = summary.get("by_predictor")
    return by[predictor] if by else summary


def result_rows(label: str, runs: list[dict[str, Any]], predictors: tuple[str, ...]) -> list[list[str]]:
    rows = []
    for p in predictors:
        views = [predictor_view(r, p) for r in runs]
        personal = p in PERSONAL
        g = (lambda key, sub=None: "—") if personal else (
            lambda key, sub=None: mean_std([v[key][sub] if sub else v[key] for v in views]))
        rows.append([label, PREDICTOR_LABELS.get(p, p), g("test_acc"), g("hmt_acc", "head"), g("hmt_acc", "middle"),
                     g("hmt_acc", "tail"), mean_std([v.get("client_acc_mean") for v in views]),
                     mean_std([v.get("client_acc_masked_mean") for v in views])])
    return rows


def predictors_of(summary: dict[str, Any]) -> tuple[str, ...]:
    by = summary.get("by_predictor")
    if not by:  # one predictor: FedPer and FedRep keep the whole head personal, so theirs is personalized
        return ("personalized",) if summary["algorithm"] in ("fedper", "fedrep") else ("global",)
    names = tuple(by)
    return tuple(p for p in FEDLOGE_PREDICTORS if p in names) if "universal" in names else names


def head_norm_rho(run_dir: Path) -> tuple[float | None, float | None]:
    """(ρ(‖G_c‖, n_c), mean over clients of ρ(‖L_k,c‖, n_k,c)) from the final checkpoint (spec §9.1)."""
    from fedtrust.runner.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir)
    part = json.loads((run_dir / "partition.json").read_text())
    counts = part["class_counts"]
    arrays = ckpt.state.arrays
    key = "head_g/weight" if "head_g/weight" in arrays else next((k for k in arrays if k.endswith("head.weight")), None)
    rho_g = float(spearmanr(arrays[key].norm(dim=1).numpy(), counts)[0]) if key else None
    local = []
    for cid, st in ckpt.store.states.items():
        w = st.arrays.get("head_l/weight")
        hist = part["label_hist"][cid]
        if w is not None and len(set(hist)) > 1:
            local.append(float(spearmanr(w.norm(dim=1).numpy(), hist)[0]))
    return rho_g, (statistics.mean(local) if local else None)


def main() -> None:
    parser = benchmark_parser(__doc__, "lt_fl")
    parser.add_argument("--fmnist-rounds", type=int, default=20)
    parser.add_argument("--fmnist-epochs", type=int, default=1)
    parser.add_argument("--fmnist-width", type=int, default=16)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    datasets = [d for d in args.datasets.split(",") if d]
    fm_extra = [f"rounds={args.fmnist_rounds}", f"train.epochs={args.fmnist_epochs}", f"model.width={args.fmnist_width}"]
    notes: list[str] = []
    settings = {}
    for d in datasets:
        if d == "fmnist" and not fmnist_available():
            notes.append("Fashion-MNIST-LT skipped: ../shared/data/fashion_mnist/train.npz is absent on this machine.")
            continue
        settings[d] = prepare(d, work, fm_extra if d == "fmnist" else [])
    all_jobs = {d: jobs_for(s, seeds, work, ablations=d == "digits") for d, s in settings.items()}
    run_jobs([j for jobs in all_jobs.values() for j in jobs.values()], args.jobs)

    cmd = (f"python benchmarks/lt_fl.py --seeds {args.seeds} --jobs {args.jobs} --datasets {args.datasets} "
           f"--fmnist-rounds {args.fmnist_rounds} --fmnist-epochs {args.fmnist_epochs} --fmnist-width {args.fmnist_width}")
    lines = ["# Long-tailed federated learning: FedLoGe vs baselines (issue 7)", "",
             f"Reproduce: `{cmd}` (from the repository root; runs kept under `{args.work}`).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}; 2 CPU cores, one torch "
             f"thread per run; the runs took {total_minutes([j for jobs in all_jobs.values() for j in jobs.values()]):.0f} min of wall time in all, {args.jobs} at a time.",
             "- Every method on its dataset's FedLoGe preset with only `algorithm` swapped (same partition, model, "
             "SGD lr 0.05 momentum 0.9, cosine schedule); baselines at their README defaults.",
             f"- Fashion-MNIST scaled for 2 CPU cores: {', '.join(fm_extra)} (preset: 100 rounds, 2 epochs, width 32).",
             "- Values in %, mean ± std over seeds. Pers. = personalized accuracy, unweighted over clients; masked = "
             "logits of classes absent from the client's local test set set to −∞ (spec fedloge.md §10), for every "
             "method alike. `—`: not applicable (a personalized predictor has no single global model).", *notes]
    header = ["method", "predictor", "Global", "Head", "Middle", "Tail", "Pers.", "Pers. masked"]
    for d, jobs in all_jobs.items():
        runs = {label: [jobs[label, s].summary() for s in seeds] for label in METHODS}
        rows = [r for label in METHODS for r in result_rows(label, runs[label], predictors_of(runs[label][0]))]
        lines += ["", f"## {TITLES[d]}", "", *md_table(header, rows, 2)]
        diag = []
        for label in ("FedLoGe", "FedAvg", "FedRoD"):
            rhos = [head_norm_rho(jobs[label, s].out) for s in seeds]
            diag.append([label, mean_std([r[0] for r in rhos], 1, 2), mean_std([r[1] for r in rhos], 1, 2)])
        lines += ["", f"Head-norm diagnostics on {d} (spec §9.1; Spearman ρ, mean ± std over seeds; FedLoGe: G and "
                  "L_k; FedAvg/FedRoD: their aggregated classifier, no local head kept):", "",
                  *md_table(["method", "ρ(‖G_c‖, n_c)", "mean_k ρ(‖L_k,c‖, n_k,c)"], diag)]
        if d == "digits":
            abl_rows = []
            for label in ("FedLoGe", *ABLATIONS):
                runs_a = [jobs[label, s].summary() for s in seeds]
                name = "sparse ETF 0.6, norm target 1.0 (preset)" if label == "FedLoGe" else label
                for p in ("universal", "global", "personalized"):
                    v = [predictor_view(r, p) for r in runs_a]
                    glob = "—" if p == "personalized" else mean_std([x["test_acc"] for x in v])
                    tail = "—" if p == "personalized" else mean_std([x["hmt_acc"]["tail"] for x in v])
                    abl_rows.append([name, PREDICTOR_LABELS[p], glob, tail, mean_std([x["client_acc_mean"] for x in v]),
                                     mean_std([x["client_acc_masked_mean"] for x in v])])
            lines += ["", "### Ablations on digits-LT: dense vs sparse ETF, SSE-C norm target", "",
                      *md_table(["FedLoGe variant", "predictor", "Global", "Tail", "Pers.", "Pers. masked"], abl_rows, 2)]
    write_results("lt_fl.md", with_analysis(lines, args.analysis))


if __name__ == "__main__":
    main()
