"""The ``dat`` objective (fedtrust.objectives.adversarial; spec splitmix.md §4): the λ-mix of a clean and an
adversarial CE, PGD on the adversarial BN in eval mode, and both executors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedtrust.adversarial import pgd
from fedtrust.errors import ConfigError
from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.vectorized import VectorizedExecutor
from fedtrust.models import create_model
from fedtrust.models.dual_bn import bn_route
from fedtrust.objectives import build_objective
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

pytestmark = pytest.mark.usefixtures("one_thread")
COUNTS = torch.ones(10)


def _model(norm: str = "dual_bn", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("cnn", 10, (1, 8, 8), width=4, norm=norm)
    with torch.no_grad():  # make the two BNs differ, so a wrong route shows
        for name, p in model.named_parameters():
            if ".adv." in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.train()


def _batch(digits, norm, n: int = 24) -> dict[str, torch.Tensor]:
    return {"x": norm(digits.train.x[:n]), "y": digits.train.y[:n]}


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)}


def test_params_and_defaults() -> None:
    obj = build_objective("dat", {}, 10, COUNTS)
    p = obj.params
    assert (p.lam, p.eps, p.steps, p.step_size, p.random_start) == (0.5, 8 / 255, 7, None, True)
    for bad, match in [("objective.eps=-0.1", "objective.eps"), ("objective.lam=1.5", "objective.lam")]:
        with pytest.raises(ConfigError, match=match) as err:
            build_config({}, ["objective.name=dat", bad])
        assert "\n" not in str(err.value)


def test_lambda_zero_is_plain_ce_on_the_clean_path(digits, norm) -> None:
    """Same gradients as CE through the clean BN, and the adversarial BN untouched (no PGD, no adv forward)."""
    batch = _batch(digits, norm)
    a, b = _model(), _model()
    adv_stats = a.body[0][1].adv.running_mean.clone()
    g_dat = _grads(a, build_objective("dat", {"lam": 0.0}, 10, COUNTS, norm)(a, batch))
    g_ce = _grads(b, F.cross_entropy(b(batch["x"]), batch["y"]))  # default route: clean
    for k in g_ce:
        assert torch.equal(g_dat[k], g_ce[k]), k
    assert torch.equal(a.body[0][1].adv.running_mean, adv_stats)


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_loss_is_the_lambda_mix_of_clean_and_adversarial_ce(lam, digits, norm) -> None:
    """Reference: CE through the clean BN, then PGD on the adv BN in eval mode (with the run's normaliser),
    then CE of x_adv through the adv BN in train mode. Rules out a swapped λ, PGD in train mode, PGD on
    the clean path, the adversarial CE through the clean BN and a normaliser left out."""
    batch = _batch(digits, norm)
    x, y = batch["x"], batch["y"]
    a, ref = _model(), _model()
    obj = build_objective("dat", {"lam": lam}, 10, COUNTS, norm)
    torch.manual_seed(7)
    loss = obj(a, batch)
    g_dat = _grads(a, loss)
    assert a.training and all(m.route == "clean" for m in a.modules() if hasattr(m, "route"))

    with bn_route(ref, "clean"):
        ce_c = F.cross_entropy(ref(x), y) if lam < 1 else torch.zeros(())
    ref.eval()
    torch.manual_seed(7)
    with bn_route(ref, "adv"):
        x_adv = pgd(ref, x, y, normalizer=norm)
    ref.train()
    with bn_route(ref, "adv"):
        ce_a = F.cross_entropy(ref(x_adv), y)
    expected = (1 - lam) * ce_c + lam * ce_a
    assert torch.allclose(loss, expected, atol=1e-6)
    g_ref = _grads(ref, expected)
    for k in g_ref:
        assert torch.allclose(g_dat[k], g_ref[k], atol=1e-6), k
    adv_bn = a.body[0][1].adv
    assert int(adv_bn.num_batches_tracked) == 1, "PGD must run in eval mode: one train-mode adv forward"
    if lam == 1.0:  # only the adversarial path: the clean BN gets no gradient and keeps its stats
        assert all(not g_dat[k].any() for k in g_dat if ".clean." in k)
        assert int(a.body[0][1].clean.num_batches_tracked) == 0


def test_single_bn_model_is_fedavg_at(digits, norm) -> None:
    """One BN per layer: the routes do nothing and the loss is (1 − λ)·CE(x) + λ·CE(x_adv)."""
    batch = _batch(digits, norm)
    x, y = batch["x"], batch["y"]
    model, ref = _model("bn"), _model("bn")
    torch.manual_seed(3)
    loss = build_objective("dat", {"lam": 0.5, "steps": 3}, 10, COUNTS, norm)(model, batch)
    ce_c = F.cross_entropy(ref(x), y)
    ref.eval()
    torch.manual_seed(3)
    x_adv = pgd(ref, x, y, steps=3, normalizer=norm)
    ref.train()
    assert torch.allclose(loss, 0.5 * ce_c + 0.5 * F.cross_entropy(ref(x_adv), y), atol=1e-6)


def test_vmapped_gradients_equal_the_eager_ones(digits, norm, float64) -> None:
    """What the vectorised executor does (vmap of grad over functional_call, PGD's input gradient nested
    inside): the same gradients and BN buffers as the sequential trainer, per client."""
    model = _model().double()
    obj = build_objective("dat", {"random_start": False, "steps": 3}, 10, COUNTS, norm)
    states = [{k: v.clone() for k, v in _model(seed=s).double().state_dict().items()} for s in (1, 2)]
    xs = torch.stack([norm(digits.train.x[i * 16:(i + 1) * 16]) for i in range(2)])
    ys = torch.stack([digits.train.y[i * 16:(i + 1) * 16] for i in range(2)])
    eager = []
    for i, s in enumerate(states):
        m = copy.deepcopy(model)
        m.load_state_dict(s)
        g = _grads(m, obj(m, {"x": xs[i], "y": ys[i]}))
        eager.append((g, m.state_dict()))
    names = [n for n, _ in model.named_parameters()]
    params = {k: torch.stack([s[k] for s in states]) for k in names}
    buffers = {k: torch.stack([s[k] for s in states]) for k, _ in model.named_buffers()}

    def loss(p, b, x, y):
        return _call(model, obj, p | b, x, y)

    grads, _ = vmap(grad_and_value(loss), randomness="different")(params, buffers, xs, ys)
    for i, (g, state) in enumerate(eager):
        for k in names:
            assert torch.allclose(grads[k][i], g[k], atol=1e-10), k
        for k in buffers:
            assert torch.allclose(buffers[k][i].double(), state[k].double(), atol=1e-12), k


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, obj) -> None:
        super().__init__()
        self.model, self.obj = model, obj

    def forward(self, batch):
        return self.obj(self.model, batch)


def _call(model, obj, tensors, x, y):
    return functional_call(_LossModule(model, obj), {f"model.{k}": v for k, v in tensors.items()},
                           ({"x": x, "y": y},))


def test_both_executors_train_the_same_dual_bn_federation(float64) -> None:
    """One round of FedAvg + DAT on a dual-BN cnn: vectorised equals sequential (random start off, as the
    two executors draw random starts from different global-RNG streams)."""
    cfg = build_config({}, ["data.num_clients=4", "data.clients_per_round=3", "data.alpha=0.3", "data.min_size=20",
                            "eval.personalized=false", "model.width=4", "model.norm=dual_bn", "train.steps=2",
                            "objective.name=dat", "objective.steps=2", "objective.random_start=false"])
    fed = build_federation(cfg)
    torch.manual_seed(0)
    state = fed.algorithm.init()
    seq = SequentialExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 3).run(state, ClientStore(), 0, 1)
    vec = VectorizedExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 3).run(state, ClientStore(), 0, 1)
    for k in seq.arrays:
        assert torch.allclose(seq.arrays[k].double(), vec.arrays[k].double(), atol=1e-9, rtol=1e-7), k
    moved = [k for k in seq.arrays if ".adv." in k and not torch.equal(seq.arrays[k], state.arrays[k])]
    assert moved, "the adversarial BN must train"


@pytest.mark.slow
def test_raising_mu_trades_clean_for_robust_accuracy_on_digits(tmp_path) -> None:
    """Spec §4's test-time knob on real data (configs/splitmix-dat-digits.yaml, shrunk: 5 IID clients, width
    16, 8 rounds of 2 epochs, 300 attacked images, seed 0): one DAT training, white-box PGD-7 (ε = 0.2) against
    the μ-mixed model. Stated tolerance: 1 point for each step of μ ∈ {0, .2, .5, .8, 1}. Robust accuracy does
    not fall as μ rises and gains at least 5 points from μ = 0 to 1; clean accuracy does not rise (what the
    robustness is paid with; on these digits the clean path keeps within a point). Rules out: μ ignored (a
    flat robust curve), the BNs swapped (robust falling), the adversarial BN trained on clean images."""
    import fedtrust

    run = fedtrust.run("configs/splitmix-dat-digits.yaml",
                       ["data.num_clients=5", "data.clients_per_round=5", "model.width=16", "rounds=8",
                        "train.epochs=2", "eval.every=8", "eval.robust.num_samples=300", "checkpoint_every=0",
                        f"out={tmp_path / 'dat'}"], progress=False, report=False)
    sweep = run.summary["robust"]
    assert sweep["mu"] == [0.0, 0.2, 0.5, 0.8, 1.0] and sweep["eps"] == 0.2
    clean, robust = sweep["clean_acc"], sweep["robust_acc"]
    assert all(b >= a - 0.01 for a, b in zip(robust, robust[1:])), robust
    assert robust[-1] >= robust[0] + 0.05, robust
    assert all(b <= a + 0.01 for a, b in zip(clean, clean[1:])), clean
    assert clean[-1] <= clean[0], clean
    assert clean[0] > 0.8 and robust[-1] < clean[-1], (clean, robust)
