"""Gradient-leakage benchmark (issue 18): the I2F audit (spec i2f.md) against real gradient-inversion attacks.

Reproduce (from the repository root; about 20 min on 2 CPU cores, measured 19.2 min; the exact command is in
the results header):

    python benchmarks/leakage.py --jobs 2

In process, no ``fedtrust run``: every sample is one task of a ``multiprocessing`` pool of ``--jobs`` workers
with one torch thread each. Models are untrained, float64, eval mode, built once per worker from the seed
(``--seeds``, first value): ``convnet5`` (the I2F code's sigmoid "LeNet", spec §3) with init ``uniform``
U(±0.5), and on digits also ``sigmoid_mlp`` (64 → 32 → 10). Images are the first test images, normalized as
fedtrust feeds them to a model; everything (δ, I2F, attack start, errors) is in that normalized space (spec
§7.5). The label is **given** to the attacker (spec §2).

What is measured (spec §6):

- **noise** (§6.6): δ = ``gaussian_delta(g0, σ)`` (seeded per sample and σ), σ ∈ {0, 1e-4, 1e-3, 1e-2, 1e-1};
  ``I_lb = ‖Jδ‖/λmax(JJᵀ)`` (λmax by Lanczos), the exact I2F ``‖(JJᵀ)⁻¹Jδ‖`` (dense J: 64 rows on digits,
  784 on MNIST), the ridge I2F at the I2F code's ε = 1 (CG), and the DLG error ``‖x̂ − x0‖₂`` (spec §4's
  scale-matched error) with MSE, PSNR (peak 1/std) and SSIM (zero border, as the I2F code). DLG = L2 matching
  loss, L-BFGS (strong Wolfe), from N(0, 1) with restarts, keeping the restart of lowest matching loss:
  digits 10 steps × 3 restarts, MNIST 50 steps × 2 restarts. L-BFGS was picked over Adam (lr 0.1) in a
  trial at σ = 0 on digits: 184 / 279 dB vs 110 / 220 dB PSNR on two images, at half the time. Inverting
  Gradients (cosine, signed Adam, box, step schedule, TV 0; 500 steps on digits, 1000 on MNIST, 1 restart)
  at σ ∈ {0, 1e-2}. Digits: 50 samples; MNIST (``../shared/data/mnist``; skipped with a note where absent):
  20 samples, since one MNIST attack costs ≈ 7 s against ≈ 1 s on digits.
- **pruning** (§7): δ = ``pruning_delta(g0, p)``, p ∈ {0.1, 0.3, 0.5, 0.7, 0.9}, digits ConvNet5, 30 samples.
- **init** (§8): uniform / normal / kaiming / xavier ConvNet5 on digits at σ = 1e-3, 30 samples.
- **eigen** (§6.5): δ = c·v_k along right singular vectors of J (``eigen_delta``; c = 1e-2, and the I2F
  code's 5), k spread over the spectrum, 10 samples; slope of log ‖x̂ − x0‖ against log λ_k (λ_k = σ_k²; the
  linearization predicts −0.5).
- **fl** (what FL adds): batch size B ∈ {1, 2, 4, 8} (batch-mean CE, images with distinct labels) at σ = 0
  and 1e-3; and FedAvg updates of 1, 2, 5 local SGD steps (lr 0.01, B = 1, ``fedavg_target``) attacked as a
  gradient (Geiping et al. §5), with δ = target − g0 fed to the I2F. Digits ConvNet5, 5 samples.
- **cost**: seconds per sample of λmax (Lanczos), I_lb given λmax, ridge I2F (CG, one δ), dense J plus exact
  I2F, one DLG and one IG attack.

Results: ``benchmarks/results/leakage.md`` (with ``--analysis`` appended), scatter/pruning/eigen PNGs beside
it; the raw records as ``records.json`` under ``--work``. ``--quick`` is a smoke version (≈ 3 min
with ``--jobs 1``); ``--report-only`` rebuilds the results file from ``records.json``.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runpool import (benchmark_parser, machine_note, md_table, REPO, RESULTS, SHARED_DATA, shared_data_available,
                     with_analysis, write_results)

SIGMAS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
IG_SIGMAS = (0.0, 1e-2)
RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
INITS = ("uniform", "normal", "kaiming", "xavier")
INIT_SIGMA = 1e-3
EIGEN_CS = (1e-2, 5.0)  # small (linear regime) and the I2F code's c = 5
EIGEN_K = (0, 8, 16, 32, 48, 63)  # indices into J's 64 singular values on digits (0 = largest)
BATCHES = (1, 2, 4, 8)
FL_SIGMA = 1e-3
STEPS = (1, 2, 5)
FEDAVG_LR = 0.01
RIDGE_EPS = 1.0  # the I2F code's compute_exact_bound default


@dataclass(frozen=True)
class Attack:
    """The attack budget on one data set."""

    dlg_steps: int  # L-BFGS steps (each up to 20 inner iterations)
    dlg_restarts: int
    ig_steps: int  # Adam steps of Inverting Gradients, one restart


ATTACKS = {"digits": Attack(10, 3, 500), "mnist": Attack(50, 2, 1000)}
DEFAULTS = {"samples": 50, "mnist_samples": 20, "pruning_samples": 30, "init_samples": 30, "eigen_samples": 10,
            "fl_samples": 5}
QUICK = {"samples": 4, "mnist_samples": 2, "pruning_samples": 2, "init_samples": 2, "eigen_samples": 2,
         "fl_samples": 1}


# ---------------------------------------------------------------- data and models (cached per worker)


@functools.lru_cache(maxsize=None)
def dataset(name: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The first 500 test images in normalized float64 (as tests/privacy/conftest.py), their labels, mean, std."""
    from fedtrust.data.datasets import load_digits, load_mnist

    ds = load_digits() if name == "digits" else load_mnist(SHARED_DATA)
    pixels = ds.test.x[:500].double() / 255.0
    return (pixels - ds.mean[0]) / ds.std[0], ds.test.y[:500], float(ds.mean[0]), float(ds.std[0])


