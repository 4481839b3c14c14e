"""Every sampled client trains on an equal, disjoint share of the server's outlier pool, a new
share each round (README ``data.outliers``; ``AlgorithmContext.outlier_shares``, rna.md §8 variant A),
checked on the batches the clients' losses actually receive, on both executors.

The pool is an ``npz:`` file whose image i carries i in two pixels, so every outlier row of a
batch (``batch["x_ood"]``, normalised) decodes back to the pool image it came from. 302 images over
3 sampled clients: shares of ⌊302/3⌋ = 100, two images left out; each client (8 steps of 16 ID images)
draws 128 outliers, one pass through its share and part of a second, so it sees its whole share.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import fedtrust.fl.local as local_mod
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.vectorized import VectorizedExecutor
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

POOL = 302
SAMPLED = 3
ROUNDS = 3


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory) -> Path:
    """An 8x8 grey image file whose image i has pixel (0, 0) = i // 256 and (0, 1) = i % 256."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(POOL, 8, 8), dtype=np.uint8)
    ids = np.arange(POOL)
    x[:, 0, 0], x[:, 0, 1] = ids // 256, ids % 256
    path = tmp_path_factory.mktemp("pool") / "pool.npz"
    np.savez(path, x=x)
    return path


def decode(x_ood: torch.Tensor, mean: float, std: float) -> list[int]:
    """Pool ids of normalised outlier images (N, 1, 8, 8)."""
    pixels = torch.round((x_ood[:, 0, 0, :2].double() * std + mean) * 255).long()
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def record_run(executor: str, pool: Path) -> tuple[dict[tuple[int, int], list[int]], dict[tuple[int, int], int]]:
    """(round, client) -> the pool ids in the outlier rows of every batch that client trained on, in
    order, and -> the number of ID images it trained on."""
    cfg = build_config({}, [
        f"executor={executor}", "data.num_clients=4", f"data.clients_per_round={SAMPLED}", "data.partition=iid",
        "data.augment=none", "objective.name=oe", f"data.outliers=npz:{pool}", f"data.num_outliers={POOL}",
        "train.steps=8", "eval.personalized=false", f"rounds={ROUNDS}"])
    fed = build_federation(cfg)
    assert fed.executor.name == executor
    mean, std = fed.dataset.mean[0], fed.dataset.std[0]
    seen: dict[tuple[int, int], list[int]] = defaultdict(list)
    id_images: Counter = Counter()

    def note(round_: int, client: int, batch: dict[str, torch.Tensor]) -> None:
        assert batch["x_ood"].shape[0] == batch["x"].shape[0], "as many outliers as ID images per batch"
        seen[(round_, client)] += decode(batch["x_ood"], mean, std)
        id_images[(round_, client)] += batch["x"].shape[0]

    real_train = local_mod.train_locally
    real_batch, real_execute = VectorizedExecutor._batch, VectorizedExecutor.execute
    current = {}

    def train_spy(plan, data, ctx, normalize):  # sequential: the batch the loss receives
        inner = plan.loss

        def loss(model, params, batch, ref):
            note(ctx.round, ctx.client_id, batch)
            return inner(model, params, batch, ref)

        return real_train(dataclasses.replace(plan, loss=loss), data, ctx, normalize)

    def execute_spy(self, messages, round, store):
        current["round"] = round
        return real_execute(self, messages, round, store)

    def batch_spy(self, clients, t):  # vectorized: the stacked batch the vmapped loss receives, row i = client i
        batch = real_batch(self, clients, t)
        for i, cl in enumerate(clients):
            note(current["round"], cl.cid, {k: v[i] for k, v in batch.items() if k != "y"})
        return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local_mod, "train_locally", train_spy)
        mp.setattr(VectorizedExecutor, "_batch", batch_spy)
        mp.setattr(VectorizedExecutor, "execute", execute_spy)
        torch.manual_seed(0)
        fed.executor.run(fed.algorithm.init(), ClientStore(), 0, ROUNDS)
    return dict(seen), dict(id_images)


@pytest.fixture(scope="module")
def runs(pool_file):
    return {name: record_run(name, pool_file) for name in ("sequential", "vectorized")}


@pytest.mark.parametrize("executor", ["sequential", "vectorized"])
def test_each_sampled_client_trains_on_an_equal_disjoint_share_renewed_every_round(runs, executor):
    """Rules out: overlapping shares (a stride smaller than the share, every client slicing from 0),
    unequal shares (the remainder handed to some clients, ``tensor_split``), the same cut every round
    (a permutation not seeded by the round), a client given the whole pool or another client's share
    (the vectorised group gathering every row from one client's share), and a client that does not
    cycle through its whole share.
    """
    seen, id_images = runs[executor]
    by_round: dict[int, dict[int, set[int]]] = defaultdict(dict)
    for (r, c), ids in seen.items():
        counts = Counter(ids)
        assert max(counts.values()) - min(counts.values()) <= 1, f"round {r} client {c}: not one pass after another"
        assert len(ids) == id_images[(r, c)]
        by_round[r][c] = set(ids)
    assert sorted(by_round) == list(range(1, ROUNDS + 1))
    for r, shares in by_round.items():
        assert len(shares) == SAMPLED, f"round {r}: {sorted(shares)} trained with outliers"
        for c, share in shares.items():
            assert len(share) == POOL // SAMPLED, f"round {r} client {c}: share of {len(share)}, not {POOL // SAMPLED}"
            assert share <= set(range(POOL))
        for (a, sa), (b, sb) in itertools.combinations(shares.items(), 2):
            assert not sa & sb, f"round {r}: clients {a} and {b} share {len(sa & sb)} outliers"
    all_shares = [(r, c, frozenset(s)) for r, shares in by_round.items() for c, s in shares.items()]
    for (r1, c1, s1), (r2, c2, s2) in itertools.combinations(all_shares, 2):
        if r1 != r2:
            assert s1 != s2, f"client {c1} in round {r1} and client {c2} in round {r2} got the same share"
    assert any(len([r for r in by_round if c in by_round[r]]) > 1 for c in range(4)), "no client sampled twice"


def test_both_executors_feed_each_client_the_same_outliers(runs):
    """Rules out: an executor that draws the outlier batches in another order or from another share
    than the sequential reference (so the vectorised executor would train on different data)."""
    assert runs["sequential"] == runs["vectorized"]
