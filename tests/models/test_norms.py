"""NormFactory: the one place models get their norm layers from."""

from __future__ import annotations

import pytest
import torch
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
    [({"norm": "layernorm"}, "valid: bn, bn_static, dual_bn"), ({"bn_affine": 0}, "bn_affine"), ({"bn_affine_shortcut": "no"}, "bn_affine_shortcut")],
)
def test_bad_options_are_one_line_errors(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        NormFactory(**kwargs)  # type: ignore[arg-type]
    assert needle in str(excinfo.value) and "\n" not in str(excinfo.value)


@pytest.mark.parametrize(("dims", "cls"), [(2, nn.BatchNorm2d), (1, nn.BatchNorm1d)])
@pytest.mark.parametrize("kind", ["bn", "bn_static"])
def test_dims_select_the_batch_norm(kind: str, dims: int, cls: type) -> None:
    """dims=1 (after a hidden FC, DigitModel's bn4/bn5) is BatchNorm1d, dims=2 BatchNorm2d; rules out a
    1-D norm built as 2-D (which rejects (B, C) inputs)."""
    layer = NormFactory(kind, bn_affine=False)(6, dims=dims)
    assert type(layer) is cls and layer.num_features == 6 and not layer.affine
    assert isinstance(NormFactory("none")(6, dims=dims), nn.Identity)
    with pytest.raises(ConfigError, match="dims must be 1"):
        NormFactory(kind)(6, dims=3)


@pytest.mark.parametrize("dims", [1, 2])
def test_bn_static_uses_batch_statistics_in_eval_mode(dims: int) -> None:
    """bn_static (spec splitmix.md §2 --no_track_stat): no running statistics, so eval mode normalises with
    the batch's own statistics and gives exactly the training-mode output. Rules out bn_static built as the
    tracked BN (eval would use the initial running stats 0/1 and not normalise this shifted batch)."""
    torch.manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(8, 5, *((4, 4) if dims == 2 else ()))
    static = NormFactory("bn_static")(5, dims=dims)
    assert not static.track_running_stats and static.running_mean is None and not list(static.buffers())
    train_out = static.train()(x)
    torch.testing.assert_close(static.eval()(x), train_out, rtol=0, atol=0)
    assert train_out.mean().abs() < 1e-5  # batch-normalised
    tracked = NormFactory("bn")(5, dims=dims)
    tracked.eval()
    assert not torch.allclose(tracked(x), train_out, atol=1e-2)
    assert NormFactory("bn").tracks_running_stats and not NormFactory("bn_static").tracks_running_stats
    assert not NormFactory("bn_static").conv_bias
