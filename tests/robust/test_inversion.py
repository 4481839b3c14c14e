"""Trigger inversion (robust/inversion.py): recovers a planted trigger, adapts λ as documented, and is pure.

The digits models are trained once per module (300 Adam steps each, one thread):
``backdoored`` sees a 2×2 white patch in the top-left corner on 20 of each 64
images, relabelled to class 2; ``clean`` the same batches without the patch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.robust.inversion import (
    InversionParams,
    Trigger,
    init_state,
    invert_pair,
    invert_trigger,
    inversion_step,
    stamp,
    to_mask,
)

TARGET = 2
TRIGGER = torch.zeros(8, 8, dtype=torch.bool)
TRIGGER[:2, :2] = True  # the planted 2x2 patch, k = 4 pixels
HW = 64


def _rand(*shape: int, seed: int = 9) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16, torch.tensor(d.target)


def _train(x: torch.Tensor, y: torch.Tensor, poison: bool, seed: int = 0, steps: int = 300) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("cnn", 10, (1, 8, 8), width=16)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        xb, yb = x[idx].clone(), y[idx].clone()
        if poison:
            xb[:20, :, TRIGGER], yb[:20] = 1.0, TARGET
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits(one_thread):
    """(backdoored model, clean model, held-out non-target images, held-out clean accuracy of each, ASR)."""
    x, y = _digits()
    x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]
    backdoored, clean = _train(x_tr, y_tr, poison=True), _train(x_tr, y_tr, poison=False)
    others = x_te[y_te != TARGET]
    stamped = others.clone()
    stamped[:, :, TRIGGER] = 1.0
    with torch.no_grad():
        acc = [float((m(x_te).argmax(1) == y_te).float().mean()) for m in (backdoored, clean)]
        asr = float((backdoored(stamped).argmax(1) == TARGET).float().mean())
    return backdoored, clean, others[:64], acc, asr


@pytest.fixture(scope="module")
def inverted(digits):
    """Target-2 triggers of both models from the same random start (300 steps, 64 images)."""
    backdoored, clean, images, _, _ = digits
    return [invert_trigger(m, images, TARGET, 300, torch.Generator().manual_seed(0)) for m in (backdoored, clean)]


class Scripted(nn.Module):
    """Step i classifies the first ``round(hits[i] * N)`` images as ``target`` and the rest as class 0.

    Its logits do not depend on the input, so the only gradient is λ‖m‖₁'s.
    """

    def __init__(self, hits: list[float], target: int = TARGET) -> None:
        super().__init__()
        self.hits, self.target, self.calls = hits, target, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        k = round(self.hits[min(self.calls, len(self.hits) - 1)] * n)
        self.calls += 1
        labels = torch.tensor([self.target] * k + [0] * (n - k))
        return 5.0 * F.one_hot(labels, 10).to(x) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class _Log(list):
    """A record the model's copies share (the inversion may call a copy holding the same weights)."""

    def __deepcopy__(self, memo: dict) -> "_Log":
        return self


class Biased(nn.Module):
    """A linear model with a large bias to class 0: class 2 is out of reach, yet the CE has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10))
        with torch.no_grad():
            self.net[1].weight.copy_(torch.randn(10, 64, generator=torch.Generator().manual_seed(3)) / 8)
            self.net[1].bias.zero_()[0] = 50.0
        self.seen_training: list[bool] = _Log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.net(x)


# ---------------------------------------------------------------- Neural Cleanse signal on a planted backdoor


def test_backdoor_is_planted(digits):
    """Guards the two tests below: the backdoored model is accurate and its backdoor works, the clean one has none."""
    _, _, _, acc, asr = digits
    assert min(acc) >= 0.9 and asr >= 0.9


def test_planted_trigger_is_recovered_from_a_random_start(inverted):
    """Criterion: reached, ‖m‖₁ ≤ HW/8, at least 2 of the mask's top-4 pixels (k = trigger size) and at least
    half its mass lie on the 4 planted pixels. Rules out a mask/pattern swap, a mask per channel laid out wrong,
    a missing or sign-flipped L1 term or λ that never rises (a large mask), and a start at the corner that
    spreads nowhere only because it began there (the start is random)."""
    trig = inverted[0]
    assert trig.reached and trig.l1 <= HW / 8
    top = trig.mask.flatten().topk(4).indices
    assert TRIGGER.flatten()[top].sum() >= 2
    assert float(trig.mask[TRIGGER].sum()) >= 0.5 * trig.l1
    assert trig.l1 == pytest.approx(float(trig.mask.sum()), rel=1e-5)


def test_clean_model_needs_a_larger_trigger(inverted):
    """Neural Cleanse's signal: flipping a clean model to 2 takes clearly more mask (≥ 2× the backdoor's; measured
    ≈ 3.5×). Rules out an inversion that returns a tiny mask whatever the model (e.g. keeping the smallest mask
    regardless of τ_inv)."""
    backdoored, clean = inverted
    assert clean.reached and clean.l1 >= 2 * backdoored.l1


def test_returned_trigger_flips_the_images(digits, inverted):
    """Rules out returning a mask other than the best's (e.g. the last step's, or the best's mask with another
    step's pattern): the returned trigger itself reaches τ_inv."""
    backdoored, _, images, _, _ = digits
    with torch.no_grad():
        hit = (backdoored(inverted[0].stamp(images)).argmax(1) == TARGET).float().mean()
    assert hit >= 0.9


