"""``fedtrust.run(config)``: one federated run, start to finish, as a run directory.

The CLI is a thin layer over :func:`run`. A run writes ``config.yaml``,
``partition.json``, ``metrics.jsonl`` (a line per round), atomic checkpoints,
``eval_scores.npz`` (the final evaluation's per-sample scores), ``summary.json``
and ``report.html``. ``resume=RUN_DIR`` continues an
interrupted run and ends with exactly the metrics and weights of an
uninterrupted one on CPU.

``init_from`` (a run directory or its ``checkpoint.safetensors``) warm-starts a
new run from another run's last checkpointed server state, weights only: the
run builds ``algorithm.init()`` as usual (same seed, same RNG draws), then
:func:`warm_start` replaces its arrays by the source's; the source's client
store, round, RNG state and server ``meta`` are not carried over, so the run
starts at round 1 with an empty client store. The rules:

* every array of the new init state must be in the source under the same
  name, with the same shape and the same dtype (floating-point arrays may
  differ in precision; they are cast). The first key, in the init state's
  order, that is missing or differs is a one-line ConfigError, which also
  lists both sides' key prefixes. There is no renaming: algorithms that keep
  ``model/…`` (fedavg, fedprox, fedper, fedrep, ditto, fedrod, fedbabu,
  fedavg_ft) share weights with each other; FedLoGe (``backbone/``,
  ``sse_c/``, ``head_g/``, ``head_l_init/``) and FedETF (``model/backbone.…``)
  only with runs of themselves.
* a source array the new state lacks is an error (naming the first such key
  in sorted order) under a prefix the new state has (another architecture:
  ``model/extra.weight``), and ignored (and said so on the console) under a
  prefix it lacks (another algorithm's server-only state, e.g. control
  variates ``c/…``).
* a source whose checkpoint round is below its config's ``rounds`` (a run
  that did not finish) is used with a warning.

The resolved ``config.yaml`` records ``init_from: {path, sha256}``: the
checkpoint file's absolute path and SHA-256. A new run given a pinned
``sha256`` (a copied resolved config) refuses a file whose hash differs. A
resume never re-applies ``init_from`` (it loads its own checkpoint) and only
warns when the source has changed or is gone since the run started.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedtrust.errors import CheckpointError, ConfigError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import Message
from fedtrust.runner import rundir
from fedtrust.runner.callbacks import Checkpointer, Evaluator, MetricsLogger, ProgressBar
from fedtrust.runner.checkpoint import (CHECKPOINT_NAME, Checkpoint, config_mismatch, load_checkpoint,
                                       read_checkpoint, sha256_file)
from fedtrust.runner.config import RunConfig, build_config, config_to_dict, load_config, load_yaml
from fedtrust.runner.federation import build_federation


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
        report: bool = True) -> RunResult:
    """Run (or resume) a federated training job and return its :class:`RunResult`.

    ``config`` is a :class:`RunConfig`, a plain dict, a YAML path, or None for
    the defaults (FedAvg on bundled digits); ``overrides`` are ``key=value``
    strings. With ``resume``, the config defaults to the run's ``config.yaml``
    and must match the checkpoint's (except ``out``).
    """
    console = console or Console(quiet=not progress)
    if resume is not None:
        run_dir = Path(resume)
        if config is None:
            if not (run_dir / rundir.CONFIG).is_file():
                raise CheckpointError(f"{str(run_dir)!r} is not a run directory (no {rundir.CONFIG})")
            config = load_yaml(run_dir / rundir.CONFIG)
        cfg = _as_config(config, (overrides or []) + [f"out={run_dir}"])
        ckpt = load_checkpoint(run_dir)
        cfg = _recorded_source(cfg, ckpt.config)
        diffs = config_mismatch(ckpt.config, config_to_dict(cfg))
        if diffs:
            raise CheckpointError(f"checkpoint in {str(run_dir)!r} was made with a different config: {'; '.join(diffs)}")
        _check_source_unchanged(cfg)
        source = None
    else:
        cfg = _as_config(config, overrides)
        ckpt = None
        cfg, source = _read_source(cfg) if cfg.init_from is not None else (cfg, None)

    fed = build_federation(cfg)
    fed.executor.log = console.print
    resolved = config_to_dict(cfg)
    if ckpt is None:
        torch.manual_seed(cfg.seed)
        state, store, start, offset = fed.algorithm.init(), ClientStore(), 0, 0.0
        if source is not None:  # before the run directory exists: a mismatch leaves nothing behind
            state, ignored = warm_start(state, source.state, cfg.init_from.path, cfg.algorithm.name)
            console.print(f"init_from {cfg.init_from.path}: {len(state.arrays)} arrays"
                          + (f"; ignored the source's {', '.join(ignored)}" if ignored else ""))
        run_dir = rundir.new_run_dir(cfg.out, f"{cfg.algorithm.name}-{cfg.data.dataset}")
        resolved["out"] = str(run_dir)
        rundir.write_config(run_dir, resolved)
    else:
        kept = rundir.truncate_metrics(run_dir, ckpt.round)
        state, store, start = ckpt.state, ckpt.store, ckpt.round
        offset = kept[-1]["time_s"] if kept else 0.0
        console.print(f"resuming {run_dir} after round {start}")
    rundir.write_json(run_dir / rundir.PARTITION, fed.partition)

    evaluator = Evaluator(fed.algorithm, fed.eval_setup, cfg.eval.every, cfg.rounds, run_dir)
    callbacks = [evaluator, MetricsLogger(run_dir, offset),
                 Checkpointer(run_dir, config_to_dict(cfg), cfg.checkpoint_every, cfg.rounds)]
    if progress:
        callbacks.append(ProgressBar(console, f"{cfg.algorithm.name} on {cfg.data.dataset} ({fed.executor.name})"))
    console.print(f"fedtrust: {cfg.algorithm.name} on {cfg.data.dataset}, {cfg.data.num_clients} clients, "
                  f"executor {fed.executor.name} ({fed.executor_reason}), device {fed.device}, run dir {run_dir}")
    t0 = time.perf_counter()
    state = fed.executor.run(state, store, start, cfg.rounds, callbacks)

    summary = _summary(run_dir, cfg, fed.executor.name, offset + time.perf_counter() - t0)
    rundir.write_json(run_dir / rundir.SUMMARY, summary)
    report_path = None
    if report:
        from fedtrust.report import write_report

        report_path = write_report([run_dir])
    _print_summary(console, summary, run_dir, report_path)
    return RunResult(run_dir, summary, state, cfg, report_path)


def _source_file(path: str) -> Path:
    """``init_from``'s checkpoint file: the path itself, or ``checkpoint.safetensors`` in it; absolute."""
    p = Path(path).expanduser()
    return (p / CHECKPOINT_NAME if p.is_dir() else p).resolve()


