"""Channel-prefix / rolling sub-nets (spec splitmix.md §5; models/slimmable.py): SlimNet, slice_indices,
extract, embed, coverage, submodel.

References: a standalone model built with ``width_ratio=w`` (``create_model``, its own code path) loaded
with the extracted weights; direct ``F.conv2d`` on hand-sliced weights; FedRolex's window definition
(Alam et al., NeurIPS 2022, §3) written out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.models.slimmable import SlimNet, coverage, embed, extract, slice_indices, submodel, window

MODELS = [("cnn", (2, 8, 8)), ("digitnet", (3, 28, 28)), ("preresnet18", (3, 16, 16))]
WIDTHS = [1 / 8, 1 / 4, 1 / 2, 1.0]


def _full(name: str, shape: tuple[int, int, int], norm: str = "bn", seed: int = 0) -> nn.Module:
    """A float64 full-width model whose BN γ, β and running statistics are random (the defaults 1/0/0/1 would
    hide a wrongly sliced BN)."""
    torch.manual_seed(seed)
    model = create_model(name, 5, shape, norm=norm).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                if m.running_mean is not None:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
    return model


def _standalone(name: str, shape: tuple[int, int, int], full: nn.Module, width: float, offset: int = 0,
                norm: str = "bn", **kw: object) -> nn.Module:
    torch.manual_seed(123)
    ref = create_model(name, 5, shape, norm=norm, width_ratio=width, **kw).double()
    ref.load_state_dict(extract(full.state_dict(), slice_indices(full, width, offset)))  # strict: keys and shapes
    return ref


@pytest.mark.parametrize("width", WIDTHS, ids=lambda w: f"w{w:g}")
@pytest.mark.parametrize(("name", "shape"), MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("norm", ["bn", "bn_static"])
def test_slim_forward_equals_the_standalone_width_w_model(name: str, shape, width: float, norm: str) -> None:
    """Spec §5: the full model run at width w (SlimNet) gives exactly the outputs of a model built with
    width_ratio=w that holds extract(...) of the same weights, in eval mode (running statistics sliced) and
    in training mode (batch statistics), in float64; features and head agree too."""
    full = _full(name, shape, norm)
    ref = _standalone(name, shape, full, width, norm=norm)
    slim = SlimNet(full, width)
    x = torch.randn(4, *shape, dtype=torch.float64)
    for mode in (False, True):
        slim.train(mode), ref.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(slim(x), ref(x), rtol=0, atol=1e-12)
            z, logits = slim.forward_features_and_logits(x)
            torch.testing.assert_close(z, ref.features(x), rtol=0, atol=1e-12)
            torch.testing.assert_close(slim.head(z), logits, rtol=0, atol=1e-12)
    assert slim.num_features == ref.num_features == slim.head.in_features
    assert slim.num_classes == 5 and set(slim.state_dict()) == set(full.state_dict())


def test_hetero_slices_are_prefixes() -> None:
    """HeteroFL takes the *first* ceil(w C) channels of every hidden layer (spec §5); input channels and the
    head's outputs are whole. The equivalence test cannot see a suffix or strided choice (both sides would use
    it), so the indices are checked, and the slim forward against F.conv2d on hand-sliced weights."""
    full = _full("cnn", (2, 8, 8))  # widths 32, 64, 128
    idx = slice_indices(full, 1 / 4)
    assert [i.tolist() for i in idx["body.0.0.weight"]] == [list(range(8)), [0, 1], [0, 1, 2], [0, 1, 2]]
    assert idx["body.1.0.weight"][0].tolist() == list(range(16)) and idx["body.1.0.weight"][1].tolist() == list(range(8))
    assert idx["body.1.1.running_mean"][0].tolist() == list(range(16))
    assert [i.tolist() for i in idx["head.weight"]] == [list(range(5)), list(range(32))]
    assert idx["body.0.1.num_batches_tracked"] == ()

    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    slim = SlimNet(full, 1 / 4).eval()

    def layer(h: Tensor, i: int, k: int) -> Tensor:
        conv, bn = full.body[i][0], full.body[i][1]
        h = F.conv2d(h, conv.weight[:k, : h.shape[1]], padding=1)
        return F.relu(F.batch_norm(h, bn.running_mean[:k], bn.running_var[:k], bn.weight[:k], bn.bias[:k], False))

    z = layer(layer(layer(x, 0, 8), 1, 16), 3, 32).mean(dim=(2, 3))
    with torch.no_grad():
        torch.testing.assert_close(slim(x), F.linear(z, full.head.weight[:, :32], full.head.bias))


@pytest.mark.parametrize(("name", "shape"), MODELS, ids=[m[0] for m in MODELS])
def test_gradients_reach_exactly_the_slice(name: str, shape) -> None:
    """Training the slim view trains the full model's parameters: each full gradient equals the standalone
    sub-net's gradient embedded at the slice (embed), and is zero outside it. Rules out a SlimNet that
    trains a detached copy, and an embed that writes to the wrong entries."""
    full = _full(name, shape, "bn_static")
    slim, ref = SlimNet(full, 1 / 4, offset=3), _standalone(name, shape, full, 1 / 4, 3, norm="bn_static")
    x, y = torch.randn(4, *shape, dtype=torch.float64), torch.tensor([0, 1, 2, 4])
    F.cross_entropy(slim(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    idx = slice_indices(full, 1 / 4, offset=3)
    zeros = {k: torch.zeros_like(p) for k, p in full.named_parameters()}
    expected = embed({k: p.grad for k, p in ref.named_parameters()}, {k: idx[k] for k in zeros}, zeros)
    masks = coverage(idx, full.state_dict())
    for k, p in full.named_parameters():
        torch.testing.assert_close(p.grad, expected[k], rtol=1e-10, atol=1e-12)
        assert not p.grad[~masks[k]].any(), k


def test_functional_call_and_vmap() -> None:
    """SlimNet under torch.func: functional_call uses the swapped tensors (not the module's own), and vmap
    over two clients' stacked parameters equals one call per client (forward and gradient), in float64."""
    torch.manual_seed(0)
    full = create_model("preresnet18", 5, (3, 8, 8), norm="bn_static").double()
    slim = SlimNet(full, 1 / 2, offset=5)
    params = {k: v.detach() for k, v in full.named_parameters()}
    stacked = {k: torch.stack([v, v + 0.05 * torch.randn_like(v)]) for k, v in params.items()}
    x, y = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (2, 4))

    def loss(p: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(slim, p, (xb,)), yb)

    other = {k: v[1] for k, v in stacked.items()}
    assert not torch.allclose(functional_call(slim, other, (x[0],)), slim(x[0]))
    grads = vmap(grad(loss))(stacked, x, y)
    for i in range(2):
        one = grad(loss)({k: v[i] for k, v in stacked.items()}, x[i], y[i])
        for k in one:
            torch.testing.assert_close(grads[k][i], one[k], rtol=1e-9, atol=1e-11)
    outs = vmap(lambda p, xb: functional_call(slim, p, (xb,)))(stacked, x)
    torch.testing.assert_close(outs[1], functional_call(slim, other, (x[1],)), rtol=1e-9, atol=1e-11)


