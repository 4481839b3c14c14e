"""Callbacks of a run: divergence checks, evaluation, metrics to disk, checkpoints, progress bar, round lines."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
import torch
from torch import Tensor

from fedtrust.errors import DivergenceError
from fedtrust.evaluation import EvalScores, EvalSetup, evaluate
from fedtrust.fl.executor import Callback, RoundReport
from fedtrust.fl.faults import Faults
from fedtrust.fl.protocol import Algorithm, Message
from fedtrust.fl.validate import NONFINITE
from fedtrust.runner.checkpoint import Checkpoint, save_checkpoint
from fedtrust.runner.rundir import MetricsWriter, write_eval_scores


class DivergenceGuard(Callback):
    """Stops a run whose training diverged, with one line naming the round and the likely cause.

    After each round's aggregation (place it before the other callbacks, so the
    round's metrics are not written and every earlier round's are kept) it
    raises :class:`~fedtrust.errors.DivergenceError` when

    * a client's reply was rejected for holding NaN/Inf, or reports an infinite
      loss: its local training diverged;
    * the server state holds NaN/Inf (finite but huge updates overflowed in the
      aggregation, or BatchNorm statistics did), or a BatchNorm running
      variance went negative (its outputs are NaN: a server step overshot);

    and, through :class:`Evaluator`, when the server model's test logits are
    NaN/Inf although its weights are finite (they grew too large).
    ``hint`` ends each message (the runner names ``train.lr`` and what to try).
    A reply that an injected garbage fault (``faults``) made NaN is the fault's,
    not a divergence: validation rejects it and the run goes on.
    """

    def __init__(self, hint: str, faults: Faults | None = None) -> None:
        self.hint = hint
        self.faults = faults

    def _garbage(self, client: str, round: int) -> bool:
        return self.faults is not None and self.faults.fault(int(client), round) == "garbage"

    def after_round(self, report: RoundReport) -> None:
        r = report.round
        rejected = {c: why for c, why in report.metrics.get("rejected", {}).items()
                    if NONFINITE in why and not self._garbage(c, r)}
        if rejected:
            c, why = next(iter(rejected.items()))
            raise DivergenceError(f"round {r}: local training diverged on {len(rejected)} of {len(report.clients)} "
                                  f"clients (client {c}: {why}); {self.hint}")
        for c, meta in sorted(report.reply_meta.items()):
            loss = meta.get("loss")
            if isinstance(loss, float) and math.isinf(loss):
                raise DivergenceError(f"round {r}: client {c}'s training loss is {loss}; {self.hint}")
        bad = first_nonfinite(report.state)
        if bad is not None:
            raise DivergenceError(f"round {r}: the server model holds NaN/Inf after aggregation (key {bad!r}): "
                                  f"training diverged; {self.hint}")
        bad = first_negative_variance(report.state)
        if bad is not None:
            raise DivergenceError(f"round {r}: the server model's BatchNorm variance {bad!r} is negative after "
                                  f"aggregation (its outputs are NaN): training diverged; {self.hint}")

    def check_logits(self, round: int, logits: Tensor, state: Message) -> None:
        """Raise when the evaluated model's test ``logits`` are NaN/Inf (its weights finite but too large)."""
        if bool(torch.isfinite(logits).all()):
            return
        largest = max((float(v.abs().max()) for v in state.arrays.values() if v.is_floating_point() and v.numel()),
                      default=math.nan)
        raise DivergenceError(f"round {round}: the server model's test outputs are NaN/Inf (its largest weight is "
                              f"{largest:.3g} in magnitude): training diverged; {self.hint}")


def first_nonfinite(state: Message) -> str | None:
    """The first key (in sorted order) of a floating array of ``state`` holding NaN or Inf; None if all finite."""
    for key, value in sorted(state.arrays.items()):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def first_negative_variance(state: Message) -> str | None:
    """The first key (sorted) of a BatchNorm ``running_var`` buffer of ``state`` with a negative entry; else None."""
    for key, value in sorted(state.arrays.items()):
        if key.endswith("running_var") and value.numel() and float(value.min()) < 0:
            return key
    return None