# ---------------------------------------------------------------- adaptive λ, best and restart


def test_lambda_rises_and_falls_after_ten_consecutive_steps():
    """Hand-worked: hits 0.9 (counts: ≥ τ) ×10 → λ·1.5; 9 successes, 1 failure at 0.8, 9 successes: no change
    (the counter is consecutive); 1 more success → ×1.5 again; then failures: ÷1.5^1.5 after the 10th. Rules out
    > instead of ≥, counting non-consecutive steps, not resetting a counter after a change (λ would move every
    step), the wrong factors, or changing λ before the 10th step."""
    hits = [0.9] * 10 + [1.0] * 9 + [0.8] + [1.0] * 10 + [0.0] * 12
    lam0 = 1e-3
    x = _rand(10, 1, 8, 8)
    trig = invert_trigger(Scripted(hits), x, TARGET, len(hits), torch.Generator().manual_seed(0))
    expected = [lam0] * 10 + [1.5 * lam0] * 20 + [2.25 * lam0] * 10 + [2.25 * lam0 / 1.5**1.5] * 2
    assert torch.allclose(trig.history["lam"], torch.tensor(expected), rtol=1e-6)
    assert trig.lam == pytest.approx(expected[-1], rel=1e-6)
    assert trig.history["hit"][:11].tolist() == pytest.approx([0.9] * 10 + [1.0])


def test_best_is_the_smallest_mask_among_successful_steps():
    """Rules out taking the best among all steps, or returning the last step's mask: the mask shrinks on every
    step (λ‖m‖₁ is the only gradient), so the best is the last step that reached τ_inv (step 29), not later."""
    hits = [1.0] * 30 + [0.0] * 30
    trig = invert_trigger(Scripted(hits), _rand(4, 1, 8, 8), TARGET, 60, torch.Generator().manual_seed(1))
    l1 = trig.history["l1"]
    assert trig.reached and (l1[1:] < l1[:-1]).all()
    assert trig.l1 == pytest.approx(float(l1[29]), rel=1e-6)
    assert float(trig.mask.sum()) == pytest.approx(trig.l1, rel=1e-5)


def test_improving_run_keeps_shrinking():
    """The GUESS (restart before the update): every step improves the best here, and the mask shrinks on every
    step at Adam's pace (measured: 33.3 → 11.0 in 10 steps). Rules out restarting after the update, which
    discards every improving step, so ‖m‖₁ stalls on every other step (measured: 33.3 → 25.5) and skipping the
    restart's update is no better."""
    trig = invert_trigger(Scripted([1.0]), _rand(4, 1, 8, 8), TARGET, 60, torch.Generator().manual_seed(2))
    l1 = trig.history["l1"]
    assert (l1[1:] < l1[:-1]).all() and l1[10] < 0.5 * l1[0]


def test_restart_noise_comes_from_the_generator_and_only_on_improvement():
    """From the same warm start: with improvements, two generators give different triggers (rules out a
    missing restart noise); with τ_inv never reached, they give the same one (rules out noise on every step)."""
    init = (torch.zeros(8, 8), torch.zeros(1, 8, 8))
    x = _rand(4, 1, 8, 8)
    runs = {hit: [invert_trigger(Scripted([hit]), x, TARGET, 5, torch.Generator().manual_seed(s), init=init)
                  for s in (0, 1)] for hit in (1.0, 0.0)}
    assert not torch.equal(runs[1.0][0].raw[0], runs[1.0][1].raw[0])
    assert torch.equal(runs[0.0][0].raw[0], runs[0.0][1].raw[0])
    assert torch.equal(runs[0.0][0].raw[1], runs[0.0][1].raw[1])


