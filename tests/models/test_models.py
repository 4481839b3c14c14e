"""Every registered model: the FedModel contract, gradients, BN options, errors, seeding.

Parametrized over ``registry.names("model")``, so registering a model enrols it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedtrust.errors import ConfigError
from fedtrust.models import FedModel, create_model, model_options
from fedtrust.registry import names

MODELS = names("model")
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
NUM_CLASSES = 5
MIN_HW = {"lenet": 16}
"""Models whose smallest input exceeds the 8x8 the shared tests use: built at (1, MIN_HW, MIN_HW) there."""
BN_MODELS = [n for n in MODELS if "bn_affine" in model_options(n)]
SHORTCUT_MODELS = [n for n in MODELS if "bn_affine_shortcut" in model_options(n)]


def _small(name: str) -> tuple[int, int, int]:
    """The smallest shared test input ``name`` takes: 8x8, or its ``MIN_HW``."""
    side = max(8, MIN_HW.get(name, 8))
    return (1, side, side)


def _build(name: str, in_shape: tuple[int, int, int] | None = None, seed: int = 0, **kwargs: object) -> FedModel:
    torch.manual_seed(seed)
    return create_model(name, NUM_CLASSES, in_shape or _small(name), **kwargs)


def _one_line_config_error(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_registry_has_the_families() -> None:
    assert {"cnn", "cnn2", "lenet", "resnet18", "resnet34", "wrn", "wrn40_2", "digitnet", "preresnet18"} <= set(MODELS)


@pytest.mark.parametrize("in_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str, in_shape: tuple[int, int, int]) -> None:
    if min(in_shape[1:]) < MIN_HW.get(name, 0):  # too small for this model: a one-line error, not a crash
        with pytest.raises(ConfigError) as excinfo:
            _build(name, in_shape)
        assert f">= {MIN_HW[name]}" in _one_line_config_error(excinfo)
        return
    model = _build(name, in_shape)
    assert isinstance(model, FedModel) and isinstance(model.head, nn.Linear)
    assert model.num_classes == NUM_CLASSES and model.head.in_features == model.num_features
    x = torch.randn(2, *in_shape)
    y = torch.tensor([0, NUM_CLASSES - 1])

    model.train()
    z, logits = model.forward_features_and_logits(x)
    assert z.shape == (2, model.num_features)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.equal(logits, model.head(z))
    assert torch.isfinite(logits).all() and torch.isfinite(z).all()
    if model.nonnegative_features:
        assert (z >= 0).all()

    F.cross_entropy(logits, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"

    model.eval()
    with torch.no_grad():
        z_eval, logits_eval = model.forward_features_and_logits(x)
        assert torch.equal(model(x), logits_eval)
        assert torch.equal(model.features(x), z_eval)


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_init(name: str) -> None:
    a, b, c = _build(name, seed=7), _build(name, seed=7), _build(name, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", MODELS)
def test_reset_head(name: str) -> None:
    model = _build(name)
    model.reset_head(3)
    assert model.num_classes == 3 and model(torch.randn(2, *_small(name))).shape == (2, 3)


# ---------------------------------------------------------------- BN options


def _batch_norms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("name", BN_MODELS)
def test_bn_affine_false_removes_gamma_beta(name: str) -> None:
    bns = _batch_norms(_build(name, bn_affine=False, **({"bn_affine_shortcut": False} if name in SHORTCUT_MODELS else {})))
    assert bns
    assert all(bn.weight is None and bn.bias is None and not bn.affine for bn in bns.values())
    assert all(bn.affine for bn in _batch_norms(_build(name)).values())


@pytest.mark.parametrize("name", SHORTCUT_MODELS)
def test_rna_shortcut_exception_keeps_affine(name: str) -> None:
    """RNA (specs/rna.md §1): non-affine bn1/bn2 everywhere, affine 1x1-shortcut BNs."""
    bns = _batch_norms(_build(name, bn_affine=False, bn_affine_shortcut=True))
    shortcut = {n for n in bns if ".shortcut." in n}
    assert shortcut == {"layer2.0.shortcut.1", "layer3.0.shortcut.1", "layer4.0.shortcut.1"}
    for n, bn in bns.items():
        assert bn.affine == (n in shortcut), n
        assert (bn.weight is not None) == (n in shortcut), n
    # None means "same as bn_affine"
    assert not any(bn.affine for bn in _batch_norms(_build(name, bn_affine=False, bn_affine_shortcut=None)).values())


@pytest.mark.parametrize("name", BN_MODELS)
def test_norm_none_has_no_batch_norm(name: str) -> None:
    model = _build(name, norm="none")
    assert not _batch_norms(model)
    z, logits = model.forward_features_and_logits(torch.randn(2, 1, 8, 8))
    assert torch.isfinite(logits).all() and z.shape == (2, model.num_features)


def test_resnet18_matches_the_cifar_reference_size() -> None:
    """CIFAR ResNet-18 with 10 classes has 11,173,962 parameters (kuangliu / RNA / FedLoGe)."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model.num_features == 512


def test_cnn2_matches_mcmahan_parameter_count() -> None:
    """McMahan et al. (2017) report 1,663,370 parameters for the MNIST CNN."""
    torch.manual_seed(0)
    assert sum(p.numel() for p in create_model("cnn2", 10, (1, 28, 28)).parameters()) == 1_663_370


