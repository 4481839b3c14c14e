"""``fedtrust audit RUN_DIR``: how much a finished run's shared updates reveal about its clients' data.

For a few probed clients and samples, at the run's final server model (the model clients received
in the next round), each row is one shared target under one defense:

* **target** ``gradient``: one sample's gradient g0 = ∇θ L(x0, y) (a client of batch size 1 taking one
  SGD step shares −η·g0); ``update``: the client's real FedAvg update on a batch of its first B samples
  with the run's lr and S local full-batch SGD steps, attacked as the mean gradient along the path
  (Geiping et al. 2020 §5; :func:`~fedtrust.privacy.attacks.fedavg_target`).
* **defense**: ``none`` (what is shared exactly; I2F is 0: a perfect attacker recovers x0), ``privacy``
  (the run's own client-side defense, config ``privacy``, applied to the update −η·S·g exactly as the
  clients apply it, :mod:`fedtrust.fl.update_privacy`), and ``noise σ`` (a reference Gaussian δ = σ·ξ on
  the shared gradient, ``--sigma``). FL's own defenses show in the ``update`` target (batch size B and
  local steps S mix the samples).
* the I2F lower bound I_lb = ‖Jδ‖/λmax(JJᵀ) (spec i2f.md §1, :mod:`fedtrust.privacy.probe`; J of the
  batch's gradient at the round's model, so for ``update`` with S > 1 the first step's J) of the same δ the
  attacker faces and, with ``--attack dlg|ig``, the attack's reconstruction from the defended target (known
  labels, random starts, the restart with the lowest matching loss kept) and its errors: ‖x̂ − x0‖₂ in
  model-input space (I2F's scale), MSE, PSNR and SSIM in [0, 1] pixels.

Writes ``RUN_DIR/audit/``: ``audit.json`` (settings, rows, costs), ``audit.md`` (the table) and
``reconstructions.npz`` (originals and reconstructions in [0, 1] pixels), then rewrites the run's
report, whose "Privacy" section shows them. LPIPS is not computed: it needs pretrained weights we cannot
ship offline.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from fedtrust.errors import ConfigError, FedTrustError
from fedtrust.fl.update_privacy import UpdatePrivacy
from fedtrust.privacy.attacks import dlg, fedavg_target, inverting_gradients
from fedtrust.privacy.metrics import l2_error, mse, psnr, ssim
from fedtrust.privacy.i2f import gaussian_delta
from fedtrust.privacy.probe import batch_risk
from fedtrust.runner import rundir
from fedtrust.runner.checkpoint import load_checkpoint
from fedtrust.fl.types import Message
from fedtrust.runner.config import build_config, load_config, load_yaml
from fedtrust.runner.federation import Federation, build_federation, build_privacy
from fedtrust.runner.source import primary_model

AUDIT_DIR = "audit"
AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
RECONSTRUCTIONS = "reconstructions.npz"
ATTACKS = ("none", "dlg", "ig")
TARGETS = ("gradient", "update")
DEFAULT_ITERATIONS = {"dlg": 20, "ig": 500, "none": 0}
"""Attack iterations when ``--iterations`` is not given: enough on the benchmark's digits and MNIST nets for
DLG to reach a >70 dB reconstruction of an undefended gradient (benchmarks/results/leakage.md)."""


@dataclass(frozen=True)
class AuditSettings:
    """What ``fedtrust audit`` probes and how hard it attacks (the CLI's options)."""

    clients: tuple[int, ...] | None = None
    """Client ids to probe; None: the first ``num_clients`` clients that hold data."""
    num_clients: int = 2
    samples: int = 2
    """Samples per client (``gradient``: one row each; ``update``: the batch size B)."""
    target: Literal["gradient", "update"] = "gradient"
    steps: int | None = None
    """Local SGD steps S of the ``update`` target (None: ``train.steps``, else 1)."""
    sigmas: tuple[float, ...] = (1e-3,)
    attack: Literal["none", "dlg", "ig"] = "dlg"
    iterations: int | None = None
    """Attack iterations per restart; None: :data:`DEFAULT_ITERATIONS` of the attack (DLG's are L-BFGS outer
    steps of up to 20 inner iterations each, IG's are Adam steps)."""
    restarts: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ConfigError(f"audit attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        if self.target not in TARGETS:
            raise ConfigError(f"audit target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        for name in ("num_clients", "samples", "iterations", "restarts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"audit {name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"audit steps must be >= 1, got {self.steps}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.sigmas):
            raise ConfigError(f"audit sigmas must be finite and > 0, got {list(self.sigmas)}")


@dataclass
class AuditRow:
    """One shared target under one defense: its I2F lower bound and, with an attack, the attack's errors."""

    client: int
    samples: list[int]
    labels: list[int]
    target: str
    defense: str
    i2f_lb: float
    lambda_max: float
    jdelta: float
    seconds_i2f: float
    l2_error: float | None = None
    mse: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    matching_loss: float | None = None
    seconds_attack: float | None = None
    recon: int | None = None
    """Index into ``reconstructions.npz`` (None: no attack)."""


@dataclass
class AuditResult:
    """Everything ``fedtrust audit`` writes."""

    run_dir: Path
    settings: AuditSettings
    round: int
    rows: list[AuditRow] = field(default_factory=list)
    originals: list[np.ndarray] = field(default_factory=list)
    reconstructions: list[np.ndarray] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"round": self.round, "settings": asdict(self.settings), "rows": [asdict(r) for r in self.rows],
                "cost": _costs(self.rows)}


def _costs(rows: list[AuditRow]) -> dict[str, float | None]:
    i2f = [r.seconds_i2f for r in rows]
    attack = [r.seconds_attack for r in rows if r.seconds_attack is not None]
    return {"i2f_seconds_mean": sum(i2f) / len(i2f) if i2f else None,
            "attack_seconds_mean": sum(attack) / len(attack) if attack else None}


def load_finished_run(run_dir: Path) -> tuple[Federation, Message, int]:
    """The run's federation (data, algorithm), its last checkpointed server state and round; one-line errors
    when it has none."""
    if not (run_dir / rundir.CONFIG).is_file():
        raise FedTrustError(f"{str(run_dir)!r} is not a run directory (no {rundir.CONFIG})")
    ckpt = load_checkpoint(run_dir)
    cfg = build_config(load_yaml(run_dir / rundir.CONFIG))
    return build_federation(cfg), ckpt.state, ckpt.round


def load_config_model(config: Path, overrides: list[str]) -> tuple[Federation, Message, int]:
    """A config's federation and its initial server state (round 0): what its clients would share first."""
    cfg = load_config(config, overrides)
    if cfg.init_from is not None:
        raise ConfigError("config key 'init_from': audit the source run directory itself "
                          "(fedtrust audit RUN_DIR); a config is audited at its fresh initial model")
    fed = build_federation(cfg)
    return fed, fed.algorithm.init(), 0


def _probed_clients(fed: Federation, settings: AuditSettings) -> list[int]:
    sizes = [len(i) for i in fed.data.indices]
    if settings.clients is not None:
        bad = [c for c in settings.clients if not 0 <= c < len(sizes)]
        if bad:
            raise ConfigError(f"audit client {bad[0]} does not exist; expected ids in 0..{len(sizes) - 1}")
        return list(settings.clients)
    return [k for k, n in enumerate(sizes) if n > 0][:settings.num_clients]


def _pixels(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Normalized model input back to [0, 1] pixels (per channel), float64."""
    m = torch.tensor(mean, dtype=torch.float64, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64, device=x.device).view(1, -1, 1, 1)
    return x.double() * s + m


def _defended(g: Tensor, privacy: UpdatePrivacy, lr: float, steps: int, round: int, client: int) -> Tensor:
    """The gradient-like target a client running ``privacy`` shares: its update −η·S·g defended as the
    clients defend it, mapped back to gradient scale."""
    scale = -lr * steps
    return privacy.perturb(scale * g, round, client) / scale  # float64: no float32 round-off posing as δ


def audit_run(source: Path | str, settings: AuditSettings = AuditSettings(), overrides: list[str] | None = None,
              out: Path | str | None = None, log: Any = None) -> AuditResult:
    """Audit a finished run directory, or a config file at its initial model (module docstring).

    Writes nothing (see :func:`write_audit`); ``out`` is where the result will be written: the run
    directory by default, and for a config a new folder under ``runs/``.
    """
    source = Path(source)
    if source.is_dir():
        if overrides:
            raise ConfigError(f"overrides {overrides[0]!r}: a run directory is audited as it ran; "
                              f"overrides apply to a CONFIG.yaml only")
        fed, state, round_ = load_finished_run(source)
    elif source.is_file():
        fed, state, round_ = load_config_model(source, overrides or [])
    else:
        raise FedTrustError(f"{str(source)!r} is neither a run directory nor a config file")
    target_dir = Path(out) if out is not None else (source if source.is_dir() else None)
    if target_dir is None:
        target_dir = rundir.new_run_dir(None, f"audit-{source.stem}")
    cfg = fed.config
    model = primary_model(fed, state).eval().double()  # a copy built for the audit: float64 throughout
    normalize = fed.algorithm.ctx.normalize
    mean, std = fed.dataset.mean, fed.dataset.std
    privacy = build_privacy(cfg)
    lr = cfg.train.lr
    steps = settings.steps or (cfg.train.steps if settings.target == "update" and cfg.train.steps else 1)
    result = AuditResult(target_dir, settings, round_)
    gen = torch.Generator(device=fed.device).manual_seed(settings.seed)
    for client in _probed_clients(fed, settings):
        data = fed.data.client(client)
        n = min(settings.samples, len(data))
        if n == 0:
            raise ConfigError(f"audit client {client} holds no training data; choose another (--clients)")
        batches = [[i] for i in range(n)] if settings.target == "gradient" else [list(range(n))]
        for picks in batches:
            x0 = normalize(data.x[picks].to(fed.device)).double()
            y = data.y[picks].to(fed.device)
            g = fedavg_target(model, x0, y, lr, steps) if settings.target == "update" else None
            defenses: list[tuple[str, Tensor | float]] = [("none", 0.0)]
            if privacy is not None:
                g0 = g if g is not None else _gradient(model, x0, y)
                defenses.append(("privacy", _defended(g0, privacy, lr, steps, round_ + 1, client) - g0))
            if settings.sigmas:  # one draw of δ = σ·ξ per target, faced by I_lb and the attack alike
                g0 = g if g is not None else _gradient(model, x0, y)
                defenses += [(f"noise {s:g}", gaussian_delta(g0, s, gen)) for s in settings.sigmas]
            for name, delta in defenses:
                row = _row(model, x0, y, g, delta, gen, client, [int(data_index(fed, client, i)) for i in picks],
                           settings.target, name)
                if settings.attack != "none":
                    _attack(model, row, x0, y, g, delta, gen, settings, mean, std, result)
                result.rows.append(row)
                if log is not None:
                    log(_row_line(row))
    return result


def data_index(fed: Federation, client: int, i: int) -> int:
    """The training-set index of a client's i-th sample."""
    return int(fed.data.indices[client][i])


def _gradient(model: nn.Module, x0: Tensor, y: Tensor) -> Tensor:
    from fedtrust.privacy.jacobian import GradientMap

    return GradientMap(model, x0, y, dtype=torch.float64).grad()


def _row(model: nn.Module, x0: Tensor, y: Tensor, g: Tensor | None, delta: Tensor | float, gen: torch.Generator,
         client: int, samples: list[int], target: str, defense: str) -> AuditRow:
    start = time.perf_counter()
    if isinstance(delta, float) and delta == 0.0:
        lb, lam, jd = 0.0, float("nan"), 0.0
    else:
        lb, lam, jd, _ = batch_risk(model, x0, y, delta, generator=gen)
    return AuditRow(client, samples, [int(v) for v in y.tolist()], target, defense, lb, lam, jd,
                    time.perf_counter() - start)


def _attack(model: nn.Module, row: AuditRow, x0: Tensor, y: Tensor, g: Tensor | None, delta: Tensor | float,
            gen: torch.Generator, settings: AuditSettings, mean: tuple[float, ...], std: tuple[float, ...],
            result: AuditResult) -> None:
    """Run the attack on the defended target, record its errors and reconstruction in ``row``."""
    target = g if g is not None else _gradient(model, x0, y)
    if isinstance(delta, Tensor):
        target = target + delta
    start = time.perf_counter()
    iterations = settings.iterations or DEFAULT_ITERATIONS[settings.attack]
    if settings.attack == "dlg":
        out = dlg(model, target, x0.shape, y, optimizer="lbfgs", iterations=iterations,
                  restarts=settings.restarts, generator=gen)
    else:
        out = inverting_gradients(model, target, x0.shape, y, mean=mean[0], std=std[0],
                                  iterations=iterations, restarts=settings.restarts, generator=gen)
    row.seconds_attack = time.perf_counter() - start
    x_hat = out.x.detach()
    finite = bool(torch.isfinite(x_hat).all())
    p0, p_hat = _pixels(x0, mean, std), _pixels(x_hat, mean, std).clamp(0, 1)
    border = "valid" if min(x0.shape[-2:]) >= 11 else "zero"
    row.l2_error = float(l2_error(x_hat, x0).mean()) if finite else None
    row.mse = float(mse(p_hat, p0).mean()) if finite else None
    row.psnr = float(psnr(p_hat, p0, 1.0).mean()) if finite else None
    row.ssim = float(ssim(p_hat, p0, 1.0, border=border).mean()) if finite else None
    row.matching_loss = float(out.loss) if math.isfinite(float(out.loss)) else None
    row.recon = len(result.reconstructions)
    result.originals.append(p0.cpu().numpy().astype(np.float32))
    result.reconstructions.append(p_hat.cpu().numpy().astype(np.float32) if finite
                                  else np.full(tuple(x0.shape), np.nan, np.float32))


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _row_line(row: AuditRow) -> str:
    return (f"client {row.client} samples {row.samples} ({row.target}, {row.defense}): I_lb {_fmt(row.i2f_lb, '.3g')}"
            f"  ||x^-x0|| {_fmt(row.l2_error, '.3g')}  PSNR {_fmt(row.psnr, '.1f')}  SSIM {_fmt(row.ssim, '.3f')}")


def audit_table(result: AuditResult) -> list[str]:
    """The audit as a markdown table, with its settings and costs above it."""
    s = result.settings
    cost = _costs(result.rows)
    lines = [f"# Gradient-leakage audit of {result.run_dir.name} (round {result.round})", "",
             f"Target: {s.target}; attack: {s.attack} ({s.iterations or DEFAULT_ITERATIONS[s.attack]} iterations, "
             f"{s.restarts} restarts, labels given); I_lb = ||J delta|| / lambda_max(JJ^T) (smaller: riskier; 0 without a defense).",
             f"Cost: I_lb {_fmt(cost['i2f_seconds_mean'], '.2f')} s per row, attack "
             f"{_fmt(cost['attack_seconds_mean'], '.2f')} s per row.", "",
             "| client | samples | labels | defense | I_lb | lambda_max | ‖x̂−x0‖ | MSE | PSNR (dB) | SSIM |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {r.client} | {' '.join(map(str, r.samples))} | {' '.join(map(str, r.labels))} | {r.defense} "
                     f"| {_fmt(r.i2f_lb, '.3g')} | {_fmt(r.lambda_max, '.3g')} | {_fmt(r.l2_error, '.3g')} "
                     f"| {_fmt(r.mse, '.2e')} | {_fmt(r.psnr, '.1f')} | {_fmt(r.ssim, '.3f')} |")
    return lines


def write_audit(result: AuditResult) -> Path:
    """Write ``audit.json``, ``audit.md`` and ``reconstructions.npz`` under ``<run dir>/audit`` (atomically)."""
    folder = result.run_dir / AUDIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(folder / AUDIT_JSON, json.dumps(rundir.jsonable(result.as_json()), indent=1))
    rundir.write_atomic(folder / AUDIT_MD, "\n".join(audit_table(result)) + "\n")
    tmp = folder / (RECONSTRUCTIONS + ".tmp.npz")
    recon = {f"x0_{i}": a for i, a in enumerate(result.originals)}
    recon |= {f"xhat_{i}": a for i, a in enumerate(result.reconstructions)}
    np.savez_compressed(tmp, **recon)
    tmp.replace(folder / RECONSTRUCTIONS)
    return folder
