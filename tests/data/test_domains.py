"""Multi-domain data (Split-Mix spec §8): digits_domains' renderings, domain ids through subsets, the domains partitioner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtrust.data.class_subsets import select_classes
from fedtrust.data.datasets import load_dataset, load_digits
from fedtrust.data.domains import DOMAINS
from fedtrust.data.partition import partition
from fedtrust.data.types import ImageSet
from fedtrust.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def dd():
    return load_dataset("digits_domains")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def domain(images: ImageSet, name: str) -> torch.Tensor:
    return images.x[images.domains == DOMAINS.index(name)]


def test_layout_every_domain_holds_the_whole_split_domain_major(dd, digits):
    assert dd.domain_names == DOMAINS and dd.shape == (3, 8, 8)
    for split, base in (("train", digits.train), ("test", digits.test)):
        s = getattr(dd, split)
        n = len(base)
        assert len(s) == 5 * n
        assert s.domains.tolist() == [d for d in range(5) for _ in range(n)]  # domain-major
        assert torch.equal(s.y, base.y.repeat(5))  # every copy keeps its digit's label


def test_plain_is_the_digit_in_three_channels(dd, digits):
    assert torch.equal(domain(dd.train, "plain"), digits.train.x.expand(-1, 3, -1, -1))


def test_inverted_is_255_minus_plain_exactly(dd):
    assert torch.equal(domain(dd.train, "inverted"), 255 - domain(dd.train, "plain"))
    assert torch.equal(domain(dd.test, "inverted"), 255 - domain(dd.test, "plain"))


def test_rotated_equals_a_hand_rotation(dd):
    """90° counter-clockwise: out[i, j] = in[j, W−1−i] (rules out clockwise, a transpose, a flip)."""
    plain, rot = domain(dd.test, "plain"), domain(dd.test, "rotated")
    w = plain.shape[-1]
    hand = torch.empty_like(plain)
    for i in range(w):
        for j in range(w):
            hand[..., i, j] = plain[..., j, w - 1 - i]
    assert torch.equal(rot, hand)


def test_mnist_m_blend_changes_pixels_keeps_labels_and_is_deterministic(dd, digits):
    blend, plain = domain(dd.train, "mnist_m").int(), domain(dd.train, "plain").int()
    assert (plain != blend).float().mean() > 0.5
    assert not torch.equal(blend[:, 0], blend[:, 1])  # colour from the photos, not grey
    assert torch.equal(dd.train.y[dd.train.domains == DOMAINS.index("mnist_m")], digits.train.y)
    assert torch.equal(load_dataset("digits_domains").train.x, dd.train.x)  # fixed seeds, not the run's


def test_noisy_is_plain_plus_clipped_noise_per_channel(dd):
    noisy = domain(dd.train, "noisy")
    diff = noisy.float() - domain(dd.train, "plain").float()
    assert diff.abs().mean() > 20 and (diff != 0).float().mean() > 0.6  # about half the black pixels clip to 0
    assert not torch.equal(noisy[:, 0], noisy[:, 1])


def test_domains_are_pairwise_distinct(dd):
    xs = {n: domain(dd.test, n) for n in DOMAINS}
    for a in DOMAINS:
        for b in DOMAINS:
            if a < b:
                assert (xs[a] != xs[b]).float().mean() > 0.3, (a, b)


def test_domain_ids_survive_id_classes(dd):
    sub = select_classes(dd, [3, 7])
    keep = (dd.test.y == 3) | (dd.test.y == 7)
    assert torch.equal(sub.test.domains, dd.test.domains[keep])
    assert torch.equal(sub.test.x, dd.test.x[keep])
    assert sub.domain_names == DOMAINS and sub.test.y.max() == 1


def test_domain_ids_survive_id_classes_in_the_runner():
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import build_dataset

    data = build_dataset(build_config({}, ["data.dataset=digits_domains", "data.id_classes=[0, 1, 2]"]))
    assert data.train.domains is not None and data.domain_names == DOMAINS
    assert torch.bincount(data.train.domains).tolist() == [len(data.train) // 5] * 5


def test_bad_domain_ids_are_refused():
    x, y = torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(DataError, match="domain ids must lie"):
        ImageSet(x, y, 1, torch.tensor([0, 2]), ("a", "b"))
    with pytest.raises(DataError, match="without domain ids"):
        ImageSet(x, y, 1, None, ("a",))


# ---------------------------------------------------------------- domains partitioner


def test_domains_partitioner_gives_each_domain_its_block_disjoint_and_complete():
    d_ids = np.repeat(np.arange(4), [30, 31, 25, 40])
    labels = np.arange(len(d_ids)) % 10
    parts = partition(labels, "domains", 8, seed=0, domain_ids=d_ids)
    for d in range(4):
        mine = np.sort(np.concatenate(parts[2 * d:2 * d + 2]))
        assert np.array_equal(mine, np.flatnonzero(d_ids == d))  # exactly the domain's samples
        assert abs(len(parts[2 * d]) - len(parts[2 * d + 1])) <= 1  # split evenly
    every = np.concatenate(parts)
    assert len(every) == len(set(every.tolist())) == len(labels)  # disjoint and complete
    again = partition(labels, "domains", 8, seed=0, domain_ids=d_ids)
    other = partition(labels, "domains", 8, seed=1, domain_ids=d_ids)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))  # seeded, shuffled within the domain


def test_domains_partitioner_errors_are_one_line():
    labels = np.zeros(20, dtype=np.int64)
    with pytest.raises(ConfigError) as e:
        partition(labels, "domains", 7, seed=0, domain_ids=np.repeat(np.arange(5), 4))
    assert "multiple of 5" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs a data set with domains"):
        partition(labels, "domains", 5, seed=0)


def test_domains_partition_in_a_federation_records_domain_hist_and_budgets(one_thread):
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import build_federation

    cfg = build_config({}, ["data.dataset=digits_domains", "data.partition=domains", "data.num_clients=10",
                            "data.clients_per_round=2", "budget.distribution=blocks", "model.width=4",
                            "eval.metrics=[accuracy, domain_acc]", "eval.personalized=false"])
    fed = build_federation(cfg)
    hist = np.asarray(fed.partition["domain_hist"])
    assert fed.partition["domain_names"] == list(DOMAINS)
    assert np.array_equal(hist > 0, np.repeat(np.eye(5, dtype=bool), 2, axis=0))  # clients 2d, 2d+1 ↔ domain d
    assert hist.sum() == 5 * 1437
    assert fed.partition["budgets"][:2] == [0.125, 0.125] and fed.partition["budgets"][-2:] == [1.0, 1.0]


def test_mnist_domains_is_mnist_cut_into_disjoint_domain_shares(shared_data):
    mnist = load_dataset("mnist", shared_data)
    md = load_dataset("mnist_domains", shared_data)
    assert md.shape == (3, 28, 28) and md.domain_names == DOMAINS
    for split in ("train", "test"):
        s, base = getattr(md, split), getattr(mnist, split)
        assert len(s) == len(base)
        assert torch.equal(torch.bincount(s.domains), torch.full((5,), len(base) // 5))
        assert torch.equal(s.class_counts(), base.class_counts())  # the shares partition the split
    grey = torch.cat([domain(md.test, "plain")[:, 0], 255 - domain(md.test, "inverted")[:, 0]])
    rows = {bytes(r) for r in mnist.test.x[:, 0].reshape(len(mnist.test), -1).numpy()}
    flat = grey.reshape(len(grey), -1).numpy()
    assert all(bytes(r) in rows for r in flat[:200])  # plain and inverted images are MNIST's own
    assert len({bytes(r) for r in flat}) > 0.99 * len(flat)  # no image in both shares (up to MNIST duplicates)


def test_fashion_mnist_domains_loads(shared_data):
    fd = load_dataset("fashion_mnist_domains", shared_data)
    assert len(fd.test) == 10000 and fd.classes[0] == "T-shirt/top" and fd.domain_names == DOMAINS