def test_lenet_matches_the_dba_flip_mnistnet() -> None:
    """DBA/FLIP MnistNet at 28x28, 1 channel, 10 classes: conv 1->20 (5x5) 24x24, pool 12x12, conv 20->50 (5x5)
    8x8, pool 4x4, FC 800->500, FC 500->10. Rules out "same" padding (FC 50*7*7 inputs), a missing pool, or
    a head on the flattened conv map instead of on FC 500."""
    conv1 = 1 * 20 * 5 * 5 + 20
    conv2 = 20 * 50 * 5 * 5 + 50
    fc = (50 * 4 * 4) * 500 + 500
    head = 500 * 10 + 10
    assert conv1 + conv2 + fc + head == 431_080
    torch.manual_seed(0)
    model = create_model("lenet", 10, (1, 28, 28))
    assert sum(p.numel() for p in model.parameters()) == conv1 + conv2 + fc + head
    assert model.num_features == 500 and model.head.in_features == 500
    x = torch.rand(3, 1, 28, 28)
    z, logits = model.forward_features_and_logits(x)
    assert z.shape == (3, 500) and logits.shape == (3, 10)
    assert torch.equal(model(x), logits)  # logits, not log-probabilities: they do not log-sum-exp to 0
    assert not torch.allclose(torch.logsumexp(logits, dim=1), torch.zeros(3), atol=1e-3)


def test_lenet_on_cifar_sized_colour_images() -> None:
    """3x32x32: 28x28 after conv1, 14, 10, 5, so FC 50*5*5 = 1250 inputs (not the 28x28 800)."""
    torch.manual_seed(0)
    model = create_model("lenet", 10, (3, 32, 32))
    assert model.body[0].in_channels == 3
    fc = [m for m in model.body if isinstance(m, nn.Linear)]
    assert len(fc) == 1 and fc[0].in_features == 50 * 5 * 5 and fc[0].out_features == 500
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_lenet_rejects_8x8_digits_in_one_line() -> None:
    with pytest.raises(ConfigError) as excinfo:
        create_model("lenet", 10, (1, 8, 8))
    message = _one_line_config_error(excinfo)
    assert "lenet" in message and "H, W >= 16" in message and "(1, 8, 8)" in message


def test_cnn_width_and_wrn_widen_set_num_features() -> None:
    assert _build("cnn", width=8).num_features == 32
    assert _build("wrn", depth=10, widen_factor=2).num_features == 128
    assert _build("wrn40_2").num_features == 128


def test_none_options_keep_defaults() -> None:
    a = _build("cnn", width=None, norm=None, bn_affine=None)
    b = _build("cnn")
    assert a.num_features == b.num_features
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


# -------------------------------------------------------------------- errors


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError) as excinfo:
        create_model("resnet19", 10, (3, 32, 32))
    message = _one_line_config_error(excinfo)
    assert "resnet19" in message and "resnet18" in message


@pytest.mark.parametrize("name", MODELS)
def test_unknown_option(name: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        create_model(name, 10, (3, 32, 32), not_an_option=1)
    message = _one_line_config_error(excinfo)
    assert "not_an_option" in message and name in message


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("cnn", {"width": 0}, "width"),
        ("cnn", {"width": 2.5}, "width"),
        ("cnn", {"norm": "gn"}, "norm"),
        ("cnn", {"bn_affine": "yes"}, "bn_affine"),
        ("resnet18", {"bn_affine_shortcut": 1}, "bn_affine_shortcut"),
        ("wrn", {"depth": 15}, "6n + 4"),
        ("wrn", {"widen_factor": 0}, "widen_factor"),
        ("wrn", {"dropout": 1.5}, "dropout"),
        ("wrn40_2", {"depth": 16}, "depth"),
        ("cnn2", {"hidden": -1}, "hidden"),
        ("cnn", {"width_ratio": 0}, "width_ratio"),
        ("digitnet", {"width_ratio": 1.5}, "width_ratio"),
        ("preresnet18", {"width_ratio": -0.25}, "width_ratio"),
        ("digitnet", {"width_ratio": True}, "width_ratio"),
        ("digitnet", {"norm": "gn"}, "norm"),
        ("preresnet18", {"norm": "layernorm"}, "norm"),
        ("digitnet", {"rescale_init": "yes"}, "rescale_init"),
        ("preresnet18", {"rescale_layer": 1}, "rescale_layer"),
        ("cnn", {"width_ratio": 0.5, "rescale_layer": True}, "rescale_layer"),  # tracked BN (spec §2)
    ],
)
def test_bad_option_value(name: str, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        create_model(name, 10, (1, 8, 8), **kwargs)
    message = _one_line_config_error(excinfo)
    assert needle in message and name in message


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_shape", [(1, 2, 2), (3, 32), (0, 8, 8), "3x32x32", (3, 32.0, 32)], ids=str)
def test_bad_input_shape(name: str, in_shape: object) -> None:
    with pytest.raises(ConfigError) as excinfo:
        create_model(name, 10, in_shape)  # type: ignore[arg-type]
    message = _one_line_config_error(excinfo)
    assert name in message and "H, W" in message


@pytest.mark.parametrize("num_classes", [0, -3, 2.0, True])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ConfigError) as excinfo:
        create_model("cnn", num_classes, (1, 8, 8))  # type: ignore[arg-type]
    assert "num_classes" in _one_line_config_error(excinfo)


@pytest.mark.parametrize(("name", "min_hw"), [("resnet18", 8), ("wrn", 8), ("cnn", 4), ("cnn2", 4), ("lenet", 16),
                                                ("convnet5", 4), ("sigmoid_mlp", 4), ("digitnet", 4),
                                                ("preresnet18", 8)])
def test_smallest_input(name: str, min_hw: int) -> None:
    _build(name, (2, min_hw, min_hw))
    with pytest.raises(ConfigError) as excinfo:
        _build(name, (2, min_hw - 1, min_hw))
    assert f">= {min_hw}" in _one_line_config_error(excinfo)