# ---------------------------------------------------------------- purity, determinism, exact update


def test_never_reached_gives_a_zero_mask_and_leaves_the_model_alone():
    """Rules out returning the last (large) mask when τ_inv is never met, inverting in train mode (BN would
    update its running statistics), leaving gradients on or changing the model's parameters, or not restoring
    the caller's mode."""
    model = Biased().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _rand(8, 1, 8, 8)
    trig = invert_trigger(model, x, TARGET, 30, torch.Generator().manual_seed(0))
    assert not trig.reached and trig.l1 == 0.0 and torch.equal(trig.mask, torch.zeros(8, 8))
    assert torch.equal(trig.stamp(x), x)
    assert float(trig.history["hit"].max()) == 0.0
    assert model.seen_training == [False] * 30 and model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_same_generator_seed_gives_the_same_trigger(digits):
    """Rules out randomness outside the generator (global RNG), and a start that ignores it (seed 1 differs)."""
    backdoored, _, images, _, _ = digits
    runs = [invert_trigger(backdoored, images[:16], TARGET, 20, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    torch.manual_seed(123)  # the global RNG must not matter
    runs.append(invert_trigger(backdoored, images[:16], TARGET, 20, torch.Generator().manual_seed(7)))
    for other in (runs[1], runs[3]):
        assert torch.equal(runs[0].raw[0], other.raw[0]) and torch.equal(runs[0].raw[1], other.raw[1])
        assert torch.equal(runs[0].mask, other.mask) and runs[0].l1 == other.l1
    assert not torch.equal(runs[0].raw[0], runs[2].raw[0])


def test_update_is_adam_on_ce_plus_lambda_l1_of_the_normalized_stamp():
    """Reference loop with ``torch.optim.Adam`` (lr 0.1, betas (0.5, 0.9)) on CE(f(normalize(x')), t) + λ‖m‖₁
    from the warm start; no restart (never reached) and λ is constant for the first 10 steps. Rules out wrong betas or
    lr, a missing bias correction, ignoring ``normalize`` or applying it before stamping, an L1 on the pattern,
    a mask per channel, or ignoring the warm start."""
    model = Biased().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 1, 8, 8, generator=g)
    init = (torch.randn(8, 8, generator=g), torch.randn(1, 8, 8, generator=g))

    def normalize(z):
        return (z - 0.3) / 0.2

    trig = invert_trigger(model, x, TARGET, 8, torch.Generator().manual_seed(0), normalize=normalize, init=init)
    a, b = init[0].clone().requires_grad_(), init[1].clone().requires_grad_()
    opt = torch.optim.Adam([a, b], lr=0.1, betas=(0.5, 0.9))
    for _ in range(8):
        m, p = to_mask(a), to_mask(b)
        loss = F.cross_entropy(model(normalize((1 - m) * x + m * p)), torch.full((8,), TARGET)) + 1e-3 * m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not trig.reached
    assert torch.allclose(trig.raw[0], a.detach(), atol=1e-5) and torch.allclose(trig.raw[1], b.detach(), atol=1e-5)


def test_pair_is_two_independent_inversions_with_their_own_lambda(digits):
    """s→t on x_s and t→s on x_t jointly equal two single inversions (no restart noise, same starts). Rules out
    one λ shared by both triggers, swapped targets or images, and a CE averaged over both groups together
    (which reweighs CE against λ‖m‖₁ when the groups differ in size).

    In float64: the joint pass runs its 17 images through the model as one batch, the singles 12 and 5, and
    float32 kernels round such batches differently on different CPUs (session 42: 3e-3 apart after 40 Adam
    steps on an Intel Xeon, within 1e-4 on an AMD EPYC); in float64 that rounding stays far below the bound."""
    backdoored, _, images, _, _ = digits
    model = copy.deepcopy(backdoored).double()
    x, y = _digits()
    x, y = x[1400:].double(), y[1400:]
    x_s, x_t = x[y == 0][:12], x[y == TARGET][:5]
    params = InversionParams(restart_noise=0.0)
    g = torch.Generator().manual_seed(4)
    init = [(torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, 8, generator=g,
                                                                               dtype=torch.float64))
            for _ in range(2)]
    pair = invert_pair(model, x_s, x_t, 0, TARGET, 40, torch.Generator(), params=params, init=tuple(init))
    singles = [invert_trigger(model, xs, tgt, 40, torch.Generator(), params=params, init=raw)
               for xs, tgt, raw in ((x_s, TARGET, init[0]), (x_t, 0, init[1]))]
    assert not torch.equal(singles[0].history["lam"], singles[1].history["lam"])  # the λs do part ways
    for joint, single in zip(pair, singles):
        assert joint.raw[0].dtype == torch.float64
        assert joint.reached == single.reached
        assert torch.allclose(joint.history["lam"], single.history["lam"])
        assert torch.allclose(joint.raw[0], single.raw[0], atol=1e-7)
        assert torch.allclose(joint.mask, single.mask, atol=1e-7)


