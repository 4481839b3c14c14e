"""What an algorithm is built with (fl/context.py): models of other widths, seeded server randomness."""

from __future__ import annotations

import torch

from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation


def test_new_model_overrides_the_configured_builder_arguments():
    """Rules out overrides that are ignored (every net at the configured width) or that replace the whole
    model config (losing the configured norm)."""
    fed = build_federation(build_config({}, ["model.width=16", "model.norm=none", "eval.personalized=false"]))
    default, half = fed.algorithm.ctx.new_model(), fed.algorithm.ctx.new_model(width=8)
    assert default.num_features == 64 and half.num_features == 32
    norms = {type(m).__name__ for m in half.modules()}
    assert "BatchNorm2d" not in norms  # the configured norm (none) is kept


def test_server_generator_is_seeded_by_seed_round_and_stream_not_the_global_rng():
    """Rules out server randomness drawn from the global RNG (a resumed run would draw differently) or a
    generator that ignores the round."""
    ctx = build_federation(build_config({}, ["eval.personalized=false"])).algorithm.ctx
    torch.manual_seed(123)
    a = torch.rand(4, generator=ctx.generator(3))
    torch.manual_seed(456)
    assert torch.equal(a, torch.rand(4, generator=ctx.generator(3)))
    assert not torch.equal(a, torch.rand(4, generator=ctx.generator(4)))
    assert not torch.equal(a, torch.rand(4, generator=ctx.generator(3, stream=1)))
