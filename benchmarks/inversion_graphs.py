#!/usr/bin/env python
"""Speed of FLIP's trigger inversion on a GPU: eager steps against recorded CUDA graphs (issue 15).

Run from the repository root, on a machine with a GPU (``bash benchmarks/device_flip.sh`` runs it on a lent
one)::

    python benchmarks/inversion_graphs.py --device cuda     # -> benchmarks/results/inversion_graphs.md

Each row times ``InversionJob.solve_batch`` on ``clients`` K = 2 jobs (FLIP's symmetric pairs; each job on its
own differently initialised model of the architecture, with its own generator) of ``images`` images each
(half source, half target: a pair's two classes in one of the paper regime's batches of 64, ~16 on
Dirichlet(0.5) MNIST clients), ``--steps`` Adam steps: eagerly
(``use_cuda_graphs(False)``: each step's few hundred kernels launched from Python through ``torch.func``) and
replayed from a recorded CUDA graph (the default on a GPU). One untimed solve of each mode first (the
recording is cached, as in a run, where every later inversion of the shape replays it), then the median of
``--repeats`` interleaved repeats, synchronised. "max |Δ mask|": the largest difference between the two modes'
masks over all triggers of the last repeat, and whether every trigger's ``reached`` agrees. On a CPU only the
eager column is measured (there are no graphs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runpool import machine_note, md_table, with_analysis, write_results  # noqa: E402

SHAPES = [("digits `cnn` (8×8)", "cnn", (1, 8, 8)), ("MNIST `lenet` (28×28)", "lenet", (1, 28, 28))]


def jobs(model: str, shape: tuple[int, int, int], clients: int, images: int, steps: int, seed: int,
         device: str, shell) -> list:
    import torch

    from fedtrust.models import create_model
    from fedtrust.robust.inversion import InversionJob, InversionParams

    out = []
    for i in range(clients):
        torch.manual_seed(seed * 1000 + i)
        net = create_model(model, 10, shape).to(device)
        weights = {k: v.detach() for k, v in [*net.named_parameters(), *net.named_buffers()]}
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        x = torch.rand((images, *shape), generator=gen).to(device)
        group = torch.tensor([0] * (images // 2) + [1] * (images - images // 2), device=device)
        target = torch.where(group == 0, 2, 5)
        out.append(InversionJob(shell, weights, x, group, target, 2, steps, gen, 1e-3, [None, None], None,
                                InversionParams()))
    return out


def measure(model: str, shape: tuple[int, int, int], clients: int, images: int, steps: int, repeats: int,
            device: str) -> dict[str, object]:
    import torch

    from fedtrust.models import create_model
    from fedtrust.robust.inversion import InversionJob, use_cuda_graphs

    shell = create_model(model, 10, shape).to(device)
    modes = ["eager", "graph"] if device.startswith("cuda") else ["eager"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    last: dict[str, list] = {}
    try:
        for rep in range(-1, repeats):  # rep -1: untimed warm-up (and the graph's recording)
            for mode in modes:
                use_cuda_graphs(mode == "graph")
                batch = jobs(model, shape, clients, images, steps, max(rep, 0), device, shell)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                last[mode] = InversionJob.solve_batch(batch)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if rep >= 0:
                    times[mode].append(time.perf_counter() - start)
    finally:
        use_cuda_graphs(True)
    row: dict[str, object] = {m: 1000 * statistics.median(t) / steps for m, t in times.items()}
    if "graph" in last:
        pairs = [(g, e) for gs, es in zip(last["graph"], last["eager"]) for g, e in zip(gs, es)]
        row["diff"] = max(float((g.mask - e.mask).abs().max()) for g, e in pairs)
        row["agree"] = all(g.reached == e.reached for g, e in pairs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=200, help="inversion steps per solve (FLIP's pairs: 200)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", default="1,6", help="jobs solved together, comma-separated")
    parser.add_argument("--images", type=int, default=16, help="images per job (a pair's two classes in a batch)")
    parser.add_argument("--results", default="inversion_graphs")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    body = []
    for label, model, shape in SHAPES:
        for clients in (int(c) for c in args.clients.split(",")):
            r = measure(model, shape, clients, args.images, args.steps, args.repeats, args.device)
            graph = r.get("graph")
            body.append([label, str(clients), f"{r['eager']:.2f}", f"{graph:.3f}" if graph else "—",
                         f"{r['eager'] / graph:.1f}" if graph else "—",
                         f"{r['diff']:.1e}" if "diff" in r else "—", str(r["agree"]) if "agree" in r else "—"])
            print(" | ".join(body[-1]), flush=True)
    hardware = machine_note(args.device)
    cmd = (f"python benchmarks/inversion_graphs.py --device {args.device} --steps {args.steps} "
           f"--repeats {args.repeats} --clients {args.clients} --images {args.images}")
    lines = ["# Trigger inversion on a GPU: eager steps against recorded CUDA graphs (issue 15)", "",
             f"Reproduce: `{cmd}` (repository root; `bash benchmarks/device_flip.sh` on a lent GPU).", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; hardware: {hardware}; device "
             f"`{args.device}`, one torch thread.",
             f"- K = 2 jobs of {args.images} images each, {args.steps} steps, median of {args.repeats} repeats "
             "after an untimed one (module docstring).", "",
             *md_table(["model", "clients", "eager (ms / step)", "graph (ms / step)", "eager / graph",
                        "max |Δ mask|", "reached agree"], body, 2)]
    write_results(f"{args.results}.md", with_analysis(lines, f"benchmarks/{args.results}_analysis.md"))


if __name__ == "__main__":
    main()