@functools.lru_cache(maxsize=None)
def model(data: str, name: str, init: str, seed: int) -> torch.nn.Module:
    from fedtrust.models import create_model

    torch.manual_seed(seed)
    shape = (1, 8, 8) if data == "digits" else (1, 28, 28)
    return create_model(name, 10, shape, init=init).double().eval()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image(data: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _, _ = dataset(data)
    return x[i:i + 1], y[i:i + 1]


# ---------------------------------------------------------------- one attack, scored


def attack(data: str, net: torch.nn.Module, target: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, seed: int,
           kind: str = "dlg") -> dict[str, float]:
    """DLG or IG on ``target``; the per-image errors averaged over the batch, and the seconds it took."""
    from fedtrust.privacy import dlg, inverting_gradients
    from fedtrust.privacy.metrics import l2_error, mse, psnr, ssim

    budget, (_, _, mean, std) = ATTACKS[data], dataset(data)
    start = time.perf_counter()
    if kind == "dlg":
        got = dlg(net, target, x0.shape, y0, optimizer="lbfgs", iterations=budget.dlg_steps,
                  restarts=budget.dlg_restarts, generator=gen(seed))
    else:
        got = inverting_gradients(net, target, x0.shape, y0, mean=mean, std=std, iterations=budget.ig_steps,
                                  generator=gen(seed))
    seconds = time.perf_counter() - start
    x_hat = torch.nan_to_num(got.x, nan=1e6, posinf=1e6, neginf=-1e6)
    return {"err": float(l2_error(x_hat, x0).mean()), "mse": float(mse(x_hat, x0).mean()),
            "psnr": float(psnr(x_hat, x0, 1 / std).mean()), "ssim": float(ssim(x_hat, x0, 1 / std, "zero").mean()),
            "loss": got.loss, "t_attack": seconds}


# ---------------------------------------------------------------- the tasks (one sample each)


def task_noise(data: str, name: str, i: int, seed: int) -> list[dict[str, Any]]:
    """σ sweep on one image: I_lb, exact and ridge I2F, DLG at every σ, IG at :data:`IG_SIGMAS`, and the costs."""
    from fedtrust.privacy import DenseJacobian, exact_i2f, gaussian_delta, GradientMap, lambda_max, lower_bound
    from fedtrust.privacy import ridge_i2f

    net = model(data, name, "uniform", seed)
    x0, y0 = image(data, i)
    t = time.perf_counter()
    gmap = GradientMap(net, x0, y0)
    g0 = gmap.grad()
    lam = lambda_max(gmap, generator=gen(seed))
    t_lambda = time.perf_counter() - t
    t = time.perf_counter()
    jac = DenseJacobian.from_map(gmap, chunk_size=64)
    t_dense = time.perf_counter() - t
    deltas = torch.stack([gaussian_delta(g0, s, gen(1000 * i + k)) for k, s in enumerate(SIGMAS)])
    t = time.perf_counter()
    ilb = lower_bound(gmap, deltas, lam)
    t_lb = time.perf_counter() - t
    t = time.perf_counter()
    exact = exact_i2f(jac, deltas[1:]).value
    t_exact = (time.perf_counter() - t) / (len(SIGMAS) - 1) + t_dense
    ridge = ridge_i2f(gmap, deltas[1:], RIDGE_EPS).value
    t = time.perf_counter()
    ridge_i2f(gmap, deltas[3], RIDGE_EPS)
    t_ridge = time.perf_counter() - t
    cost = {"t_lambda": t_lambda, "t_lb": t_lb / len(SIGMAS), "t_ridge": t_ridge, "t_exact": t_exact}
    out = []
    for k, sigma in enumerate(SIGMAS):
        base = {"exp": "noise", "data": data, "model": name, "sample": i, "sigma": sigma, "lam": lam.value,
                "ilb": float(ilb[k]), "i2f": float(exact[k - 1]) if k else 0.0,
                "ridge": float(ridge[k - 1]) if k else 0.0, "gnorm": float(g0.norm())}
        out.append({**base, "attack": "dlg", **cost, **attack(data, net, g0 + deltas[k], x0, y0, i)})
        if sigma in IG_SIGMAS:
            out.append({**base, "attack": "ig", **attack(data, net, g0 + deltas[k], x0, y0, i, "ig")})
    return out


def _i2f_pair(net: torch.nn.Module, x0: torch.Tensor, y0: torch.Tensor, deltas: torch.Tensor, seed: int):
    """g0, I_lb and exact I2F of a batch of δ (built from ``deltas(g0)``), J, λmax."""
    from fedtrust.privacy import DenseJacobian, exact_i2f, GradientMap, lambda_max, lower_bound

    gmap = GradientMap(net, x0, y0)
    g0 = gmap.grad()
    d = deltas(g0)
    lam = lambda_max(gmap, generator=gen(seed))
    jac = DenseJacobian.from_map(gmap, chunk_size=64)
    return g0, d, lower_bound(gmap, d, lam), exact_i2f(jac, d).value, jac, lam.value


def task_pruning(data: str, i: int, seed: int) -> list[dict[str, Any]]:
    from fedtrust.privacy import pruning_delta

    net = model(data, "convnet5", "uniform", seed)
    x0, y0 = image(data, i)
    g0, d, ilb, i2f, _, _ = _i2f_pair(net, x0, y0, lambda g: torch.stack([pruning_delta(g, p) for p in RATIOS]),
                                      seed)
    return [{"exp": "pruning", "data": data, "sample": i, "ratio": p, "ilb": float(ilb[k]), "i2f": float(i2f[k]),
             **attack(data, net, g0 + d[k], x0, y0, i)} for k, p in enumerate(RATIOS)]


def task_init(data: str, init: str, i: int, seed: int) -> list[dict[str, Any]]:
    from fedtrust.privacy import gaussian_delta

    net = model(data, "convnet5", init, seed)
    x0, y0 = image(data, i)
    g0, d, ilb, i2f, _, lam = _i2f_pair(net, x0, y0, lambda g: gaussian_delta(g, INIT_SIGMA, gen(1000 * i + 2))[None],
                                        seed)
    return [{"exp": "init", "data": data, "init": init, "sample": i, "ilb": float(ilb[0]), "i2f": float(i2f[0]),
             "lam": lam, "gnorm": float(g0.norm()), **attack(data, net, g0 + d[0], x0, y0, i)}]


def task_eigen(data: str, i: int, seed: int) -> list[dict[str, Any]]:
    from fedtrust.privacy import eigen_delta, exact_i2f, jacobian_spectrum

    net = model(data, "convnet5", "uniform", seed)
    x0, y0 = image(data, i)
    g0, _, _, _, jac, _ = _i2f_pair(net, x0, y0, lambda g: g[None] * 0, seed)
    s, _ = jacobian_spectrum(jac)
    out = []
    for c in EIGEN_CS:
        d = eigen_delta(jac, list(EIGEN_K), c)
        i2f = exact_i2f(jac, d).value
        out += [{"exp": "eigen", "data": data, "sample": i, "c": c, "k": k, "lam_k": float(s[k]) ** 2,
                 "i2f": float(i2f[j]), **attack(data, net, g0 + d[j], x0, y0, i)} for j, k in enumerate(EIGEN_K)]
    return out


def distinct_batch(data: str, start: int, size: int) -> list[int]:
    """``size`` test indices from ``start`` on with pairwise different labels (labels pin the image order)."""
    _, y, _, _ = dataset(data)
    chosen, seen = [], set()
    for j in range(start, len(y)):
        if int(y[j]) not in seen:
            chosen.append(j)
            seen.add(int(y[j]))
        if len(chosen) == size:
            return chosen
    raise ValueError("not enough distinct labels")


def task_fl(data: str, i: int, seed: int) -> list[dict[str, Any]]:
    """Batch size and local steps on the ``i``-th handful of digits."""
    from fedtrust.privacy import fedavg_target, gaussian_delta

    net = model(data, "convnet5", "uniform", seed)
    x, y, _, _ = dataset(data)
    out = []
    for b in BATCHES:
        idx = distinct_batch(data, 40 * i, b)
        x0, y0 = x[idx], y[idx]
        g0, d, ilb, i2f, _, _ = _i2f_pair(net, x0, y0, lambda g: gaussian_delta(g, FL_SIGMA, gen(1000 * i + 7))[None],
                                          seed)
        base = {"exp": "batch", "data": data, "sample": i, "B": b, "ilb": float(ilb[0]), "i2f": float(i2f[0])}
        out.append({**base, "sigma": 0.0, "ilb": 0.0, "i2f": 0.0, **attack(data, net, g0, x0, y0, i)})
        out.append({**base, "sigma": FL_SIGMA, **attack(data, net, g0 + d[0], x0, y0, i)})
    x0, y0 = image(data, 40 * i)
    for steps in STEPS:
        target = fedavg_target(net, x0, y0, FEDAVG_LR, steps)
        g0, d, ilb, i2f, _, _ = _i2f_pair(net, x0, y0, lambda g: (target - g)[None], seed)
        out.append({"exp": "steps", "data": data, "sample": i, "steps": steps, "ilb": float(ilb[0]),
                    "i2f": float(i2f[0]), "drift": float(d[0].norm() / g0.norm()),
                    **attack(data, net, target, x0, y0, i)})
    return out


TASKS = {"noise": task_noise, "pruning": task_pruning, "init": task_init, "eigen": task_eigen, "fl": task_fl}


def _run_task(spec: tuple[str, tuple]) -> list[dict[str, Any]]:
    name, args = spec
    return TASKS[name](*args)


def _init_worker() -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------- tables


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else float("nan")


def _fmt(v: float) -> str:
    if v != v:
        return "—"
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _corr(a: list[float], b: list[float]) -> tuple[str, str]:
    from fedtrust.privacy.metrics import pearson, spearman

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return "—", "—"
    ta, tb = torch.tensor(a), torch.tensor(b)
    positive = bool((ta > 0).all() and (tb > 0).all())
    return f"{spearman(ta, tb):.2f}", f"{pearson(ta.log(), tb.log()):.2f}" if positive else "—"


def noise_tables(recs: list[dict], data: str, name: str) -> list[str]:
    rows = []
    for sigma in SIGMAS:
        r = [x for x in recs if x["sigma"] == sigma and x["attack"] == "dlg"]
        ig = [x for x in recs if x["sigma"] == sigma and x["attack"] == "ig"]
        errs = [x["err"] for x in r]
        rho = _corr([x["i2f"] for x in r], errs)[0] if sigma else "—"
        rows.append([f"{sigma:g}", str(len(r)), _fmt(_mean([x["ilb"] for x in r])), _fmt(_mean([x["i2f"] for x in r])),
                     _fmt(_mean([x["ridge"] for x in r])), _fmt(_mean(errs)), _fmt(statistics.median(errs)),
                     _fmt(_mean([x["psnr"] for x in r])), _fmt(_mean([x["ssim"] for x in r])), rho,
                     _fmt(statistics.median([x["err"] for x in ig])) if ig else "",
                     _fmt(_mean([x["psnr"] for x in ig])) if ig else ""])
    pos = [x for x in recs if x["sigma"] > 0 and x["attack"] == "dlg"]
    rho, r_log = _corr([x["i2f"] for x in pos], [x["err"] for x in pos])
    rho_lb, _ = _corr([x["ilb"] for x in pos], [x["err"] for x in pos])
    ratio = [x["err"] / x["i2f"] for x in pos]
    ig_pos = [x for x in recs if x["sigma"] > 0 and x["attack"] == "ig"]
    rho_ig = _corr([x["i2f"] for x in ig_pos], [x["err"] for x in ig_pos])[0]
    lines = md_table(["σ", "n", "mean I_lb", "mean I2F", "mean ridge I2F (ε=1)", "mean ‖x̂−x0‖",
                      "median ‖x̂−x0‖", "PSNR dB", "SSIM", "Spearman(I2F, err) in σ", "IG median ‖x̂−x0‖",
                      "IG PSNR"], rows)
    qs = statistics.quantiles(ratio, n=10) if len(ratio) > 2 else [float("nan")] * 9
    lines += ["", f"Pooled over σ > 0 ({len(pos)} pairs): Spearman(I2F, ‖x̂−x0‖) = **{rho}**, Pearson of the logs = "
              f"{r_log}; Spearman(I_lb, ‖x̂−x0‖) = {rho_lb}. IG at σ = 1e-2: Spearman(I2F, err) = {rho_ig}. "
              f"Ratio ‖x̂−x0‖ / I2F: median {_fmt(statistics.median(ratio))}, 10–90 % "
              f"{_fmt(qs[0])}–{_fmt(qs[-1])}; share of pairs with ‖x̂−x0‖ ≥ I_lb: "
              f"{sum(x['err'] >= x['ilb'] for x in pos) / len(pos):.0%}."]
    return lines


def pruning_table(recs: list[dict]) -> list[str]:
    rows = []
    for p in RATIOS:
        r = [x for x in recs if x["ratio"] == p]
        rows.append([f"{p:g}", str(len(r)), _fmt(_mean([x["ilb"] for x in r])), _fmt(_mean([x["i2f"] for x in r])),
                     _fmt(statistics.median([x["err"] for x in r])), _fmt(_mean([x["psnr"] for x in r])),
                     _fmt(_mean([x["ssim"] for x in r])), _corr([x["i2f"] for x in r], [x["err"] for x in r])[0]])
    rho = _corr([x["i2f"] for x in recs], [x["err"] for x in recs])[0]
    return [*md_table(["p", "n", "mean I_lb", "mean I2F", "median ‖x̂−x0‖", "PSNR dB", "SSIM",
                       "Spearman in p"], rows), "", f"Pooled Spearman(I2F, ‖x̂−x0‖) = {rho}."]


def init_table(recs: list[dict]) -> list[str]:
    rows = []
    for init in INITS:
        r = [x for x in recs if x["init"] == init]
        if not r:
            continue
        rows.append([init, str(len(r)), _fmt(_mean([x["gnorm"] for x in r])), _fmt(_mean([x["lam"] for x in r])),
                     _fmt(_mean([x["ilb"] for x in r])), _fmt(statistics.median([x["i2f"] for x in r])),
                     _fmt(statistics.median([x["err"] for x in r])), _fmt(_mean([x["psnr"] for x in r])),
                     _fmt(_mean([x["ssim"] for x in r]))])
    return md_table(["init", "n", "mean ‖g0‖", "mean λmax", "mean I_lb", "median I2F", "median ‖x̂−x0‖", "PSNR dB",
                     "SSIM"], rows)


def slope(xs: list[float], ys: list[float]) -> float:
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def eigen_table(recs: list[dict]) -> list[str]:
    rows, notes = [], []
    for c in EIGEN_CS:
        for k in EIGEN_K:
            r = [x for x in recs if x["k"] == k and x["c"] == c]
            rows.append([f"{c:g}", str(k), _fmt(statistics.median([x["lam_k"] for x in r])),
                         _fmt(statistics.median([x["i2f"] for x in r])),
                         _fmt(statistics.median([x["err"] for x in r])),
                         _fmt(statistics.median([x["err"] / x["i2f"] for x in r]))])
        ok = [x for x in recs if x["c"] == c and x["err"] > 0]
        per = [slope([x["lam_k"] for x in ok if x["sample"] == s], [x["err"] for x in ok if x["sample"] == s])
               for s in sorted({x["sample"] for x in ok})]
        notes.append(f"- c = {c:g}: slope of log ‖x̂−x0‖ on log λ_k pooled "
                     f"**{slope([x['lam_k'] for x in ok], [x['err'] for x in ok]):.3f}**, per sample median "
                     f"{statistics.median(per):.3f} (range {min(per):.3f} … {max(per):.3f}); the I2F's own slope "
                     f"{slope([x['lam_k'] for x in ok], [x['i2f'] for x in ok]):.3f} (−0.5 by construction).")
    lines = md_table(["c", "k (0 = largest)", "median λ_k", "median I2F = c/√λ_k", "median ‖x̂−x0‖",
                      "median ‖x̂−x0‖ / I2F"], rows, align_first=2)
    return [*lines, "", *notes]


def fl_tables(recs: list[dict]) -> list[str]:
    rows = []
    for b in BATCHES:
        clean = [x for x in recs if x["exp"] == "batch" and x["B"] == b and x["sigma"] == 0]
        noisy = [x for x in recs if x["exp"] == "batch" and x["B"] == b and x["sigma"] > 0]
        rows.append([str(b), str(len(clean)), _fmt(_mean([x["ilb"] for x in noisy])),
                     _fmt(_mean([x["i2f"] for x in noisy])), _fmt(statistics.median([x["err"] for x in noisy])),
                     _fmt(_mean([x["psnr"] for x in noisy])), _fmt(statistics.median([x["err"] for x in clean])),
                     _fmt(_mean([x["psnr"] for x in clean])), _fmt(_mean([x["t_attack"] for x in clean]))])
    lines = md_table(["B", "n", f"mean I_lb (σ={FL_SIGMA:g})", "mean I2F", "median ‖x̂−x0‖ per image",
                      "PSNR dB", "median ‖x̂−x0‖ at σ=0", "PSNR at σ=0", "s / attack"], rows)
    rows = []
    for steps in STEPS:
        r = [x for x in recs if x["exp"] == "steps" and x["steps"] == steps]
        rows.append([str(steps), str(len(r)), _fmt(_mean([x["drift"] for x in r])), _fmt(_mean([x["ilb"] for x in r])),
                     _fmt(_mean([x["i2f"] for x in r])), _fmt(statistics.median([x["err"] for x in r])),
                     _fmt(_mean([x["psnr"] for x in r])), _fmt(_mean([x["ssim"] for x in r]))])
    return [*lines, "", *md_table(["local steps", "n", "‖target − g0‖/‖g0‖", "mean I_lb", "mean I2F",
                                   "median ‖x̂−x0‖", "PSNR dB", "SSIM"], rows)]


def cost_table(recs: list[dict]) -> list[str]:
    rows = []
    for key in sorted({(x["data"], x["model"]) for x in recs if x["exp"] == "noise"}):
        r = [x for x in recs if x["exp"] == "noise" and (x["data"], x["model"]) == key and x["attack"] == "dlg"]
        first = [x for x in r if x["sigma"] == 0]
        ig = [x for x in recs if x["exp"] == "noise" and (x["data"], x["model"]) == key and x["attack"] == "ig"]
        t_dlg, t_lam = _mean([x["t_attack"] for x in r]), _mean([x["t_lambda"] for x in first])
        rows.append([f"{key[0]} {key[1]}", _fmt(t_lam), _fmt(_mean([x["t_lb"] for x in first])),
                     _fmt(_mean([x["t_ridge"] for x in first])), _fmt(_mean([x["t_exact"] for x in first])),
                     _fmt(t_dlg), _fmt(_mean([x["t_attack"] for x in ig])), f"{t_dlg / t_lam:.0f}×"])
    return md_table(["data, model", "λmax (Lanczos) s", "I_lb given λmax s", "ridge I2F (CG) s",
                     "dense J + exact I2F s", "one DLG s", "one IG s", "DLG / λmax"], rows)


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter(recs: list[dict], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    colors = dict(zip(SIGMAS[1:], ("tab:blue", "tab:green", "tab:orange", "tab:red")))
    lo, hi = math.inf, 0.0
    for sigma, color in colors.items():
        r = [x for x in recs if x["sigma"] == sigma and x["attack"] == "dlg"]
        xs, ys = [x["i2f"] for x in r], [max(x["err"], 1e-12) for x in r]
        ax.scatter(xs, ys, s=12, c=color, label=f"σ = {sigma:g}", alpha=0.8)
        lo, hi = min(lo, *xs), max(hi, *xs)
    ig = [x for x in recs if x["sigma"] > 0 and x["attack"] == "ig"]
    if ig:
        ax.scatter([x["i2f"] for x in ig], [x["err"] for x in ig], s=18, facecolors="none", edgecolors="k",
                   label="IG, σ = 0.01")
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="‖x̂−x0‖ = I2F")
    ax.set(xscale="log", yscale="log", xlabel="I2F (exact, normalized space)", ylabel="DLG ‖x̂ − x0‖₂",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pruning_plot(recs: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, label in (("ilb", "mean I_lb"), ("i2f", "median I2F"), ("err", "median ‖x̂ − x0‖")):
        agg = _mean if key == "ilb" else statistics.median
        ax.plot(RATIOS, [agg([x[key] for x in recs if x["ratio"] == p]) for p in RATIOS], "o-", label=label)
    ax.set(yscale="log", xlabel="pruning ratio p", title="digits ConvNet5: pruning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eigen_plot(recs: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for c, color in zip(EIGEN_CS, ("tab:blue", "tab:red")):
        r = [x for x in recs if x["c"] == c]
        ax.scatter([x["lam_k"] for x in r], [max(x["err"], 1e-12) for x in r], s=12, c=color,
                   label=f"DLG ‖x̂ − x0‖, c = {c:g}")
        ax.scatter([x["lam_k"] for x in r], [x["i2f"] for x in r], s=14, c="k", marker="x",
                   label="I2F = c/√λ_k" if c == EIGEN_CS[0] else None)
    ax.set(xscale="log", yscale="log", xlabel="λ_k (eigenvalue of JJᵀ)", ylabel="error",
           title="digits ConvNet5: δ = c·v_k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def plan(datasets: list[str], n: dict[str, int], seed: int) -> list[tuple[str, tuple]]:
    """Every task, the expensive ones first (MNIST samples cost ≈ 40 s, digits ones 1–8 s)."""
    tasks: list[tuple[str, tuple]] = []
    if "mnist" in datasets:
        tasks += [("noise", ("mnist", "convnet5", i, seed)) for i in range(n["mnist_samples"])]
    if "digits" in datasets:
        tasks += [("fl", ("digits", i, seed)) for i in range(n["fl_samples"])]
        tasks += [("noise", ("digits", "convnet5", i, seed)) for i in range(n["samples"])]
        tasks += [("eigen", ("digits", i, seed)) for i in range(n["eigen_samples"])]
        tasks += [("pruning", ("digits", i, seed)) for i in range(n["pruning_samples"])]
        tasks += [("init", ("digits", init, i, seed)) for init in INITS for i in range(n["init_samples"])]
        tasks += [("noise", ("digits", "sigmoid_mlp", i, seed)) for i in range(n["samples"])]
    return tasks


def main() -> None:
    parser = benchmark_parser(__doc__, "leakage")
    parser.set_defaults(seeds="0", datasets="digits,mnist")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--quick", action="store_true", help="a smoke run (a handful of samples, ≈ 3 min on one job)")
    parser.add_argument("--out", default="leakage.md", help="results file name under benchmarks/results")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the results file from records.json under --work (after editing the analysis)")
    args = parser.parse_args()
    work = REPO / args.work
    if args.report_only:
        saved = json.loads((work / "records.json").read_text())
        write_report(saved["records"], saved["command"], saved["quick"], saved["n"], saved["datasets"],
                     saved["notes"],
                     saved["minutes"], args.analysis, args.out, args.work, saved["jobs"], saved["seed"], saved["date"],
                     saved["load"])
        return
    n = {k: getattr(args, k) if getattr(args, k) is not None else (QUICK if args.quick else DEFAULTS)[k]
         for k in DEFAULTS}
    seed = int(args.seeds.split(",")[0])
    datasets = args.datasets.split(",")
    notes = []
    if "mnist" in datasets and not shared_data_available("mnist"):
        notes.append(f"MNIST skipped: {SHARED_DATA / 'mnist'} not found.")
        print(notes[-1], flush=True)
        datasets.remove("mnist")
    tasks = plan(datasets, n, seed)
    start, records = time.time(), []
    print(f"{len(tasks)} tasks, {args.jobs} at a time", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_init_worker) as pool:
        for done, recs in enumerate(pool.imap_unordered(_run_task, tasks), 1):
            records += recs
            if done % 10 == 0 or done == len(tasks):
                print(f"{done}/{len(tasks)} tasks ({time.time() - start:.0f} s)", flush=True)
    minutes = (time.time() - start) / 60
    print(f"total {minutes:.1f} min", flush=True)
    command = f"python benchmarks/leakage.py {' '.join(sys.argv[1:])}".strip()
    work.mkdir(parents=True, exist_ok=True)
    saved = {"command": command, "quick": args.quick, "n": n, "datasets": datasets, "notes": notes,
             "minutes": minutes, "jobs": args.jobs, "seed": seed, "load": os.getloadavg()[0],
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "records": records}
    (work / "records.json").write_text(json.dumps(saved))
    write_report(records, command, args.quick, n, datasets, notes, minutes, args.analysis, args.out, args.work,
                 args.jobs, seed, saved["date"], saved["load"])


def write_report(records: list[dict], command: str, quick: bool, n: dict[str, int], datasets: list[str],
                 notes: list[str], minutes: float, analysis: str, out: str, work: str, jobs: int, seed: int,
                 date: str, load: float) -> None:
    lines = [f"# Gradient leakage: I2F vs gradient-inversion attacks (issue 18){' — quick' if quick else ''}",
             "", f"Reproduce: `{command}` (from the repository root; `PYTHONPATH=src` where fedtrust is not "
             f"installed; raw records in `{work}/records.json`; `--report-only` rebuilds this file from them).", "",
             f"- Date: {date}; model seed {seed}; "
             f"untrained float64 nets, first test images, label given to the attacker.",
             f"- Samples: digits noise {n['samples']} (ConvNet5 and MLP), MNIST noise {n['mnist_samples']} "
             f"(fewer: one MNIST DLG costs ≈ 7× a digits one), pruning {n['pruning_samples']}, init "
             f"{n['init_samples']} per scheme, eigen {n['eigen_samples']}, FL {n['fl_samples']}.",
             "- Attacks: DLG = L2 matching, L-BFGS (strong Wolfe) from N(0, 1), best of restarts by matching loss "
             f"(digits {ATTACKS['digits'].dlg_steps} steps × {ATTACKS['digits'].dlg_restarts} restarts, MNIST "
             f"{ATTACKS['mnist'].dlg_steps} × {ATTACKS['mnist'].dlg_restarts}), no box; IG = cosine, signed Adam "
             f"lr 0.1, box, schedule, TV 0, 1 restart ({ATTACKS['digits'].ig_steps} / {ATTACKS['mnist'].ig_steps} "
             "steps). Errors: ‖x̂ − x0‖₂ over the image in normalized space (the scale of I2F); PSNR with peak "
             "1/std (= [0, 1] PSNR), SSIM zero border.",
             f"- Hardware: {machine_note()}; {jobs} worker processes, one torch thread each"
             + f"; 1-minute load average at the end {load:.1f}.",
             f"- Total run time: {minutes:.1f} min of wall time.", *(f"- {x}" for x in notes), ""]
    noise = [x for x in records if x["exp"] == "noise"]
    for data, name in (("digits", "convnet5"), ("digits", "sigmoid_mlp"), ("mnist", "convnet5")):
        r = [x for x in noise if x["data"] == data and x["model"] == name]
        if not r:
            continue
        png = f"leakage-{data}-{name}.png"
        scatter(r, f"{data} {name}: I2F vs DLG error", RESULTS / png)
        lines += [f"## Noise: {data}, {name}", "", *noise_tables(r, data, name), "", f"![scatter]({png})", ""]
    pruning = [x for x in records if x["exp"] == "pruning"]
    if pruning:
        pruning_plot(pruning, RESULTS / "leakage-pruning.png")
        lines += ["## Pruning (digits, ConvNet5)", "", *pruning_table(pruning), "", "![pruning](leakage-pruning.png)",
                  ""]
    init = [x for x in records if x["exp"] == "init"]
    if init:
        lines += [f"## Initialization (digits, ConvNet5, σ = {INIT_SIGMA:g})", "", *init_table(init), ""]
    eigen = [x for x in records if x["exp"] == "eigen"]
    if eigen:
        eigen_plot(eigen, RESULTS / "leakage-eigen.png")
        lines += ["## Eigen-directions (digits, ConvNet5; spec §6.5)", "", *eigen_table(eigen), "",
                  "![eigen](leakage-eigen.png)", ""]
    fl = [x for x in records if x["exp"] in ("batch", "steps")]
    if fl:
        lines += ["## What FL adds (digits, ConvNet5)", "", f"Batch size B (batch-mean CE; σ = {FL_SIGMA:g} "
                  "Gaussian δ; errors per image), then FedAvg updates of B = 1 with local SGD steps at lr "
                  f"{FEDAVG_LR:g}, attacked as if they were the gradient (δ = target − g0):", "", *fl_tables(fl), ""]
    if noise:
        lines += ["## Cost per sample (seconds, one thread)", "", *cost_table(noise), ""]
    write_results(out, with_analysis(lines, analysis))


if __name__ == "__main__":
    main()
