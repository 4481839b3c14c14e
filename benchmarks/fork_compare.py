"""A run and its forks side by side, from the fork's round on (``fedtrust fork``; README "What a run writes").

Each fork folder holds ``fork.json`` (parent, round, checkpoint SHA-256, keys changed). The table has one row
per evaluated round from the earliest fork's round on, and per run its clean accuracy and ASR (with the
τ-rejection's values when the run logs them); a fork's rows before its own fork round are the parent's.
It trains nothing: it reads ``metrics.jsonl`` of runs that may still be going.

    fedtrust fork runs/bench-backdoor-paper/flip-dba-s0 runs/bench-backdoor-paper-forks/tau05-from-flip-dba-s0 \\
        algorithm.tau_inv=0.5
    fedtrust run --resume runs/bench-backdoor-paper-forks/tau05-from-flip-dba-s0 device=cpu
    python benchmarks/fork_compare.py runs/bench-backdoor-paper/flip-dba-s0 \\
        runs/bench-backdoor-paper-forks/tau05-from-flip-dba-s0 --results flip_fork_paper_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedtrust.runner.fork import FORK_INFO
from fedtrust.runner.rundir import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runpool import emit, md_table  # noqa: E402


def fork_info(run: Path) -> dict[str, Any] | None:
    """``run``'s ``fork.json``, None for a run that is not a fork."""
    path = run / FORK_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def table(runs: list[Path]) -> list[str]:
    """The side-by-side table and what each run is."""
    infos = {run: fork_info(run) for run in runs}
    starts = [i["round"] for i in infos.values() if i is not None]
    if not starts:
        sys.exit("none of the runs is a fork (no fork.json): give a run and its forks")
    start = min(starts)
    evals = {run: {r["round"]: r for r in read_metrics(run) if "test_acc" in r} for run in runs}
    rounds = sorted({r for ev in evals.values() for r in ev if r >= start})
    lines = []
    for i, run in enumerate(runs):
        info = infos[run]
        what = (f"fork of `{info['parent']}` at round {info['round']}: {'; '.join(info['changed']) or 'no change'}"
                if info else "not a fork")
        done = max(evals[run], default=0)
        lines.append(f"- run {i + 1}: `{run}` ({what}; {done} rounds done)")
    lines.append("")
    head = ["round"]
    for i in range(len(runs)):
        head += [f"run {i + 1}: clean acc (%)", "ASR (%)", "ASR with τ (%)"]
    rows = []
    for rnd in rounds:
        row = [str(rnd)]
        for run in runs:
            r = evals[run].get(rnd, {})
            row += [pct(r.get("test_acc")), pct(r.get("asr")), pct(r.get("asr_tau"))]
        rows.append(row)
    return lines + md_table(head, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders: a parent and its forks")
    parser.add_argument("--results", help="write benchmarks/results/<RESULTS>.md too")
    parser.add_argument("--analysis", type=Path, help="hand-written analysis appended to the table")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "metrics.jsonl").is_file():
            sys.exit(f"{run}: no metrics.jsonl (expected a fedtrust run folder)")
    lines = ["# A run and its forks, from the fork's round on", "",
             f"Reproduce: `python benchmarks/fork_compare.py {' '.join(str(r) for r in args.runs)}"
             + (f" --results {args.results}" if args.results else "")
             + (f" --analysis {args.analysis}`" if args.analysis else "`")
             + " (the forks: `fedtrust fork PARENT FORK key=value`, then `fedtrust run --resume FORK`).", "",
             *table(args.runs)]
    if args.analysis is not None:
        lines += ["", args.analysis.read_text().rstrip()]
    emit(lines, args.results)


if __name__ == "__main__":
    main()