def test_sheterofl_rescale_layer_option() -> None:
    """SHeteroFL (§5): slim conv outputs divided by the width ratio in training. SlimNet(rescale_layer=True)
    equals the standalone width-w model with rescale_layer; it changes training outputs (norm 'none' so no BN
    undoes it) and leaves eval outputs alone; None keeps the full model's own option."""
    full = _full("cnn", (2, 8, 8), "none")
    on, off = SlimNet(full, 1 / 2, rescale_layer=True), SlimNet(full, 1 / 2)
    ref = _standalone("cnn", (2, 8, 8), full, 1 / 2, norm="none", rescale_layer=True)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for mode in (True, False):
            on.train(mode), off.train(mode), ref.train(mode)
            torch.testing.assert_close(on(x), ref(x), rtol=0, atol=1e-12)
            assert torch.allclose(on(x), off(x)) == (not mode)
    with pytest.raises(ConfigError, match="rescale_layer needs norm without running statistics"):
        SlimNet(_full("cnn", (2, 8, 8), "bn"), 1 / 2, rescale_layer=True)


def test_tracked_bn_prefix_updates_the_full_running_stats() -> None:
    """Documented behaviour: a training-mode prefix call updates the kept channels' running statistics of the
    full model in place (narrow views) and leaves the others."""
    full = _full("cnn", (2, 8, 8))
    before = full.body[0][1].running_mean.clone()
    SlimNet(full, 1 / 4).train()(torch.randn(4, 2, 8, 8, dtype=torch.float64))
    after = full.body[0][1].running_mean
    assert not torch.equal(after[:8], before[:8]) and torch.equal(after[8:], before[8:])


