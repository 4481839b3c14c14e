"""Shared pieces of the quality benchmarks (lt_ood.py, lt_fl.py): a pool of `fedtrust run` processes and
mean ± std formatting.

Each run is ``python -m fedtrust.cli run --quiet CONFIG key=value ... out=DIR`` in its own process with one
torch thread, so ``--jobs`` runs share the cores without thread thrashing and a crash takes only its run
down. A run whose ``summary.json`` already exists is not run again, so an interrupted benchmark continues
where it stopped (delete the work folder to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Job:
    """One training run: a config file plus dotted overrides, written to ``out``."""

    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    out: Path = Path()

    def done(self) -> bool:
        return (self.out / "summary.json").is_file()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "summary.json").read_text())

    def start(self) -> subprocess.Popen:
        if self.out.exists():  # a run killed half-way: start it anew
            shutil.rmtree(self.out)
        args = [sys.executable, "-m", "fedtrust.cli", "run", "--quiet", str(self.config), *self.overrides,
                f"out={self.out}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def benchmark_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every quality benchmark shares: seeds, parallel jobs, datasets, work folder, analysis file."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--datasets", default="digits,fmnist")
    parser.add_argument("--work", default=f"runs/bench-{name.replace('_', '-')}")
    parser.add_argument("--analysis", default=f"benchmarks/{name}_analysis.md",
                        help="hand-written analysis appended to the results file (kept when the tables are redone)")
    return parser


def fmnist_available() -> bool:
    """Whether ../shared/data holds Fashion-MNIST (the benchmarks skip it with a note where not)."""
    return (REPO.parent / "shared" / "data" / "fashion_mnist" / "train.npz").is_file()


def with_analysis(lines: list[str], analysis: str) -> list[str]:
    """``lines`` plus the hand-written analysis file (relative to the repository root), where it exists."""
    path = REPO / analysis
    return [*lines, "", path.read_text().rstrip()] if path.is_file() else lines


def run_jobs(jobs: Sequence[Job], parallel: int) -> None:
    """Run the jobs not yet done, ``parallel`` at a time; a failed run stops the benchmark with its error."""
    todo = [j for j in jobs if not j.done()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; {len(todo)} to run, {parallel} at a time",
          flush=True)
    start, running = time.time(), []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            running.append((job, job.start()))
        time.sleep(0.5)
        for job, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((job, proc))
            if proc.returncode:
                for _, other in running:
                    other.kill()
                raise SystemExit(f"run {job.name} failed:\n{proc.stderr.read()}")
            print(f"done {job.name} ({time.time() - start:.0f} s)", flush=True)


def total_minutes(jobs: Sequence[Job]) -> float:
    """Sum of the runs' own wall times (``summary.json``), in minutes: what reproducing the table costs."""
    return sum(j.summary().get("wall_time_s") or 0.0 for j in jobs) / 60


def mean_std(values: Sequence[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """``"m ± s"`` of the non-missing values times ``scale`` (sample std; ``—`` when none)."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "—"
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.{digits}f} ± {std:.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first: int = 1) -> list[str]:
    """A markdown table: the first ``align_first`` columns left-aligned, the rest right-aligned."""
    sep = ["---"] * align_first + ["---:"] * (len(header) - align_first)
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def write_results(name: str, lines: list[str]) -> Path:
    """Write ``benchmarks/results/<name>`` and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
