"""runner/federation.py: the data options it wires from the config (normalisation, long-tail order,
drop_last) reach training and evaluation alike."""

from __future__ import annotations

import numpy as np
import torch

from fedtrust.data.augment import normalize
from fedtrust.data.longtail import longtail_counts, make_longtail
from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.local import client_schedule
from fedtrust.fl.types import Message
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation, build_longtail

SMALL = ["data.num_clients=4", "data.clients_per_round=2", "eval.personalized=false"]


def one_round(fed) -> Message:
    torch.manual_seed(0)
    state = fed.algorithm.init()
    return SequentialExecutor(fed.algorithm, fed.data, fed.config.seed, fed.device, 2).run(state, ClientStore(), 0, 1)


def test_normalize_none_is_x_over_255_for_training_and_evaluation_and_changes_the_run():
    """Rules out ``none`` still subtracting the mean (inputs outside [0, 1]), evaluation normalising
    differently from training, ``dataset`` changing (the default must be today's mean/std), and a key
    that is read but not wired (the run would not change)."""
    default, explicit = build_federation(build_config({}, SMALL)), build_federation(
        build_config({}, [*SMALL, "data.normalize=dataset"]))
    identity = build_federation(build_config({}, [*SMALL, "data.normalize=none"]))
    x = default.data.train.x[:64]
    before = normalize(x, default.dataset.mean, default.dataset.std)  # what every run did so far
    assert torch.equal(default.algorithm.ctx.normalize(x), before)
    assert torch.equal(explicit.algorithm.ctx.normalize(x), before)
    plain = identity.algorithm.ctx.normalize(x)
    assert torch.equal(plain, x.to(plain.dtype) / 255) and plain.min() >= 0 and plain.max() <= 1 and plain.max() > 0.5
    assert before.min() < 0  # the data set's normalisation is not in [0, 1], so the two are told apart
    for fed in (default, identity):
        assert fed.eval_setup.normalize is fed.algorithm.ctx.normalize
    a, b, c = one_round(default), one_round(explicit), one_round(identity)
    assert all(torch.equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    assert any(not torch.allclose(a.arrays[k].float(), c.arrays[k].float()) for k in a.arrays)


def test_longtail_order_random_keeps_the_counts_draws_other_images_and_is_seeded():
    """Rules out ``random`` changing the class counts, keeping the file-order images anyway (rng ignored),
    an unseeded draw, a draw that ignores the partition seed, and ``first`` changing."""
    base = [*SMALL, "data.imbalance_ratio=10"]
    fed = build_federation(build_config({}, base))
    labels = fed.dataset.train.y.numpy()
    first = build_longtail(build_config({}, base), labels, 10)
    assert np.array_equal(first, make_longtail(labels, 10, 10))
    rand = build_longtail(build_config({}, [*base, "data.longtail_order=random"]), labels, 10)
    again = build_longtail(build_config({}, [*base, "data.longtail_order=random"]), labels, 10)
    other = build_longtail(build_config({}, [*base, "data.longtail_order=random", "data.partition_seed=1"]), labels, 10)
    counts = np.bincount(labels[first], minlength=10)
    assert counts.tolist() == longtail_counts(np.bincount(labels), 10, 10)
    assert np.bincount(labels[rand], minlength=10).tolist() == counts.tolist()
    assert np.array_equal(rand, again) and not np.array_equal(rand, first) and not np.array_equal(rand, other)
    assert len(np.intersect1d(rand, first)) < 0.9 * len(first)
    assert build_longtail(build_config({}, SMALL), labels, 10) is None  # imbalance_ratio 1: the whole set
    shuffled = build_federation(build_config({}, [*base, "data.longtail_order=random"]))
    assert torch.equal(shuffled.data.train.y.bincount(), fed.data.train.y.bincount())
    assert not torch.equal(shuffled.data.train.x, fed.data.train.x)


def test_drop_last_reaches_the_client_plan():
    """Rules out a config key that never reaches LocalTraining (the schedule would keep short batches)."""
    fed = build_federation(build_config({}, [*SMALL, "train.drop_last=true", "train.batch_size=64"]))
    torch.manual_seed(0)
    message = fed.algorithm.configure(fed.algorithm.init(), 1, [0])[0]
    ctx = fed.executor.client_context(0, 1)
    plan = fed.algorithm.local_training(message, Message(), ctx)
    assert plan.drop_last is True
    n = len(fed.data.indices[0])
    assert n % 64 and n > 64
    sizes = [len(b) for b in client_schedule(plan, n, ctx.generator).batches]
    assert sizes == [64] * (n // 64)
