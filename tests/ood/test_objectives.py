"""OOD / long-tail objectives (fedtrust.objectives.ood): hand-checked values, one joint BN pass, torch.func.

Hand checks use a tiny linear model whose head is zeroed, so every logit is 0 and
softmax is uniform over K classes: CE = log K, E = −log K, p = 1/K.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedtrust.errors import ConfigError
from fedtrust.models import FedModel, create_model
from fedtrust.objectives import Objective, build_objective
from fedtrust.objectives import ood as objectives_ood
from fedtrust.objectives.ood import energy_hinge, log_prior, tail_supcon, uniform_ce

K = 5
COUNTS = torch.tensor([40, 20, 10, 5, 0])
NAMES = ["la", "oe", "energy_oe", "oecc", "rna", "rna_no_outliers", "pascl", "bel"]
LOG_K = math.log(K)


class TinyNet(FedModel):
    """Flatten → Linear(16, 6) → ReLU gives z; no BN (vmap-friendly)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_shape = (1, 4, 4)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU())
        self.num_features = 6
        self.reset_head(K)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


def _objective(name: str, **params: object) -> Objective:
    return build_objective(name, params, K, COUNTS)


def _model(obj: Objective, zero_head: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = obj.wrap_model(TinyNet())
    if zero_head:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
    return model


def _batch(n: int = 6, m: int = 6, seed: int = 1, y: Tensor | None = None) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 1, 4, 4, generator=g),
        "x2": torch.randn(n, 1, 4, 4, generator=g),
        "x_ood": torch.randn(m, 1, 4, 4, generator=g) + 2,
        "y": y if y is not None else torch.randint(0, K, (n,), generator=g),
    }


def test_registered_with_spec_defaults() -> None:
    defaults = {
        "la": {"tau": 1.0},
        "oe": {"weight": 0.5},
        "energy_oe": {"m_in": -25.0, "m_out": -7.0, "weight": 0.1},
        "oecc": {"lambda1": 0.07, "lambda2": 0.05, "train_accuracy": None},
        "rna": {"tau": 1.0, "weight": 0.5, "proj_dim": 128},
        "pascl": {"oe_weight": 0.5, "cl_weight": 0.1, "temperature": 0.07, "k": 0.4, "proj_dim": 128},
        "bel": {"m_in": -23.0, "m_out": -5.0, "lam": 10.0, "gamma1": 0.75, "gamma2": 0.75, "weight": 0.1},
    }
    for name, expected in defaults.items():
        params = _objective(name).params.model_dump()
        assert {k: params[k] for k in expected} == expected, name
    needs = {n: _objective(n).needs_outliers for n in NAMES}
    assert needs == {"la": False, "oe": True, "energy_oe": True, "oecc": True, "rna": True,
                     "rna_no_outliers": False, "pascl": True, "bel": True}
    assert _objective("pascl").num_views == 2 and _objective("rna").num_views == 1


def test_unknown_param_is_rejected() -> None:
    with pytest.raises(Exception, match="lambda3"):
        _objective("oecc", lambda3=1.0)


# ---------------------------------------------------------------- hand-checked values


def test_la_is_ce_on_prior_shifted_logits() -> None:
    obj, batch = _objective("la"), _batch()
    model = _model(obj)
    logits = model(batch["x"])
    prior = COUNTS.clamp_min(1).double() / COUNTS.clamp_min(1).sum()
    expected = F.cross_entropy(logits + prior.log().float(), batch["y"])
    assert torch.allclose(obj(model, batch), expected, atol=1e-6)
    assert torch.allclose(_objective("la", tau=0.0)(model, batch), F.cross_entropy(logits, batch["y"]), atol=1e-6)
    assert torch.isfinite(log_prior(COUNTS, logits)).all()  # an empty class does not give −inf


def test_oe_uniform_term_is_minimal_at_constant_logits() -> None:
    logits = torch.full((3, K), 2.5, requires_grad=True)
    term = uniform_ce(logits)
    assert torch.allclose(term, torch.full((3,), LOG_K))  # CE to uniform of a uniform softmax = log K
    term.sum().backward()
    assert torch.allclose(logits.grad, torch.zeros_like(logits), atol=1e-7)
    obj = _objective("oe")
    assert obj(_model(obj, zero_head=True), _batch()).item() == pytest.approx(1.5 * LOG_K, abs=1e-6)