def test_building_slim_views_draws_nothing_from_the_rng() -> None:
    """The width-w architecture is built on the meta device: a SlimNet, slice_indices or submodel does not move
    the global RNG (a seeded run stays reproducible whether or not it slims)."""
    full = _full("digitnet", (1, 8, 8))
    state = torch.random.get_rng_state()
    SlimNet(full, 1 / 8), slice_indices(full, 1 / 2, 3), submodel(full, 1 / 4)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_submodel_is_the_extracted_standalone_model() -> None:
    full = _full("digitnet", (1, 8, 8))
    sub = submodel(full, 1 / 4, offset=2)
    expected = extract(full.state_dict(), slice_indices(full, 1 / 4, 2))
    assert all(torch.equal(sub.state_dict()[k], v) for k, v in expected.items())
    assert sub.width_ratio == 0.25 and sub.fc1.in_features == 32 * 4 and sub.training == full.training


# ------------------------------------------------------------ FedRolex windows


def test_window_is_fedrolex_cyclic_window() -> None:
    """Alam et al. §3: at round j a layer of K channels keeps {j mod K, ..., j + k - 1 mod K}."""
    assert window(8, 3).tolist() == [0, 1, 2]
    assert window(8, 3, 6).tolist() == [6, 7, 0]
    assert window(8, 3, 13).tolist() == [5, 6, 7]
    assert window(8, 8, 5).tolist() == list(range(8))  # a whole layer keeps its order
    with pytest.raises(ConfigError):
        window(8, 9)


@pytest.mark.parametrize("width", [1 / 8, 1 / 4, 1 / 3, 1 / 2, 3 / 4])
@pytest.mark.parametrize("size", [8, 30, 64, 100])
def test_windows_cover_every_channel(size: int, width: float) -> None:
    """Rolling the window by k = ceil(w C) covers all C channels in ceil(1/w) rolls; rolling by one per round
    (FedRolex) covers them in C - k + 1 consecutive rounds, and C - k rounds leave one out."""
    k = math.ceil(width * size)
    rolls = math.ceil(1 / width)
    assert set(torch.cat([window(size, k, j * k) for j in range(rolls)]).tolist()) == set(range(size))
    per_round = [set(window(size, k, j).tolist()) for j in range(size - k + 1)]
    assert set().union(*per_round) == set(range(size))
    assert set().union(*per_round[:-1]) != set(range(size))


def test_rolling_slices_of_a_model() -> None:
    """slice_indices with an offset rolls every hidden layer's window (conv outputs, BN, the next layer's
    inputs alike); DigitNet's fc1 inputs roll by whole conv3 channels (H/4 * W/4 entries each), not by single
    flattened entries; over the rounds 0..C-1 every channel of every dimension is used (every channel, not
    every weight entry: a 64->64 conv rolls both its windows together, spec note in the module docstring)."""
    full = _full("digitnet", (1, 8, 8))  # conv 64, 64, 128; fc 2048, 512; 2x2 map before fc1
    idx = slice_indices(full, 1 / 4, offset=120)
    conv3 = window(128, 32, 120)
    assert idx["conv3.weight"][0].tolist() == conv3.tolist() == idx["bn3.weight"][0].tolist()
    assert idx["conv3.weight"][1].tolist() == window(64, 16, 120).tolist()
    assert idx["fc1.weight"][1].tolist() == (conv3[:, None] * 4 + torch.arange(4)).reshape(-1).tolist()
    assert idx["fc1.weight"][0].tolist() == window(2048, 512, 120).tolist()
    assert idx["head.weight"][0].tolist() == list(range(5))
    seen = {k: [set() for _ in v] for k, v in idx.items()}
    for j in range(2048 - 512 + 1):
        for k, dims in slice_indices(full, 1 / 4, j).items():
            for d, i in enumerate(dims):
                seen[k][d].update(i.tolist())
    shapes = {k: v.shape for k, v in full.state_dict().items()}
    assert all(seen[k][d] == set(range(n)) for k in seen for d, n in enumerate(shapes[k]))
    cover = coverage(slice_indices(full, 1 / 4, 0), full.state_dict())["conv2.weight"]
    assert cover[:16, :16].all() and not cover[16:].any() and not cover[:, 16:].any()


