"""Shared pieces of the quality benchmarks (lt_ood.py, lt_fl.py, byzantine.py): a pool of `fedtrust run`
processes and mean ± std formatting.

Each run is ``python -m fedtrust.cli run --quiet CONFIG key=value ... out=DIR`` in its own process with one
torch thread, so ``--jobs`` runs share the cores without thread thrashing and a crash takes only its run
down. A run whose ``summary.json`` already exists is not run again, so an interrupted benchmark continues
where it stopped (delete the work folder to start over).

Grids of many short runs (byzantine.py: about 1,000 runs of 5–10 s) pass ``per_process`` to
:func:`run_jobs`: one process then runs that many jobs one after another through ``fedtrust.run`` (this file
run as ``runpool.py --worker``), without ``report.html``. That saves the ~5 s each fresh process spends on
imports and the HTML report, more than a short run's own training time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclass
class Job:
    """One training run: a config file plus dotted overrides, written to ``out``."""

    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    out: Path = Path()
    keep_checkpoint: bool = True
    """False: delete the run's final ``checkpoint.safetensors`` once it is done (tables need only the summary and
    metrics; FoolsGold's checkpoint holds every client's update history, ~150 MB on MNIST)."""

    def done(self) -> bool:
        return (self.out / "summary.json").is_file()

    def tidy(self) -> None:
        if not self.keep_checkpoint:
            (self.out / "checkpoint.safetensors").unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "summary.json").read_text())

    def start(self) -> subprocess.Popen:
        if self.out.exists():  # a run killed half-way: start it anew
            shutil.rmtree(self.out)
        args = [sys.executable, "-m", "fedtrust.cli", "run", "--quiet", str(self.config), *self.overrides,
                f"out={self.out}"]
        return subprocess.Popen(args, env=_one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, preexec_fn=_die_with_parent)


def _one_thread_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _die_with_parent() -> None:
    """In a child before it starts (Linux): SIGTERM it when the benchmark process dies. Without this, killing the
    benchmark left its workers running their queued jobs, and a restarted benchmark ran the same job into the
    same folder at the same time (session 30: one MNIST run's metrics.jsonl interleaved two runs' rows, and the
    orphans' load slowed the new runs' timings). Elsewhere a no-op: stop the workers by hand there."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class _Batch:
    """Jobs run one after another in one ``runpool.py --worker`` process (stderr to a file: no pipe to fill)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs, self.reported = jobs, 0
        self.stderr = tempfile.TemporaryFile(mode="w+")
        specs = [{"config": str(j.config), "overrides": j.overrides, "out": str(j.out)} for j in jobs]
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], env=_one_thread_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     preexec_fn=_die_with_parent)
        self.proc.stdin.write(json.dumps(specs))
        self.proc.stdin.close()

    def newly_done(self) -> list[Job]:
        """Jobs finished since the last call (they finish in order)."""
        done = []
        while self.reported < len(self.jobs) and self.jobs[self.reported].done():
            done.append(self.jobs[self.reported])
            self.reported += 1
        return done

    def error(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()


def _worker() -> None:
    """``runpool.py --worker``: run the job specs read from stdin (JSON) in this process, in order."""
    import fedtrust

    for spec in json.loads(sys.stdin.read()):
        out = Path(spec["out"])
        if (out / "summary.json").is_file():
            continue
        if out.exists():
            shutil.rmtree(out)
        fedtrust.run(spec["config"], [*spec["overrides"], f"out={out}"], progress=False, report=False)


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


def shared_data_available(folder: str) -> bool:
    """Whether ../shared/data holds ``folder/train.npz`` (e.g. ``mnist``; the benchmarks skip a data set with
    a note where not)."""
    return (SHARED_DATA / folder / "train.npz").is_file()


def fmnist_available() -> bool:
    """Whether ../shared/data holds Fashion-MNIST (the benchmarks skip it with a note where not)."""
    return shared_data_available("fashion_mnist")


def with_analysis(lines: list[str], analysis: str) -> list[str]:
    """``lines`` plus the hand-written analysis file (relative to the repository root), where it exists."""
    path = REPO / analysis
    return [*lines, "", path.read_text().rstrip()] if path.is_file() else lines


def run_jobs(jobs: Sequence[Job], parallel: int, per_process: int = 1) -> None:
    """Run the jobs not yet done, ``parallel`` processes at a time; a failed run stops the benchmark with its
    error. ``per_process`` > 1: each process runs up to that many jobs in turn (see the module docstring)."""
    todo = [j for j in jobs if not j.done()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; {len(todo)} to run, {parallel} at a time",
          flush=True)
    if per_process > 1:
        _run_batches(todo, parallel, per_process)
        return
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
            job.tidy()
            print(f"done {job.name} ({time.time() - start:.0f} s)", flush=True)


def _run_batches(todo: list[Job], parallel: int, per_process: int) -> None:
    chunks = [todo[i:i + per_process] for i in range(0, len(todo), per_process)]
    start, running = time.time(), []
    while chunks or running:
        while chunks and len(running) < parallel:
            running.append(_Batch(chunks.pop(0)))
        time.sleep(0.5)
        for batch in list(running):
            finished = batch.proc.poll() is not None  # before newly_done, so a batch's last run is reported
            for job in batch.newly_done():
                job.tidy()
                print(f"done {job.name} ({time.time() - start:.0f} s)", flush=True)
            if not finished:
                continue
            running.remove(batch)
            if batch.proc.returncode:
                for other in running:
                    other.proc.kill()
                failed = batch.jobs[batch.reported].name if batch.reported < len(batch.jobs) else "?"
                raise SystemExit(f"run {failed} failed:\n{batch.error()}")


def total_minutes(jobs: Sequence[Job]) -> float:
    """Sum of the runs' own wall times (``summary.json``), in minutes: what reproducing the table costs."""
    return sum(j.summary().get("wall_time_s") or 0.0 for j in jobs) / 60