def test_energy_oe_is_ce_when_energies_are_inside_the_margins() -> None:
    model_obj = _objective("energy_oe", m_in=0.0, m_out=-5.0)  # E = −log 5 ≈ −1.61: <= 0 and >= −5
    model = _model(model_obj, zero_head=True)
    assert model_obj(model, _batch()).item() == pytest.approx(LOG_K, abs=1e-6)
    default = _objective("energy_oe")  # E_in − m_in = 25 − log 5 > 0; m_out − E_out = −7 + log 5 < 0
    expected = LOG_K + 0.1 * (25 - LOG_K) ** 2
    assert default(model, _batch()).item() == pytest.approx(expected, rel=1e-6)
    assert energy_hinge(torch.tensor([-30.0]), torch.tensor([-1.0]), -25.0, -7.0).item() == 0.0


def test_oecc_hand_checked_with_both_accuracy_choices() -> None:
    """Flat logits: every max p is 1/K, every outlier softmax is uniform (L1 term 0); the ID term is the
    batch SUM of (1/K − A_tr)², as the official notebook, not a mean (six times smaller here)."""
    batch = _batch(y=torch.zeros(6, dtype=torch.long))  # flat logits: argmax is class 0, batch accuracy 1
    guess = _objective("oecc")
    model = _model(guess, zero_head=True)
    assert guess(model, batch).item() == pytest.approx(LOG_K + 0.07 * 6 * (1 / K - 1) ** 2, abs=1e-6)
    fixed = _objective("oecc", train_accuracy=0.5)
    assert fixed(model, batch).item() == pytest.approx(LOG_K + 0.07 * 6 * (1 / K - 0.5) ** 2, abs=1e-6)


class _FixedLogits(nn.Module):
    """Returns given logits for ``cat(x, x_ood)`` (one row per input), whatever the input."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward_features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert len(x) == len(self.logits)
        return torch.zeros(len(x), 1), self.logits


def test_oecc_equals_the_official_formula_on_hand_built_logits() -> None:
    """Both regularisers on non-flat logits, written out term by term: λ1·Σ_id (max_k p_k − A_tr)² and
    λ2·Σ_ood Σ_k |p_k − 1/K|, summed over 2 ID and 3 outlier rows, plus the ID rows' mean CE."""
    id_logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 3.0, 0.0, 0.0]])
    ood_logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 2.0]])
    y = torch.tensor([0, 1])
    batch = {"x": torch.zeros(2, 1, 4, 4), "x_ood": torch.zeros(3, 1, 4, 4), "y": y}
    model = _FixedLogits(torch.cat([id_logits, ood_logits]))
    a_tr, lam1, lam2 = 0.3, 0.3, 0.2
    obj = _objective("oecc", train_accuracy=a_tr, lambda1=lam1, lambda2=lam2)
    ce = sum(-math.log(math.exp(r[int(c)]) / sum(math.exp(v) for v in r)) for r, c in zip(id_logits.tolist(), y)) / 2
    id_term = sum((max(math.exp(v) for v in r) / sum(math.exp(v) for v in r) - a_tr) ** 2 for r in id_logits.tolist())
    ood_term = sum(abs(math.exp(v) / sum(math.exp(u) for u in r) - 1 / K) for r in ood_logits.tolist() for v in r)
    assert ood_term > 0.5 and id_term > 0.1, "both terms must be non-trivial for the check to mean anything"
    assert obj(model, batch).item() == pytest.approx(ce + lam1 * id_term + lam2 * ood_term, abs=1e-5)


