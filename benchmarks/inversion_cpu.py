#!/usr/bin/env python
"""Speed of a lone trigger inversion on a CPU: the ``torch.func`` step against the eager autograd one (issue 15).

Run from the repository root::

    python benchmarks/inversion_cpu.py          # -> benchmarks/results/inversion_cpu.md

On a CPU (and on a GPU with ``use_cuda_graphs(False)``) a lone inversion runs its steps eagerly. Three ways of
taking a step's gradient are timed on the same job, one torch thread:

- "torch.func": ``torch.func.grad`` of a ``functional_call`` of the shared model (the step the vectorised and
  recorded paths vmap; the lone CPU path before session 36);
- "autograd": ``torch.autograd.grad`` on a private copy of the model holding the job's weights
  (``_bound_model``), every convolution on oneDNN (``ATEN_CONV_MAX_IN_CHANNELS = 0``);
- "autograd + ATen thin convs": the same with the convolutions of at most 3 input channels (an image's first
  layer) on ATen's kernels (the default, ``ATEN_CONV_MAX_IN_CHANNELS = 3``).

Each row: one K = 1 job of ``images`` random images on a randomly initialised model of the architecture,
``--steps`` steps; the median of ``--repeats`` interleaved repeats after an untimed one. "Δ": the largest
difference of the final raw variables (a, b) from the torch.func step's (0: the same to the bit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runpool import machine_note, md_table, with_analysis, write_results  # noqa: E402

SHAPES = [("digits `cnn` (8×8)", "cnn", (1, 8, 8)), ("MNIST `lenet` (28×28)", "lenet", (1, 28, 28)),
          ("MNIST `cnn` (28×28)", "cnn", (1, 28, 28)), ("CIFAR-10 `resnet18` (32×32)", "resnet18", (3, 32, 32))]
MODES = ("torch.func", "autograd", "autograd + ATen thin convs")


def solve(mode: str, model: str, shape: tuple[int, int, int], images: int, steps: int, seed: int, shell):
    """The final state of one K = 1 inversion run the ``mode`` way, and its seconds."""
    import torch

    from fedtrust.robust import inversion as inv

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((images, *shape), generator=gen)
    group = torch.zeros(images, dtype=torch.int64)
    target = torch.full((images,), 2)
    weights = {k: v.detach() for k, v in [*shell.named_parameters(), *shell.named_buffers()]}
    job = inv.InversionJob(shell, weights, x, group, target, 1, steps, gen, 1e-3, [None], None, inv.InversionParams())
    a, b = inv._start(1, shape, gen, x, job.params, job.inits)
    noise = inv._step_noise(a.shape, b.shape, steps, gen, x)
    inv.ATEN_CONV_MAX_IN_CHANNELS = 0 if mode == "autograd" else 3
    start = time.perf_counter()
    if mode == "torch.func":
        step, args = inv._step_fn(job), (weights, x, group, target)
    else:
        step, args = inv._bound_step_fn(job), (x, group, target)
    state, _ = inv._eager_steps(step, inv.init_state(a, b, job.lam0), noise, args, steps, shell)
    seconds = time.perf_counter() - start
    inv.ATEN_CONV_MAX_IN_CHANNELS = 3
    return state, seconds


def measure(model: str, shape: tuple[int, int, int], images: int, steps: int, repeats: int) -> dict[str, float]:
    import torch

    from fedtrust.models import create_model

    torch.manual_seed(0)
    shell = create_model(model, 10, shape).eval()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    final = {}
    for rep in range(-1, repeats):
        for mode in MODES:
            final[mode], seconds = solve(mode, model, shape, images, steps, max(rep, 0), shell)
            if rep >= 0:
                times[mode].append(seconds)
    row = {m: 1000 * statistics.median(t) / steps for m, t in times.items()}
    for mode in MODES[1:]:
        row[f"diff {mode}"] = max(float((u - v).abs().max()) for u, v in
                                  zip(final[mode][:2], final["torch.func"][:2]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", default="12,64", help="images per job, comma-separated (a pair's classes in a "
                                                          "batch of 64: ~12 on MNIST clients)")
    parser.add_argument("--results", default="inversion_cpu")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    body = []
    for label, model, shape in SHAPES:
        for images in (int(n) for n in args.images.split(",")):
            r = measure(model, shape, images, args.steps, args.repeats)
            base = r["torch.func"]
            body.append([label, str(images), *(f"{r[m]:.2f}" for m in MODES),
                         f"{base / r[MODES[-1]]:.2f}", *(f"{r[f'diff {m}']:.1e}" for m in MODES[1:])])
            print(" | ".join(body[-1]), flush=True)
    cmd = (f"python benchmarks/inversion_cpu.py --steps {args.steps} --repeats {args.repeats} "
           f"--images {args.images}")
    lines = ["# A lone trigger inversion on a CPU: the torch.func step against eager autograd (issue 15)", "",
             f"Reproduce: `{cmd}` (repository root).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; hardware: {machine_note('cpu')}; "
             "one torch thread.",
             f"- One K = 1 job, {args.steps} steps, median of {args.repeats} repeats after an untimed one "
             "(module docstring). Times in ms per step.", "",
             *md_table(["model", "images", *MODES, "speed-up", "Δ autograd", "Δ ATen thin convs"], body, 2)]
    write_results(f"{args.results}.md", with_analysis(lines, f"benchmarks/{args.results}_analysis.md"))


if __name__ == "__main__":
    main()
