"""Width-scaled base nets, rescale tricks and the mixed model (spec splitmix.md §2; models/width.py,
digitnet.py, preresnet.py, ensemble.py).

References: parameter counts are hand arithmetic of the architectures written out below; the rescale
tricks are checked against their definitions (divide by r before the norm in training only; kaiming-uniform
with fan_in / r); the mixed model against the mean of its bases' logits computed one base at a time.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.models.ensemble import MixedModel
from fedtrust.models.width import scaled

SCALABLE = [("cnn", (1, 8, 8)), ("digitnet", (3, 28, 28)), ("preresnet18", (3, 16, 16))]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(name: str, shape: tuple[int, int, int], seed: int = 0, num_classes: int = 10, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes, shape, **kw)


# ------------------------------------------------------------ parameter counts


def test_scaled_is_ceil_at_least_one() -> None:
    """ceil, not int() (HeteroFL's floor): 30/8 keeps 4 channels; never 0; no float fuzz (0.1 * 30 = 3)."""
    assert [scaled(30, 1 / 8), scaled(60, 1 / 8), scaled(3, 1 / 8), scaled(30, 0.1), scaled(64, 1.0)] == [4, 8, 1, 3, 64]


def test_cnn_at_one_eighth_matches_hand_arithmetic() -> None:
    """cnn(width=30) at r=1/8 on 3x32x32, 10 classes: widths ceil(30/8, 60/8, 120/8) = 4, 8, 15; conv3x3
    without bias before BN (2 affine parameters per channel); input channels 3 and 10 logits unscaled.
    Rules out floor widths (3, 7, 15), a scaled input conv or a scaled head output."""
    conv1 = 3 * 4 * 9 + 2 * 4
    conv2 = 4 * 8 * 9 + 2 * 8
    conv3 = 8 * 15 * 9 + 2 * 15
    head = 15 * 10 + 10
    model = _build("cnn", (3, 32, 32), width=30, width_ratio=1 / 8)
    assert _params(model) == conv1 + conv2 + conv3 + head == 1690
    assert model.num_features == 15 and model.body[0][0].in_channels == 3 and model.num_classes == 10


def _digit_params(c: int, h: int, w: int, k: tuple[int, int, int], f: tuple[int, int], classes: int = 10) -> int:
    """DigitModel: conv5x5 with bias + BN(2 per channel) x3, FC with bias + BN1d x2, head with bias."""
    k1, k2, k3 = k
    f1, f2 = f
    convs = (c * k1 * 25 + k1 + 2 * k1) + (k1 * k2 * 25 + k2 + 2 * k2) + (k2 * k3 * 25 + k3 + 2 * k3)
    fcs = (k3 * (h // 4) * (w // 4) * f1 + f1 + 2 * f1) + (f1 * f2 + f2 + 2 * f2)
    return convs + fcs + f2 * classes + classes


def test_digitnet_parameter_counts_match_hand_arithmetic() -> None:
    """Full DigitModel on 3x28x28: 14,219,210 parameters (spec §2 "14.2M"); base net r=1/8 (widths 8, 8, 16,
    FC 256, 64): 224,194 (spec "about 224k"); 8x8 digits with one channel: FC 128*2*2 inputs."""
    assert _digit_params(3, 28, 28, (64, 64, 128), (2048, 512)) == 14_219_210
    assert _digit_params(3, 28, 28, (8, 8, 16), (256, 64)) == 224_194
    assert _params(_build("digitnet", (3, 28, 28))) == 14_219_210
    base = _build("digitnet", (3, 28, 28), width_ratio=1 / 8)
    assert _params(base) == 224_194
    assert (base.conv1.in_channels, base.fc1.in_features, base.num_features) == (3, 16 * 7 * 7, 64)
    small = _build("digitnet", (1, 8, 8), width_ratio=1 / 4)
    assert _params(small) == _digit_params(1, 8, 8, (16, 16, 32), (512, 128))
    assert small.fc1.in_features == 32 * 2 * 2
    assert small(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_eight_digit_bases_are_an_eighth_of_the_full_net() -> None:
    """Spec §2: K = 1/r = 8 base nets together have 0.126 of the full DigitModel's parameters (1/63 each).
    Rules out scaling only the convs (then the FC-dominated ratio is far from 1/8) or r^2 per base."""
    full = _params(_build("digitnet", (3, 28, 28)))
    base = _params(_build("digitnet", (3, 28, 28), width_ratio=1 / 8))
    assert round(8 * base / full, 3) == 0.126
    assert round(full / base) == 63


def test_preresnet18_parameter_count_matches_hand_arithmetic() -> None:
    """HeteroFL pre-act ResNet-18 on 3x32x32: stem conv 3->64 (no norm after it); per stage two blocks of
    [BN(c_in), conv3x3 c_in->c, BN(c), conv3x3 c->c], a bias-free 1x1 shortcut where the width changes (no
    shortcut BN); final BN(512); head. 11,172,170 (HeteroFL's 11.2M); at r=1/8 the widths are 8..64."""

    def count(widths: list[int], c: int = 3, classes: int = 10) -> int:
        total, c_in = c * widths[0] * 9, widths[0]
        for w in widths:
            for _ in range(2):
                total += 2 * c_in + c_in * w * 9 + 2 * w + w * w * 9 + (c_in * w if c_in != w else 0)
                c_in = w
        return total + 2 * c_in + c_in * classes + classes

    assert count([64, 128, 256, 512]) == 11_172_170
    assert _params(_build("preresnet18", (3, 32, 32))) == 11_172_170
    assert _params(_build("preresnet18", (3, 32, 32), width_ratio=1 / 8)) == count([8, 16, 32, 64])


@pytest.mark.parametrize(("name", "shape"), SCALABLE)
def test_width_ratio_one_is_the_default_model(name: str, shape: tuple[int, int, int]) -> None:
    """width_ratio=1 (with the rescale flags at r=1, which do nothing and draw nothing) is bit-identical."""
    a = _build(name, shape).state_dict()
    b = _build(name, shape, width_ratio=1.0, rescale_init=True, norm="bn_static", rescale_layer=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------ rescale_layer


def _norm_inputs(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Inputs of every norm layer (in call order), z and the logits."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    z, logits = model.forward_features_and_logits(x)
    for h in hooks:
        h.remove()
    return seen, z.detach(), logits.detach()


@pytest.mark.parametrize(("name", "shape"), SCALABLE)
def test_rescale_layer_divides_hidden_outputs_by_r_in_training_only(name: str, shape: tuple[int, int, int]) -> None:
    """Spec §2 rescale_layer, r = 1/4, batch-stat BN, float64. Training mode: the first norm's input is exactly
    1/r times the plain model's, and every norm's input about 1/r times (every hidden conv/FC feeding a norm is
    scaled, residual sums included); the head is not scaled (logits equal up to BN's eps). Eval mode: outputs
    identical. Rules out a scaler that also runs in eval, multiplies by r, misses a layer, or hits the head.
    BN's eps is set to 1e-12 so that BN is scale-invariant to float64 precision."""
    r = 0.25
    plain = _build(name, shape, width_ratio=r, norm="bn_static").double()
    scaled_ = _build(name, shape, width_ratio=r, norm="bn_static", rescale_layer=True).double()
    for m in [*plain.modules(), *scaled_.modules()]:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-12
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), scaled_.state_dict().values()))
    x = torch.randn(6, *shape, dtype=torch.float64)
    plain.train(), scaled_.train()
    ins_p, z_p, logits_p = _norm_inputs(plain, x)
    ins_s, z_s, logits_s = _norm_inputs(scaled_, x)
    assert len(ins_p) == len(ins_s) > 0
    assert torch.equal(ins_s[0], ins_p[0] / r)
    for a, b in zip(ins_s, ins_p):
        torch.testing.assert_close(a * r, b, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(logits_s, logits_p, rtol=1e-6, atol=1e-9)
    plain.eval(), scaled_.eval()
    assert torch.equal(scaled_(x), plain(x))


# ------------------------------------------------------------ rescale_init


def _fan_in(m: nn.Module) -> int:
    return m.weight[0].numel()


@pytest.mark.parametrize(("name", "shape", "first"), [("cnn", (3, 32, 32), "body.0.0"), ("digitnet", (3, 28, 28), "conv1"),
                                                       ("preresnet18", (3, 32, 32), "stem")])
def test_rescale_init_uses_the_full_width_fan_in(name: str, shape: tuple[int, int, int], first: str) -> None:
    """Spec §2 rescale_init at r = 1/8: every conv/linear but the input conv (the head included) is
    U(±b) with b = 1/sqrt(fan_in / r) (kaiming-uniform, a=sqrt(5), full-width fan-in), so its std is
    b/sqrt(3); the input conv keeps PyTorch's b = 1/sqrt(fan_in). Statistical bound: the sample std of n
    uniform draws has relative standard error sqrt(0.2/n); we allow 6 of them (plus the sample max within
    [0.9 b, b] for layers of >= 1000 weights). The wrong fan-in (fan_in, not fan_in/r) is off by sqrt(8) = 2.8x."""
    r = 1 / 8
    model = _build(name, shape, width_ratio=r, rescale_init=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert first in layers and "head" in layers
    for n, m in layers.items():
        fan = _fan_in(m) if n == first else _fan_in(m) / r
        bound = 1 / math.sqrt(fan)
        w = m.weight.detach().flatten()
        rel = 6 * math.sqrt(0.2 / w.numel())
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < rel, n
        assert w.abs().max() <= bound, n
        if w.numel() >= 1000:
            assert w.abs().max() >= 0.9 * bound, n
        if m.bias is not None and not (name == "preresnet18" and n == "head"):
            assert m.bias.abs().max() <= bound, n
    if name == "preresnet18":  # HeteroFL's init_param: zero head bias
        assert torch.equal(model.head.bias, torch.zeros(10))


# ------------------------------------------------------------ bn_static in models


@pytest.mark.parametrize(("name", "shape"), SCALABLE)
def test_bn_static_models_are_the_same_in_train_and_eval_mode(name: str, shape: tuple[int, int, int]) -> None:
    """Spec §2 --no_track_stat: with bn_static a model's eval output on a batch equals its training output, and
    it has no BN buffers. Rules out a model that builds its norms without the factory (then eval differs)."""
    model = _build(name, shape, width_ratio=0.25, norm="bn_static")
    assert not list(model.buffers())
    x = torch.randn(5, *shape)
    with torch.no_grad():
        train_out = model.train()(x)
        torch.testing.assert_close(model.eval()(x), train_out, rtol=0, atol=0)
    tracked = _build(name, shape, width_ratio=0.25)
    with torch.no_grad():
        assert not torch.allclose(tracked.eval()(x), tracked.train()(x), atol=1e-4)


# ------------------------------------------------------------ mixed model


def _bases(n: int, name: str = "digitnet", shape: tuple[int, int, int] = (1, 8, 8)) -> list[nn.Module]:
    return [_build(name, shape, seed=i, num_classes=4, width_ratio=1 / 8, norm="bn_static") for i in range(n)]


def test_mixed_model_is_the_mean_of_its_bases_logits() -> None:
    """Spec §2: the mixed model's logits are the mean of its bases' logits (not the sum, not the mean of
    softmaxes); features are the bases' z concatenated; head(features(x)) is the forward."""
    bases = _bases(3)
    mixed = MixedModel(bases)
    x = torch.rand(6, 1, 8, 8)
    expected = (bases[0](x) + bases[1](x) + bases[2](x)) / 3
    torch.testing.assert_close(mixed(x), expected)
    z, logits = mixed.forward_features_and_logits(x)
    torch.testing.assert_close(z, torch.cat([b.features(x) for b in bases], dim=1))
    torch.testing.assert_close(logits, expected)
    assert mixed.num_features == 3 * bases[0].num_features == mixed.head.in_features
    assert mixed.num_classes == 4 and mixed.in_shape == (1, 8, 8) and mixed.nonnegative_features
    assert sum(p.numel() for p in mixed.parameters()) == 3 * _params(bases[0])
    assert set(mixed.state_dict()) == {f"bases.{i}.{k}" for i in range(3) for k in bases[0].state_dict()}


def test_mixed_model_trains_every_base_and_resets_heads() -> None:
    bases = _bases(2)
    mixed = MixedModel(bases)
    F.cross_entropy(mixed(torch.rand(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixed.parameters())
    mixed.reset_head(7)
    assert mixed.num_classes == 7 and all(b.num_classes == 7 for b in bases)
    assert mixed(torch.rand(2, 1, 8, 8)).shape == (2, 7)


def test_mixed_model_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="at least one base"):
        MixedModel([])
    with pytest.raises(ConfigError, match="base 1") as excinfo:
        MixedModel([_build("digitnet", (1, 8, 8)), _build("digitnet", (1, 28, 28))])
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ConfigError, match="not a FedModel"):
        MixedModel([nn.Linear(2, 2)])  # type: ignore[list-item]
