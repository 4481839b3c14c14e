"""NormFactory: the one place models get their norm layers from."""

from __future__ import annotations

import pytest
from torch import nn

from fedtrust.errors import ConfigError
from fedtrust.models.norms import NormFactory


def test_default_is_affine_batch_norm() -> None:
    layer = NormFactory()(16)
    assert isinstance(layer, nn.BatchNorm2d) and layer.affine and layer.num_features == 16
    assert layer.momentum == 0.1 and not NormFactory().conv_bias


@pytest.mark.parametrize(
    ("affine", "affine_shortcut", "main", "shortcut"),
    [(True, None, True, True), (False, None, False, False), (False, True, False, True), (True, False, True, False)],
)
def test_shortcut_affine(affine: bool, affine_shortcut: bool | None, main: bool, shortcut: bool) -> None:
    factory = NormFactory("bn", affine, affine_shortcut)
    assert factory(8).affine == main
    assert factory(8, shortcut=True).affine == shortcut
    assert (factory(8).weight is None) == (not main)


def test_none_is_identity_and_convs_get_bias() -> None:
    factory = NormFactory("none", bn_affine=False)
    assert isinstance(factory(8), nn.Identity) and isinstance(factory(8, shortcut=True), nn.Identity)
    assert factory.conv_bias


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"norm": "layernorm"}, "valid: bn, none"), ({"bn_affine": 0}, "bn_affine"), ({"bn_affine_shortcut": "no"}, "bn_affine_shortcut")],
)
def test_bad_options_are_one_line_errors(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        NormFactory(**kwargs)  # type: ignore[arg-type]
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)
