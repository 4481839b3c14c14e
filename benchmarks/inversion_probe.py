"""Does FLIP's inversion find the real trigger in a global model? A probe on finished or running runs' checkpoints.

FLIP's benign clients harden against the triggers they invert (spec flip.md §2: Neural-Cleanse masks,
``invert_trigger``); on the paper-regime MNIST runs their cached masks into the backdoor's target put a third of a
uniform mask's share on the trigger's pixels (``benchmarks/flip_state.py``). This probe asks why: it takes each
run's last checkpointed global model, stamps the run's real trigger on held-out non-target test images (the
share flipped to the target: the model's backdoor strength on them), and inverts a trigger toward the target
from a random start (:func:`~fedtrust.robust.inversion.invert_trigger`, FLIP's primitive and hyperparameters,
at each ``--tau-inv``) on the same images, several seeds. Per inversion it reports whether τ_inv was reached,
the mask's L1, the share of the mask's mass on the trigger's pixels and within 2 pixels of them
(``flip_state.NEAR``), and the trigger pixels the mask covers (m > 0.5). A model whose backdoor flips most images should yield a mask on the trigger (Neural Cleanse's
premise); the question is how strong the backdoor must be before it does.

No training, no run state changes: it reads checkpoints, e.g. of ``benchmarks/backdoor_paper.py``'s runs
(FedAvg under DBA at round 90, FLIP without inversion mid-way, FLIP itself)::

    python benchmarks/inversion_probe.py runs/bench-backdoor-paper/fedavg-dba-s0 \\
        runs/bench-backdoor-paper/noinv-dba-s0 runs/bench-backdoor-paper/flip-dba-s0 --results inversion_probe
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fedtrust.errors import FedTrustError
from fedtrust.robust.inversion import InversionParams, invert_trigger
from fedtrust.robust.triggers import stamped_pixels
from fedtrust.runner.audit import load_finished_run
from fedtrust.runner.federation import asr_trigger, build_run_attack
from fedtrust.runner.source import primary_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flip_state import NEAR, near  # noqa: E402
from runpool import md_table, probe_header, write_results  # noqa: E402


def probe_images(test_x: torch.Tensor, test_y: torch.Tensor, target: int, n: int, seed: int) -> torch.Tensor:
    """``n`` non-target test images in [0, 1], drawn with ``seed`` (the same for every run of a probe)."""
    keep = (test_y != target).nonzero().flatten()
    pick = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:n]]
    return test_x[pick].to(torch.get_default_dtype()) / 255.0


def probe(run: Path, tau_invs: list[float], seeds: int, steps: int, n: int) -> list[list[str]]:
    """One table row per (τ_inv, seed) inversion on ``run``'s last global model."""
    try:
        fed, state, rnd = load_finished_run(run)
    except FedTrustError as err:
        sys.exit(f"{run}: {err}")
    attack = build_run_attack(fed.config, fed.dataset.num_classes)
    test = fed.dataset.test
    full = asr_trigger(attack, tuple(test.x.shape[1:]))
    if full is None:
        sys.exit(f"{run}: its config has no backdoor attack, so there is no real trigger to look for")
    trigger, target = full
    pixels = stamped_pixels(trigger, tuple(test.x.shape[1:])).to(torch.get_default_dtype())
    around = near(pixels).to(pixels.dtype)
    model = primary_model(fed, state).eval()
    x = probe_images(test.x, test.y, target, n, seed=0)

    def normalize(x01: torch.Tensor) -> torch.Tensor:
        return fed.algorithm.ctx.normalize(x01 * 255.0)

    stamped = trigger.stamp((x * 255).round().to(torch.uint8)).to(x.dtype) / 255.0
    with torch.no_grad():
        flipped = float((model(normalize(stamped)).argmax(1) == target).double().mean())
    rows = []
    for tau in tau_invs:
        for seed in range(seeds):
            start = time.perf_counter()
            trig = invert_trigger(model, x, target, steps, torch.Generator().manual_seed(seed), normalize=normalize,
                                  params=InversionParams(tau_inv=tau))
            m = trig.mask.to(pixels.dtype)
            share = float((m * pixels).sum() / m.sum()) if trig.reached else float("nan")
            close = float((m * around).sum() / m.sum()) if trig.reached else float("nan")
            covered = int(((m > 0.5) & (pixels > 0)).sum())
            rows.append([run.name, str(rnd), f"{100 * flipped:.1f}", f"{tau:g}", str(seed),
                         "yes" if trig.reached else "no", f"{trig.l1:.1f}",
                         "—" if not trig.reached else f"{100 * share:.1f}",
                         "—" if not trig.reached else f"{100 * close:.1f}", f"{covered}/{int(pixels.sum())}",
                         f"{time.perf_counter() - start:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with a checkpoint and a backdoor attack")
    parser.add_argument("--tau-inv", default="0.9,0.5", help="τ_inv values, comma-separated (FLIP: 0.9)")
    parser.add_argument("--seeds", type=int, default=3, help="random starts per τ_inv")
    parser.add_argument("--steps", type=int, default=400, help="inversion steps (FLIP's warm-up: 400)")
    parser.add_argument("--images", type=int, default=64, help="non-target test images inverted on")
    parser.add_argument("--results", default=None, help="also write benchmarks/results/<results>.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    taus = [float(t) for t in args.tau_inv.split(",")]
    if not all(0 < t <= 1 for t in taus):
        parser.error(f"--tau-inv values must be in (0, 1]; got {args.tau_inv}")
    rows = [row for run in args.runs for row in probe(run, taus, args.seeds, args.steps, args.images)]
    cmd = (f"python benchmarks/inversion_probe.py {' '.join(str(r) for r in args.runs)} --tau-inv {args.tau_inv} "
           f"--seeds {args.seeds} --steps {args.steps} --images {args.images}")
    lines = probe_header("Does FLIP's inversion find the real trigger? (probe of global models)", cmd, args.results)
    lines += [
        f"- {args.images} non-target test images (the same for every run); FLIP's inversion "
        "(Neural-Cleanse mask and pattern, adaptive λ from 1e-3, Adam lr 0.1) from a random start; "
        "\"flipped by the real trigger\": the share of those images the run's full trigger sends to the target.",
        "- s: wall seconds of one inversion, one torch thread (they include waiting for a core when other "
        "work shares the machine).", ""]
    lines += md_table(["run", "round", "flipped by the real trigger (%)", "τ_inv", "seed", "reached", "mask L1 (px)",
                       "mask mass on the trigger (%)", f"within {NEAR} px of it (%)",
                       "trigger pixels covered (m > 0.5)", "s"], rows)
    if args.results:
        write_results(f"{args.results}.md", lines)


if __name__ == "__main__":
    main()
