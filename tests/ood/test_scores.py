"""OOD scores (fedtrust.ood.scores): "higher = more ID", hand-computed values, one eval-mode pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.ood import scores
from fedtrust.ood.scores import compute_scores, energy, forward_in_batches, maxlogit, msp, representation_norm
from fedtrust.registry import names

ALL = ["energy", "maxlogit", "msp", "rn"]


def test_registry_holds_the_four_scores() -> None:
    assert set(ALL) <= set(names("score"))
    for name in ALL:
        assert "higher = more id" in scores.get_score(name).__doc__.lower()


def test_unknown_score_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown score 'enrgy'.*did you mean energy") as err:
        scores.get_score("enrgy")
    assert "\n" not in str(err.value)


def test_confident_sample_scores_higher_than_a_flat_one() -> None:
    logits = torch.tensor([[8.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    for name in ALL:
        s = scores.get_score(name)(logits, z)
        assert s.shape == (2,) and s[0] > s[1], name


def test_hand_computed_values() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert msp(logits).item() == pytest.approx(0.75)
    assert maxlogit(logits).item() == pytest.approx(math.log(3.0))
    assert energy(logits).item() == pytest.approx(math.log(4.0))  # logsumexp(0, log 3) = log(1 + 3)
    assert energy(logits, temperature=2.0).item() == pytest.approx(2 * math.log(1 + math.sqrt(3.0)))
    z = torch.tensor([[3.0, 4.0, 0.0]])
    assert representation_norm(None, z).item() == pytest.approx(5.0)


def test_energy_uses_logits_not_probabilities() -> None:
    """The RNA repo's get_energy_scores applies logsumexp to softmax outputs (spec §5): not ours."""
    logits = torch.tensor([[5.0, 1.0, -2.0]])
    buggy = torch.logsumexp(torch.softmax(logits, 1), 1)
    assert not torch.allclose(energy(logits), buggy)
    assert torch.allclose(energy(logits), torch.logsumexp(logits, 1))


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("cnn", 4, (1, 8, 8), width=4, bn_affine=False)
    model.train()
    with torch.no_grad():  # give BN non-trivial running statistics
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8) * 2 + 1)
    return model


def _norm(x: Tensor) -> Tensor:
    return x.float() / 255.0 - 0.5


def test_compute_scores_is_one_eval_pass_per_batch_and_restores_mode() -> None:
    model = _bn_model()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    calls: list[bool] = []
    original = model.forward_features_and_logits

    def spy(x: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(model.training)
        return original(x)

    model.forward_features_and_logits = spy  # type: ignore[method-assign]
    got = compute_scores(model, images, _norm, batch_size=4, names=["msp", "energy", "rn", "maxlogit"])
    assert calls == [False, False, False]  # ceil(10 / 4) batches, all in eval mode, none per score
    assert model.training

    model.eval()
    with torch.no_grad():
        z, logits = original(_norm(images))
    assert torch.allclose(got["rn"], z.norm(dim=1), atol=1e-5)
    assert torch.allclose(got["msp"], torch.softmax(logits, 1).amax(1), atol=1e-6)
    assert torch.allclose(got["energy"], torch.logsumexp(logits, 1), atol=1e-5)
    assert torch.allclose(got["maxlogit"], logits.amax(1), atol=1e-5)


def test_compute_scores_passes_per_score_params_and_checks_names_first() -> None:
    model = _bn_model()
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    z, logits = forward_in_batches(model, images, _norm, batch_size=2)
    got = compute_scores(model, images, _norm, 3, ["energy"], energy={"temperature": 3.0})
    assert torch.allclose(got["energy"], 3.0 * torch.logsumexp(logits / 3.0, 1), atol=1e-5)
    with pytest.raises(ConfigError):
        compute_scores(model, images, _norm, 3, ["msp", "nope"])