# ------------------------------------------------------------ server-side helpers


def test_overlap_mean_from_embed_and_coverage() -> None:
    """SHeteroFL's element-wise mean (§5), written with embed/coverage as the module docstring shows: entries
    covered by both clients (the first 8 conv1 channels) average both, entries only the wider client covers
    take its value, untouched entries keep the old value."""
    full = _full("cnn", (2, 8, 8))
    old = {k: v.clone() for k, v in full.state_dict().items()}
    i1, i2 = slice_indices(full, 1 / 4), slice_indices(full, 1 / 2)
    s1 = {k: v + 1.0 for k, v in extract(old, i1).items() if v.is_floating_point()}
    s2 = {k: v + 3.0 for k, v in extract(old, i2).items() if v.is_floating_point()}
    keys = list(s1)
    i1, i2 = {k: i1[k] for k in keys}, {k: i2[k] for k in keys}
    zeros = {k: torch.zeros_like(old[k]) for k in keys}
    w1, w2 = 1.0, 3.0
    e1, e2 = embed(s1, i1, zeros), embed(s2, i2, zeros)
    c1, c2 = coverage(i1, old), coverage(i2, old)
    new = {}
    for k in keys:
        num, den = w1 * e1[k] + w2 * e2[k], w1 * c1[k] + w2 * c2[k]
        new[k] = torch.where(den > 0, num / den.clamp_min(1e-12), old[k])
    w = new["body.0.0.weight"] - old["body.0.0.weight"]
    torch.testing.assert_close(w[:8], torch.full_like(w[:8], (1 * 1 + 3 * 3) / 4))
    torch.testing.assert_close(w[8:16], torch.full_like(w[8:16], 3.0))
    assert torch.equal(w[16:], torch.zeros_like(w[16:]))
    assert torch.equal(embed(s1, i1, old)["body.0.0.weight"][8:], old["body.0.0.weight"][8:])  # out of place
    assert c2["body.1.0.weight"].sum() == 32 * 16 * 9 and c1["head.bias"].all()


def test_extract_returns_new_tensors() -> None:
    full = _full("cnn", (2, 8, 8))
    sub = extract(full.state_dict(), slice_indices(full, 1.0))
    sub["head.bias"].add_(1.0)
    assert not torch.equal(sub["head.bias"], full.head.bias)


# ------------------------------------------------------------ errors


@pytest.mark.parametrize("width", [0, 0.0, 1.5, -0.5, True, "half"])
def test_bad_width_is_a_one_line_error(width: object) -> None:
    full = _full("cnn", (2, 8, 8))
    for build in (lambda: SlimNet(full, width), lambda: slice_indices(full, width)):  # type: ignore[arg-type]
        with pytest.raises(ConfigError) as excinfo:
            build()
        assert "width must be a number in (0, 1]" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_non_scalable_model_and_bad_offset_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="cnn2 has no width_ratio|TwoConvCNN has no width_ratio"):
        slice_indices(create_model("cnn2", 10, (1, 8, 8)), 0.5)
    with pytest.raises(ConfigError, match="offset must be an integer"):
        SlimNet(_full("cnn", (2, 8, 8)), 0.5, offset=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head is a view"):
        SlimNet(_full("cnn", (2, 8, 8)), 0.5).reset_head(3)
