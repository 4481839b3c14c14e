"""The leakage-audit models (models/sigmoid.py): ConvNet5 and the sigmoid MLP, their init schemes, a real run.

The registry-wide contract (forward/backward, seeding, bad options, bad shapes) is enrolled automatically in
tests/models/test_models.py; here is what is specific to these nets (spec i2f.md §3, §5, §6, §7.8).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fedtrust
from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.models.sigmoid import ConvNet5

pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, in_shape=(1, 8, 8), seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, 10, in_shape, **options)


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize(("in_shape", "num_features"), [((1, 8, 8), 12 * 2 * 2), ((1, 28, 28), 588),
                                                        ((3, 32, 32), 768)])
def test_convnet5_shapes_match_the_spec(in_shape, num_features: int) -> None:
    """Spec §3: 4 conv5x5, 12 channels, pad 2, strides 2, 2, 1, 1, sigmoid after each, Linear 588->10 at MNIST
    28x28 (28 -> 14 -> 7 -> 7 -> 7) and 768->10 at CIFAR 32x32; 8x8 -> 4 -> 2 -> 2 -> 2. The MNIST net has
    312 + 3·3612 + 5890 = 17,038 parameters. Rules out a missing stride, valid padding or a pooling layer."""
    model = build("convnet5", in_shape)
    assert isinstance(model, ConvNet5) and model.num_features == num_features
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1), (1, 1)]
    assert all(c.kernel_size == (5, 5) and c.padding == (2, 2) and c.out_channels == 12 for c in convs)
    assert sum(isinstance(m, nn.Sigmoid) for m in model.body) == 4
    z, logits = model.forward_features_and_logits(torch.randn(2, *in_shape))
    assert z.shape == (2, num_features) and logits.shape == (2, 10) and (z > 0).all()
    if in_shape == (1, 28, 28):
        assert sum(p.numel() for p in model.parameters()) == 312 + 3 * 3612 + 5890


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28)])
def test_sigmoid_mlp_shapes_and_hidden(in_shape) -> None:
    """Spec §6: 64 -> 32 -> 10 on digits by default; ``hidden`` takes an int or a list (as YAML gives it)."""
    c, h, w = in_shape
    model = build("sigmoid_mlp", in_shape)
    linears = layers(model)
    assert [(m.in_features, m.out_features) for m in linears] == [(c * h * w, 32), (32, 10)]
    deep = build("sigmoid_mlp", in_shape, hidden=[20, 7])
    assert [(m.in_features, m.out_features) for m in layers(deep)] == [(c * h * w, 20), (20, 7), (7, 10)]
    assert build("sigmoid_mlp", in_shape, hidden=5).num_features == 5
    z, logits = deep.forward_features_and_logits(torch.randn(3, *in_shape))
    assert z.shape == (3, 7) and logits.shape == (3, 10) and (z > 0).all()


@pytest.mark.parametrize("name", ["convnet5", "sigmoid_mlp"])
def test_uniform_init_draws_weights_and_biases_in_half_unit_box(name: str) -> None:
    """``init=uniform`` (the default, spec §3): every weight and bias, head included, in [-0.5, 0.5] and filling it
    (max |w| > 0.49 per weight tensor, pooled std ≈ 1/√12 within 5%). Rules out PyTorch's default init (bounds
    1/√fan_in: 0.2 at most here for weights) and biases left at the default."""
    model = build(name, hidden=[256]) if name == "sigmoid_mlp" else build(name, (1, 28, 28))
    for m in layers(model):
        assert m.weight.abs().max() <= 0.5 and m.bias.abs().max() <= 0.5
        assert m.weight.abs().max() > 0.49
    biases = torch.cat([m.bias.reshape(-1) for m in layers(model)])
    assert biases.abs().max() > 0.45
    pooled = torch.cat([p.reshape(-1) for p in model.parameters()])
    assert abs(pooled.std().item() * math.sqrt(12) - 1) < 0.05


def test_normal_init_draws_biases_too() -> None:
    """``init=normal``: weights AND biases N(0, std 0.5) — the I2F code's ``normal_init`` left biases at their
    default (spec §7.8). Checked on 522 biases and 17k weights of an MLP: stds within 10% and 3% of 0.5."""
    model = build("sigmoid_mlp", hidden=[256, 256], init="normal")
    biases = torch.cat([m.bias for m in layers(model)])
    weights = torch.cat([m.weight.reshape(-1) for m in layers(model)])
    assert abs(biases.std().item() / 0.5 - 1) < 0.1
    assert abs(weights.std().item() / 0.5 - 1) < 0.03 and weights.abs().max() > 1.5


@pytest.mark.parametrize("name", ["convnet5", "sigmoid_mlp"])
def test_kaiming_and_xavier_use_their_uniform_bounds_and_zero_biases(name: str) -> None:
    """``kaiming``: U(±√(3/fan_in)) (sigmoid gain 1); ``xavier``: U(±√(6/(fan_in+fan_out))); biases 0 (a GUESS,
    documented). Each weight tensor stays inside its bound and reaches 80% of it. Rules out the two swapped
    (their bounds differ for every layer here), the ReLU gain √2, and the default a=√5 kaiming (bound 1/√fan_in)."""
    for init in ("kaiming", "xavier"):
        model = build(name, (1, 28, 28), init=init)
        for m in layers(model):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = math.sqrt(3 / fan_in) if init == "kaiming" else math.sqrt(6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound, (init, m)
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_reset_head_keeps_the_init_scheme() -> None:
    """A new head (FedModel.reset_head) is drawn by the model's scheme, not PyTorch's default."""
    model = build("convnet5", init="uniform")
    model.reset_head(3)
    assert model.head.out_features == 3 and model.head.bias.abs().max() > 1 / math.sqrt(model.num_features)


def test_bad_init_and_hidden_are_one_line_errors() -> None:
    for options, needle in (({"init": "orthogonal"}, "init"), ({"hidden": []}, "hidden"), ({"hidden": [4, 0]}, "hidden")):
        with pytest.raises(ConfigError) as excinfo:
            build("sigmoid_mlp", **options)
        assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)
    with pytest.raises(ConfigError, match="init"):
        build("convnet5", init="he")


@pytest.mark.parametrize(("name", "option"), [("convnet5", "model.init=xavier"), ("sigmoid_mlp", "model.hidden=[16]")])
def test_two_round_fedtrust_run_on_digits(tmp_path, name: str, option: str) -> None:
    """``model.name=convnet5`` / ``sigmoid_mlp`` with their options go through the config and train: 2 FedAvg
    rounds on digits end with finite losses and server weights that moved a little from the seeded init (the
    run builds the model after ``torch.manual_seed(seed)``)."""
    from safetensors.torch import load_file

    from fedtrust.runner.checkpoint import CHECKPOINT_NAME

    result = fedtrust.run(None, [f"model.name={name}", option, "rounds=2", "data.num_clients=4",
                                 "data.clients_per_round=2", "train.steps=2", "eval.personalized=false",
                                 f"out={tmp_path}"], progress=False, report=False)
    summary = result.summary
    assert summary["rounds"] == 2 and math.isfinite(summary["train_loss"]) and math.isfinite(summary["test_loss"])
    saved = {k.split("/", 1)[1]: v for k, v in load_file(str(result.run_dir / CHECKPOINT_NAME)).items()
             if k.startswith("server/")}
    init = build(name, **({"init": "xavier"} if name == "convnet5" else {"hidden": [16]})).state_dict()
    weights = {k.split("/", 1)[1]: v for k, v in saved.items() if k.split("/", 1)[1] in init}
    assert weights.keys() == init.keys()
    assert all(torch.isfinite(v).all() for v in weights.values())
    moved = {k: (weights[k] - init[k]).abs().max().item() for k in init}
    assert max(moved.values()) < 0.1  # trained from this very init (measured: <= 0.03), not from a fresh draw
    assert moved["head.weight"] > 1e-3 and moved["head.bias"] > 1e-3  # and trained (measured: >= 0.016)
