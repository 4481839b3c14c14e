"""Recorded inversion steps (robust/inversion.py ``_StaticStep``): the same triggers as the eager loop.

On a GPU an inversion's step is recorded once per shape as a CUDA graph and replayed. Its bookkeeping (inputs
copied into fixed buffers, the next state written back in place, statistics stacked before the write-back,
results copied out, a recording reused by later inversions of the same shape) runs here in mode ``"replay"``:
the same body, run eagerly. With ``FEDTRUST_TEST_DEVICE=cuda`` (benchmarks/device_flip.sh) the same tests run
the real CUDA graphs on the GPU. Everything in float64, so padding the images (the only numerical change:
more zero rows in a sum) cannot flip a hit or a best.
"""

from __future__ import annotations

import pytest
import torch

from fedtrust.models import create_model
from fedtrust.robust import inversion
from fedtrust.robust.inversion import InversionJob, InversionParams, use_cuda_graphs

PARAMS = InversionParams(tau_inv=0.5)


@pytest.fixture
def device(executor_device: str) -> torch.device:
    return torch.device(executor_device)


@pytest.fixture
def recorded(device, monkeypatch) -> str:
    """The recorded mode on the test device: ``cuda-graph`` on a GPU, else ``replay``; the cache starts empty."""
    mode = "cuda-graph" if device.type == "cuda" else "replay"
    monkeypatch.setattr(inversion, "_graphs", type(inversion._graphs)())
    return mode


