"""Callbacks of a run: evaluation, metrics to disk, checkpoints, progress bar."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedtrust.evaluation import EvalScores, EvalSetup, evaluate
from fedtrust.fl.executor import Callback, RoundReport
from fedtrust.fl.protocol import Algorithm
from fedtrust.runner.checkpoint import Checkpoint, save_checkpoint
from fedtrust.runner.rundir import MetricsWriter, write_eval_scores


class Evaluator(Callback):
    """Evaluates every ``every`` rounds and after the last round; puts the results in the report.

    With ``run_dir``, the last round's evaluation also saves its per-sample
    scores there (``eval_scores.npz``, for the report's OOD plots).
    """

    def __init__(self, algorithm: Algorithm, setup: EvalSetup, every: int, rounds: int,
                 run_dir: Path | None = None) -> None:
        self.algorithm, self.setup, self.every, self.rounds = algorithm, setup, every, rounds
        self.run_dir = run_dir
        self.last: dict[str, Any] | None = None

    def after_round(self, report: RoundReport) -> None:
        if report.round % self.every == 0 or report.round == self.rounds:
            capture = EvalScores() if self.run_dir is not None and report.round == self.rounds else None
            self.last = evaluate(self.algorithm, report.state, report.store, self.setup, capture)
            report.metrics.update(self.last)
            if capture is not None:
                assert self.run_dir is not None
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
