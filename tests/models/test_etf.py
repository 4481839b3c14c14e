"""SSE-C (spec fedloge.md §3): ETF geometry, exact sparsity, refinement towards norm target and ETF angles."""

import math

import pytest
import torch

from fedtrust.errors import ConfigError
from fedtrust.models.etf import (
    build_sse_c, column_cosines, etf_angle, nearest_angles, refine, refine_loss, simplex_etf, sparsify,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("d,k", [(10, 10), (32, 10), (128, 10), (512, 100)])
def test_simplex_etf_has_unit_columns_and_cosine_minus_one_over_k_minus_one(d, k):
    m = simplex_etf(d, k, gen())
    assert m.shape == (d, k)
    assert torch.allclose(m.norm(dim=0), torch.ones(k), atol=1e-5)
    cos = column_cosines(m)
    off = cos[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (k - 1)), atol=1e-5)
    assert torch.allclose(m.sum(dim=1), torch.zeros(d), atol=1e-5)  # columns sum to zero


def test_simplex_etf_is_a_function_of_the_generator():
    assert torch.equal(simplex_etf(32, 10, gen(3)), simplex_etf(32, 10, gen(3)))
    assert not torch.equal(simplex_etf(32, 10, gen(3)), simplex_etf(32, 10, gen(4)))


def test_simplex_etf_rejects_d_below_k_in_one_line():
    with pytest.raises(ConfigError, match="d >= K"):
        simplex_etf(8, 10, gen())


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.95])
def test_sparsify_zeroes_exactly_floor_fraction_d_k_entries(fraction):
    m = simplex_etf(64, 10, gen())
    sparse, mask = sparsify(m, fraction, gen(1))
    assert int((mask == 0).sum()) == math.floor(fraction * 64 * 10)
    assert torch.equal(sparse, m * mask)
    assert int((sparse == 0).sum()) == math.floor(fraction * 64 * 10)  # ETF entries are never exactly 0


def test_refine_keeps_pruned_entries_zero_and_lowers_the_loss():
    sparse, mask = sparsify(simplex_etf(64, 10, gen()), 0.6, gen(1))
    out = refine(sparse, mask, target=0.1, steps=50, lr=1e-3)
    assert torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert refine_loss(out, 0.1) < refine_loss(sparse, 0.1)


def test_refined_sse_c_reaches_norm_target_and_near_etf_angles():
    # lr 1e-3 for 600 steps stands in for the paper's 1e-4 x 10,000 (same trajectory scale, fast test)
    k = 10
    head = build_sse_c(128, k, gen(), sparsity=0.6, target=0.1, steps=600, lr=1e-3)
    m = head.weight.detach().T
    sparse = simplex_etf(128, k, gen())
    before = nearest_angles(sparsify(sparse, 0.6, torch.Generator().manual_seed(0))[0])
    assert int((m == 0).sum()) == math.floor(0.6 * 128 * k)
    assert torch.allclose(m.norm(dim=0), torch.full((k,), 0.1), atol=0.01)
    etf = math.degrees(etf_angle(k))
    angles = torch.rad2deg(nearest_angles(m))
    assert abs(float(angles.mean()) - etf) < 0.5 and float(angles.min()) > etf - 1.0
    assert float(torch.rad2deg(before).mean()) < etf - 5  # sparsifying broke the angles; refining restored them


def test_sse_c_is_frozen_and_its_bias_choice_is_applied():
    zero = build_sse_c(32, 10, gen(), steps=5, bias="zero")
    rand = build_sse_c(32, 10, gen(), steps=5, bias="random")
    assert not any(p.requires_grad for p in zero.parameters())
    assert torch.equal(zero.bias, torch.zeros(10))
    bound = 1 / math.sqrt(32)
    assert rand.bias.abs().max() <= bound and rand.bias.abs().min() > 0
    assert torch.equal(zero.weight, rand.weight)  # the bias draw comes after the weight's
    with pytest.raises(ConfigError, match="bias"):
        build_sse_c(32, 10, gen(), steps=0, bias="ones")