def _models(device: torch.device, n: int, seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [create_model("cnn", 10, (1, 8, 8), width=8).to(device=device, dtype=torch.float64).eval()
            for _ in range(n)]


SHELLS: dict[torch.device, torch.nn.Module] = {}


def _jobs(device: torch.device, counts: list[tuple[int, int]], steps: int, seed: int) -> list[InversionJob]:
    """One k=2 job per entry of ``counts`` (source and target image counts), each with its own weights and
    generator on one architecture object (as FLIP's template); targets are each model's two most predicted
    classes, so triggers reach τ_inv and restart."""
    models = _models(device, len(counts), seed)
    shell = SHELLS.setdefault(device, _models(device, 1)[0])
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i, (model, (n_s, n_t)) in enumerate(zip(models, counts)):
        x = torch.rand(n_s + n_t, 1, 8, 8, generator=g, dtype=torch.float64).to(device)
        with torch.no_grad():
            top = torch.bincount(model(x).argmax(1), minlength=10).argsort(descending=True)[:2].tolist()
        group = torch.cat([torch.zeros(n_s, dtype=torch.int64), torch.ones(n_t, dtype=torch.int64)]).to(device)
        target = torch.tensor([top[0], top[1]], device=device)[group]
        init = (torch.zeros(8, 8, dtype=torch.float64), torch.zeros(1, 8, 8, dtype=torch.float64)) if i == 1 else None
        weights = {n: v.detach() for n, v in [*model.named_parameters(), *model.named_buffers()]}
        jobs.append(InversionJob(shell, weights, x, group, target, 2, steps,
                                 torch.Generator().manual_seed(100 + i), 1e-3, [init, None], None, PARAMS))
    return jobs


def _solve(jobs: list[InversionJob], mode: str | None, monkeypatch) -> list[list]:
    with monkeypatch.context() as m:
        m.setattr(inversion, "_static_mode", lambda device: mode)
        return InversionJob.solve_batch(jobs)


def _assert_same(got: list[list], want: list[list]) -> None:
    for triggers, expected in zip(got, want):
        for t, e in zip(triggers, expected):
            assert t.reached == e.reached and t.l1 == pytest.approx(e.l1, rel=1e-9) and t.lam == e.lam
            for x, y in [(t.mask, e.mask), (t.pattern, e.pattern), *zip(t.raw, e.raw)]:
                assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
            for key in inversion.STATS:
                assert t.history[key].shape == e.history[key].shape
                assert torch.allclose(t.history[key], e.history[key], rtol=1e-9, atol=1e-12), key


def test_recorded_batch_equals_the_eager_loop(device, recorded, monkeypatch) -> None:
    """Three clients' pairs (13, 17 and 9 images; recorded: all padded to 32) vmapped: every
    trigger, raw variable and per-step statistic as the eager loop's. A write-back after the statistics'
    stack would shift ``lam``'s history by a step; a buffer not reloaded would carry one job's state."""
    counts = [(8, 5), (10, 7), (4, 5)]
    eager = _solve(_jobs(device, counts, 40, seed=1), None, monkeypatch)
    got = _solve(_jobs(device, counts, 40, seed=1), recorded, monkeypatch)
    assert sum(t.reached for ts in eager for t in ts) >= 3  # restarts and best tracking are exercised
    assert any(len(set(t.history["lam"].tolist())) > 1 for ts in eager for t in ts)  # λ moved
    _assert_same(got, eager)
    assert len(inversion._graphs) == 1


def test_a_recording_is_reused_with_new_inputs_and_results_are_copies(device, recorded, monkeypatch) -> None:
    """A second batch of the same shape (other models, images and generators) replays the first recording and
    still equals its eager solve; the first batch's triggers are not overwritten by it."""
    counts = [(8, 5), (10, 7)]
    first = _solve(_jobs(device, counts, 30, seed=2), recorded, monkeypatch)
    kept = [[(t.mask.clone(), t.history["l1"].clone()) for t in ts] for ts in first]
    runner = next(iter(inversion._graphs.values()))
    second = _solve(_jobs(device, [(12, 8), (6, 13)], 30, seed=3), recorded, monkeypatch)
    assert list(inversion._graphs.values()) == [runner]  # reused, not recorded again
    _assert_same(second, _solve(_jobs(device, [(12, 8), (6, 13)], 30, seed=3), None, monkeypatch))
    for ts, kp in zip(first, kept):
        for t, (mask, hit) in zip(ts, kp):
            assert torch.equal(t.mask, mask) and torch.equal(t.history["l1"], hit)
    assert not torch.equal(first[0][0].history["l1"], second[0][0].history["l1"])


def test_a_lone_job_and_zero_steps(device, recorded, monkeypatch) -> None:
    """The unbatched path (one job) records its own step; an inversion of 0 steps returns an empty history."""
    (job,) = _jobs(device, [(11, 6)], 25, seed=4)
    _assert_same(_solve([job], recorded, monkeypatch),
                 _solve(_jobs(device, [(11, 6)], 25, seed=4), None, monkeypatch))
    (zero,) = _jobs(device, [(3, 3)], 0, seed=4)
    ((t, _),) = _solve([zero], recorded, monkeypatch)
    assert not t.reached and t.history["hit"].shape == (0,)


def test_the_cache_keeps_the_most_recent_recordings(device, recorded, monkeypatch) -> None:
    """GRAPH_CACHE_SIZE bounds the recordings kept (each holds device memory): the least recently used goes."""
    monkeypatch.setattr(inversion, "GRAPH_CACHE_SIZE", 1)
    _solve(_jobs(device, [(8, 5), (4, 4)], 3, seed=5), recorded, monkeypatch)
    _solve(_jobs(device, [(8, 5), (4, 4), (2, 2)], 3, seed=5), recorded, monkeypatch)  # 3 jobs: a new shape
    assert len(inversion._graphs) == 1
    (key,) = inversion._graphs
    assert key[1] == "stacked" and any(len(shape) and shape[0] == 3 for shape, *_ in key[-1][1])


def test_cuda_graphs_are_used_on_a_gpu_unless_turned_off() -> None:
    """The switch: recorded graphs on a CUDA device by default, eager after ``use_cuda_graphs(False)``;
    never on the CPU."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    try:
        assert inversion._static_mode(cuda) == "cuda-graph" and inversion._static_mode(cpu) is None
        use_cuda_graphs(False)
        assert inversion._static_mode(cuda) is None
    finally:
        use_cuda_graphs(True)
    assert inversion._static_mode(cuda) == "cuda-graph"


def test_a_step_that_cannot_be_recorded_runs_eagerly_with_a_warning(device, monkeypatch) -> None:
    """A recording that fails (on a GPU: a host sync inside the step) warns, turns the graphs off for later
    inversions and returns the eager result, instead of failing the client's round."""
    monkeypatch.setattr(inversion, "_graphs", type(inversion._graphs)())
    monkeypatch.setattr(inversion, "_static_mode", lambda d: "replay" if inversion._cuda_graphs else None)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(inversion._StaticStep, "__init__", refuse)
    try:
        with pytest.warns(RuntimeWarning, match="could not record the inversion step"):
            got = InversionJob.solve_batch(_jobs(device, [(8, 5), (10, 7)], 20, seed=6))
        assert not inversion._cuda_graphs and not inversion._graphs
    finally:
        use_cuda_graphs(True)
    monkeypatch.setattr(inversion, "_static_mode", lambda d: None)
    _assert_same(got, InversionJob.solve_batch(_jobs(device, [(8, 5), (10, 7)], 20, seed=6)))
