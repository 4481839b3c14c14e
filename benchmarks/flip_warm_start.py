"""Where does a pair's cached trigger lead FLIP's next inversion? Cached against random starts on a run's model.

FLIP warm-starts each (source, target) inversion from the trigger the client cached the last time it inverted
that pair (spec flip.md §2), possibly many rounds and global models ago: a benign client of the MNIST paper
regime is selected every ~16 rounds. ``algorithm.keep_cache=false`` (a fedtrust option) starts a visit's first
inversion of a pair at random instead. This probe compares the two starts on one global model: it takes a FLIP
run's last checkpointed global model and, for every source class s ≠ the backdoor's target t, inverts s → t on
``--images`` test images of class s (:func:`~fedtrust.robust.inversion.invert_trigger`, FLIP's primitive and
hyperparameters, ``--steps`` steps as a pair's first batch) from ``--seeds`` random starts and from the cached
(s, t) triggers of up to ``--caches`` benign clients (the lowest ids that hold one; attackers left out). Per
inversion: reached τ_inv or not, the mask's L1, its mass on the real trigger's pixels and within
``flip_state.NEAR`` pixels of them. A smaller mask is the better inversion (Neural Cleanse's objective); the
trigger shares say whether it is the backdoor the hardening then unlearns.

No training, no run state changes: it reads a checkpoint, e.g. of ``benchmarks/backdoor_paper.py``'s runs::

    python benchmarks/flip_warm_start.py runs/bench-backdoor-paper/flip-dba-s0 --results flip_warm_start_paper_cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from fedtrust.errors import FedTrustError
from fedtrust.robust.inversion import InversionParams, Trigger, invert_trigger
from fedtrust.robust.triggers import stamped_pixels
from fedtrust.runner.audit import load_finished_run
from fedtrust.runner.checkpoint import CHECKPOINT_NAME, CheckpointError, read_checkpoint
from fedtrust.runner.federation import asr_trigger, build_run_attack
from fedtrust.runner.source import primary_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flip_state import NEAR, near  # noqa: E402
from runpool import emit, md_table, probe_header  # noqa: E402


def shares(trig: Trigger, pixels: torch.Tensor, around: torch.Tensor) -> tuple[float, float]:
    """The mask's mass share on the trigger's pixels and within NEAR of them (nan when τ_inv was missed)."""
    if not trig.reached:
        return float("nan"), float("nan")
    m = trig.mask.to(pixels.dtype)
    return float((m * pixels).sum() / m.sum()), float((m * around).sum() / m.sum())


def probe(run: Path, seeds: int, caches: int, steps: int, n: int, tau: float) -> tuple[list[list[str]], dict]:
    """Table rows for every (source, start) inversion on ``run``'s model, and per start kind the L1s and shares."""
    try:
        fed, state, rnd = load_finished_run(run)
        ckpt = read_checkpoint(run / CHECKPOINT_NAME, rng=False)
    except (FedTrustError, CheckpointError) as err:
        sys.exit(f"{run}: {err}")
    attack = build_run_attack(fed.config, fed.dataset.num_classes)
    test = fed.dataset.test
    shape = tuple(test.x.shape[1:])
    full = asr_trigger(attack, shape)
    if attack is None or full is None:
        sys.exit(f"{run}: its config has no backdoor attack, so there is no real trigger to look for")
    trigger, target = full
    pixels = stamped_pixels(trigger, shape).to(torch.get_default_dtype())
    around = near(pixels).to(pixels.dtype)
    model = primary_model(fed, state).eval()
    attackers = set(attack.targets.clients)

    def normalize(x01: torch.Tensor) -> torch.Tensor:
        return fed.algorithm.ctx.normalize(x01 * 255.0)

    rows, found = [], {"random": [], "cache": []}
    for s in range(fed.dataset.num_classes):
        if s == target:
            continue
        x = test.x[test.y == s][:n].to(torch.get_default_dtype()) / 255.0
        starts: list[tuple[str, tuple[torch.Tensor, torch.Tensor] | None, int]] = [
            (f"random (seed {k})", None, k) for k in range(seeds)]
        holders = sorted(c for c, msg in ckpt.store.states.items()
                         if f"flip/cache/{s}_{target}/a" in msg.arrays and c not in attackers)[:caches]
        for c in holders:
            arrays = ckpt.store.states[c].arrays
            raw = (arrays[f"flip/cache/{s}_{target}/a"].to(x.dtype), arrays[f"flip/cache/{s}_{target}/b"].to(x.dtype))
            starts.append((f"cache of client {c}", raw, 0))
        for name, init, seed in starts:
            t0 = time.perf_counter()
            trig = invert_trigger(model, x, target, steps, torch.Generator().manual_seed(seed), normalize=normalize,
                                  params=InversionParams(tau_inv=tau), init=init)
            on, close = shares(trig, pixels, around)
            found["random" if init is None else "cache"].append((trig.l1 if trig.reached else float("nan"), on, close))
            rows.append([run.name, str(rnd), f"{s}→{target}", name, "yes" if trig.reached else "no", f"{trig.l1:.1f}",
                         "—" if not trig.reached else f"{100 * on:.1f}",
                         "—" if not trig.reached else f"{100 * close:.1f}", f"{time.perf_counter() - t0:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows, found


def summary(found: dict) -> list[list[str]]:
    """Per start kind: inversions, reached, median L1 and mean trigger shares over the reached ones."""
    out = []
    for kind, got in found.items():
        ok = [g for g in got if g[0] == g[0]]
        med = statistics.median(g[0] for g in ok) if ok else float("nan")
        mean = (lambda i: sum(g[i] for g in ok) / len(ok)) if ok else (lambda i: float("nan"))
        out.append([kind, str(len(got)), str(len(ok)), f"{med:.1f}", f"{100 * mean(1):.1f}", f"{100 * mean(2):.1f}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a FLIP run folder (algorithm.invert=true) with a backdoor attack")
    parser.add_argument("--seeds", type=int, default=2, help="random starts per source class")
    parser.add_argument("--caches", type=int, default=2, help="benign clients' cached starts per source class")
    parser.add_argument("--steps", type=int, default=200, help="inversion steps (FLIP's pair_steps: 200)")
    parser.add_argument("--images", type=int, default=32, help="test images of the source class inverted on")
    parser.add_argument("--tau-inv", type=float, default=0.9, help="τ_inv (FLIP: 0.9)")
    parser.add_argument("--results", default=None, help="also write benchmarks/results/<results>.md")
    args = parser.parse_args()
    if not 0 < args.tau_inv <= 1 or min(args.seeds, args.caches) < 0 or min(args.steps, args.images) < 1:
        parser.error("expected 0 < --tau-inv <= 1, --seeds and --caches >= 0, --steps and --images >= 1")
    torch.manual_seed(0)
    rows, found = probe(args.run, args.seeds, args.caches, args.steps, args.images, args.tau_inv)
    cmd = (f"python benchmarks/flip_warm_start.py {args.run} --seeds {args.seeds} --caches {args.caches} "
           f"--steps {args.steps} --images {args.images} --tau-inv {args.tau_inv:g}")
    lines = probe_header("FLIP's inversion from a pair's cached trigger against a random start (one global model)",
                         cmd, args.results)
    lines += [
        f"- {args.images} test images of each source class; s → target inverted with FLIP's primitive "
        f"(adaptive λ from 1e-3, Adam lr 0.1, τ_inv {args.tau_inv:g}, {args.steps} steps). \"cache of client "
        "c\": warm-started from the (s, target) trigger client c cached on its last visit (FLIP, "
        "`keep_cache=true`); \"random\": `keep_cache=false`'s start for a visit's first inversion of a pair.",
        "- s: wall seconds of one inversion, one torch thread (they include waiting for a core when other "
        "work shares the machine).", "", "## Summary", ""]
    lines += md_table(["start", "inversions", "reached τ_inv", "median mask L1 (px)", "mask mass on the trigger (%)",
                       f"within {NEAR} px of it (%)"], summary(found))
    lines += ["", "## Every inversion", ""]
    lines += md_table(["run", "round", "pair", "start", "reached", "mask L1 (px)", "mask mass on the trigger (%)",
                       f"within {NEAR} px of it (%)", "s"], rows)
    emit(lines, args.results)


if __name__ == "__main__":
    main()
