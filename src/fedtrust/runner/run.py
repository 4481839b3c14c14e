"""``fedtrust.run(config)``: one federated run, start to finish, as a run directory.

The CLI is a thin layer over :func:`run`. A run writes ``config.yaml``,
``partition.json``, ``metrics.jsonl`` (a line per round), atomic checkpoints,
``eval_scores.npz`` (the final evaluation's per-sample scores), ``summary.json``
and ``report.html``. ``resume=RUN_DIR`` continues an
interrupted run and ends with exactly the metrics and weights of an
uninterrupted one on CPU.

Runs that go wrong say so in one line: an ``out`` that cannot be created or
written fails before the data is loaded, and a run without an attack whose
training diverges (NaN/Inf in a client's update, the server model or its test
outputs) stops at that round (:class:`~fedtrust.runner.callbacks.DivergenceGuard`),
keeping the metrics of the rounds before. Under an attack a diverged model is
the attack's result, so that run goes on (its metrics null where undefined).

``init_from`` (warm start from another run) is :mod:`fedtrust.runner.source`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedtrust.errors import CheckpointError, ConfigError
from fedtrust.evaluation.evaluators import backdoor_asr
from fedtrust.fl.executor import Callback, ClientStore
from fedtrust.fl.protocol import Message
from fedtrust.metrics.backdoor import lifespan
from fedtrust.runner import rundir
from fedtrust.runner.callbacks import Checkpointer, DivergenceGuard, Evaluator, MetricsLogger, ProgressBar, RoundLines
from fedtrust.runner.checkpoint import RELOCATABLE, config_mismatch, load_checkpoint
from fedtrust.runner.config import RunConfig, build_config, config_to_dict, load_config, load_yaml
from fedtrust.runner.federation import build_federation
from fedtrust.runner.source import (check_source_unchanged, primary_model, read_source, recorded_source,  # noqa: F401
                                    resolve_pretrained, source_state, warm_start)


@dataclass
class RunResult:
    """What a finished run returns: where it lives, its final metrics, and the final server state."""

    run_dir: Path
    summary: dict[str, Any]
    state: Message
    config: RunConfig
    report: Path | None = None


def _as_config(config: RunConfig | dict | str | Path | None, overrides: list[str] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        return build_config(config_to_dict(config), overrides) if overrides else config
    if isinstance(config, dict):
        return build_config(config, overrides)
    return load_config(config, overrides)


def run(config: RunConfig | dict | str | Path | None = None, overrides: list[str] | None = None, *,
        resume: str | Path | None = None, console: Console | None = None, progress: bool = True,
        report: bool = True, round_lines: Callable[[str], None] | None = None) -> RunResult:
    """Run (or resume) a federated training job and return its :class:`RunResult`.

    ``config`` is a :class:`RunConfig`, a plain dict, a YAML path, or None for
    the defaults (FedAvg on bundled digits); ``overrides`` are ``key=value``
    strings. With ``resume``, the config defaults to the run's ``config.yaml``
    and must match the checkpoint's (except ``out``). ``round_lines`` receives one plain line per round
    (:class:`~fedtrust.runner.callbacks.RoundLines`; the Flower ServerApp streams them to ``flwr run``).
    """
    console = console or Console(quiet=not progress)
    if resume is not None:
        run_dir = Path(resume)
        if config is None:
            if not (run_dir / rundir.CONFIG).is_file():
                raise CheckpointError(f"{str(run_dir)!r} is not a run directory (no {rundir.CONFIG})")
            config = load_yaml(run_dir / rundir.CONFIG)
        cfg = _as_config(config, (overrides or []) + [f"out={run_dir}"])
        rundir.check_writable(run_dir, advice="make it writable to resume the run")
        ckpt = load_checkpoint(run_dir, console.print)
        cfg = recorded_source(cfg, ckpt.config)
        diffs = config_mismatch(ckpt.config, config_to_dict(cfg), ignore=RELOCATABLE)
        if diffs:
            raise CheckpointError(f"checkpoint in {str(run_dir)!r} was made with a different config: {'; '.join(diffs)} "
                                  f"(a resume may change only {', '.join(RELOCATABLE)})")
        for moved in config_mismatch(ckpt.config, config_to_dict(cfg), ignore=("out",)):
            console.print(f"resuming with a new {moved}")
        check_source_unchanged(cfg)
        source = None
    else:
        cfg = _as_config(config, overrides)
        rundir.check_writable(cfg.out)
        ckpt = None
        cfg, source = read_source(cfg) if cfg.init_from is not None else (cfg, None)

    fed = build_federation(cfg)
    if ckpt is None and source is None and fed.algorithm.needs_init_from:
        raise ConfigError(f"algorithm {cfg.algorithm.name!r} is a second stage: set init_from to a finished run "
                          f"of the first (e.g. a fedavg run directory) to start from its weights")
    fed.executor.log = console.print
    resolved = config_to_dict(cfg)
    if ckpt is None:
        torch.manual_seed(cfg.seed)
        state, store, start, offset = fed.algorithm.init(), ClientStore(), 0, 0.0
        if source is not None:  # before the run directory exists: a mismatch leaves nothing behind
            state, ignored = warm_start(state, source.state, cfg.init_from.path, cfg.algorithm.name,
                                        fed.algorithm.fresh_prefixes)
            console.print(f"init_from {cfg.init_from.path}: {len(state.arrays)} arrays"
                          + (f"; ignored the source's {', '.join(ignored)}" if ignored else ""))
            cfg, fed, measured = resolve_pretrained(cfg, fed, state)
            fed.executor.log = console.print
            resolved = config_to_dict(cfg)
            if measured:
                console.print(f"measured on the init_from model: objective {measured}")
        if fed.eval_setup.backdoor is not None and cfg.eval.asr_baseline is None:  # the lifespan's reference
            cfg = record_asr_baseline(cfg, backdoor_asr(primary_model(fed, state), fed.eval_setup))
            resolved = config_to_dict(cfg)
        run_dir = rundir.new_run_dir(cfg.out, f"{cfg.algorithm.name}-{cfg.data.dataset}")
        resolved["out"] = str(run_dir)
        rundir.write_config(run_dir, resolved)
    else:
        kept = rundir.truncate_metrics(run_dir, ckpt.round)
        state, store, start = ckpt.state, ckpt.store, ckpt.round
        offset = kept[-1]["time_s"] if kept else 0.0
        console.print(f"resuming {run_dir} after round {start}")
    rundir.write_json(run_dir / rundir.PARTITION, fed.partition)
    if getattr(fed.executor, "config", None) is not None:  # Flower's nodes keep client state under the run dir
        fed.executor.config = fed.executor.config.model_copy(update={"out": str(Path(run_dir).resolve())})
    if cfg.eval.ood_model == "init_from":  # OOD scored with the source model (PASCL stage 2)
        fed.eval_setup.ood_model = primary_model(fed, state if start == 0 else source_state(fed, cfg))

    guard = DivergenceGuard(divergence_hint(cfg), fed.executor.faults) if fed.executor.attack is None else None
    evaluator = Evaluator(fed.algorithm, fed.eval_setup, cfg.eval.every, cfg.rounds, run_dir, guard)
    callbacks: list[Callback] = [*([guard] if guard is not None else []), evaluator, MetricsLogger(run_dir, offset),
                                 Checkpointer(run_dir, config_to_dict(cfg), cfg.checkpoint_every, cfg.rounds)]
    if round_lines is not None:
        callbacks.append(RoundLines(round_lines))
    if progress:
        callbacks.append(ProgressBar(console, f"{cfg.algorithm.name} on {cfg.data.dataset} ({fed.executor.name})"))
    console.print(f"fedtrust: {cfg.algorithm.name} on {cfg.data.dataset}, {cfg.data.num_clients} clients, "
                  f"executor {fed.executor.name} ({fed.executor_reason}), device {fed.device}, run dir {run_dir}")
    t0 = time.perf_counter()
    try:
        state = fed.executor.run(state, store, start, cfg.rounds, callbacks)
    except BaseException:  # a run stopped early still ends its progress bar and syncs the metrics written so far
        for cb in callbacks:
            with contextlib.suppress(Exception):
                cb.on_end()
        raise

    summary = _summary(run_dir, cfg, fed.executor.name, offset + time.perf_counter() - t0)
    if fed.executor.attack is not None and fed.eval_setup.backdoor is not None:
        summary.update(backdoor_summary(rundir.read_metrics(run_dir), cfg.eval.asr_baseline,
                                        fed.executor.attack.targets.last_round(cfg.rounds)))
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    report_path = None
    if report:
        from fedtrust.report import write_report

        report_path = write_report([run_dir])
    _print_summary(console, summary, run_dir, report_path)
    return RunResult(run_dir, summary, state, cfg, report_path)


def divergence_hint(cfg: RunConfig) -> str:
    """The likely cause and cure that end a divergence error: the learning rate, and an update bound."""
    bound = cfg.defense.max_update_norm
    cure = (f"a smaller defense.max_update_norm (now {bound:g})" if bound is not None
            else "defense.max_update_norm to bound each client's update")
    if cfg.defense.server_lr != 1.0:
        return (f"defense.server_lr={cfg.defense.server_lr:.12g} or train.lr={cfg.train.lr:.12g} too high? "
                f"try smaller ones, or {cure}")
    return f"train.lr={cfg.train.lr:.12g} too high? try a smaller train.lr, or {cure}"


def _summary(run_dir: Path, cfg: RunConfig, executor: str, wall: float) -> dict[str, Any]:
    records = rundir.read_metrics(run_dir)
    evals = [r for r in records if "test_acc" in r]
    final = dict(evals[-1]) if evals else {}
    final.pop("time_s", None)
    final.update(rounds=cfg.rounds, wall_time_s=wall, executor=executor, algorithm=cfg.algorithm.name,
                 dataset=cfg.data.dataset, best_test_acc=max((r["test_acc"] for r in evals), default=None),
                 run_dir=str(run_dir))
    return final


def record_asr_baseline(cfg: RunConfig, asr: float | None) -> RunConfig:
    """``cfg`` with ``eval.asr_baseline`` set to the start model's measured ASR (kept in config.yaml, so a
    resumed run uses the same reference)."""
    tree = config_to_dict(cfg)
    tree["eval"]["asr_baseline"] = asr
    return build_config(tree)


def backdoor_summary(records: list[dict[str, Any]], baseline: float | None,
                     last_attack: int | None) -> dict[str, Any]:
    """Peak ASR over the evaluations (with τ too when logged) and the lifespan (rounds after the last attack
    round until the ASR falls below twice ``baseline``, :func:`~fedtrust.metrics.backdoor.lifespan`; None
    when it never does, or without an attack round or a baseline)."""
    asr = {r["round"]: r["asr"] for r in records if r.get("asr") is not None}
    out: dict[str, Any] = {"asr_peak": max(asr.values(), default=None), "asr_baseline": baseline,
                           "last_attack_round": last_attack}
    tau = [r["asr_tau"] for r in records if r.get("asr_tau") is not None]
    if tau:
        out["asr_tau_peak"] = max(tau)
    out["lifespan"] = (lifespan(asr, last_attack, baseline) if last_attack is not None and baseline is not None
                       else None)
    return out


def _print_summary(console: Console, s: dict[str, Any], run_dir: Path, report: Path | None) -> None:
    table = Table(title=f"{s['algorithm']} on {s['dataset']}: final metrics (round {s.get('round', '?')})")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    for key in ("test_acc", "best_test_acc", "test_loss", "client_acc_mean"):
        if key in s:
            table.add_row(key, fmt(s[key]))
    for group in ("group_acc", "hmt_acc"):
        for k, v in (s.get(group) or {}).items():
            table.add_row(f"{group}.{k}", fmt(v))
    table.add_row("wall_time_s", f"{s['wall_time_s']:.1f}")
    table.add_row("executor", s["executor"])
    console.print(table)
    console.print(f"run directory: {run_dir}")
    if report is not None:
        console.print(f"report: {report}")