def _read_source(cfg: RunConfig) -> tuple[RunConfig, Checkpoint]:
    """The config with ``init_from`` pinned to ``{path, sha256}`` of its checkpoint file, and that
    checkpoint's server state (no client store, no RNG restore). Bad paths are one-line ConfigErrors."""
    assert cfg.init_from is not None
    given = cfg.init_from.path
    path = _source_file(given)
    if not path.is_file():
        what = (f"directory {given!r} holds no {CHECKPOINT_NAME}" if Path(given).expanduser().is_dir()
                else f"{given!r} does not exist")
        raise ConfigError(f"config key 'init_from': {what}; expected a run directory with a checkpoint "
                          f"(a run that finished a round) or a {CHECKPOINT_NAME} file")
    before = path.stat()
    digest = sha256_file(path)
    if cfg.init_from.sha256 is not None and digest != cfg.init_from.sha256:
        raise ConfigError(f"config key 'init_from': {str(path)!r} has sha256 {digest}, the config pins "
                          f"{cfg.init_from.sha256}; the source changed (set init_from.sha256=null to accept it)")
    try:
        source = read_checkpoint(path, clients=False, rng=False)
    except CheckpointError as e:
        raise ConfigError(f"config key 'init_from': {e}") from None
    after = path.stat()
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
        raise ConfigError(f"config key 'init_from': {str(path)!r} changed while it was read (is its run still "
                          f"going?); expected a finished run's checkpoint")
    rounds = source.config.get("rounds")
    if isinstance(rounds, int) and source.round < rounds:
        warnings.warn(f"init_from {str(path)!r} holds round {source.round} of {rounds}: that run did not finish",
                      stacklevel=3)
    tree = config_to_dict(cfg) | {"init_from": {"path": str(path), "sha256": digest}}
    return build_config(tree), source