def test_step_vmaps_over_clients(digits):
    """The pure step under ``vmap`` over two clients' stacked weights equals stepping each client alone (the
    batched-over-clients use the primitive is written for)."""
    backdoored, clean, images, _, _ = digits
    weights = {k: v.detach() for d in stack_module_state([backdoored, clean]) for k, v in d.items()}
    x = torch.stack([images[:8], images[8:16]])
    group, target = torch.zeros(8, dtype=torch.int64), torch.full((8,), TARGET)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 1, 8, 8, generator=g)
    noise = [(torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 1, 8, 8, generator=g)) for _ in range(10)]
    params = InversionParams(tau_inv=0.5)

    def step(state, nz, w, xi):
        return inversion_step(state, nz, lambda z: functional_call(backdoored, w, (z,)), xi, group, target, params)

    batched = vmap(lambda a_, b_: init_state(a_, b_, 1e-3))(a, b)
    for nz in noise:
        batched, _ = vmap(step)(batched, nz, weights, x)
    for c, model in enumerate((backdoored, clean)):
        state = init_state(a[c], b[c], 1e-3)
        w = {k: v[c] for k, v in weights.items()}
        for nz in noise:
            state, _ = step(state, (nz[0][c], nz[1][c]), w, x[c])
        assert torch.allclose(batched.best_l1[c], state.best_l1)  # inf == inf where never reached
        assert torch.allclose(batched.a[c], state.a, atol=1e-4) and torch.allclose(batched.b[c], state.b, atol=1e-4)


def test_stamp_and_validation():
    """Rules out a channel-wise mask broadcast gone wrong and silently accepting bad inputs."""
    x, mask, pattern = _rand(2, 3, 4, 4), torch.zeros(4, 4), _rand(3, 4, 4, seed=1)
    mask[0, 0] = 1.0
    out = stamp(x, mask, pattern)
    assert torch.equal(out[:, :, 0, 0], pattern[:, 0, 0].expand(2, 3)) and torch.equal(out[:, :, 1:], x[:, :, 1:])
    assert isinstance(Trigger(mask, pattern, 1.0, True, (mask, pattern), 1e-3).stamp(x), torch.Tensor)
    with pytest.raises(ConfigError, match="tau_inv"):
        InversionParams(tau_inv=0.0)
    with pytest.raises(ConfigError, match="images"):
        invert_trigger(nn.Identity(), _rand(1, 8, 8), 0, 1, torch.Generator())
    with pytest.raises(ConfigError, match="warm start"):
        init = (torch.zeros(4, 4), torch.zeros(1, 4, 4))
        invert_trigger(nn.Flatten(), _rand(2, 1, 8, 8), 0, 1, torch.Generator(), init=init)


def test_noise_drawn_up_front_equals_the_per_step_draws_in_order():
    """_step_noise draws every step's restart noise before the loop (one device copy per inversion): the same
    numbers, in the same order (step i's a, then its b), and the same generator state after, as a draw a step."""
    from fedtrust.robust.inversion import _step_noise, _uniform

    like = torch.zeros((), dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = _step_noise(torch.Size((2, 4, 4)), torch.Size((2, 3, 4, 4)), 6, g1, like)
    for i in range(6):
        assert torch.equal(a[i], _uniform((2, 4, 4), g2, like)) and torch.equal(b[i], _uniform((2, 3, 4, 4), g2, like))
    assert a.dtype == torch.float64 and a.shape == (6, 2, 4, 4) and b.shape == (6, 2, 3, 4, 4)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert float(a.min()) >= -1 and float(a.max()) < 1 and float(a.std()) > 0.3
