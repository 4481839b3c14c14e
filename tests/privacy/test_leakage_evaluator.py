"""The ``leakage`` evaluator and its probes (fedtrust.privacy.probe): I_lb of fixed test samples, every evaluation.

References: the probe order worked by hand, λmax and ‖Jδ‖ from the explicit J (``eigvalsh``), and the
evaluator's numbers re-derived from its own per-probe fields in a real 2-round run on bundled digits.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import fedtrust
from fedtrust.data.datasets import load_digits
from fedtrust.evaluation.evaluators import Leakage
from fedtrust.evaluation.setup import EvalSetup
from fedtrust.privacy import DenseJacobian, GradientMap
from fedtrust.privacy.probe import batch_risk, probe_indices, probe_risk
from fedtrust.runner.rundir import read_metrics

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]


def test_probe_indices_take_each_class_in_turn() -> None:
    """First sample of class 0, 1, 2, then each class's second, ...; stops at n or when the set runs out."""
    labels = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    assert probe_indices(labels, 4) == [1, 3, 0, 2]
    assert probe_indices(labels, 2) == [1, 3]
    assert probe_indices(labels, 20) == [1, 3, 0, 2, 5, 4, 6]


def test_batch_risk_matches_the_explicit_jacobian(make_net, digits, float64) -> None:
    """λmax = eigvalsh(JJᵀ)[-1], ‖Jδ‖ from the dense J, I_lb = ‖Jδ‖/λmax; a given δ is used as is, a float σ
    draws σ·ξ (twice the σ with the same generator state: exactly twice the δ, so twice the I_lb)."""
    model = make_net("spec_cnn")
    x, y = digits.x[:1], digits.y[:1]
    J = DenseJacobian.from_map(GradientMap(model, x, y)).matrix
    lam = torch.linalg.eigvalsh(J @ J.T)[-1].item()
    delta = 1e-3 * torch.randn(J.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lb, got_lam, jd, g0 = batch_risk(model, x, y, delta, generator=torch.Generator().manual_seed(0), tol=1e-9)
    assert abs(got_lam - lam) <= 1e-6 * lam
    assert jd == pytest.approx((J @ delta).norm().item(), rel=1e-6)
    assert lb == pytest.approx((J @ delta).norm().item() / lam, rel=1e-6)
    assert torch.allclose(g0, GradientMap(model, x, y).grad())
    one = batch_risk(model, x, y, 1e-3, generator=torch.Generator().manual_seed(5))[0]
    two = batch_risk(model, x, y, 2e-3, generator=torch.Generator().manual_seed(5))[0]
    assert two == pytest.approx(2 * one, rel=1e-9)


def test_probe_risk_is_seeded_per_index_and_leaves_the_model_as_it_was(make_net, digits, float64) -> None:
    """A probe's ξ depends on its index only: probing [a, b] or [b] alone gives b the same I_lb; the model's
    mode and weights are untouched; different probes get different draws."""
    model = make_net("spec_cnn").train()
    before = [p.clone() for p in model.parameters()]
    both = probe_risk(model, digits.x[:2], digits.y[:2], 1e-3, indices=[7, 9])
    alone = probe_risk(model, digits.x[1:2], digits.y[1:2], 1e-3, indices=[9])
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert [r.index for r in both] == [7, 9] and [r.label for r in both] == digits.y[:2].tolist()
    assert alone[0].i2f_lb == pytest.approx(both[1].i2f_lb, rel=1e-9)
    for r in both:
        assert r.i2f_lb == pytest.approx(r.jdelta / r.lambda_max, rel=1e-12)
        assert r.i2f_lb > 0 and r.grad_norm > 0
    other_seed = probe_risk(model, digits.x[1:2], digits.y[1:2], 1e-3, indices=[9], seed=1)
    assert other_seed[0].i2f_lb != pytest.approx(alone[0].i2f_lb, rel=1e-6)


def _setup(probes: int = 3) -> EvalSetup:
    ds = load_digits()
    mean, std = ds.mean[0], ds.std[0]
    return EvalSetup(test=ds.test, normalize=lambda x: (x.float() / 255 - mean) / std, groups={}, hmt={},
                     local_test=None, metrics=("leakage",), leakage_probes=probes, leakage_sigma=1e-3)


def test_evaluator_probes_the_first_sample_of_each_class(make_net) -> None:
    """On the digits test set with 3 probes: the first test image of classes 0, 1, 2; its numbers are the
    probe_risk of those images, summarized (mean, min, mean λmax)."""
    model = make_net("convnet5").float()
    setup = _setup(3)
    out = Leakage().test_metrics("global", model, torch.empty(0), setup, None)["leakage"]
    want_idx = [int(torch.nonzero(setup.test.y == c)[0]) for c in range(3)]
    assert [p["index"] for p in out["probes"]] == want_idx
    assert [p["label"] for p in out["probes"]] == [0, 1, 2]
    values = [p["i2f_lb"] for p in out["probes"]]
    assert out["i2f_lb"] == pytest.approx(sum(values) / 3)
    assert out["i2f_lb_min"] == min(values)
    assert out["lambda_max"] == pytest.approx(sum(p["lambda_max"] for p in out["probes"]) / 3)
    assert out["sigma"] == 1e-3
    direct = probe_risk(model, setup.normalize(setup.test.x[want_idx]), setup.test.y[want_idx], 1e-3,
                        indices=want_idx)
    assert values == pytest.approx([r.i2f_lb for r in direct], rel=1e-9)


def test_evaluator_reports_null_for_non_finite_weights(make_net) -> None:
    model = make_net("convnet5").float()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    assert Leakage().test_metrics("global", model, torch.empty(0), _setup(), None) == {"leakage": None}


@pytest.mark.slow
def test_leakage_is_charted_every_round_and_reproducible(tmp_path: Path) -> None:
    """A 2-round FedAvg run of the sigmoid ConvNet5 with eval.metrics=[accuracy, leakage]: every evaluation
    logs the same probes, I_lb moves with the model (training changes J), and a second run with the same
    seed logs identical numbers."""
    args = ["model.name=convnet5", "rounds=2", "data.num_clients=4", "data.clients_per_round=2", "train.steps=5",
            "eval.every=1", "eval.personalized=false", "eval.metrics=[accuracy,leakage]", "eval.leakage_probes=2"]
    logs = []
    for name in ("a", "b"):
        run_dir = fedtrust.run(None, [*args, f"out={tmp_path / name}"], progress=False, report=False).run_dir
        logs.append([r for r in read_metrics(run_dir) if "leakage" in r])
    a, b = logs
    assert [r["round"] for r in a] == [1, 2]
    assert [p["index"] for p in a[0]["leakage"]["probes"]] == [p["index"] for p in a[1]["leakage"]["probes"]]
    assert a[0]["leakage"]["i2f_lb"] != a[1]["leakage"]["i2f_lb"]
    for r in a:
        assert math.isfinite(r["leakage"]["i2f_lb"]) and r["leakage"]["i2f_lb"] > 0
        assert "test_acc" in r
    strip = [[{k: v for k, v in p.items() if k != "seconds"} for p in r["leakage"]["probes"]] for r in a + b]
    assert strip[:2] == strip[2:]