def warm_start(init: Message, source: Message, where: str, algorithm: str) -> tuple[Message, list[str]]:
    """``init`` with every array replaced by the source's array of that name (rules: module docstring).

    Returns the new state (``init``'s meta) and the source's key prefixes that were ignored.
    """
    def prefix(key: str) -> str:
        return key.split("/", 1)[0] + "/"

    def prefixes(keys: Any) -> str:
        return ", ".join(sorted({prefix(k) for k in keys})) or "nothing"

    head = f"config key 'init_from': {where!r}"
    arrays: dict[str, torch.Tensor] = {}
    for key, fresh in init.arrays.items():
        if key not in source.arrays:
            raise ConfigError(f"{head} has no array {key!r} (it holds {prefixes(source.arrays)}; {algorithm} needs "
                              f"{prefixes(init.arrays)}); expected a run of an algorithm with the same server state")
        got = source.arrays[key]
        if got.shape != fresh.shape:
            raise ConfigError(f"{head}: array {key!r} has shape {tuple(got.shape)} there but {tuple(fresh.shape)} "
                              f"here; expected the same model (name, width, ...)")
        if got.dtype != fresh.dtype and not (got.is_floating_point() and fresh.is_floating_point()):
            raise ConfigError(f"{head}: array {key!r} is {got.dtype} there but {fresh.dtype} here")
        arrays[key] = got.to(device=fresh.device, dtype=fresh.dtype)
    ours = {prefix(k) for k in init.arrays}
    for key in sorted(source.arrays):
        if key not in init.arrays and prefix(key) in ours:
            raise ConfigError(f"{head} has array {key!r}, which {algorithm}'s state lacks; expected the same model")
    return Message(arrays, dict(init.meta)), sorted({prefix(k) for k in source.arrays} - ours)


def _recorded_source(cfg: RunConfig, saved: dict[str, Any]) -> RunConfig:
    """On resume, an ``init_from`` given without sha256 (the user's own config rather than the run's
    config.yaml) stands for the recorded source when it resolves to the recorded path."""
    recorded = saved.get("init_from")
    if cfg.init_from is None or cfg.init_from.sha256 is not None or not isinstance(recorded, dict):
        return cfg
    if str(_source_file(cfg.init_from.path)) != recorded.get("path"):
        return cfg  # config_mismatch names the difference
    return build_config(config_to_dict(cfg) | {"init_from": recorded})


def _check_source_unchanged(cfg: RunConfig) -> None:
    """On resume: warn if the recorded ``init_from`` source is gone or changed (resume never re-reads it)."""
    spec = cfg.init_from
    if spec is None or spec.sha256 is None:
        return
    path = Path(spec.path)
    if not path.is_file():
        warnings.warn(f"init_from source {spec.path!r} is gone; resuming from this run's own checkpoint", stacklevel=3)
    elif sha256_file(path) != spec.sha256:
        warnings.warn(f"init_from source {spec.path!r} changed since this run started (sha256 differs); "
                      f"resuming from this run's own checkpoint", stacklevel=3)


def _summary(run_dir: Path, cfg: RunConfig, executor: str, wall: float) -> dict[str, Any]:
    records = rundir.read_metrics(run_dir)
    evals = [r for r in records if "test_acc" in r]
    final = dict(evals[-1]) if evals else {}
    final.pop("time_s", None)
    final.update(rounds=cfg.rounds, wall_time_s=wall, executor=executor, algorithm=cfg.algorithm.name,
                 dataset=cfg.data.dataset, best_test_acc=max((r["test_acc"] for r in evals), default=None),
                 run_dir=str(run_dir))
    return final


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
