"""What FLIP's benign clients hold after a run: the inversion state in a FLIP run's checkpoint, per target class.

Reads ``checkpoint.safetensors`` of one or more FLIP runs (the ``client/<id>/flip/...`` entries: ``l1``, the
reference mask L1 of every (source, target) pair, and ``mat_diff``, the priority of phase B's argmax pick,
spec flip.md §2) and reports per target class, over every client that holds a state:

- the mean reference mask L1 (pixels) of the pairs into that target that reached τ_inv (``l1`` > 0): a
  backdoor's target class is expected to need the smallest masks;
- the share of such pairs never inverted successfully (``l1`` = 0);
- how many clients' ``mat_diff`` argmax (off the diagonal) points at that target: where phase B goes next.

And per run: how many clients have a priority above 10, and the largest. ``mat_diff`` moves by the relative
growth (new − old)/old of a pair's mask, so a pair whose reference mask is a fraction of a pixel can jump to
thousands and take the argmax for many visits.

No training: it only reads the checkpoints, e.g. of ``benchmarks/backdoor_paper.py``'s runs while they go on::

    python benchmarks/flip_state.py runs/bench-backdoor-paper/flip-dba-s0 runs/bench-backdoor-paper/flip-dba-s1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fedtrust.runner.checkpoint import CHECKPOINT_NAME, CheckpointError, read_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runpool import md_table, write_results  # noqa: E402

HIGH = 10.0
"""A ``mat_diff`` priority above this is reported as blown up (a normalised priority starts at ≤ 1)."""


def flip_states(run: Path) -> tuple[torch.Tensor, torch.Tensor, int, int | None]:
    """The clients' stacked ``l1`` and ``mat_diff`` (clients × K × K) in ``run``'s checkpoint, its round, and the
    backdoor's target label of its config (None without a backdoor attack)."""
    try:
        ckpt = read_checkpoint(run / CHECKPOINT_NAME, rng=False)
    except CheckpointError as err:
        sys.exit(f"{run}: {err} (expected the folder of a FLIP run with checkpoint_every ≥ 1)")
    states = [msg.arrays for msg in ckpt.store.states.values() if "flip/mat_diff" in msg.arrays]
    if not states:
        sys.exit(f"{run}: no client holds a flip/mat_diff state: not a FLIP run with algorithm.invert=true")
    diff = torch.stack([a["flip/mat_diff"].double() for a in states])
    l1 = torch.stack([a["flip/l1"].double() for a in states])
    target = (ckpt.config.get("attack") or {}).get("target")
    return l1, diff, ckpt.round, None if target is None else int(target)


def per_target(l1: torch.Tensor, diff: torch.Tensor) -> list[tuple[float, float, int]]:
    """Per target t: mean L1 of the successful pairs into t, share of its pairs at L1 0, argmax count."""
    n, k, _ = l1.shape
    off = ~torch.eye(k, dtype=torch.bool)
    picks = diff.masked_fill(~off, float("-inf")).reshape(n, -1).argmax(dim=1) % k
    out = []
    for t in range(k):
        col = l1[:, off[:, t], t].flatten()
        hit = col[col > 0]
        out.append((hit.mean().item() if len(hit) else float("nan"), (col == 0).double().mean().item(),
                    int((picks == t).sum())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="FLIP run folders (each with checkpoint.safetensors)")
    parser.add_argument("--results", default=None,
                        help="also write the tables to benchmarks/results/<results>.md (default: print only)")
    args = parser.parse_args()
    lines = ["# FLIP's inversion state per target class", "",
             f"Reproduce: `python benchmarks/flip_state.py {' '.join(str(r) for r in args.runs)}"
             + (f" --results {args.results}`" if args.results else "`"), ""]
    for run in args.runs:
        l1, diff, rnd, target = flip_states(run)
        off = diff.masked_fill(torch.eye(diff.shape[1], dtype=torch.bool), float("-inf"))
        top = off.reshape(len(off), -1).max(dim=1).values
        lines += [f"## {run} (round {rnd}; {len(l1)} clients with a state; backdoor target "
                  f"{'none' if target is None else target})", "",
                  f"Clients with a `mat_diff` priority above {HIGH:g}: {int((top > HIGH).sum())}; the largest "
                  f"{top.max().item():.4g}.", ""]
        rows = [[f"{t}{' (backdoor)' if t == target else ''}", f"{m:.1f}", f"{100 * z:.1f}", str(c)]
                for t, (m, z, c) in enumerate(per_target(l1, diff))]
        lines += md_table(["target", "mean mask L1 (px), inverted pairs", "pairs never inverted (%)",
                           "clients whose next pick aims here"], rows) + [""]
    if args.results:
        write_results(f"{args.results}.md", lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
