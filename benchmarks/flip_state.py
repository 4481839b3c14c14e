"""What FLIP's benign clients hold after a run: the inversion state in a FLIP run's checkpoint, per target class.

Reads ``checkpoint.safetensors`` of one or more FLIP runs (the ``client/<id>/flip/...`` entries: ``l1``, the
reference mask L1 of every (source, target) pair, and ``mat_diff``, the priority of phase B's argmax pick,
spec flip.md §2) and reports per target class, over every client that holds a state:

- the mean reference mask L1 (pixels) of the pairs into that target that reached τ_inv (``l1`` > 0): a
  backdoor's target class is expected to need the smallest masks;
- the share of such pairs never inverted successfully (``l1`` = 0);
- how many clients' ``mat_diff`` argmax (off the diagonal) points at that target: where phase B goes next;
- the share of the cached masks' mass (``flip/cache/<s>_<t>/a``, m = tanh(a)/2 + 1/2) on the real trigger's
  pixels, and within ``NEAR`` pixels of them, the mean over the benign clients' pairs into that target, against
  the shares a uniform mask puts there: whether the inversion toward the backdoor's target finds the trigger
  (spec §6: "inverted masks toward target 2 should sit near the corner trigger"), and how much of that corner
  the other targets' masks take anyway. "Near" counts because a backdoored model answers to its trigger's
  neighbourhood too: its 5×5 first convolutions see pixels next to the trigger's (on the MNIST FedAvg model
  under DBA, a 3-pixel mask one row off the trigger flips 90 % of the images; ``inversion_probe.py``).

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

from fedtrust.robust.inversion import to_mask
from fedtrust.robust.triggers import stamped_pixels
from fedtrust.runner.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError, read_checkpoint
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import asr_trigger, build_run_attack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runpool import emit, md_table  # noqa: E402

NEAR = 2
"""Chebyshev distance (pixels) from the trigger within which a mask's mass counts as near it."""
HIGH = 10.0
"""A ``mat_diff`` priority above this is reported as blown up (a normalised priority starts at ≤ 1)."""


def load(run: Path) -> Checkpoint:
    """``run``'s checkpoint, or exit with a one-line reason."""
    try:
        return read_checkpoint(run / CHECKPOINT_NAME, rng=False)
    except CheckpointError as err:
        sys.exit(f"{run}: {err} (expected the folder of a FLIP run with checkpoint_every ≥ 1)")


def flip_states(ckpt: Checkpoint, run: Path) -> tuple[torch.Tensor, torch.Tensor, int, int | None]:
    """The clients' stacked ``l1`` and ``mat_diff`` (clients × K × K) in a FLIP run's checkpoint, its round, and
    the backdoor's target label of its config (None without a backdoor attack)."""
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


def near(pixels: torch.Tensor, distance: int = NEAR) -> torch.Tensor:
    """The (H, W) 0/1 map of the pixels within ``distance`` (Chebyshev) of a pixel of ``pixels``."""
    grown = torch.nn.functional.max_pool2d(pixels[None, None].double(), 2 * distance + 1, 1, distance)
    return grown[0, 0]


def trigger_share(ckpt: Checkpoint, k: int) -> tuple[list[tuple[float, float]], tuple[float, float]] | None:
    """Per target t, the mean shares of the benign clients' cached (s, t) masks' mass on the real trigger's
    pixels and near them (nan where no client caches a pair into t), and a uniform mask's two shares; None
    without a trigger."""
    cfg = build_config(dict(ckpt.config))
    attack = build_run_attack(cfg, k)
    states = {cid: msg.arrays for cid, msg in ckpt.store.states.items()}
    patterns = [v for a in states.values() for key, v in a.items() if key.startswith("flip/cache/")
                and key.endswith("/b")]
    if attack is None or not patterns:
        return None
    full = asr_trigger(attack, tuple(patterns[0].shape))
    if full is None:
        return None
    pixels = stamped_pixels(full[0], tuple(patterns[0].shape)).double()
    around = near(pixels)
    attackers = set(attack.targets.clients)
    shares: list[list[tuple[float, float]]] = [[] for _ in range(k)]
    for cid, arrays in states.items():
        if cid in attackers:
            continue
        for key, a in arrays.items():
            parts = key.split("/")
            if len(parts) == 4 and parts[:2] == ["flip", "cache"] and parts[3] == "a":
                t = int(parts[2].split("_")[1])
                m = to_mask(a.double())
                shares[t].append((float((m * pixels).sum() / m.sum()), float((m * around).sum() / m.sum())))
    means = [tuple(sum(c) / len(v) for c in zip(*v)) if v else (float("nan"), float("nan")) for v in shares]
    return means, (float(pixels.mean()), float(around.mean()))


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
        ckpt = load(run)
        l1, diff, rnd, target = flip_states(ckpt, run)
        share = trigger_share(ckpt, l1.shape[1])
        off = diff.masked_fill(torch.eye(diff.shape[1], dtype=torch.bool), float("-inf"))
        top = off.reshape(len(off), -1).max(dim=1).values
        lines += [f"## {run} (round {rnd}; {len(l1)} clients with a state; backdoor target "
                  f"{'none' if target is None else target})", "",
                  f"Clients with a `mat_diff` priority above {HIGH:g}: {int((top > HIGH).sum())}; the largest "
                  f"{top.max().item():.4g}.", ""]
        rows = [[f"{t}{' (backdoor)' if t == target else ''}", f"{m:.1f}", f"{100 * z:.1f}", str(c)]
                + ([f"{100 * share[0][t][0]:.1f}", f"{100 * share[0][t][1]:.1f}"] if share else [])
                for t, (m, z, c) in enumerate(per_target(l1, diff))]
        head = ["target", "mean mask L1 (px), inverted pairs", "pairs never inverted (%)",
                "clients whose next pick aims here"]
        if share:
            head += [f"mask mass on the trigger (%; uniform {100 * share[1][0]:.1f})",
                     f"within {NEAR} px of it (%; uniform {100 * share[1][1]:.1f})"]
        lines += md_table(head, rows) + [""]
    emit(lines, args.results)


if __name__ == "__main__":
    main()