class Evaluator(Callback):
    """Evaluates every ``every`` rounds and after the last round; puts the results in the report.

    With ``run_dir``, the last round's evaluation also saves its per-sample
    scores there (``eval_scores.npz``, for the report's OOD plots). With
    ``guard``, a model whose test logits are NaN/Inf stops the run
    (:meth:`DivergenceGuard.check_logits`) before its metrics are logged.
    """

    def __init__(self, algorithm: Algorithm, setup: EvalSetup, every: int, rounds: int,
                 run_dir: Path | None = None, guard: DivergenceGuard | None = None) -> None:
        self.algorithm, self.setup, self.every, self.rounds = algorithm, setup, every, rounds
        self.run_dir = run_dir
        self.guard = guard
        self.last: dict[str, Any] | None = None

    def after_round(self, report: RoundReport) -> None:
        if report.round % self.every == 0 or report.round == self.rounds:
            save = self.run_dir is not None and report.round == self.rounds
            capture = EvalScores() if save or self.guard is not None else None
            self.last = evaluate(self.algorithm, report.state, report.store, self.setup, capture)
            if self.guard is not None:
                assert capture is not None and capture.logits is not None
                self.guard.check_logits(report.round, capture.logits, report.state)
            report.metrics.update(self.last)
            if save:
                assert self.run_dir is not None and capture is not None
                write_eval_scores(self.run_dir, report.round, capture)


class MetricsLogger(Callback):
    """Writes one ``metrics.jsonl`` record per round as soon as the round ends."""

    def __init__(self, run_dir: Path, time_offset: float = 0.0) -> None:
        self.writer = MetricsWriter(run_dir)
        self.offset = time_offset
        self.start = time.perf_counter()

    def after_round(self, report: RoundReport) -> None:
        record = {"round": report.round, "time_s": self.offset + time.perf_counter() - self.start,
                  "train_loss": report.train_loss, "clients": len(report.clients)}
        record.update(report.metrics)
        self.writer.write(record)

    def on_end(self) -> None:
        self.writer.sync()


class Checkpointer(Callback):
    """Saves a checkpoint every ``every`` rounds (0: only after the last) and after the last round."""

    def __init__(self, run_dir: Path, config: dict[str, Any], every: int, rounds: int) -> None:
        self.run_dir, self.config, self.every, self.rounds = run_dir, config, every, rounds

    def after_round(self, report: RoundReport) -> None:
        due = report.round == self.rounds or (self.every > 0 and report.round % self.every == 0)
        if due:
            save_checkpoint(self.run_dir, Checkpoint(report.round, report.state, report.store, self.config, {}))


class ProgressBar(Callback):
    """A rich progress bar: round, ETA, last train loss and test accuracy."""

    def __init__(self, console: Console, label: str) -> None:
        self.console, self.label = console, label
        self.acc: float | None = None
        self.progress: Progress | None = None

    def on_begin(self, start_round: int, rounds: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("rounds"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=rounds, completed=start_round, status="")

    def after_round(self, report: RoundReport) -> None:
        if "test_acc" in report.metrics:
            self.acc = report.metrics["test_acc"]
        loss = report.train_loss
        status = " ".join(s for s in (
            f"loss {loss:.3f}" if loss is not None else "",
            f"acc {self.acc:.3f}" if self.acc is not None else "") if s)
        assert self.progress is not None
        self.progress.update(self.task, completed=report.round, status=status)

    def on_end(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class RoundLines(Callback):
    """One plain line per round for a log that is not a terminal (a Flower deployment's ``flwr run --stream``).

    ``round 3/10: 2 of 2 clients replied (failed: 1: no reply within 60 s), loss 0.412, test_acc 0.9361,
    4.2 s (12.9 s in all)``: the clients that replied, the failed and rejected ones with their reasons
    (at most three named), the round's train loss, test accuracy where the round evaluated, and the
    round's and the run's wall time. Place it after the evaluator and the metrics logger.
    """

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.rounds = 0
        self.start = self.last = time.perf_counter()

    def on_begin(self, start_round: int, rounds: int) -> None:
        self.rounds = rounds
        self.start = self.last = time.perf_counter()

    def after_round(self, report: RoundReport) -> None:
        now = time.perf_counter()
        m = report.metrics
        failed, rejected = m.get("failed") or {}, m.get("rejected") or {}
        replied = len(report.clients) - len(failed)
        parts = [f"{replied} of {len(report.clients)} clients replied"
                 + "".join(f" ({what}: {_named(ids)})" for what, ids in (("failed", failed), ("rejected", rejected))
                           if ids)]
        if m.get("skipped"):
            parts.append(f"skipped: {m['skipped']}")
        if report.train_loss is not None:
            parts.append(f"loss {report.train_loss:.4g}")
        if m.get("test_acc") is not None:
            parts.append(f"test_acc {m['test_acc']:.4f}")
        parts.append(f"{now - self.last:.1f} s ({now - self.start:.1f} s in all)")
        self.last = now
        self.write(f"round {report.round}/{self.rounds}: " + ", ".join(parts))


def _named(reasons: dict[Any, str], limit: int = 3) -> str:
    """``"3: reason; 5: reason"`` for at most ``limit`` clients, then how many more."""
    items = list(reasons.items())
    text = "; ".join(f"{c}: {r}" for c, r in items[:limit])
    return text + (f"; … {len(items) - limit} more" if len(items) > limit else "")