def mean_std(values: Sequence[float | None], scale: float = 100.0, digits: int = 1) -> str:
    """``"m ± s"`` of the non-missing values times ``scale`` (sample std; the value alone for one; ``—`` when none)."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "—"
    if len(vals) == 1:  # one seed: no spread to report (not "± 0")
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


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


def emit(lines: list[str], results: str | None) -> None:
    """Write ``benchmarks/results/<results>.md`` (and print it) when ``results`` is given, else only print."""
    if results:
        write_results(f"{results}.md", lines)
    else:
        print("\n".join(lines))


def machine_note(device: str = "cpu") -> str:
    """CPU model, logical cores, RAM and torch version of this machine, for a results header; with a CUDA
    ``device`` (and a GPU present) also the GPU's name and torch's CUDA version."""
    import platform

    import torch

    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    ram = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        ram = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2 ** 30:.1f} GiB RAM"
    note = f"{cpu}, {os.cpu_count()} logical cores{ram}; Python {platform.python_version()}, torch {torch.__version__}"
    if device != "cpu" and torch.cuda.is_available():
        note += f"; GPU {torch.cuda.get_device_name(0)}, torch.version.cuda {torch.version.cuda}"
    return note


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()


def probe_header(title: str, cmd: str, results: str | None) -> list[str]:
    """The header of a results file that reads checkpoints (no runs of its own): title, the command that
    reproduces it (``--results`` appended when given), date and hardware."""
    full = cmd + (f" --results {results}" if results else "")
    return [f"# {title}", "", f"Reproduce: `{full}`", "",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine_note('cpu')}."]


def run_header(title: str, cmd: str, args, every: list[Job], todo: int, elapsed_min: float) -> list[str]:
    """The header every quality benchmark's results file opens with: title, the command that reproduces it,
    date, seeds, hardware, parallelism and run time."""
    return [f"# {title}", "",
            f"Reproduce: `{cmd}` (from the repository root; runs kept under `{args.work}`; `PYTHONPATH=src` where "
            "fedtrust is not installed).", "",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}; {len(every)} runs.",
            f"- Hardware: {machine_note()}; one torch thread per run, {args.jobs} at a time, "
            f"{args.runs_per_process} runs per process; 1-minute load average at the end {os.getloadavg()[0]:.1f}.",
            f"- Total run time: {elapsed_min:.1f} min of wall time for the {todo} runs this invocation ran "
            f"({len(every) - todo} were already done); the runs' own wall times add up to "
            f"{total_minutes(every):.1f} min."]