def test_pretrained_values_measure_the_init_model() -> None:
    """OECC's A_tr = the training accuracy of the given logits; BEL's π̂ = the argmax histogram on outliers."""
    train_logits = torch.tensor([[3.0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0], [0, 0, 3.0, 0, 0], [3.0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 1, 0])
    assert _objective("oecc", train_accuracy="pretrained").pretrained_values(train_logits, labels, None) == \
        {"train_accuracy": 0.75}
    outliers = torch.tensor([[0, 0, 0, 5.0, 0], [0, 0, 0, 5.0, 0], [5.0, 0, 0, 0, 0], [0, 0, 0, 5.0, 0]])
    got = _objective("bel", prior="pretrained").pretrained_values(train_logits, labels, outliers)
    assert got == {"prior": [0.25, 0.0, 0.0, 0.75, 0.0]}
    assert _objective("oecc", train_accuracy=0.9).pretrained_values(train_logits, labels, None) == {}
    with pytest.raises(ConfigError, match="'pretrained' is measured on the init_from model"):
        _objective("oecc", train_accuracy="pretrained")(_model(_objective("oecc")), _batch())


def test_bel_without_balancing_is_energy_oe() -> None:
    bel = _objective("bel", lam=0.0, gamma1=0.0, gamma2=0.0, m_in=-25.0, m_out=-7.0)
    eoe = _objective("energy_oe")
    model, batch = _model(bel), _batch()
    assert torch.allclose(bel(model, batch), eoe(model, batch), atol=1e-5)


def test_bel_prior_guess_is_the_detached_mean_outlier_softmax() -> None:
    obj, batch = _objective("bel"), _batch()
    model = _model(obj)
    with torch.no_grad():
        pi_hat = torch.softmax(model(batch["x_ood"]), 1).mean(0)
    fixed = _objective("bel", prior=tuple(pi_hat.tolist()))
    assert torch.allclose(obj(model, batch), fixed(model, batch), atol=1e-5)
    with pytest.raises(ConfigError, match="prior has 2 entries"):
        _objective("bel", prior=(0.5, 0.5))(model, batch)


def test_bel_hand_checked_with_flat_logits() -> None:
    """Flat logits: p = 1/K, so E'_out = −log K − λ/K and w is constant."""
    obj = _objective("bel", prior=(0.2,) * K)
    e_in, e_out = -LOG_K, -LOG_K - 10.0 / K
    expected = LOG_K + 0.1 * (max(e_in + 23, 0) ** 2 + max(-5 - e_out, 0) ** 2)
    assert obj(_model(obj, zero_head=True), _batch()).item() == pytest.approx(expected, rel=1e-6)


def test_tail_supcon_hand_checked() -> None:
    """One tail sample with identical views e1 and one outlier e2, T = 1: each anchor sees
    its other view (similarity 1) and the outlier (0): loss = −log(e/(e + 1)) = log(1 + 1/e).
    A head-class sample equal to e1 is outside the contrast set, so it changes nothing."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    f_id, f_ood = torch.stack([e1, e1]), e2.unsqueeze(0)
    y, tail = torch.tensor([3, 3]), torch.tensor([True, True])
    expected = math.log(1 + math.exp(-1))
    assert tail_supcon(f_id, f_ood, y, tail, 1.0).item() == pytest.approx(expected, abs=1e-6)
    f_id4 = torch.stack([e1, e1, e1, e1])  # views: (tail, head, tail, head)
    y4, tail4 = torch.tensor([3, 0, 3, 0]), torch.tensor([True, False, True, False])
    assert tail_supcon(f_id4, f_ood, y4, tail4, 1.0).item() == pytest.approx(expected, abs=1e-6)
    assert tail_supcon(f_id4, f_ood, y4, torch.zeros(4, dtype=torch.bool), 1.0).item() == 0.0


def _reference_tail_supcon(f1: Tensor, f2: Tensor, f_ood: Tensor, y: Tensor, tail: Tensor, t: float) -> Tensor:
    """A loop over tail anchors, built from the paper's description (contrast set: tail views + outliers)."""
    feats = torch.cat([f1[tail], f2[tail]])
    labels = torch.cat([y[tail], y[tail]])
    contrast = torch.cat([feats, f_ood])
    losses = []
    for a in range(len(feats)):
        others = [c for c in range(len(contrast)) if c != a]
        logits = torch.stack([feats[a] @ contrast[c] / t for c in others])
        log_prob = torch.log_softmax(logits, 0)
        pos = [i for i, c in enumerate(others) if c < len(feats) and labels[c] == labels[a]]
        losses.append(-log_prob[pos].mean())
    return torch.stack(losses).mean()


def test_tail_supcon_matches_a_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    f1, f2 = F.normalize(torch.randn(8, 4, generator=g), dim=1), F.normalize(torch.randn(8, 4, generator=g), dim=1)
    f_ood = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    y = torch.tensor([0, 1, 3, 4, 3, 2, 4, 4])
    tail = y >= 3
    got = tail_supcon(torch.cat([f1, f2]), f_ood, torch.cat([y, y]), torch.cat([tail, tail]), 0.5)
    assert torch.allclose(got, _reference_tail_supcon(f1, f2, f_ood, y, tail, 0.5), atol=1e-5)


def test_pascl_is_ce_oe_and_supcon_from_one_pass() -> None:
    obj, batch = _objective("pascl"), _batch()
    model = _model(obj)
    calls = _spy_forward(model)
    loss = obj(model, batch)
    assert calls == [18]  # x, x2 and x_ood in one forward
    x_all = torch.cat([batch["x"], batch["x2"], batch["x_ood"]])
    z, logits = model.forward_features_and_logits(x_all)
    y2 = torch.cat([batch["y"], batch["y"]])
    f = F.normalize(model.projection(z), dim=1)
    tail = y2 >= round(0.6 * K)
    expected = (F.cross_entropy(logits[:12], y2) + 0.5 * uniform_ce(logits[12:]).mean()
                + 0.1 * tail_supcon(f[:12], f[12:], y2, tail, 0.07))
    assert torch.allclose(loss, expected, atol=1e-5)


# ---------------------------------------------------------------- RNA


def _spy_forward(model: nn.Module) -> list[int]:
    calls: list[int] = []
    original = model.forward_features_and_logits

    def spy(x: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(x.shape[0])
        return original(x)

    model.forward_features_and_logits = spy
    return calls


def test_rna_value_is_la_plus_norm_term_on_id_rows() -> None:
    obj, batch = _objective("rna"), _batch(n=4, m=7)
    model = _model(obj)
    calls = _spy_forward(model)
    loss = obj(model, batch)
    assert calls == [11]
    z, logits = model.forward_features_and_logits(torch.cat([batch["x"], batch["x_ood"]]))
    la = F.cross_entropy(logits[:4] + log_prior(COUNTS, logits), batch["y"])
    expected = la - 0.5 * torch.log1p(model.projection(z[:4]).norm(dim=1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def _bn_rna_model(obj: Objective) -> nn.Module:
    torch.manual_seed(0)
    model = obj.wrap_model(create_model("cnn", K, (1, 8, 8), width=4, bn_affine=False))
    return model.train()


@pytest.mark.parametrize("name", ["rna", "rna_no_outliers"])
def test_rna_bn_sees_the_joint_batch_once(name: str) -> None:
    obj = _objective(name)
    model = _bn_rna_model(obj)
    g = torch.Generator().manual_seed(0)
    x, x_ood = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g) * 3 + 4
    batch = {"x": x, "x_ood": x_ood, "y": torch.randint(0, K, (8,), generator=g)}
    calls = _spy_forward(model)
    bn = model.body[0][1]
    conv = model.body[0][0]
    with torch.no_grad():
        joint_mean = conv(torch.cat([x, x_ood])).mean(dim=(0, 2, 3))
        id_mean = conv(x).mean(dim=(0, 2, 3))
    loss = obj(model, batch)
    seen = joint_mean if name == "rna" else id_mean
    assert calls == [16 if name == "rna" else 8]
    assert torch.allclose(bn.running_mean, 0.1 * seen, atol=1e-6)  # momentum 0.1 from zero
    assert not torch.allclose(bn.running_mean, 0.1 * (id_mean if name == "rna" else joint_mean), atol=1e-3)
    assert int(bn.num_batches_tracked) == 1
    loss.backward()
    for pname, p in model.projection.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_projection_objectives_need_the_wrapped_model() -> None:
    for name in ("rna", "pascl"):
        with pytest.raises(ConfigError, match="projection head"):
            _objective(name)(TinyNet(), _batch())


def test_missing_outliers_is_a_one_line_config_error() -> None:
    batch = _batch()
    del batch["x_ood"]
    for name in ("oe", "energy_oe", "oecc", "rna", "pascl", "bel"):
        obj = _objective(name)
        with pytest.raises(ConfigError, match="x_ood") as err:
            obj(_model(obj), batch)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- torch.func


@pytest.mark.parametrize("name", NAMES)
def test_runs_under_functional_call_and_grad(name: str) -> None:
    obj = _objective(name)
    model, batch = _model(obj), _batch()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return functional_call(_LossModule(obj, model), {f"model.{k}": v for k, v in p.items()}, (batch,))

    assert torch.allclose(loss_fn(params), obj(model, batch), atol=1e-6)
    grads = grad(loss_fn)(params)
    eager = torch.autograd.grad(obj(model, batch), list(model.parameters()), allow_unused=True)
    for (pname, g_func), g_eager in zip(grads.items(), eager):
        expected = torch.zeros_like(g_func) if g_eager is None else g_eager
        assert torch.allclose(g_func, expected, atol=1e-5), pname


@pytest.mark.parametrize("name", NAMES)
def test_vmaps_over_client_parameters(name: str) -> None:
    """Two "clients" with different weights in one vmapped grad call: no .item(), no value branching."""
    obj = _objective(name)
    models = [_model(obj, seed=s) for s in (0, 1)]
    batch = _batch()
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k, _ in
               models[0].named_parameters()}
    module = _LossModule(obj, models[0])

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return functional_call(module, {f"model.{k}": v for k, v in p.items()}, (batch,))

    grads = vmap(grad(loss_fn))(stacked)
    for i, m in enumerate(models):
        single = grad(loss_fn)({k: v.detach() for k, v in m.named_parameters()})
        for k in single:
            assert torch.allclose(grads[k][i], single[k], atol=1e-5), (name, k)


class _LossModule(nn.Module):
    """``objective(model, batch)`` as a module, so functional_call can swap the model's tensors."""

    def __init__(self, objective: Objective, model: nn.Module) -> None:
        super().__init__()
        self.objective = objective
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.objective(self.model, batch)


def test_module_docstrings_cite_the_spec() -> None:
    for name in NAMES:
        doc = type(_objective(name)).__doc__ or ""
        assert "spec" in doc, name
    assert "GUESS" in objectives_ood.OECC.__doc__ and "GUESS" in objectives_ood.BalancedEnergy.__doc__
